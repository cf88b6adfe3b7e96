//! The deployer: `deploy.requested`, `rollback.requested` and `promote.requested` in; `started`
//! (with what was live before) and `succeeded` / `failed` out. In an environment with a rollout
//! the deploy command gets `SLIPWAY_SLOT` (`candidate` for the deploy, `stable` for the
//! promotion); after a promotion all traffic goes back to the stable slot.
//!
//! It trusts the log, not the request: the deploy command comes from the run's spec snapshot,
//! the artifact must be the run's own build (or, for a rollback, the version the log says was
//! live before), and before an environment that requires approval it folds the run itself and
//! refuses unless every gate passed and an approval the policy accepts is in the log for exactly
//! this artifact digest. A request whose deploy was already started by an earlier delivery is
//! never run again: deploys never run twice for the same run and environment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::exec::workspace::{self, Workspace};
use slipway_core::exec::{self, Cmd, ExecSettings};
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_domain::Event;
use slipway_domain::decide::version_of;
use slipway_domain::events::{
    DeployRequested, DeployStarted, DeploySucceeded, EventData, ObjectRef, StageFailed,
};
use slipway_domain::fold::Run;
use slipway_domain::rollout::{WeightCause, WeightSet};
use slipway_domain::stage::StageKind;
use slipway_domain::traffic::Weight;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum DeployerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("configuration error: {0}")]
    Config(String),
}

/// Runs the deployer until `shutdown`.
///
/// # Errors
/// [`DeployerError`] when NATS cannot be reached, the consumer cannot be set up, or the
/// approval public key is not a key.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DeployerError> {
    let approval_key = match &config.approvals.public_key {
        Some(k) => Some(
            slipway_domain::signing::PublicKey::from_base64(k)
                .map_err(|e| DeployerError::Config(format!("[approvals] public_key: {e}")))?,
        ),
        None => {
            warn!(
                "No [approvals] public_key: deploys to environments that require approval are refused."
            );
            None
        }
    };
    let bus = Bus::connect(&config.nats, "slipway-deployer").await?;
    let worker = Arc::new(Deployer {
        exec: config.exec.clone(),
        logs_bucket: config.nats.stream.logs_bucket.clone(),
        approvers: config.gateway.approvers.clone(),
        approval_key,
    });
    Ok(run_worker(bus, worker, config.worker, &config.health, shutdown).await?)
}

/// The deploy worker.
#[derive(Debug)]
pub struct Deployer {
    pub exec: ExecSettings,
    pub logs_bucket: String,
    /// The configured approvers: an approval counts only from one of them, with the groups
    /// the configuration gives them.
    pub approvers: Vec<slipway_core::config::Approver>,
    /// The gateway's public key: an approval counts only with its valid signature.
    pub approval_key: Option<slipway_domain::signing::PublicKey>,
}

pub use slipway_core::store::baseline::{Live, live_version, live_version_as_of};

fn request(job: &Job) -> Result<(&DeployRequested, StageKind), Transient> {
    match &job.request.data {
        EventData::DeployRequested(r) => Ok((r, StageKind::Deploy)),
        EventData::RollbackRequested(r) => Ok((r, StageKind::Rollback)),
        EventData::PromoteRequested(r) => Ok((r, StageKind::Promote)),
        _ => Err(Transient::not_a(&job.request, "a deploy request")),
    }
}

fn failed(
    kind: StageKind,
    r: &DeployRequested,
    reason: String,
    exit_code: Option<i32>,
    log_tail: Option<String>,
    log: Option<ObjectRef>,
) -> EventData {
    let f = StageFailed {
        stage: r.stage.clone(),
        attempt: r.attempt,
        reason,
        exit_code,
        log_tail,
        log,
    };
    match kind {
        StageKind::Rollback => EventData::RollbackFailed(f),
        StageKind::Promote => EventData::PromoteFailed(f),
        _ => EventData::DeployFailed(f),
    }
}

