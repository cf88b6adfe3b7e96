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
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
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

fn measures(items: &[Deployed], window: Duration) -> Measures {
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
    let mut all: Vec<Deployed> = deployments
        .into_iter()
        .filter(|d| d.deployed_at >= since && d.deployed_at <= until)
        .collect();
    all.sort_by_key(|d| d.deployed_at);
    let mut by_pipeline: BTreeMap<String, Vec<Deployed>> = BTreeMap::new();
    for d in &all {
        by_pipeline
            .entry(d.pipeline.clone())
            .or_default()
            .push(d.clone());
    }
    let window = until - since;
    Report {
        since,
        until,
        overall: measures(&all, window),
        pipelines: by_pipeline
            .into_iter()
            .map(|(p, cs)| (p, measures(&cs, window)))
            .collect(),
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
