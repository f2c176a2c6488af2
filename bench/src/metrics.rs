//! Metric math over what the client observed: per-request records in, a [`RunSummary`]
//! out. Pure functions, so every number in a report can be checked by hand.
//!
//! Timing is the client's: a record holds the instant the request was sent and the
//! arrival instant of every SSE chunk that carried output (monotonic clock), never what
//! the server says about itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a request did not complete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FailReason {
    /// HTTP 429: the server shed load. Counted apart from the other failures.
    RateLimited,
    /// Any other non-2xx status.
    Http(u16),
    /// Could not connect or the connection broke before a response.
    Connect,
    /// The response stream broke, carried an error object, or could not be parsed.
    Stream,
    /// The stream ended without a single output token.
    Empty,
    /// The per-request timeout passed.
    Timeout,
    /// Still in flight when the run was interrupted (Ctrl-C / SIGTERM). Counted apart:
    /// the server did nothing wrong.
    Cancelled,
    /// Still in flight at the end of a `--duration --cut-off` run: cancelled by plan. Its
    /// tokens count in the throughput; its latencies do not.
    CutOff,
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RateLimited => write!(f, "http_429"),
            Self::Http(code) => write!(f, "http_{code}"),
            Self::Connect => write!(f, "connect"),
            Self::Stream => write!(f, "stream"),
            Self::Empty => write!(f, "empty"),
            Self::Timeout => write!(f, "timeout"),
            Self::Cancelled => write!(f, "cancelled"),
            Self::CutOff => write!(f, "cut_off"),
        }
    }
}

/// What the client saw for one request. Times are offsets from the request's send time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    /// Send time, as an offset from the start of the run.
    pub sent_at: Duration,
    /// Arrival of each SSE chunk that carried output text, in order.
    pub chunk_arrivals: Vec<Duration>,
    /// When the response finished (stream end or error).
    pub end: Duration,
    /// Prompt length in tokens (as generated, or as the server reported it).
    pub prompt_tokens: u32,
    /// Output tokens: the server's usage count when given, else our own count.
    pub output_tokens: u32,
    /// `None` when the request completed.
    pub failure: Option<FailReason>,
    /// The failure's detail (status body, error text), for the first few failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A 429's `Retry-After` (whole seconds), when the server sent one.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl RequestRecord {
    /// Time to first token: send → first chunk with output.
    pub fn ttft(&self) -> Option<Duration> {
        self.chunk_arrivals.first().copied()
    }

    /// Gaps between successive output chunks.
    pub fn itls(&self) -> impl Iterator<Item = Duration> + '_ {
        self.chunk_arrivals
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
    }

    /// Time per output token after the first: (e2e − ttft) / (output_tokens − 1).
    /// `None` for single-token outputs, where it is undefined.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft()?;
        if self.output_tokens < 2 {
            return None;
        }
        Some(self.end.saturating_sub(ttft) / (self.output_tokens - 1))
    }
}

/// Service-level objectives for goodput: a request is "good" when it meets every one set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft: Option<Duration>,
    pub tpot: Option<Duration>,
    pub itl: Option<Duration>,
    pub e2e: Option<Duration>,
}

impl Slo {
    pub fn is_empty(&self) -> bool {
        self.ttft.is_none() && self.tpot.is_none() && self.itl.is_none() && self.e2e.is_none()
    }

    /// Whether a completed request meets every objective. A missing TPOT (one output
    /// token) meets a TPOT objective; the max ITL is checked against the ITL objective.
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        if r.failure.is_some() {
            return false;
        }
        let le = |obj: Option<Duration>, v: Option<Duration>| match (obj, v) {
            (Some(o), Some(v)) => v <= o,
            _ => true,
        };
        le(self.ttft, r.ttft())
            && le(self.tpot, r.tpot())
            && le(self.itl, r.itls().max())
            && le(self.e2e, Some(r.end))
    }
}

/// Summary statistics of one latency metric, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// Statistics of `values` (milliseconds). All zeros when empty.
    pub fn from_ms(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        Self {
            count: values.len(),
            mean,
            min: values[0],
            p50: percentile_sorted(&values, 50.0),
            p90: percentile_sorted(&values, 90.0),
            p95: percentile_sorted(&values, 95.0),
            p99: percentile_sorted(&values, 99.0),
            max: values[values.len() - 1],
        }
    }
}