impl Worker for Deployer {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Deployer
    }

    /// A deploy is never run twice: one delivery wins the start, and a start without a result
    /// is left to the stage timeout rather than repeated...
    fn exclusive(&self) -> bool {
        true
    }

    /// ...unless the run's spec declares the environment's deploy command idempotent by its
    /// deploy key: then it is run again with the same key (what the spec says, not the
    /// request).
    fn may_resume(&self, run: &slipway_domain::Run, request: &slipway_domain::Event) -> bool {
        let env = match &request.data {
            EventData::DeployRequested(r)
            | EventData::RollbackRequested(r)
            | EventData::PromoteRequested(r) => &r.environment,
            _ => return false,
        };
        run.spec
            .environment(env)
            .is_some_and(|e| e.deploy.idempotent)
    }

    async fn started(&self, job: &Job) -> Result<EventData, Transient> {
        let (r, kind) = request(job)?;
        let live =
            live_version_as_of(&job.deploys, &job.run.pipeline, &r.environment, job.seq).await?;
        let s = DeployStarted {
            stage: r.stage.clone(),
            attempt: r.attempt,
            worker: job.worker_id.clone(),
            environment: r.environment.clone(),
            version: r.version.clone(),
            previous_version: live.as_ref().map(|l| l.version.clone()),
            previous_artifact: live.map(|l| l.artifact),
        };
        Ok(match kind {
            StageKind::Rollback => EventData::RollbackStarted(s),
            StageKind::Promote => EventData::PromoteStarted(s),
            _ => EventData::DeployStarted(s),
        })
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let (r, kind) = request(job)?;
        let rollback = kind == StageKind::Rollback;
        if let Some(why) = self.refusal(job, r, rollback).await? {
            warn!(environment = %r.environment, %why, "Deploy refused.");
            return Ok(failed(kind, r, format!("refused: {why}"), None, None, None));
        }
        self.deploy(job, r, kind).await
    }
}

/// Tries `f` a few times with a growing pause: fetching an artifact can meet a passing NATS
/// hiccup, and after the start a deploy must not be left to a redelivery.
async fn retried<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    mut f: impl FnMut() -> F,
) -> Result<T, String> {
    let mut delay = Duration::from_millis(200);
    let mut last = String::new();
    for _ in 0..5 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    Err(last)
}

impl Deployer {
    /// Why this request must not be carried out, from the log's point of view.
    async fn refusal(
        &self,
        job: &Job,
        r: &DeployRequested,
        rollback: bool,
    ) -> Result<Option<String>, Transient> {
        let run = &job.run;
        if run.pipeline != r.pipeline || run.spec.environment(&r.environment).is_none() {
            return Ok(Some(format!(
                "the run's spec has no environment {:?} in pipeline {:?}",
                r.environment, r.pipeline
            )));
        }
        if rollback {
            // Only back to what the log says was live before this run's deploy.
            let dep = run.deployment(&r.environment);
            let expected =
                dep.and_then(|d| Some((d.previous_version.clone()?, d.previous_artifact.clone()?)));
            return Ok(match expected {
                Some((v, a)) if v == r.version && a.digest == r.artifact.digest => None,
                Some((v, _)) => Some(format!(
                    "rollback target {} is not the version live before this run ({v})",
                    r.version
                )),
                None => Some(
                    "the log holds no earlier version of this environment to roll back to".into(),
                ),
            });
        }
        let Some(built) = run.artifact_ref.as_ref() else {
            return Ok(Some("the run has no built artifact".into()));
        };
        if built.digest != r.artifact.digest {
            return Ok(Some(format!(
                "artifact {} is not the run's build ({})",
                r.artifact.digest, built.digest
            )));
        }
        let gated = run
            .spec
            .environment(&r.environment)
            .is_some_and(|e| e.requires_approval);
        if gated && self.approval_key.is_none() {
            return Ok(Some(
                "no approval public key is configured ([approvals] public_key): approvals cannot be verified"
                    .into(),
            ));
        }
        Ok(slipway_domain::policy::deploy_refusal(
            run,
            &r.environment,
            slipway_core::bus::now(),
            Some(&self.approvers),
            self.approval_key.as_ref(),
        ))
    }

