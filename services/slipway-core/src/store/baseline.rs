//! Baselines from the log: what is live in an environment, which run built it, and that run's
//! gate reports. Every comparison of the quality gates is against the version live in
//! production, as the log records it.

use std::collections::HashMap;

use crate::bus::{Bus, BusError};
use slipway_domain::digest::Digest;
use slipway_domain::envelope::Event;
use slipway_domain::events::{EventData, GateReport, ObjectRef};
use slipway_domain::fold::Run;

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
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
) -> Result<Option<Live>, BusError> {
    live_version_in(deploys, pipeline, environment, None).await
}

/// [`live_version`] as of stream sequence `seq` at least (a job's request): when a follower
/// of the log has folded that far into the index, the answer needs no read.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn live_version_as_of(
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    seq: u64,
) -> Result<Option<Live>, BusError> {
    live_version_in(deploys, pipeline, environment, Some(seq)).await
}

async fn live_version_in(
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    as_of: Option<u64>,
) -> Result<Option<Live>, BusError> {
    let here = deploys_here(deploys, pipeline, environment, as_of).await?;
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
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    digest: &Digest,
) -> Result<Option<String>, BusError> {
    Ok(first_deployer(
        &deploys_here(deploys, pipeline, environment, None).await?,
        digest,
    ))
}

fn first_deployer(here: &[Event], digest: &Digest) -> Option<String> {
    here.iter().find_map(|e| match &e.data {
        EventData::DeploySucceeded(x) if x.artifact.digest == *digest => e.subject.clone(),
        _ => None,
    })
}

/// Successful deploys and rollbacks by pipeline and environment, as far as the log has been
/// read. The log only grows, so each lookup reads just what was appended since the last one
/// (rather than every deploy ever made, per deploy); in a worker, the runs in flight
/// ([`crate::runtime::follow`]) feed it as they follow the log, and a lookup then reads nothing. One
/// per [`Deploys`] (its clones share it); a log stream deleted and made again under a
/// running process is not noticed, so the services are restarted after that.
#[derive(Debug, Default)]
pub struct DeployIndex {
    /// Every deploy and rollback up to this stream sequence is in `here`.
    through: u64,
    here: HashMap<(String, String), Vec<Event>>,
    /// The last stream sequence a follower of the log folded (0: none follows).
    followed: u64,
}

impl DeployIndex {
    fn add(&mut self, seq: u64, e: &Event) {
        if seq <= self.through {
            return;
        }
        self.through = seq;
        if let EventData::DeploySucceeded(d) | EventData::RollbackSucceeded(d) = &e.data {
            let key = (d.pipeline.clone(), d.environment.clone());
            self.here.entry(key).or_default().push(e.clone());
        }
    }

    /// A follower of the log starts after `seq`.
    pub(crate) fn follow_from(&mut self, seq: u64) {
        self.followed = self.followed.max(seq);
    }

    /// A follower of the log folded the message at `seq` (`event` when it is one). It is
    /// taken in when the index already holds everything before it, so nothing is skipped.
    pub(crate) fn followed(&mut self, seq: u64, event: Option<&Event>) {
        let contiguous = self.through >= self.followed;
        self.followed = self.followed.max(seq);
        if contiguous {
            match event {
                Some(e) => self.add(seq, e),
                None => self.through = self.through.max(seq),
            }
        }
    }

    /// Whether a lookup as of stream sequence `as_of` needs no read: a follower has folded
    /// that far and the index holds everything it folded. Without `as_of` (as of now), a
    /// lookup always reads: a follower may lag, or have stopped.
    fn current(&self, as_of: Option<u64>) -> bool {
        as_of.is_some_and(|s| s > 0 && self.followed >= s) && self.through >= self.followed
    }
}

/// The deploys of one connection: the [`Bus`] with the index of deploys read so far. Clones
/// share the index; make one per connection and pass it on (a worker's runs in flight feed it,
/// [`crate::runtime::follow`]).
#[derive(Debug, Clone)]
pub struct Deploys {
    bus: Bus,
    index: std::sync::Arc<SharedDeployIndex>,
}

