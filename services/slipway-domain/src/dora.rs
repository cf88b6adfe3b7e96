//! DORA delivery metrics, computed from the event log alone (folded runs), per pipeline and
//! overall, for a time window. Definitions in `docs/dora.md`.
//!
//! Production is each pipeline's last environment. A deployment counts in the window when it
//! finished in `[since, now]`.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::run::{Phase, Run, StageStatus};

/// The five measures for one scope (a pipeline, or all of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Measures {
    /// Production deployments (deploys, not rollbacks) in the window.
    pub deployments: u64,
    /// Deployments per day over the window.
    pub deployment_frequency_per_day: f64,
    /// Median hours from a change's creation to its production deploy.
    pub change_lead_time_hours_p50: Option<f64>,
    pub change_lead_time_hours_mean: Option<f64>,
    /// Share of production deployments that needed a rollback or fix (their monitor failed).
    pub change_fail_rate: Option<f64>,
    /// Median hours from a failed deployment to the rollback that restored service.
    pub failed_deployment_recovery_hours_p50: Option<f64>,
    /// Share of deployments to production that were unplanned rollbacks.
    pub deployment_rework_rate: Option<f64>,
    pub rollbacks: u64,
    pub failed_deployments: u64,
}

/// DORA for a window.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Report {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub overall: Measures,
    pub pipelines: BTreeMap<String, Measures>,
}

/// What one run contributes: its production deploy, whether it failed, its recovery. Small
/// and final once the run has ended, so the run index keeps it beside the run
/// ([`crate::index::IndexEntry::deployed`]) and DORA over a window reads these, not whole runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployed {
    pub pipeline: String,
    pub deployed_at: DateTime<Utc>,
    /// From the change's creation to the production deploy.
    pub lead_ms: i64,
    /// Its monitor failed, or the run rolled back.
    pub failed: bool,
    /// From the deploy to the rollback that restored service.
    pub recovery_ms: Option<i64>,
    pub rolled_back: bool,
}

/// The run's production deployment, if it deployed to production.
pub fn deployed(run: &Run) -> Option<Deployed> {
    let production = run.spec.environment.last()?.name.clone();
    let deploy = run.stage(&format!("deploy:{production}"))?;
    if deploy.status != StageStatus::Succeeded {
        return None;
    }
    let deployed_at = deploy.finished_at?;
    let monitor_failed = run
        .stage(&format!("monitor:{production}"))
        .is_some_and(|s| s.status == StageStatus::Failed);
    let failed = monitor_failed || run.phase == Phase::RolledBack;
    let rollback = run
        .stage(&format!("rollback:{production}"))
        .filter(|s| s.status == StageStatus::Succeeded);
    Some(Deployed {
        pipeline: run.pipeline.clone(),
        deployed_at,
        lead_ms: (deployed_at - run.change.time).num_milliseconds(),
        failed,
        recovery_ms: rollback
            .and_then(|r| r.finished_at)
            .map(|t| (t - deployed_at).num_milliseconds()),
        rolled_back: rollback.is_some(),
    })
}

fn hours(ms: i64) -> f64 {
    ms as f64 / 3_600_000.0
}

/// One deployment as the measures need it: no names, no ids, so a year of them is cheap to
/// hold and sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Sample {
    /// Deployed at, Unix nanoseconds (first: samples are measured in the order deployed).
    at: i64,
    lead_ms: i64,
    failed: bool,
    rolled_back: bool,
    recovery_ms: Option<i64>,
}

impl Sample {
    fn of(d: &Deployed) -> Self {
        Self {
            at: d.deployed_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
            lead_ms: d.lead_ms,
            failed: d.failed,
            rolled_back: d.rolled_back,
            recovery_ms: d.recovery_ms,
        }
    }
}

