//! Drives one load point: closed loop (N requests always in flight), open loop (arrivals
//! at a rate, Poisson or gamma) or trace replay (arrivals at the trace's timestamps).
//! Requests are taken from the workload in order and cycled when the run outlasts it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::arrival::{ArrivalError, Arrivals};
use crate::client::ClientConfig;
use crate::metrics::{FailReason, RequestRecord};
use crate::workload::RequestSpec;

/// The longest `Retry-After` a lane honours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The shape of the offered load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Closed loop: this many requests in flight at all times.
    Concurrency(usize),
    /// Open loop: arrivals at `rate`/s (∞ = all at once), at most `max_concurrency` in flight.
    Rate {
        rate: f64,
        burstiness: f64,
        max_concurrency: Option<usize>,
    },
    /// Replay the workload's own timestamps.
    Trace,
}

impl Load {
    /// A label for tables and JSON, e.g. `rate=4/s` or `concurrency=8`.
    pub fn label(&self) -> String {
        match self {
            Load::Concurrency(c) => format!("concurrency={c}"),
            Load::Rate { rate, .. } if rate.is_infinite() => "rate=inf".into(),
            Load::Rate { rate, .. } => format!("rate={rate}/s"),
            Load::Trace => "trace".into(),
        }
    }

    /// The number plotted on a sweep's x axis (∞ rate plots as 0 until the summary
    /// replaces it with the achieved rate).
    pub fn value(&self) -> f64 {
        match *self {
            Load::Concurrency(c) => c as f64,
            Load::Rate { rate, .. } if rate.is_finite() => rate,
            _ => 0.0,
        }
    }
}

/// One load point to run.
#[derive(Debug, Clone)]
pub struct Point {
    pub load: Load,
    /// Stop sending after this many requests (warm-up not included).
    pub num_requests: Option<usize>,
    /// Stop sending after this long; in-flight requests still finish and count, unless
    /// `cut_off`.
    pub duration: Option<Duration>,
    /// At the end of `duration`, cancel what is still in flight (recorded as
    /// [`FailReason::CutOff`], keeping the tokens that had arrived).
    pub cut_off: bool,
    /// After a 429 with `Retry-After`, hold the lane or slot that long (at most
    /// [`MAX_RETRY_AFTER`], never past the deadline) before it sends again.
    pub honor_retry_after: bool,
    pub seed: u64,
    pub progress: bool,
}

