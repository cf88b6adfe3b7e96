//! Baselines from the log: what is live in an environment, which run built it, and that run's
//! gate reports. Every comparison of the quality gates is against the version live in
//! production, as the log records it.

use std::collections::HashMap;

use crate::bus::{Bus, BusError};
use crate::envelope::Event;
use crate::events::{EventData, GateReport, ObjectRef};
use crate::fold::Run;

/// The version live in one environment of one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub version: String,
    pub artifact: ObjectRef,
    /// The run that built the live artifact (not a run that rolled back to it).
    pub run_id: String,
}

/// What the log says is live in `environment` of `pipeline`: the last successful deploy or
/// rollback there.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn live_version(
    bus: &Bus,
    pipeline: &str,
    environment: &str,
) -> Result<Option<Live>, BusError> {
    let here = deploys_here(bus, pipeline, environment).await?;
    let Some(last) = here.last() else {
        return Ok(None);
    };
    let (EventData::DeploySucceeded(d) | EventData::RollbackSucceeded(d)) = &last.data else {
        return Ok(None);
    };
    let builder = first_deployer(&here, &d.artifact.digest)
        .or_else(|| last.subject.clone())
        .unwrap_or_default();
    Ok(Some(Live {
        version: d.version.clone(),
        artifact: d.artifact.clone(),
        run_id: builder,
    }))
}

/// The run that built the artifact `digest`: the first to deploy it to the environment.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn builder_of(
    bus: &Bus,
    pipeline: &str,
    environment: &str,
    digest: &str,
) -> Result<Option<String>, BusError> {
    Ok(first_deployer(
        &deploys_here(bus, pipeline, environment).await?,
        digest,
    ))
}

fn first_deployer(here: &[Event], digest: &str) -> Option<String> {
    here.iter().find_map(|e| match &e.data {
        EventData::DeploySucceeded(x) if x.artifact.digest == digest => e.subject.clone(),
        _ => None,
    })
}

/// Successful deploys and rollbacks by pipeline and environment, as far as the log has been
/// read. The log only grows, so each lookup reads just what was appended since the last one
/// (rather than every deploy ever made, per deploy). One per connection ([`Bus`] clones share
/// it); a log stream deleted and made again under a running process is not noticed, so the
/// services are restarted after that.
#[derive(Debug, Default)]
pub struct DeployIndex {
    /// The stream sequence of the last deploy or rollback read.
    through: u64,
    here: HashMap<(String, String), Vec<Event>>,
}

/// Successful deploys and rollbacks of one environment of one pipeline, in log order.
async fn deploys_here(
    bus: &Bus,
    pipeline: &str,
    environment: &str,
) -> Result<Vec<Event>, BusError> {
    // Held across the read: concurrent lookups wait for one read instead of each making one.
    let mut index = bus.deploy_index().lock().await;
    let recs = bus
        .read(
            &[
                "slipway.run.*.deploy.succeeded".to_string(),
                "slipway.run.*.rollback.succeeded".to_string(),
            ],
            index.through + 1,
        )
        .await?;
    for r in recs {
        index.through = index.through.max(r.seq);
        let Ok(e) = r.event else { continue };
        if let EventData::DeploySucceeded(d) | EventData::RollbackSucceeded(d) = &e.data {
            let key = (d.pipeline.clone(), d.environment.clone());
            index.here.entry(key).or_default().push(e);
        }
    }
    Ok(index
        .here
        .get(&(pipeline.to_string(), environment.to_string()))
        .cloned()
        .unwrap_or_default())
}

/// The baseline of a gate: the latest report of `stage` by the run live in the pipeline's last
/// environment (production), if there is one and it was gated.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn gate_baseline(
    bus: &Bus,
    run: &Run,
    stage: &str,
) -> Result<Option<(String, GateReport)>, BusError> {
    let Some(production) = run.spec.environment.last() else {
        return Ok(None);
    };
    let Some(live) = live_version(bus, &run.pipeline, &production.name).await? else {
        return Ok(None);
    };
    if live.run_id == run.run_id {
        return Ok(None);
    }
    let log = bus.run_log(&live.run_id).await?;
    let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
    let Some(base) = Run::replay(&events) else {
        return Ok(None);
    };
    Ok(base.gate(stage).cloned().map(|g| (live.run_id.clone(), g)))
}

/// The stored details of a baseline report (per-item results, a latency sample), read into
/// `T`; `None` when the report stored none or they cannot be read.
pub async fn details<T: serde::de::DeserializeOwned>(
    bus: &Bus,
    report: Option<&GateReport>,
    scratch: &std::path::Path,
) -> Option<T> {
    let obj = report?.details.clone()?;
    crate::objects::get_file(bus, &obj, scratch).await.ok()?;
    let bytes = std::fs::read(scratch).ok()?;
    serde_json::from_slice(&bytes).ok()
}