fn measures(items: &[Sample], window: Duration) -> Measures {
    let n = items.len() as u64;
    let days = (window.num_seconds() as f64 / 86_400.0).max(1e-9);
    let leads: Vec<f64> = items.iter().map(|c| hours(c.lead_ms)).collect();
    let recoveries: Vec<f64> = items
        .iter()
        .filter_map(|c| c.recovery_ms.map(hours))
        .collect();
    let failed = items.iter().filter(|c| c.failed).count() as u64;
    let rollbacks = items.iter().filter(|c| c.rolled_back).count() as u64;
    let share = |k: u64, of: u64| (of > 0).then(|| k as f64 / of as f64);
    Measures {
        deployments: n,
        deployment_frequency_per_day: n as f64 / days,
        change_lead_time_hours_p50: crate::stats::quantile(&leads, 0.5),
        change_lead_time_hours_mean: crate::stats::mean(&leads),
        change_fail_rate: share(failed, n),
        failed_deployment_recovery_hours_p50: crate::stats::quantile(&recoveries, 0.5),
        deployment_rework_rate: share(rollbacks, n + rollbacks),
        rollbacks,
        failed_deployments: failed,
    }
}

/// DORA over the runs, for deployments that finished in `[since, until]`.
pub fn report<'a>(
    runs: impl IntoIterator<Item = &'a Run>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Report {
    report_of(runs.into_iter().filter_map(deployed), since, until)
}

/// DORA over production deployments (each counted once), for those that finished in
/// `[since, until]`.
pub fn report_of(
    deployments: impl IntoIterator<Item = Deployed>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Report {
    let mut tally = Tally::new(since, until);
    for d in deployments {
        tally.add(&d);
    }
    tally.report()
}

/// DORA over compacted deployments ([`Chunk`]s, as stored) and the deployments of runs
/// indexed or held after them, `recent`, by run id: a run in both counts once, as `recent`
/// has it.
///
/// # Errors
/// A chunk that cannot be read, named by its place.
pub fn report_from(
    chunks: &[impl AsRef<[u8]>],
    recent: &std::collections::HashMap<String, Deployed>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Report, String> {
    let mut tally = Tally::new(since, until);
    for (i, bytes) in chunks.iter().enumerate() {
        let chunk: ChunkRef<'_> =
            serde_json::from_slice(bytes.as_ref()).map_err(|e| format!("DORA chunk {i}: {e}"))?;
        for (pipeline, rows) in chunk.pipelines {
            let pipeline = tally.pipeline(&pipeline);
            for RowRef(run, at, lead_ms, flags, recovery_ms) in rows {
                if !recent.contains_key(run.as_ref()) {
                    let sample = Sample {
                        at,
                        lead_ms,
                        failed: flags & 1 != 0,
                        rolled_back: flags & 2 != 0,
                        recovery_ms,
                    };
                    tally.push(pipeline, sample);
                }
            }
        }
    }
    for d in recent.values() {
        tally.add(d);
    }
    Ok(tally.report())
}

/// A [`Chunk`] read without copying its run ids and names.
#[derive(Deserialize)]
struct ChunkRef<'a> {
    #[serde(borrow)]
    pipelines: BTreeMap<std::borrow::Cow<'a, str>, Vec<RowRef<'a>>>,
}

#[derive(Deserialize)]
struct RowRef<'a>(
    #[serde(borrow)] std::borrow::Cow<'a, str>,
    i64,
    i64,
    u8,
    Option<i64>,
);

/// Deployments in a window, by pipeline.
struct Tally {
    since: i64,
    until: i64,
    window: Duration,
    names: Vec<String>,
    samples: Vec<Vec<Sample>>,
}

impl Tally {
    fn new(since: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        let nanos = |t: DateTime<Utc>| t.timestamp_nanos_opt().unwrap_or(i64::MAX);
        Self {
            since: nanos(since),
            until: nanos(until),
            window: until - since,
            names: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// The pipeline's place (pipelines are few: a scan is enough).
    fn pipeline(&mut self, name: &str) -> usize {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i;
        }
        self.names.push(name.to_string());
        self.samples.push(Vec::new());
        self.names.len() - 1
    }

    fn push(&mut self, pipeline: usize, sample: Sample) {
        if (self.since..=self.until).contains(&sample.at) {
            self.samples[pipeline].push(sample);
        }
    }

    fn add(&mut self, d: &Deployed) {
        let i = self.pipeline(&d.pipeline);
        self.push(i, Sample::of(d));
    }

    fn report(mut self) -> Report {
        let since = DateTime::from_timestamp_nanos(self.since);
        let until = DateTime::from_timestamp_nanos(self.until);
        let mut all: Vec<Sample> = Vec::with_capacity(self.samples.iter().map(Vec::len).sum());
        let mut pipelines = BTreeMap::new();
        for (name, samples) in self.names.into_iter().zip(&mut self.samples) {
            if samples.is_empty() {
                continue;
            }
            samples.sort_unstable();
            all.extend_from_slice(samples);
            pipelines.insert(name, measures(samples, self.window));
        }
        all.sort_unstable();
        Report {
            since,
            until,
            overall: measures(&all, self.window),
            pipelines,
        }
    }
}

/// The production deployments of a range of the run index, compacted: what DORA over a year
/// reads instead of a year of whole index entries. Derived from the index (which is derived
/// from the log) and made again from it whenever it is dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The range of the run index's revisions it covers, both included.
    pub from: u64,
    pub through: u64,
    /// By pipeline: each deployment as a [`Row`].
    pub pipelines: BTreeMap<String, Vec<Row>>,
}

