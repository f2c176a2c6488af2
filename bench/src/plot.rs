//! Plots, each written as PNG and SVG: for a sweep, latency percentiles and throughput
//! against the offered load; for one load point, TTFT and ITL histograms.
//!
//! Text is drawn with DejaVu Sans Mono, compiled in (`assets/`, Bitstream Vera licence,
//! redistributable), so plots carry labels on hosts without fontconfig or system fonts.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::RunSummary;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const SIZE: (u32, u32) = (1400, 900);
/// Distinguishable on white (matplotlib's tab10).
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];

/// A plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {msg}")]
pub struct PlotError {
    path: String,
    msg: String,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::error!("the bundled plot font did not load; plots will lack text");
        }
    });
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A named line of (x, y) points.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// Write `<dir>/<stem>.png` and `<dir>/<stem>.svg`; returns both paths.
fn both(
    dir: &Path,
    stem: &str,
    png_draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult<BitMapBackend<'_>>,
    svg_draw: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult<SVGBackend<'_>>,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let err = |p: &Path, e: String| PlotError {
        path: p.display().to_string(),
        msg: e,
    };
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        png_draw(root.clone()).map_err(|e| err(&png, e.to_string()))?;
        root.present().map_err(|e| err(&png, e.to_string()))?;
    }
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        svg_draw(root.clone()).map_err(|e| err(&svg, e.to_string()))?;
        root.present().map_err(|e| err(&svg, e.to_string()))?;
    }
    Ok(vec![png, svg])
}

/// One panel: several named (x, y) series on shared axes.
fn lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series<'_>],
) -> DrawResult<DB> {
    let xs = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1));
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y_hi = ys.fold(0.0, f64::max);
    let pad = ((x_hi - x_lo) * 0.05).max(0.5);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo - pad)..(x_hi + pad), 0.0..(y_hi * 1.1).max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Latency percentiles and throughput against load, one point per run.
pub fn sweep(
    dir: &Path,
    stem: &str,
    runs: &[RunSummary],
    x_desc: &str,
) -> Result<Vec<PathBuf>, PlotError> {
    let pts = |f: &dyn Fn(&RunSummary) -> f64| {
        runs.iter()
            .map(|r| (r.load_value, f(r)))
            .collect::<Vec<_>>()
    };
    let ttft = [
        ("p50", pts(&|r| r.ttft_ms.p50)),
        ("p90", pts(&|r| r.ttft_ms.p90)),
        ("p99", pts(&|r| r.ttft_ms.p99)),
    ];
    let tpot = [
        ("TPOT p50", pts(&|r| r.tpot_ms.p50)),
        ("TPOT p99", pts(&|r| r.tpot_ms.p99)),
        ("ITL p99", pts(&|r| r.itl_ms.p99)),
    ];
    let e2e = [
        ("p50", pts(&|r| r.e2e_ms.p50)),
        ("p99", pts(&|r| r.e2e_ms.p99)),
    ];
    let mut thr = vec![("output tok/s", pts(&|r| r.output_throughput))];
    if runs.iter().any(|r| r.goodput.is_some()) {
        // Goodput is in requests/s; scale it to tokens/s by the mean output length.
        thr.push((
            "goodput (req/s x mean out len)",
            pts(&|r| {
                let per_req = r.total_output_tokens as f64 / (r.completed.max(1) as f64);
                r.goodput.unwrap_or(0.0) * per_req
            }),
        ));
    }
    let panels = [
        ("TTFT", "ms", &ttft[..]),
        ("TPOT / ITL", "ms", &tpot[..]),
        ("End-to-end latency", "ms", &e2e[..]),
        ("Throughput", "tokens/s", &thr[..]),
    ];
    grid(dir, stem, x_desc, &panels)
}

/// Four panels (title, y axis, series) in a 2 × 2 grid sharing the x axis description.
pub fn grid(
    dir: &Path,
    stem: &str,
    x_desc: &str,
    panels: &[(&str, &str, &[Series<'_>])],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        dir,
        stem,
        |r| draw_grid(r, x_desc, panels),
        |r| draw_grid(r, x_desc, panels),
    )
}

fn draw_grid<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    x_desc: &str,
    panels: &[(&str, &str, &[Series<'_>])],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    for (area, (title, y_desc, series)) in root.split_evenly((2, 2)).iter().zip(panels) {
        lines(area, title, x_desc, y_desc, series)?;
    }
    Ok(())
}

/// TTFT and ITL histograms of one run (values in ms).
pub fn distributions(
    dir: &Path,
    stem: &str,
    title: &str,
    ttft_ms: &[f64],
    itl_ms: &[f64],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        dir,
        stem,
        |r| draw_hists(r, title, ttft_ms, itl_ms),
        |r| draw_hists(r, title, ttft_ms, itl_ms),
    )
}

fn draw_hists<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    ttft_ms: &[f64],
    itl_ms: &[f64],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 26))?;
    let panels = root.split_evenly((1, 2));
    histogram(&panels[0], "TTFT", ttft_ms)?;
    histogram(&panels[1], "ITL", itl_ms)
}

fn histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    values: &[f64],
) -> DrawResult<DB> {
    const BINS: usize = 40;
    let lo = values
        .iter()
        .copied()
        .fold(f64::MAX, f64::min)
        .min(f64::MAX);
    let lo = if values.is_empty() { 0.0 } else { lo };
    let hi = values.iter().copied().fold(lo, f64::max);
    let width = ((hi - lo) / BINS as f64).max(1e-6);
    let mut counts = [0u32; BINS];
    for &v in values {
        counts[(((v - lo) / width) as usize).min(BINS - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{name} ({} samples)", values.len()),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..(lo + width * BINS as f64), 0u32..(top + top / 10 + 1))?;
    chart
        .configure_mesh()
        .x_desc(format!("{name} (ms)"))
        .y_desc("requests")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
        let x0 = lo + width * i as f64;
        Rectangle::new([(x0, 0), (x0 + width, c)], COLORS[0].mix(0.8).filled())
    }))?;
    Ok(())
}