/// The `p`-th percentile of sorted values with linear interpolation between closest
/// ranks (numpy's default): rank = p/100 · (n − 1).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Everything reported for one load point.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSummary {
    /// The offered load, e.g. "rate=4/s" or "concurrency=8".
    pub load: String,
    /// Numeric load for plots: requests/s for open loop, in-flight cap for closed loop.
    pub load_value: f64,
    /// First send → last response end, in seconds.
    pub duration_s: f64,
    pub completed: u64,
    pub failed: u64,
    /// HTTP 429s, counted apart (they are not in `failed`).
    pub rate_limited: u64,
    /// Requests still in flight when the run was interrupted (not in `failed`).
    #[serde(default)]
    pub cancelled: u64,
    /// Requests in flight at the end of a `--cut-off` run (not in `failed` or
    /// `completed`; their tokens are in the token totals and throughputs).
    #[serde(default)]
    pub cut_off: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Tokens of the completed requests (and of those cut off, when the run cuts off).
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// Completed requests per second.
    pub request_throughput: f64,
    pub output_throughput: f64,
    /// (input + output tokens of completed and cut-off requests) per second.
    pub total_token_throughput: f64,
    pub ttft_ms: Dist,
    pub itl_ms: Dist,
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    /// Requests per second that met every SLO; `None` without SLOs.
    pub goodput: Option<f64>,
    /// Share of completed requests that met every SLO.
    pub slo_attainment: Option<f64>,
    /// Server-side gauges scraped during the run, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<crate::scrape::ServerStats>,
}