impl Deploys {
    pub fn new(bus: &Bus) -> Self {
        Self {
            bus: bus.clone(),
            index: std::sync::Arc::default(),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The index, for the follower that feeds it.
    pub(crate) fn index(&self) -> &SharedDeployIndex {
        &self.index
    }

    /// Reads of the log the index has made (a follower of the log spares them).
    pub fn reads(&self) -> u64 {
        self.index.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The index and the lock that makes concurrent lookups wait for one read instead of each
/// making one (the index itself is locked only briefly, as the follower feeds it per message).
#[derive(Debug, Default)]
pub(crate) struct SharedDeployIndex {
    index: std::sync::Mutex<DeployIndex>,
    reading: tokio::sync::Mutex<()>,
    reads: std::sync::atomic::AtomicU64,
}

impl SharedDeployIndex {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, DeployIndex> {
        self.index.lock().expect("deploy index lock")
    }
}

/// Successful deploys and rollbacks of one environment of one pipeline, in log order, as of
/// stream sequence `as_of` at least (`None`: as of now).
async fn deploys_here(
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    as_of: Option<u64>,
) -> Result<Vec<Event>, BusError> {
    let (bus, shared) = (&deploys.bus, deploys.index());
    let key = (pipeline.to_string(), environment.to_string());
    let lookup = |index: &DeployIndex| index.here.get(&key).cloned().unwrap_or_default();
    {
        let index = shared.lock();
        if index.current(as_of) {
            return Ok(lookup(&index));
        }
    }
    let _reading = shared.reading.lock().await;
    let (start, followed) = {
        let index = shared.lock();
        if index.current(as_of) {
            return Ok(lookup(&index));
        }
        (index.through + 1, index.followed)
    };
    shared
        .reads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let recs = bus
        .read(
            &[
                "slipway.run.*.deploy.succeeded".to_string(),
                "slipway.run.*.rollback.succeeded".to_string(),
            ],
            start,
        )
        .await?;
    let mut index = shared.lock();
    for r in recs {
        match r.event {
            Ok(e) => index.add(r.seq, &e),
            Err(_) => index.through = index.through.max(r.seq),
        }
    }
    // The read began after the follower had folded `followed`: it holds every deploy up to
    // there, so the follower's next message can be taken in.
    index.through = index.through.max(followed);
    Ok(lookup(&index))
}

/// The baseline of a gate: the latest report of `stage` by the run live in the pipeline's last
/// environment (production), if there is one and it was gated.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn gate_baseline(
    deploys: &Deploys,
    run: &Run,
    stage: &str,
) -> Result<Option<(String, GateReport)>, BusError> {
    let Some(production) = run.spec.environment.last() else {
        return Ok(None);
    };
    let Some(live) = live_version(deploys, &run.pipeline, &production.name).await? else {
        return Ok(None);
    };
    if live.run_id == run.run_id {
        return Ok(None);
    }
    let log = deploys.bus.run_log(&live.run_id).await?;
    let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
    let Some(base) = Run::replay(&events) else {
        return Ok(None);
    };
    Ok(base.gate(stage).cloned().map(|g| (live.run_id.clone(), g)))
}

/// The stored details of a baseline report (per-item results, a latency sample), read into
/// `T`; `None` when the report stored none or they cannot be read.
pub async fn details<T: serde::de::DeserializeOwned>(
    objects: &crate::store::objects::Objects,
    report: Option<&GateReport>,
    scratch: &std::path::Path,
) -> Option<T> {
    let obj = report?.details.clone()?;
    crate::store::objects::get_file(objects, &obj, scratch)
        .await
        .ok()?;
    let bytes = std::fs::read(scratch).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_domain::events::DeploySucceeded;

    fn deployed(version: &str) -> Event {
        Event::new(
            format!("id-{version}"),
            "/slipway/deployer",
            Some("run".into()),
            crate::bus::now(),
            EventData::DeploySucceeded(DeploySucceeded {
                stage: "deploy:prod".into(),
                attempt: 1,
                pipeline: "p".into(),
                environment: "prod".into(),
                version: version.into(),
                artifact: ObjectRef {
                    bucket: "b".into(),
                    name: version.into(),
                    digest: format!("sha256:{version}").into(),
                    size: 1,
                },
                previous_version: None,
                log: None,
                duration_ms: 1,
            }),
        )
    }

    fn versions(index: &DeployIndex) -> Vec<String> {
        index
            .here
            .get(&("p".to_string(), "prod".to_string()))
            .into_iter()
            .flatten()
            .map(|e| match &e.data {
                EventData::DeploySucceeded(d) => d.version.clone(),
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn a_follower_feeds_the_index_only_once_it_holds_everything_before() {
        let mut index = DeployIndex::default();
        assert!(!index.current(Some(1)), "no follower: every lookup reads");
        // The follower starts after 10; the index has read nothing yet.
        index.follow_from(10);
        index.followed(11, Some(&deployed("v1")));
        assert!(!index.current(Some(11)));
        assert!(versions(&index).is_empty(), "deploys before 11 are unknown");
        // A read took in everything up to where the follower was when it began (11).
        index.add(5, &deployed("v0"));
        index.through = index.through.max(11);
        assert!(index.current(Some(11)));
        assert!(!index.current(Some(12)), "the follower has not folded 12");
        assert!(!index.current(None), "as of now: always read");
        index.followed(12, None);
        index.followed(13, Some(&deployed("v2")));
        assert!(index.current(Some(13)));
        assert_eq!(versions(&index), ["v0", "v2"]);
        assert_eq!(index.through, 13);
    }

    #[test]
    fn a_read_ahead_of_the_follower_is_not_taken_twice() {
        let mut index = DeployIndex::default();
        index.follow_from(3);
        // A read went past the follower: it holds everything to 6.
        index.add(6, &deployed("v1"));
        index.followed(4, None);
        index.followed(6, Some(&deployed("v1")));
        index.followed(7, Some(&deployed("v2")));
        assert_eq!(versions(&index), ["v1", "v2"]);
        assert!(index.current(Some(7)));
    }

    #[test]
    fn a_message_the_follower_folded_before_the_read_caught_up_leaves_the_index_reading() {
        let mut index = DeployIndex::default();
        index.follow_from(3);
        index.followed(4, Some(&deployed("v1")));
        index.followed(5, None);
        // A read that began when the follower was at 4 holds 4, not 5.
        index.add(4, &deployed("v1"));
        assert!(
            !index.current(Some(5)),
            "5 may hold a deploy the index lacks"
        );
        index.followed(6, Some(&deployed("v2")));
        assert_eq!(versions(&index), ["v1"], "not taken across the gap");
    }
}