/// One deployment in a [`Chunk`]: run id, deployed at (Unix nanoseconds), lead time (ms),
/// flags (1: failed, 2: rolled back), recovery (ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row(pub String, pub i64, pub i64, pub u8, pub Option<i64>);

impl Chunk {
    /// An empty chunk starting at revision `from`.
    pub fn starting(from: u64) -> Self {
        Self {
            from,
            through: from.saturating_sub(1),
            pipelines: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, run_id: &str, d: &Deployed) {
        let Sample {
            at,
            lead_ms,
            failed,
            rolled_back,
            recovery_ms,
        } = Sample::of(d);
        let flags = u8::from(failed) | (u8::from(rolled_back) << 1);
        self.pipelines
            .entry(d.pipeline.clone())
            .or_default()
            .push(Row(run_id.to_string(), at, lead_ms, flags, recovery_ms));
    }

    /// Deployments in it.
    pub fn len(&self) -> usize {
        self.pipelines.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its deployments, by run id.
    pub fn deployments(self) -> impl Iterator<Item = (String, Deployed)> {
        self.pipelines.into_iter().flat_map(|(pipeline, rows)| {
            rows.into_iter()
                .map(move |Row(run, at, lead_ms, flags, recovery_ms)| {
                    let deployed = Deployed {
                        pipeline: pipeline.clone(),
                        deployed_at: DateTime::from_timestamp_nanos(at),
                        lead_ms,
                        failed: flags & 1 != 0,
                        recovery_ms,
                        rolled_back: flags & 2 != 0,
                    };
                    (run, deployed)
                })
        })
    }
}

/// A window length such as `30d`, `12h`, `90m` or `3600s`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 90m or 3600s"))?;
    match unit {
        "d" => Ok(Duration::days(n)),
        "h" => Ok(Duration::hours(n)),
        "m" => Ok(Duration::minutes(n)),
        "s" | "" => Ok(Duration::seconds(n)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use d, h, m or s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Answer, MONITORED_PIPELINE as SPEC, Sim, artifact};

    #[test]
    fn a_chunk_gives_back_the_deployments_put_in() {
        let at = DateTime::parse_from_rfc3339("2026-12-04T10:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let deployed = [
            Deployed {
                pipeline: "p".into(),
                deployed_at: at,
                lead_ms: 61_000,
                failed: true,
                recovery_ms: Some(9_000),
                rolled_back: true,
            },
            Deployed {
                pipeline: "q".into(),
                deployed_at: at + Duration::days(1),
                lead_ms: 5,
                failed: false,
                recovery_ms: None,
                rolled_back: false,
            },
        ];
        let mut chunk = Chunk::starting(7);
        assert!(chunk.is_empty());
        chunk.push("r1", &deployed[0]);
        chunk.push("r2", &deployed[1]);
        chunk.through = 9;
        let bytes = serde_json::to_vec(&chunk).unwrap();
        let back: Chunk = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((back.from, back.through, back.len()), (7, 9, 2));
        let got: Vec<(String, Deployed)> = back.deployments().collect();
        assert_eq!(
            got,
            vec![
                ("r1".to_string(), deployed[0].clone()),
                ("r2".to_string(), deployed[1].clone())
            ]
        );
    }

    #[test]
    fn a_report_from_chunks_and_recent_runs_equals_one_from_every_deployment() {
        let now = Utc::now();
        let d = |n: i64, pipeline: &str| Deployed {
            pipeline: pipeline.into(),
            deployed_at: now - Duration::hours(n),
            lead_ms: 1_000 * n,
            failed: n % 3 == 0,
            recovery_ms: (n % 3 == 0).then_some(60_000 * n),
            rolled_back: n % 6 == 0,
        };
        let all: Vec<(String, Deployed)> = (1..=40)
            .map(|n| (format!("r{n}"), d(n, if n % 4 == 0 { "a" } else { "b" })))
            .collect();
        let since = now - Duration::hours(30);
        let expected = report_of(all.iter().map(|(_, d)| d.clone()), since, now);
        // Chunks of the first 30; r25..r40 held or indexed after them, r25..r30 in both
        // (a chunk's copy of those must not count again).
        let mut chunks = Vec::new();
        for part in all[..30].chunks(7) {
            let mut c = Chunk::starting(1);
            for (run, d) in part {
                c.push(run, d);
            }
            chunks.push(serde_json::to_vec(&c).unwrap());
        }
        let mut recent: std::collections::HashMap<String, Deployed> =
            all[24..].iter().cloned().collect();
        assert_eq!(
            report_from(&chunks, &recent, since, now),
            Ok(expected.clone())
        );
        assert_eq!(expected.overall.deployments, 30);
        // A run `recent` holds differently (its newer state) counts as `recent` has it.
        recent.get_mut("r26").unwrap().failed = true;
        let got = report_from(&chunks, &recent, since, now).unwrap();
        assert_eq!(
            got.overall.failed_deployments,
            expected.overall.failed_deployments + 1
        );
        assert!(
            report_from(&[b"{".to_vec()], &recent, since, now)
                .unwrap_err()
                .contains("DORA chunk 0")
        );
    }

    #[test]
    fn windows() {
        assert_eq!(parse_window("30d").unwrap(), Duration::days(30));
        assert_eq!(parse_window("90m").unwrap(), Duration::minutes(90));
        assert!(parse_window("soon").is_err());
        assert!(parse_window("3w").is_err());
    }

    #[test]
    fn three_deploys_one_rolled_back() {
        // Run 1 and 2 ship; run 3's monitor fails and it rolls back to run 2's version.
        let mut runs = Vec::new();
        let mut live = None;
        for n in 1..=3 {
            let mut sim = Sim::nth(SPEC, n);
            if let Some(l) = live.clone() {
                sim.live.insert("production".into(), l);
            }
            if n == 3 {
                sim.script
                    .insert("monitor:production".into(), Answer::Fail("errors".into()));
            }
            sim.run_to_end();
            live = Some((format!("svc-{n}"), artifact(&sim.run_id)));
            runs.push(sim);
        }
        assert_eq!(runs[2].run().phase, Phase::RolledBack);
        let until = runs[2].now;
        let since = until - Duration::days(1);
        let r = report(runs.iter().map(Sim::run), since, until);
        let m = &r.overall;
        assert_eq!(m.deployments, 3);
        assert!((m.deployment_frequency_per_day - 3.0).abs() < 1e-9);
        assert_eq!(m.change_fail_rate, Some(1.0 / 3.0));
        assert_eq!(m.rollbacks, 1);
        assert_eq!(m.deployment_rework_rate, Some(0.25));
        // In the simulation each fact takes a second: build, deploy started, deploy done.
        let lead = m.change_lead_time_hours_p50.unwrap() * 3600.0;
        assert!(lead > 0.0 && lead < 60.0, "{lead}");
        let rec = m.failed_deployment_recovery_hours_p50.unwrap() * 3600.0;
        assert!(rec > 0.0 && rec < 60.0, "{rec}");
        assert_eq!(r.pipelines["svc"], *m);
        // The same from the deployments alone, as the run index keeps them (through JSON).
        let stored: Vec<Deployed> = runs
            .iter()
            .filter_map(|s| deployed(s.run()))
            .map(|d| serde_json::from_value(serde_json::to_value(d).unwrap()).unwrap())
            .collect();
        assert_eq!(report_of(stored, since, until), r);
        // Outside the window, nothing counts.
        let r = report(
            runs.iter().map(Sim::run),
            until + Duration::hours(1),
            until + Duration::hours(2),
        );
        assert_eq!(r.overall.deployments, 0);
        assert_eq!(r.overall.change_fail_rate, None);
    }
}
