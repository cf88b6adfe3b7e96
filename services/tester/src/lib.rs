//! The tester: one `test.requested` (a suite) in, `test.succeeded` or `test.failed` out.
//!
//! It checks the source out into a fresh workspace, fetches and unpacks the run's artifact
//! (`SLIPWAY_ARTIFACT_DIR`), runs the suite's command with a clean environment and timeout,
//! reads the suite's JUnit report into per-case results when it has one, and stores the log.
//! A failed suite's reason names the failing cases.

pub mod junit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::exec::workspace::{self, Workspace};
use slipway_core::exec::{self, Cmd, ExecSettings};
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_domain::events::{CaseStatus, EventData, TestReport, TestRequested};

/// Runs the tester until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let bus = Bus::connect(&config.nats, "slipway-tester").await?;
    let worker = Arc::new(Tester {
        exec: config.exec.clone(),
        logs_bucket: config.nats.stream.logs_bucket.clone(),
    });
    run_worker(bus, worker, config.worker, &config.health, shutdown).await
}

/// The test worker.
#[derive(Debug)]
pub struct Tester {
    pub exec: ExecSettings,
    pub logs_bucket: String,
}

impl Worker for Tester {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Tester
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let EventData::TestRequested(req) = &job.request.data else {
            return Err(Transient::not_a(&job.request, "a test request"));
        };
        self.test(job, req).await
    }
}

/// How many failing cases a reason names before it says "and N more".
const NAMED_FAILURES: usize = 10;

impl Tester {
    async fn test(&self, job: &Job, req: &TestRequested) -> Result<EventData, Transient> {
        let started = Instant::now();
        let suite = &req.suite;
        let mut report = TestReport {
            stage: req.stage.clone(),
            attempt: req.attempt,
            suite: suite.name.clone(),
            exit_code: None,
            summary: None,
            cases: Vec::new(),
            reason: None,
            log_tail: None,
            log: None,
            duration_ms: 0,
        };
        let elapsed = |s: Instant| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX);
        let ws = Workspace::create(&self.exec, &format!("{}-test-{}", job.run_id, suite.name))
            .map_err(|e| Transient(e.to_string()))?;
        let scope = job.scope();
        // The source is checked out while the artifact is fetched and unpacked.
        let check_out = async {
            let span = scope.span("checkout");
            let checked_out = ws.checkout(&req.source, &self.exec, &job.cancel).await;
            if let Err(e) = &checked_out {
                span.fail("checkout_failed", e.to_string());
            }
            checked_out
        };
        let archive = ws.out().join("artifact.tar.gz");
        let artifact_dir = ws.root().join("artifact");
        let fetch = async {
            slipway_core::store::objects::get_file(&job.objects, &req.artifact, &archive)
                .await
                .map_err(Transient::from)?;
            let (a, d) = (archive.clone(), artifact_dir.clone());
            tokio::task::spawn_blocking(move || workspace::unpack(&a, &d))
                .await
                .map_err(|e| Transient(e.to_string()))?
                .map_err(|e| Transient(format!("cannot unpack the artifact: {e}")))
        };
        let (checked_out, fetched) = tokio::join!(check_out, fetch);
        if let Err(e) = checked_out {
            report.reason = Some(format!("checkout failed: {e}"));
            report.duration_ms = elapsed(started);
            return Ok(EventData::TestFailed(report));
        }
        fetched?;

        let log_path = ws.out().join("test.log");
        let mut env = self.exec.base_env(&ws.home());
        env.extend(suite.env.clone());
        env.insert("SLIPWAY_RUN_ID".into(), job.run_id.clone());
        env.insert("SLIPWAY_SUITE".into(), suite.name.clone());
        env.insert(
            "SLIPWAY_ARTIFACT_DIR".into(),
            artifact_dir.display().to_string(),
        );
        env.insert(
            "SLIPWAY_ARTIFACT_DIGEST".into(),
            req.artifact.digest.to_string(),
        );
        let src = ws.src();
        let outcome = exec::run_in(
            &scope,
            Cmd {
                argv: &suite.command,
                cwd: &src,
                env,
                timeout: Duration::from_secs(suite.timeout_secs),
                log: &log_path,
            },
            &job.cancel,
        )
        .await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                report.reason = Some(format!("suite {} could not start: {e}", suite.name));
                report.duration_ms = elapsed(started);
                return Ok(EventData::TestFailed(report));
            }
        };
        let log_name = job.object_name("log");
        report.log = Some(
            slipway_core::store::objects::put_file(
                &job.objects,
                &self.logs_bucket,
                Some(&log_name),
                &log_path,
            )
            .await
            .map_err(Transient::from)?,
        );
        report.exit_code = outcome.exit.code();
        let tail = exec::log_tail(&log_path, 20);

        let mut problems = Vec::new();
        if !outcome.exit.success() {
            problems.push(match outcome.exit {
                exec::Exit::TimedOut => format!("timed out after {}s", suite.timeout_secs),
                other => format!("command failed with {other}"),
            });
        }
        if let Some(path) = &suite.junit {
            match read_report(&src, path) {
                Ok(r) => {
                    let failing: Vec<String> = r
                        .cases
                        .iter()
                        .filter(|c| matches!(c.status, CaseStatus::Failed | CaseStatus::Error))
                        .map(|c| {
                            let name = match &c.class {
                                Some(cl) => format!("{cl}.{}", c.name),
                                None => c.name.clone(),
                            };
                            match &c.message {
                                Some(m) => format!("{name} ({m})"),
                                None => name,
                            }
                        })
                        .collect();
                    if !failing.is_empty() {
                        let n = failing.len();
                        let mut named = failing[..n.min(NAMED_FAILURES)].join(", ");
                        if n > NAMED_FAILURES {
                            named.push_str(&format!(", and {} more", n - NAMED_FAILURES));
                        }
                        problems.push(format!("{n} of {} cases failed: {named}", r.summary.tests));
                    }
                    report.summary = Some(r.summary);
                    report.cases = r.cases;
                }
                Err(why) => problems.push(why),
            }
        }
        report.duration_ms = elapsed(started);
        if problems.is_empty() {
            Ok(EventData::TestSucceeded(report))
        } else {
            report.reason = Some(format!("suite {}: {}", suite.name, problems.join("; ")));
            report.log_tail = Some(tail);
            Ok(EventData::TestFailed(report))
        }
    }
}

/// Reads the suite's JUnit report, refusing a path that leaves the workspace.
fn read_report(src: &std::path::Path, path: &str) -> Result<junit::Report, String> {
    let full = src.join(path);
    let canon = full
        .canonicalize()
        .map_err(|_| format!("JUnit report {path} was not written"))?;
    let root = src.canonicalize().map_err(|e| e.to_string())?;
    if !canon.starts_with(&root) {
        return Err(format!(
            "JUnit report {path} resolves outside the workspace"
        ));
    }
    let meta = std::fs::metadata(&canon).map_err(|e| e.to_string())?;
    // Reports beyond 64 MiB are not test reports we can hold in an event.
    if meta.len() > 64 * 1024 * 1024 {
        return Err(format!("JUnit report {path} is larger than 64 MiB"));
    }
    let text = std::fs::read(&canon).map_err(|e| format!("cannot read {path}: {e}"))?;
    let text = String::from_utf8_lossy(&text);
    junit::parse(&text).map_err(|e| format!("{path}: {e}"))
}
