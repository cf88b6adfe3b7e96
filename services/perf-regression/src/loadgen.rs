//! The built-in load generator.
//!
//! - **Open loop**: request `i` is due at `t0 + i / rate`, whether or not earlier ones have
//!   answered; its latency is measured from when it was *due*, not when it was sent, so a
//!   server that stalls is charged for the queue it causes (coordinated-omission correction).
//! - **Closed loop**: `concurrency` clients, each sending its next request when the previous
//!   one answers.
//!
//! Requests due (open) or sent (closed) during the warm-up are not measured. Latencies go into
//! an HDR histogram (microseconds, 3 significant digits) for the percentiles, and a bounded
//! uniform sample of them is kept for the baseline comparison.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use slipway_domain::stats::Rng;
use tokio::task::JoinSet;

/// Latency samples kept for the statistical comparison (reservoir).
pub const SAMPLE_CAP: usize = 4000;

/// Requests in flight at most (open loop); a request due when the cap is full counts as an
/// error, so an overloaded target cannot exhaust the generator's sockets.
pub const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Clone)]
pub enum Mode {
    Open { rate_per_sec: f64 },
    Closed { concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct Load {
    pub url: String,
    pub method: reqwest::Method,
    pub body: Option<String>,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
}

/// One request's outcome: when it was due (open) or sent (closed), its latency, its result.
type Outcome = (Instant, Duration, Result<(), String>);

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub histogram: Histogram<u64>,
    /// A uniform sample of measured latencies, in milliseconds.
    pub samples: Vec<f64>,
    pub ok: u64,
    pub errors: u64,
    /// Successful responses that completed inside the measured window (the achieved rate).
    pub ok_in_window: u64,
    /// Length of the measured phase.
    pub measured: Duration,
    pub first_error: Option<String>,
}

impl Measured {
    fn new(measured: Duration) -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            samples: Vec::new(),
            ok: 0,
            errors: 0,
            ok_in_window: 0,
            measured,
            first_error: None,
        }
    }

    fn record(
        &mut self,
        latency: Duration,
        ok: Result<(), String>,
        done_in_window: bool,
        rng: &mut Rng,
    ) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let _ = self.histogram.record(micros.min(3_600_000_000));
        match ok {
            Ok(()) => {
                self.ok += 1;
                if done_in_window {
                    self.ok_in_window += 1;
                }
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
        let n = self.ok + self.errors;
        let ms = micros as f64 / 1000.0;
        if self.samples.len() < SAMPLE_CAP {
            self.samples.push(ms);
        } else {
            let j = rng.below(usize::try_from(n).unwrap_or(usize::MAX));
            if j < SAMPLE_CAP {
                self.samples[j] = ms;
            }
        }
    }

    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    /// Responses completed inside the measured window per second: what the target achieved,
    /// not what was offered (an open loop offers its rate whatever the target can do).
    pub fn throughput_rps(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.ok_in_window as f64 / secs
        }
    }

    pub fn error_rate(&self) -> f64 {
        let n = self.ok + self.errors;
        if n == 0 {
            0.0
        } else {
            self.errors as f64 / n as f64
        }
    }
}

async fn one(client: &reqwest::Client, load: &Load) -> Result<(), String> {
    let mut req = client.request(load.method.clone(), &load.url);
    if let Some(b) = &load.body {
        req = req
            .header("content-type", "application/json")
            .body(b.clone());
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => {
            let _ = r.bytes().await;
            Ok(())
        }
        Ok(r) => Err(format!("{} answered {}", load.url, r.status())),
        Err(e) => Err(format!("{}: {e}", load.url)),
    }
}

/// Runs the load and measures it.
///
/// # Panics
/// Never for valid settings (a rate and a concurrency of at least 1).
pub async fn run(load: &Load, seed: &str) -> Measured {
    let client = reqwest::Client::builder()
        .timeout(load.timeout)
        .pool_max_idle_per_host(256)
        .build()
        .expect("HTTP client builds");
    let mut rng = Rng::from_text(seed);
    let mut m = Measured::new(load.duration);
    let t0 = Instant::now();
    let measure_from = t0 + load.warmup;
    let end = measure_from + load.duration;
    match load.mode {
        Mode::Open { rate_per_sec } => {
            let interval = Duration::from_secs_f64(1.0 / rate_per_sec.max(0.001));
            let mut set: JoinSet<Outcome> = JoinSet::new();
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
            let mut i: u32 = 0;
            loop {
                let due = t0 + interval * i;
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                i += 1;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if due >= measure_from {
                        m.record(
                            Duration::ZERO,
                            Err(format!("more than {MAX_IN_FLIGHT} requests in flight")),
                            false,
                            &mut rng,
                        );
                    }
                    continue;
                };
                let (c, l) = (client.clone(), load.clone());
                set.spawn(async move {
                    let r = one(&c, &l).await;
                    drop(slot);
                    // From when it was due: the corrected latency.
                    (due, due.elapsed(), r)
                });
                // Collect what has finished, so memory stays bounded on long runs.
                while let Some(done) = set.try_join_next() {
                    if let Ok((due, lat, r)) = done
                        && due >= measure_from
                    {
                        let in_window = due + lat <= end;
                        m.record(lat, r, in_window, &mut rng);
                    }
                }
            }
            while let Some(done) = set.join_next().await {
                if let Ok((due, lat, r)) = done
                    && due >= measure_from
                {
                    let in_window = due + lat <= end;
                    m.record(lat, r, in_window, &mut rng);
                }
            }
        }
        Mode::Closed { concurrency } => {
            let mut set: JoinSet<Vec<Outcome>> = JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let (c, l) = (client.clone(), load.clone());
                set.spawn(async move {
                    let mut out = Vec::new();
                    while Instant::now() < end {
                        let start = Instant::now();
                        let r = one(&c, &l).await;
                        out.push((start, start.elapsed(), r));
                    }
                    out
                });
            }
            while let Some(done) = set.join_next().await {
                for (start, lat, r) in done.unwrap_or_default() {
                    if start >= measure_from {
                        let in_window = start + lat <= end;
                        m.record(lat, r, in_window, &mut rng);
                    }
                }
            }
        }
    }
    m
}
