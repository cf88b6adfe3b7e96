//! Baselines from the log: what is live in an environment, which run built it, and that run's
//! gate reports. Every comparison of the quality gates is against the version live in
//! production, as the log records it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::bus::{Bus, BusError};
use crate::store::checkpoints::Checkpoints;
use slipway_domain::digest::Digest;
use slipway_domain::envelope::Event;
use slipway_domain::events::{EventData, GateReport, ObjectRef};
use slipway_domain::fold::Run;

/// The version live in one environment of one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    Ok(here(deploys, pipeline, environment, None).await?.live)
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
    Ok(here(deploys, pipeline, environment, Some(seq)).await?.live)
}

/// The run that built the artifact `digest`: the first to deploy it to the environment, if
/// it is one of the last [`BUILDERS`] artifacts deployed there.
///
/// # Errors
/// [`BusError`] when the log cannot be read.
pub async fn builder_of(
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    digest: &Digest,
) -> Result<Option<String>, BusError> {
    Ok(here(deploys, pipeline, environment, None)
        .await?
        .builder(digest)
        .map(str::to_string))
}

/// Distinct artifacts per environment whose builder is remembered: a rollback goes back to
/// the version live before, never dozens of deploys back, and memory stays bounded however
/// many deploys the log holds.
pub const BUILDERS: usize = 64;

/// What is live in one environment of one pipeline, and which runs built the artifacts
/// deployed there lately.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Here {
    pub live: Option<Live>,
    /// The first run to deploy each of the last [`BUILDERS`] distinct artifacts, the most
    /// recently deployed last.
    builders: VecDeque<(Digest, String)>,
}

impl Here {
    /// The run that first deployed `digest` here.
    pub fn builder(&self, digest: &Digest) -> Option<&str> {
        self.builders
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, run)| run.as_str())
    }

    fn take(&mut self, e: &Event) {
        let (EventData::DeploySucceeded(d) | EventData::RollbackSucceeded(d)) = &e.data else {
            return;
        };
        let digest = &d.artifact.digest;
        if let (EventData::DeploySucceeded(_), Some(run)) = (&e.data, &e.subject) {
            // A deploy again of an artifact keeps its builder and counts as recent.
            let first = match self.builders.iter().position(|(x, _)| x == digest) {
                Some(i) => self.builders.remove(i).map(|(_, r)| r),
                None => None,
            };
            self.builders
                .push_back((digest.clone(), first.unwrap_or_else(|| run.clone())));
            while self.builders.len() > BUILDERS {
                self.builders.pop_front();
            }
        }
        let run_id = self
            .builder(digest)
            .map(str::to_string)
            .or_else(|| e.subject.clone())
            .unwrap_or_default();
        self.live = Some(Live {
            version: d.version.clone(),
            artifact: d.artifact.clone(),
            run_id,
        });
    }
}

/// The key of the deploy index's checkpoint in the checkpoints' bucket, one for every
/// service that looks up what is live (each writes what it has read; any of them is a
/// correct start, the newest only a shorter tail).
pub const CHECKPOINT: &str = "deploys";

/// The deploy index's checkpoint: what is live where, as of a stream sequence.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// When the log's stream was created: a checkpoint of another stream is not used.
    stream_created: String,
    /// Every deploy and rollback up to this stream sequence is in `here`.
    through: u64,
    here: Vec<SavedHere>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedHere {
    pipeline: String,
    environment: String,
    #[serde(flatten)]
    here: Here,
}