    /// The run whose source and deploy command a deploy uses: the run itself, or for a
    /// rollback the run that built the version being restored (the failing change's own
    /// deploy tooling may be what broke).
    async fn tooling(&self, job: &Job, r: &DeployRequested, rollback: bool) -> Run {
        if rollback
            && let Ok(Some(live)) = slipway_core::store::baseline::builder_of(
                &job.deploys,
                &job.run.pipeline,
                &r.environment,
                &r.artifact.digest,
            )
            .await
            && let Ok(log) = job.bus.run_log(&live).await
        {
            let events: Vec<Event> = log.into_iter().filter_map(|x| x.event.ok()).collect();
            if let Some(base) = Run::replay(&events) {
                return base;
            }
        }
        job.run.clone()
    }

    async fn deploy(
        &self,
        job: &Job,
        r: &DeployRequested,
        kind: StageKind,
    ) -> Result<EventData, Transient> {
        let rollback = kind == StageKind::Rollback;
        let started = Instant::now();
        let fail = |reason: String| Ok(failed(kind, r, reason, None, None, None));
        let tooling = self.tooling(job, r, rollback).await;
        // The command comes from a spec snapshot in the log, never from the request.
        let Some(target) = tooling
            .spec
            .environment(&r.environment)
            .map(|e| e.deploy.clone())
        else {
            return fail(format!("no environment {:?} in the spec", r.environment));
        };
        let previous = live_version_as_of(&job.deploys, &job.run.pipeline, &r.environment, job.seq)
            .await
            .ok()
            .flatten();
        let ws = match Workspace::create(
            &self.exec,
            &format!("{}-deploy-{}", job.run_id, r.environment),
        ) {
            Ok(ws) => ws,
            Err(e) => return fail(format!("cannot create a workspace: {e}")),
        };
        let scope = job.scope();
        // The source is checked out while the artifact is fetched and unpacked.
        let check_out = async {
            let span = scope.span("checkout");
            match ws.checkout(&tooling.source, &self.exec, &job.cancel).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    span.fail("checkout_failed", e.to_string());
                    Err(format!("checkout failed: {e}"))
                }
            }
        };
        let archive = ws.out().join("artifact.tar.gz");
        let artifact_dir = ws.root().join("artifact");
        let fetch = async {
            if let Err(e) = retried(|| {
                slipway_core::store::objects::get_file(&job.objects, &r.artifact, &archive)
            })
            .await
            {
                return Err(format!(
                    "cannot fetch the artifact {}: {e}",
                    r.artifact.name
                ));
            }
            let (a, d) = (archive.clone(), artifact_dir.clone());
            tokio::task::spawn_blocking(move || workspace::unpack(&a, &d))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|e| format!("cannot unpack the artifact: {e}"))
        };
        // Both run to their end: a checkout is never dropped halfway through its command.
        let (checked_out, fetched) = tokio::join!(check_out, fetch);
        if let Err(reason) = checked_out.and(fetched) {
            return fail(reason);
        }
        let version = if rollback {
            r.version.clone()
        } else {
            version_of(&job.run.pipeline, &r.artifact)
        };
        let log_path = ws.out().join("deploy.log");
        let mut env = self.exec.base_env(&ws.home());
        env.extend(target.env.clone());
        env.insert("SLIPWAY_ENVIRONMENT".into(), r.environment.clone());
        env.insert("SLIPWAY_RUN_ID".into(), job.run_id.clone());
        env.insert("SLIPWAY_PIPELINE".into(), job.run.pipeline.clone());
        env.insert("SLIPWAY_VERSION".into(), version.clone());
        env.insert(
            "SLIPWAY_ARTIFACT_DIR".into(),
            artifact_dir.display().to_string(),
        );
        env.insert(
            "SLIPWAY_ARTIFACT_DIGEST".into(),
            r.artifact.digest.to_string(),
        );
        env.insert(
            "SLIPWAY_DEPLOY_KEY".into(),
            format!("{}/{}/{}", job.run_id, r.stage, r.attempt),
        );
        if let Some(slot) = r.slot {
            env.insert("SLIPWAY_SLOT".into(), slot.as_str().into());
        }
        env.insert(
            "SLIPWAY_PREVIOUS_VERSION".into(),
            previous
                .as_ref()
                .map(|p| p.version.clone())
                .unwrap_or_default(),
        );
        let src = ws.src();
        info!(environment = %r.environment, %version, rollback, "Deploying.");
        let outcome = exec::run_in(
            &scope,
            Cmd {
                argv: &target.command,
                cwd: &src,
                env,
                timeout: Duration::from_secs(target.timeout_secs),
                log: &log_path,
            },
            &job.cancel,
        )
        .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => return fail(format!("deploy command could not start: {e}")),
        };
        let log_name = job.object_name("log");
        // The deploy happened (or not) whatever becomes of its log: never fail it for that.
        let log = match retried(|| {
            slipway_core::store::objects::put_file(
                &job.objects,
                &self.logs_bucket,
                Some(&log_name),
                &log_path,
            )
        })
        .await
        {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "Cannot store the deploy log.");
                None
            }
        };
        if !outcome.exit.success() {
            let tail = exec::log_tail(&log_path, 20);
            let what = match outcome.exit {
                exec::Exit::TimedOut => format!("deploy timed out after {}s", target.timeout_secs),
                other => format!("deploy command failed with {other}"),
            };
            return Ok(failed(
                kind,
                r,
                format!("{what}; last lines of the log:\n{tail}"),
                outcome.exit.code(),
                Some(tail),
                log,
            ));
        }
        let done = DeploySucceeded {
            stage: r.stage.clone(),
            attempt: r.attempt,
            pipeline: job.run.pipeline.clone(),
            environment: r.environment.clone(),
            version,
            artifact: r.artifact.clone(),
            previous_version: previous.map(|p| p.version),
            log,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        if kind == StageKind::Promote
            && let Err(e) = self.traffic_back_to_stable(job, r).await
        {
            // The change is in both slots, so users are served it either way; but the next
            // candidate would be deployed into the slot holding the traffic. A promotion is
            // only done once the traffic is back.
            warn!(environment = %r.environment, error = %e, "Promoted, but the traffic could not be set back to the stable slot.");
            return Ok(failed(
                kind,
                r,
                format!(
                    "the stable slot runs {}, but the traffic could not be set back to it: {e}",
                    done.version
                ),
                None,
                None,
                done.log,
            ));
        }
        Ok(match kind {
            StageKind::Rollback => EventData::RollbackSucceeded(done),
            StageKind::Promote => EventData::PromoteSucceeded(done),
            _ => EventData::DeploySucceeded(done),
        })
    }

    /// After a promotion the stable slot runs the change: all traffic goes back to it, so the
    /// next candidate starts with none. Recorded under the rollout stage it ends.
    async fn traffic_back_to_stable(&self, job: &Job, r: &DeployRequested) -> Result<(), String> {
        let Some(traffic) = job
            .run
            .spec
            .environment(&r.environment)
            .and_then(|e| e.traffic.clone())
        else {
            return Ok(());
        };
        let stage = StageKind::Rollout.key(Some(&r.environment));
        let attempt = job.run.stage(&stage).map_or(1, |s| s.attempt);
        let target = slipway_core::traffic::Target {
            traffic: &traffic,
            pipeline: &job.run.pipeline,
            environment: &r.environment,
            shadow: false,
        };
        let published =
            retried(|| slipway_core::traffic::publish(&job.bus, &self.exec, &target, Weight::NONE))
                .await?;
        let w = WeightSet {
            stage,
            attempt,
            environment: r.environment.clone(),
            step: u32::try_from(
                job.run
                    .spec
                    .environment(&r.environment)
                    .and_then(|e| e.rollout.as_ref())
                    .map_or(0, |x| x.plan().len()),
            )
            .unwrap_or(u32::MAX),
            weight: 0.0,
            cause: WeightCause::Promoted,
            published,
            at: slipway_core::bus::now(),
        };
        let mut e = Event::new(
            slipway_domain::rollout::weight_event_id(&job.run_id, &w),
            "/slipway/deployer",
            Some(job.run_id.clone()),
            w.at,
            EventData::RolloutWeightSet(w),
        );
        e.traceparent = job.request.traceparent.clone();
        job.bus.publish(&e).await.map_err(|e| e.to_string())?;
        Ok(())
    }
}
