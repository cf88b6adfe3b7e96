//! The builder: a `build.requested` in, `build.succeeded` (artifact + log) or `build.failed`
//! (exit code + log tail) out.
//!
//! It checks the source out into a fresh workspace, runs the spec's build command there with
//! a clean environment and the spec's timeout, packs the declared artifact paths into a
//! deterministic `tar.gz` (so a repeated build stores the same object once), and stores the
//! artifact (`sha256/<hex>`) and the log in JetStream Object Store buckets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::exec::workspace::{self, Workspace};
use slipway_core::exec::{self, Cmd, ExecSettings};
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_domain::events::{BuildRequested, BuildSucceeded, EventData, StageFailed};

/// Runs the builder until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let bus = Bus::connect(&config.nats, "slipway-builder").await?;
    let worker = Arc::new(Builder {
        exec: config.exec.clone(),
        artifacts_bucket: config.nats.stream.artifacts_bucket.clone(),
        logs_bucket: config.nats.stream.logs_bucket.clone(),
    });
    run_worker(bus, worker, config.worker, &config.health, shutdown).await
}

/// The build worker.
#[derive(Debug)]
pub struct Builder {
    pub exec: ExecSettings,
    pub artifacts_bucket: String,
    pub logs_bucket: String,
}

impl Worker for Builder {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Builder
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let EventData::BuildRequested(req) = &job.request.data else {
            return Err(Transient::not_a(&job.request, "a build request"));
        };
        self.build(job, req).await
    }
}

impl Builder {
    async fn build(&self, job: &Job, req: &BuildRequested) -> Result<EventData, Transient> {
        let started = Instant::now();
        let fail = |reason: String, exit_code: Option<i32>, log_tail: Option<String>, log| {
            Ok(EventData::BuildFailed(StageFailed {
                stage: req.stage.clone(),
                attempt: req.attempt,
                reason,
                exit_code,
                log_tail,
                log,
            }))
        };
        let ws = Workspace::create(&self.exec, &format!("{}-build", job.run_id))
            .map_err(|e| Transient(e.to_string()))?;
        let scope = job.scope();
        let span = scope.span("checkout");
        if let Err(e) = ws.checkout(&req.source, &self.exec, &job.cancel).await {
            span.fail("checkout_failed", e.to_string());
            return fail(format!("checkout failed: {e}"), None, None, None);
        }
        drop(span);
        let log_path = ws.out().join("build.log");
        let mut env = self.exec.base_env(&ws.home());
        env.extend(req.build.env.clone());
        env.insert("SLIPWAY_RUN_ID".into(), job.run_id.clone());
        env.insert("SLIPWAY_PIPELINE".into(), req.pipeline.clone());
        env.insert("SLIPWAY_STAGE".into(), req.stage.clone());
        if let Some(subject) = &job.run.change.subject {
            env.insert("SLIPWAY_CHANGE_SUBJECT".into(), subject.clone());
        }
        let src = ws.src();
        let outcome = exec::run_in(
            &scope,
            Cmd {
                argv: &req.build.command,
                cwd: &src,
                env,
                timeout: Duration::from_secs(req.build.timeout_secs),
                log: &log_path,
            },
            &job.cancel,
        )
        .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                return fail(
                    format!("build command could not start: {e}"),
                    None,
                    None,
                    None,
                );
            }
        };
        let log_name = job.object_name("log");
        let upload_log = async {
            let _span = scope.span("upload");
            slipway_core::store::objects::put_file(
                &job.objects,
                &self.logs_bucket,
                Some(&log_name),
                &log_path,
            )
            .await
            .map_err(Transient::from)
        };
        if !outcome.exit.success() {
            let log = upload_log.await?;
            let tail = exec::log_tail(&log_path, 20);
            let what = match outcome.exit {
                exec::Exit::TimedOut => {
                    format!("build timed out after {}s", req.build.timeout_secs)
                }
                other => format!("build command failed with {other}"),
            };
            return fail(
                format!("{what}; last lines of the log:\n{tail}"),
                outcome.exit.code(),
                Some(tail),
                Some(log),
            );
        }
        // The artifact is packed and stored while the log is stored.
        let store_artifact = async {
            let pack = scope.span("package");
            let artifacts = req.build.artifacts.clone();
            let dest = ws.out().join("artifact.tar.gz");
            let packed =
                tokio::task::spawn_blocking(move || workspace::pack(&src, &artifacts, &dest))
                    .await
                    .map_err(|e| Transient(e.to_string()))?;
            let packed = match packed {
                Ok(p) => p,
                Err(e) => {
                    return Ok::<_, Transient>(Err(format!("packing the artifact failed: {e}")));
                }
            };
            drop(pack);
            let mut upload = scope.span("upload");
            upload.attr("slipway.artifact.files", packed.files.len() as i64);
            let artifact = slipway_core::store::objects::put_file(
                &job.objects,
                &self.artifacts_bucket,
                None,
                &packed.path,
            )
            .await
            .map_err(Transient::from)?;
            Ok::<_, Transient>(Ok((artifact, packed.files)))
        };
        let (log, stored) = tokio::join!(upload_log, store_artifact);
        let log = log?;
        let (artifact, files) = match stored? {
            Ok(a) => a,
            Err(reason) => return fail(reason, Some(0), None, Some(log)),
        };
        Ok(EventData::BuildSucceeded(BuildSucceeded {
            stage: req.stage.clone(),
            attempt: req.attempt,
            artifact,
            files,
            log,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }
}