/// How often the index's checkpoint is written, at most, while it moves.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// What is live by pipeline and environment, as far as the log has been read. The log only
/// grows, so each lookup reads just what was appended since the last one; in a worker, the
/// runs in flight ([`crate::runtime::follow`]) feed it as they follow the log, and a lookup
/// then reads nothing. A process starts from the shared checkpoint ([`CHECKPOINT`]) and the
/// deploys after it, so neither its start nor its memory grows with the deploys ever made.
/// One per [`Deploys`] (its clones share it); a log stream deleted and made again under a
/// running process is not noticed, so the services are restarted after that.
#[derive(Debug, Default)]
pub struct DeployIndex {
    /// Every deploy and rollback up to this stream sequence is in `here`.
    through: u64,
    here: HashMap<(String, String), Here>,
    /// The last stream sequence a follower of the log folded (0: none follows).
    followed: u64,
    /// The checkpoint has been read (or found missing or unusable).
    loaded: bool,
    /// When the log's stream was created, once known.
    stream_created: Option<String>,
    /// `through` when the checkpoint was last written, and when.
    saved: (u64, Option<Instant>),
}

impl DeployIndex {
    fn add(&mut self, seq: u64, e: &Event) {
        if seq <= self.through {
            return;
        }
        self.through = seq;
        if let EventData::DeploySucceeded(d) | EventData::RollbackSucceeded(d) = &e.data {
            let key = (d.pipeline.clone(), d.environment.clone());
            self.here.entry(key).or_default().take(e);
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

    /// Starts from `saved`, unless the index already holds more.
    fn restore(&mut self, saved: Saved) {
        if saved.through > self.through {
            self.through = saved.through;
            self.here = saved
                .here
                .into_iter()
                .map(|h| ((h.pipeline, h.environment), h.here))
                .collect();
            self.saved = (saved.through, Some(Instant::now()));
        }
    }

    /// The checkpoint to write now, if the index moved since the last one and that was a
    /// while ago (or `now` is asked for).
    fn checkpoint_due(&mut self, now: bool) -> Option<Saved> {
        let due = self.saved.1.is_none_or(|at| at.elapsed() >= SAVE_EVERY);
        if self.through <= self.saved.0 || !(due || now) {
            return None;
        }
        let stream_created = self.stream_created.clone()?;
        self.saved = (self.through, Some(Instant::now()));
        let mut here: Vec<SavedHere> = self
            .here
            .iter()
            .map(|((pipeline, environment), here)| SavedHere {
                pipeline: pipeline.clone(),
                environment: environment.clone(),
                here: here.clone(),
            })
            .collect();
        here.sort_by(|a, b| (&a.pipeline, &a.environment).cmp(&(&b.pipeline, &b.environment)));
        Some(Saved {
            stream_created,
            through: self.through,
            here,
        })
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
        self.index.reads.load(Ordering::Relaxed)
    }

    /// Deploys and rollbacks the index has read from the log (not from its checkpoint).
    pub fn deploys_read(&self) -> u64 {
        self.index.deploys_read.load(Ordering::Relaxed)
    }

    /// The runs that built what is live, or was deployed lately, in any environment (the last
    /// [`BUILDERS`] artifacts of each), as of now: the gates' baselines and a rollback's
    /// deploy tooling are read from their events, so retention keeps them.
    ///
    /// # Errors
    /// [`BusError`] when the log cannot be read.
    pub async fn builders(&self) -> Result<std::collections::BTreeSet<String>, BusError> {
        here(self, "", "", None).await?;
        let index = self.index.lock();
        Ok(index
            .here
            .values()
            .flat_map(|h| {
                h.builders
                    .iter()
                    .map(|(_, run)| run.clone())
                    .chain(h.live.iter().map(|l| l.run_id.clone()))
            })
            .collect())
    }

    /// Reads the log up to now and writes the checkpoint; the stream sequence it holds.
    ///
    /// # Errors
    /// [`BusError`] when the log cannot be read or the checkpoint not written.
    pub async fn checkpoint(&self) -> Result<u64, BusError> {
        here(self, "", "", None).await?;
        let saved = self.index.lock().checkpoint_due(true);
        if let Some(saved) = &saved {
            save(&self.bus, saved).await?;
        }
        Ok(self.index.lock().through)
    }
}

/// The index and the lock that makes concurrent lookups wait for one read instead of each
/// making one (the index itself is locked only briefly, as the follower feeds it per message).
#[derive(Debug, Default)]
pub(crate) struct SharedDeployIndex {
    index: std::sync::Mutex<DeployIndex>,
    reading: tokio::sync::Mutex<()>,
    reads: AtomicU64,
    deploys_read: AtomicU64,
}

impl SharedDeployIndex {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, DeployIndex> {
        self.index.lock().expect("deploy index lock")
    }
}

/// The checkpoint, if there is one this log can use.
async fn load(bus: &Bus) -> Result<(String, Option<Saved>), BusError> {
    let (stream_created, last_seq) = bus.stream_state().await?;
    let bytes = Checkpoints::open(bus).await?.get(CHECKPOINT).await?;
    let saved = bytes.and_then(|b| match serde_json::from_slice::<Saved>(&b) {
        Ok(s) if s.stream_created == stream_created && s.through <= last_seq => Some(s),
        Ok(s) => {
            warn!(
                through = s.through,
                last_seq, "The deploy index's checkpoint is of another log; reading every deploy."
            );
            None
        }
        Err(e) => {
            warn!(error = %e, "The deploy index's checkpoint cannot be read; reading every deploy.");
            None
        }
    });
    Ok((stream_created, saved))
}

async fn save(bus: &Bus, saved: &Saved) -> Result<(), BusError> {
    let bytes = serde_json::to_vec(saved).expect("a deploy checkpoint serialises");
    Checkpoints::open(bus)
        .await?
        .put_bytes(CHECKPOINT, bytes.into())
        .await
}

/// What is live in one environment of one pipeline, as of stream sequence `as_of` at least
/// (`None`: as of now).
async fn here(
    deploys: &Deploys,
    pipeline: &str,
    environment: &str,
    as_of: Option<u64>,
) -> Result<Here, BusError> {
    let (bus, shared) = (&deploys.bus, deploys.index());
    let key = (pipeline.to_string(), environment.to_string());
    let lookup = |index: &DeployIndex| index.here.get(&key).cloned().unwrap_or_default();
    let current = {
        let mut index = shared.lock();
        index
            .current(as_of)
            .then(|| (lookup(&index), index.checkpoint_due(false)))
    };
    if let Some((found, saved)) = current {
        save_now(bus, saved).await;
        return Ok(found);
    }
    let _reading = shared.reading.lock().await;
    if !shared.lock().loaded {
        let (created, saved) = load(bus).await?;
        let mut index = shared.lock();
        index.stream_created = Some(created);
        if let Some(saved) = saved {
            index.restore(saved);
        }
        index.loaded = true;
    }
    let (start, followed) = {
        let index = shared.lock();
        if index.current(as_of) {
            return Ok(lookup(&index));
        }
        (index.through + 1, index.followed)
    };
    shared.reads.fetch_add(1, Ordering::Relaxed);
    // The whole log, each message's subject looked at and only deploys decoded: served many
    // times faster than a consumer filtered on the deploy subjects of every run.
    bus.read_raw(&[], start, |seq, m| {
        let mut index = shared.lock();
        let deploy = [".deploy.succeeded", ".rollback.succeeded"]
            .iter()
            .any(|kind| m.subject.ends_with(kind));
        match deploy.then(|| crate::bus::recorded(seq, m).event) {
            Some(Ok(e)) => {
                shared.deploys_read.fetch_add(1, Ordering::Relaxed);
                index.add(seq, &e);
            }
            _ => index.through = index.through.max(seq),
        }
    })
    .await?;
    let (found, saved) = {
        let mut index = shared.lock();
        // The read began after the follower had folded `followed`: it holds every deploy up
        // to there, so the follower's next message can be taken in.
        index.through = index.through.max(followed);
        (lookup(&index), index.checkpoint_due(false))
    };
    save_now(bus, saved).await;
    Ok(found)
}

/// Writes the checkpoint when one is due (one write in [`SAVE_EVERY`], a millisecond). A
/// write that fails is tried again with the next one due: it only makes the next start read
/// a longer tail.
async fn save_now(bus: &Bus, saved: Option<Saved>) {
    if let Some(saved) = saved
        && let Err(e) = save(bus, &saved).await
    {
        debug!(error = %e, "The deploy index's checkpoint was not written.");
    }
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

    /// The versions deployed to `p`/`prod` the index remembers, oldest first.
    fn versions(index: &DeployIndex) -> Vec<String> {
        index
            .here
            .get(&("p".to_string(), "prod".to_string()))
            .into_iter()
            .flat_map(|h| h.builders.iter())
            .map(|(d, _)| d.hex().to_string())
            .collect()
    }

    fn rolled_back(version: &str, run: &str) -> Event {
        let mut e = deployed(version);
        e.subject = Some(run.into());
        let EventData::DeploySucceeded(d) = e.data else {
            unreachable!()
        };
        e.data = EventData::RollbackSucceeded(d);
        e
    }

    fn by(mut e: Event, run: &str) -> Event {
        e.subject = Some(run.into());
        e
    }

    #[test]
    fn live_is_the_last_deploy_or_rollback_and_its_builder_the_first_to_deploy_it() {
        let mut here = Here::default();
        here.take(&by(deployed("v1"), "r1"));
        here.take(&by(deployed("v2"), "r2"));
        assert_eq!(here.live.as_ref().unwrap().run_id, "r2");
        // A rollback to v1 by r3: live is v1, built by r1.
        here.take(&rolled_back("v1", "r3"));
        let live = here.live.clone().unwrap();
        assert_eq!((live.version.as_str(), live.run_id.as_str()), ("v1", "r1"));
        // v1 deployed again by r4 keeps r1 as its builder.
        here.take(&by(deployed("v1"), "r4"));
        assert_eq!(here.builder(&"sha256:v1".into()), Some("r1"));
        assert_eq!(here.live.unwrap().run_id, "r1");
        // A rollback to an artifact never deployed here names the rollback's run.
        let mut here = Here::default();
        here.take(&rolled_back("v9", "r9"));
        assert_eq!(here.live.unwrap().run_id, "r9");
    }

    #[test]
    fn builders_are_remembered_for_the_last_artifacts_only() {
        let mut here = Here::default();
        for i in 0..BUILDERS + 10 {
            here.take(&by(deployed(&format!("v{i}")), &format!("r{i}")));
        }
        assert_eq!(here.builders.len(), BUILDERS);
        assert_eq!(here.builder(&"sha256:v9".into()), None, "forgotten");
        assert_eq!(here.builder(&"sha256:v10".into()), Some("r10"));
        // Deployed again, an artifact becomes recent and is kept.
        here.take(&by(deployed("v10"), "r99"));
        for i in 0..BUILDERS - 1 {
            here.take(&by(deployed(&format!("w{i}")), &format!("s{i}")));
        }
        assert_eq!(here.builder(&"sha256:v10".into()), Some("r10"));
    }

    #[test]
    fn a_checkpoint_restores_the_index_it_was_taken_of() {
        let mut index = DeployIndex {
            stream_created: Some("1".into()),
            ..Default::default()
        };
        index.add(3, &by(deployed("v1"), "r1"));
        index.add(8, &rolled_back("v1", "r2"));
        let saved = index.checkpoint_due(true).expect("moved since the last");
        assert!(index.checkpoint_due(true).is_none(), "nothing new since");
        let bytes = serde_json::to_vec(&saved).unwrap();
        let mut fresh = DeployIndex::default();
        fresh.restore(serde_json::from_slice(&bytes).unwrap());
        assert_eq!(fresh.through, 8);
        assert_eq!(fresh.here, index.here);
        // An older checkpoint does not take back what the index already holds.
        let mut ahead = DeployIndex::default();
        ahead.add(9, &by(deployed("v2"), "r3"));
        ahead.restore(serde_json::from_slice(&bytes).unwrap());
        assert_eq!(
            (ahead.through, versions(&ahead)),
            (9, vec!["v2".to_string()])
        );
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