/// Run a point; returns the record of every request that was sent: finished, failed, or
/// (when `shutdown` fires) cancelled in flight.
pub async fn run_point(
    client: Arc<ClientConfig>,
    http: reqwest::Client,
    requests: Arc<Vec<RequestSpec>>,
    point: &Point,
    shutdown: CancellationToken,
) -> Result<Vec<RequestRecord>, ArrivalError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let limit = point.num_requests.unwrap_or(usize::MAX);
    let deadline = point.duration.map(|d| start + d);
    let bar = progress_bar(point);
    let times: Vec<Option<Duration>> = requests.iter().map(|r| r.at).collect();
    // Cancels what is in flight: on shutdown, or at the deadline when the run cuts off.
    let stop = shutdown.child_token();
    let honor_retry_after = point.honor_retry_after;
    let cut_off = match deadline.filter(|_| point.cut_off) {
        Some(at) => {
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                stop.cancel();
            }))
        }
        None => None,
    };
    let send = move |i: usize,
                     tasks: &mut JoinSet<()>,
                     permit: Option<tokio::sync::OwnedSemaphorePermit>| {
        let (client, http, tx, spec) = (client.clone(), http.clone(), tx.clone(), requests.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let spec = &spec[i % spec.len()];
            if stop.is_cancelled() {
                return; // never sent: nothing to count
            }
            let sent_at = start.elapsed();
            // On shutdown the request ends as `Cancelled` and is still recorded, so an
            // interrupted run reports what was in flight instead of losing it.
            let mut rec = client.send(&http, spec, &stop).await;
            rec.sent_at = sent_at;
            let wait = rec
                .retry_after
                .filter(|_| honor_retry_after && rec.failure == Some(FailReason::RateLimited));
            let _ = tx.send(rec);
            if let (Some(wait), Some(_)) = (wait, &permit) {
                let until = Instant::now() + wait.min(MAX_RETRY_AFTER);
                let until = deadline.map_or(until, |d| until.min(d));
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            }
            drop(permit);
        });
    };
    let past_deadline = move || deadline.is_some_and(|d| Instant::now() >= d);

    let dispatcher = {
        let shutdown = shutdown.clone();
        let load = point.load;
        let seed = point.seed;
        async move {
            let mut tasks = JoinSet::new();
            match load {
                Load::Concurrency(c) => {
                    // `c` lanes; each lane sends its next request when its last one ends.
                    let sem = Arc::new(Semaphore::new(c.max(1)));
                    let mut sent = 0usize;
                    loop {
                        let permit = tokio::select! {
                            // A lane freed by the shutdown itself must not send again.
                            biased;
                            _ = shutdown.cancelled() => break,
                            p = sem.clone().acquire_owned() => p.expect("semaphore is never closed"),
                        };
                        let i = sent;
                        sent += 1;
                        if i >= limit || past_deadline() {
                            break;
                        }
                        send(i, &mut tasks, Some(permit));
                        reap(&mut tasks);
                    }
                }
                Load::Rate {
                    rate,
                    burstiness,
                    max_concurrency,
                } => {
                    let mut arrivals = Arrivals::new(rate, burstiness, seed)?;
                    let sem = max_concurrency.map(|c| Arc::new(Semaphore::new(c.max(1))));
                    let mut at = Duration::ZERO;
                    for i in 0..limit {
                        if i > 0 {
                            at += arrivals.next_gap();
                        }
                        if deadline.is_some_and(|d| start + at >= d)
                            || !wait_until(start + at, &shutdown).await
                        {
                            break;
                        }
                        let permit = match &sem {
                            None => None,
                            Some(s) => tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => break,
                                p = s.clone().acquire_owned() => Some(p.expect("semaphore is never closed")),
                            },
                        };
                        send(i, &mut tasks, permit);
                        reap(&mut tasks);
                    }
                }
                Load::Trace => {
                    for (i, at) in times.iter().enumerate().take(limit) {
                        let at = at.unwrap_or_default();
                        if deadline.is_some_and(|d| start + at >= d)
                            || !wait_until(start + at, &shutdown).await
                        {
                            break;
                        }
                        send(i, &mut tasks, None);
                        reap(&mut tasks);
                    }
                }
            }
            while tasks.join_next().await.is_some() {}
            Ok::<(), ArrivalError>(())
        }
    };
    let dispatcher = tokio::spawn(dispatcher);
    let mut records = Vec::new();
    let (mut errors, mut ttft_sum) = (0u64, 0f64);
    while let Some(rec) = rx.recv().await {
        if rec.failure.is_some() {
            errors += 1;
        } else if let Some(t) = rec.ttft() {
            ttft_sum += t.as_secs_f64();
        }
        records.push(rec);
        let done = records.len() as u64;
        let ok = done - errors;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(
            match point.duration.filter(|_| point.num_requests.is_none()) {
                Some(_) => start.elapsed().as_secs(),
                None => done,
            },
        );
        bar.set_message(format!(
            "{done} done  {:.1} req/s  mean TTFT {:.0} ms  errors {errors}",
            done as f64 / secs,
            if ok > 0 {
                ttft_sum / ok as f64 * 1e3
            } else {
                0.0
            },
        ));
    }
    bar.finish_and_clear();
    match dispatcher.await {
        Ok(r) => r?,
        Err(e) => tracing::error!("load dispatcher failed: {e}"),
    }
    if let Some(timer) = cut_off {
        timer.abort();
        // Cancelled by the deadline, not by an interrupt: the run's planned end.
        if !shutdown.is_cancelled() {
            for rec in &mut records {
                if rec.failure == Some(FailReason::Cancelled) {
                    rec.failure = Some(FailReason::CutOff);
                    rec.error = Some("cut off at the end of --duration".into());
                }
            }
        }
    }
    Ok(records)
}

/// Drop finished tasks so a long run does not keep every handle.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

/// Sleep until `at`; false when shut down first.
async fn wait_until(at: Instant, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep_until(at.into()) => true,
    }
}

fn progress_bar(point: &Point) -> ProgressBar {
    if !point.progress {
        return ProgressBar::hidden();
    }
    let (len, unit) = match (point.num_requests, point.duration) {
        (Some(n), _) => (n as u64, "req"),
        (None, Some(d)) => (d.as_secs().max(1), "s"),
        (None, None) => (0, "req"),
    };
    let bar = ProgressBar::new(len);
    let template =
        format!("{{prefix}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.set_prefix(point.load.label());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_labels_and_values() {
        assert_eq!(Load::Concurrency(8).label(), "concurrency=8");
        let r = Load::Rate {
            rate: 2.5,
            burstiness: 1.0,
            max_concurrency: None,
        };
        assert_eq!((r.label(), r.value()), ("rate=2.5/s".to_string(), 2.5));
        let inf = Load::Rate {
            rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
        };
        assert_eq!((inf.label(), inf.value()), ("rate=inf".to_string(), 0.0));
    }
}