/// Summarise one run's records.
pub fn summarize(load: &str, load_value: f64, records: &[RequestRecord], slo: &Slo) -> RunSummary {
    let mut s = RunSummary {
        load: load.to_string(),
        load_value,
        ..Default::default()
    };
    let (mut ttft, mut itl, mut tpot, mut e2e) = (vec![], vec![], vec![], vec![]);
    let mut good = 0u64;
    let first = records.iter().map(|r| r.sent_at).min().unwrap_or_default();
    let last = records
        .iter()
        .map(|r| r.sent_at + r.end)
        .max()
        .unwrap_or_default();
    for r in records {
        match &r.failure {
            Some(FailReason::RateLimited) => s.rate_limited += 1,
            Some(FailReason::Cancelled) => s.cancelled += 1,
            Some(FailReason::CutOff) => {
                s.cut_off += 1;
                s.total_input_tokens += u64::from(r.prompt_tokens);
                s.total_output_tokens += u64::from(r.output_tokens);
            }
            Some(reason) => {
                s.failed += 1;
                *s.failed_by_reason.entry(reason.to_string()).or_default() += 1;
            }
            None => {
                s.completed += 1;
                s.total_input_tokens += u64::from(r.prompt_tokens);
                s.total_output_tokens += u64::from(r.output_tokens);
                ttft.extend(r.ttft().map(ms));
                itl.extend(r.itls().map(ms));
                tpot.extend(r.tpot().map(ms));
                e2e.push(ms(r.end));
                good += u64::from(slo.met_by(r));
            }
        }
    }
    s.duration_s = last.saturating_sub(first).as_secs_f64();
    if s.duration_s > 0.0 {
        s.request_throughput = s.completed as f64 / s.duration_s;
        s.output_throughput = s.total_output_tokens as f64 / s.duration_s;
        s.total_token_throughput =
            (s.total_input_tokens + s.total_output_tokens) as f64 / s.duration_s;
    }
    if !slo.is_empty() {
        s.goodput = Some(if s.duration_s > 0.0 {
            good as f64 / s.duration_s
        } else {
            0.0
        });
        s.slo_attainment = Some(if s.completed > 0 {
            good as f64 / s.completed as f64
        } else {
            0.0
        });
    }
    s.ttft_ms = Dist::from_ms(ttft);
    s.itl_ms = Dist::from_ms(itl);
    s.tpot_ms = Dist::from_ms(tpot);
    s.e2e_ms = Dist::from_ms(e2e);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn rec(sent: u64, chunks: &[u64], end: u64, out: u32) -> RequestRecord {
        RequestRecord {
            sent_at: d(sent),
            chunk_arrivals: chunks.iter().map(|&c| d(c)).collect(),
            end: d(end),
            prompt_tokens: 10,
            output_tokens: out,
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // rank = 0.5 * 9 = 4.5 → between 5 and 6.
        assert_eq!(percentile_sorted(&v, 50.0), 5.5);
        // rank = 0.9 * 9 = 8.1 → 9 + 0.1.
        assert!((percentile_sorted(&v, 90.0) - 9.1).abs() < 1e-12);
        // rank = 0.99 * 9 = 8.91 → 9.91.
        assert!((percentile_sorted(&v, 99.0) - 9.91).abs() < 1e-12);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert_eq!(percentile_sorted(&v, 100.0), 10.0);
        assert_eq!(percentile_sorted(&[7.0], 99.0), 7.0);
        assert_eq!(percentile_sorted(&[], 50.0), 0.0);
    }

    #[test]
    fn dist_of_unsorted_values() {
        let dist = Dist::from_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(dist.count, 4);
        assert_eq!(dist.mean, 2.5);
        assert_eq!(dist.min, 1.0);
        assert_eq!(dist.max, 4.0);
        assert_eq!(dist.p50, 2.5);
    }

    #[test]
    fn ttft_itl_tpot_from_a_synthetic_event_stream() {
        // Chunks arrive at 100, 120, 150, 160 ms; stream ends at 170 ms; 4 tokens.
        let r = rec(0, &[100, 120, 150, 160], 170, 4);
        assert_eq!(r.ttft(), Some(d(100)));
        assert_eq!(r.itls().collect::<Vec<_>>(), vec![d(20), d(30), d(10)]);
        // (170 − 100) / 3 = 23.333 ms.
        assert_eq!(r.tpot(), Some(Duration::from_nanos(23_333_333)));
        assert_eq!(rec(0, &[100], 100, 1).tpot(), None);
    }

    #[test]
    fn summary_counts_throughput_and_goodput() {
        let records = vec![
            // Good: ttft 100, tpot (300-100)/4 = 50.
            rec(0, &[100, 150, 200, 250, 300], 300, 5),
            // Bad TTFT (600 > 500).
            rec(100, &[600, 610], 620, 2),
            // Good: ttft 50, tpot 10. Ends at 200 + 60 = 260.
            rec(200, &[50, 60], 60, 2),
            RequestRecord {
                sent_at: d(300),
                end: d(10),
                failure: Some(FailReason::RateLimited),
                ..Default::default()
            },
            RequestRecord {
                sent_at: d(400),
                end: d(1000),
                failure: Some(FailReason::Http(500)),
                ..Default::default()
            },
        ];
        let slo = Slo {
            ttft: Some(d(500)),
            tpot: Some(d(50)),
            ..Default::default()
        };
        let s = summarize("rate=1/s", 1.0, &records, &slo);
        assert_eq!((s.completed, s.failed, s.rate_limited), (3, 1, 1));
        assert_eq!(s.failed_by_reason.get("http_500"), Some(&1));
        // First send 0 ms, last end 400 + 1000 = 1400 ms.
        assert!((s.duration_s - 1.4).abs() < 1e-9);
        assert!((s.request_throughput - 3.0 / 1.4).abs() < 1e-9);
        assert_eq!(s.total_output_tokens, 9);
        assert!((s.output_throughput - 9.0 / 1.4).abs() < 1e-9);
        assert!((s.total_token_throughput - 39.0 / 1.4).abs() < 1e-9);
        assert!((s.goodput.unwrap() - 2.0 / 1.4).abs() < 1e-9);
        assert!((s.slo_attainment.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        // TTFTs 100, 600, 50 → sorted 50, 100, 600; p50 = 100, mean = 250.
        assert_eq!(s.ttft_ms.p50, 100.0);
        assert_eq!(s.ttft_ms.mean, 250.0);
        // ITLs: 50,50,50,50, 10, 10 → p50 = 50, max 50.
        assert_eq!(s.itl_ms.count, 6);
        assert_eq!(s.itl_ms.p50, 50.0);
        assert_eq!(s.itl_ms.min, 10.0);
        // E2E: 300, 620, 60.
        assert_eq!(s.e2e_ms.max, 620.0);
    }

    #[test]
    fn no_slo_means_no_goodput() {
        let s = summarize("c=1", 1.0, &[rec(0, &[1, 2], 2, 2)], &Slo::default());
        assert_eq!(s.goodput, None);
    }
}
