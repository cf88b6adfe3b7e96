//! A pure simulation of runs: the conductor's decisions folded in, and every request answered
//! by a scripted worker. No I/O, no clock: time is a value that the test moves.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::decide::{Command, decide};
use crate::envelope::Event;
use crate::events::{
    ApprovalDecision, BuildSucceeded, ChangeInfo, DeployStarted, DeploySucceeded, EventData,
    GateReport, MonitorReport, ObjectRef, RunCreated, SourceRef, StageKind, TestReport,
    TestSummary, Verdict,
};
use crate::fold::{Run, fold};
use crate::ids;
use crate::spec::PipelineSpec;

pub use crate::spec::NOOP_PIPELINE;

/// How the scripted worker answers one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Succeed,
    Fail(String),
    /// Passes with a warning (gates only).
    Warn,
    /// No answer at all (the worker never comes).
    Silent,
}

/// One simulated run.
#[derive(Debug, Clone)]
pub struct Sim {
    pub run_id: String,
    pub run: Option<Run>,
    /// Every event, in log order.
    pub log: Vec<Event>,
    pub now: DateTime<Utc>,
    /// Answers by stage key; stages not named succeed.
    pub script: BTreeMap<String, Answer>,
    /// The version live before the run, per environment (what a deployer would find).
    pub live: BTreeMap<String, (String, ObjectRef)>,
}

/// One production environment, deployed and then monitored: no tests, no approval.
/// A production environment rolled out as a canary.
pub const CANARY_PIPELINE: &str = r#"
[pipeline]
name = "svc"
[build]
command = ["make"]
[[environment]]
name = "production"
url = "http://127.0.0.1:1"
[environment.deploy]
command = ["./deploy"]
[environment.traffic]
flag_file = "/tmp/flags.json"
[environment.rollout]
strategy = "canary"
requests = "http_requests_total"
steps = [{ weight = 5, duration_secs = 60 }, { weight = 50, duration_secs = 60 }]
[[environment.rollout.analysis]]
name = "errors"
kind = "ratio"
numerator = "http_errors_total"
denominator = "http_requests_total"
tolerance = 0.01
[monitor]
window_secs = 60
"#;

pub const MONITORED_PIPELINE: &str = r#"
[pipeline]
name = "svc"
[build]
command = ["make"]
[[environment]]
name = "production"
url = "http://127.0.0.1:1"
[environment.deploy]
command = ["./deploy"]
[monitor]
window_secs = 60
"#;

/// An artifact reference with a digest made from `seed`.
pub fn artifact(seed: &str) -> ObjectRef {
    let digest = crate::digest::Digest::of(seed.as_bytes());
    ObjectRef {
        bucket: "slipway-artifacts".into(),
        name: format!("sha256/{}", digest.hex()),
        digest,
        size: 1234,
    }
}

impl Sim {
    /// A run of `spec`, created at a fixed time.
    ///
    /// # Panics
    /// When the spec is invalid.
    pub fn new(spec: &str) -> Self {
        Self::with_source(
            spec,
            SourceRef::Directory {
                path: "/src".into(),
            },
            "change-1",
        )
    }

    /// A run of `spec` on `source`, for the change `change_id` (which makes the run id).
    ///
    /// # Panics
    /// When the spec is invalid.
    pub fn with_source(spec: &str, source: SourceRef, change_id: &str) -> Self {
        Self::build(spec, source, change_id, 1)
    }

    /// The `n`-th change of a pipeline: created `n` seconds after the first, with stream
    /// sequence `n`, so runs of the same spec have a creation order.
    ///
    /// # Panics
    /// When the spec is invalid.
    pub fn nth(spec: &str, n: u64) -> Self {
        Self::build(
            spec,
            SourceRef::Directory {
                path: "/src".into(),
            },
            &format!("change-{n}"),
            n,
        )
    }

    /// The `n`-th change, its clock starting at `start` (a simulated run written to a live
    /// log must not look months old to a real conductor's timeouts).
    ///
    /// # Panics
    /// When the spec is invalid.
    pub fn nth_at(spec: &str, n: u64, start: DateTime<Utc>) -> Self {
        Self::build_at(
            spec,
            SourceRef::Directory {
                path: "/src".into(),
            },
            &format!("change-{n}"),
            n,
            start,
        )
    }

    fn build(spec: &str, source: SourceRef, change_id: &str, seq: u64) -> Self {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        Self::build_at(spec, source, change_id, seq, start)
    }

    fn build_at(
        spec: &str,
        source: SourceRef,
        change_id: &str,
        seq: u64,
        start: DateTime<Utc>,
    ) -> Self {
        let spec = PipelineSpec::parse(spec).expect("valid spec");
        let now = start + Duration::seconds(i64::try_from(seq).unwrap_or(0) - 1);
        let run_id = ids::run_id("/sim", change_id);
        let created = RunCreated {
            run_id: run_id.clone(),
            pipeline: spec.pipeline.name.clone(),
            change: ChangeInfo {
                id: change_id.into(),
                source: "/sim".into(),
                seq,
                time: now,
                author: Some("alice".into()),
                title: None,
                subject: None,
                commit: None,
            },
            source,
            spec: serde_json::to_value(&spec).unwrap(),
            rerun_of: None,
        };
        let mut sim = Self {
            run_id: run_id.clone(),
            run: None,
            log: Vec::new(),
            now,
            script: BTreeMap::new(),
            live: BTreeMap::new(),
        };
        sim.push(Event::new(
            ids::derived(&[&run_id, "run.created"]),
            "/slipway/conductor",
            Some(run_id),
            now,
            EventData::RunCreated(created),
        ));
        sim
    }

    pub fn run(&self) -> &Run {
        self.run.as_ref().expect("run exists")
    }

    /// Appends an event to the log and folds it.
    pub fn push(&mut self, e: Event) {
        self.run = fold(self.run.take(), &e);
        self.log.push(e);
    }

    /// Appends a worker's fact about the run.
    pub fn fact(&mut self, data: EventData) {
        self.now += Duration::seconds(1);
        let (stage, attempt, _) =
            data.stage_fact()
                .unwrap_or(("", 0, crate::events::StageVerb::Failed));
        let id = ids::derived(&[&self.run_id, data.type_name(), stage, &attempt.to_string()]);
        let id = match &data {
            // Approvals are per approver.
            EventData::ApprovalApproved(a)
            | EventData::ApprovalRejected(a)
            | EventData::ApprovalAutoApproved(a) => {
                ids::derived(&[&self.run_id, data.type_name(), &a.stage, &a.approver])
            }
            _ => id,
        };
        let source = crate::events::stage_kind_of(data.type_name())
            .map_or("/slipway/worker", |k| {
                crate::service::Service::works(k).source()
            });
        let e = Event::new(id, source, Some(self.run_id.clone()), self.now, data);
        self.push(e);
    }

    /// One decision round: decide, record the commands, and return them.
    pub fn decide(&mut self) -> Vec<Command> {
        let cmds = decide(self.run(), self.now);
        for c in &cmds {
            let e = c.to_event(&self.run_id, "/slipway/conductor", self.now);
            self.push(e);
        }
        cmds
    }

    /// One decision round among other runs of the pipeline (see [`crate::decide::Fleet`]).
    pub fn decide_in(&mut self, fleet: &crate::decide::Fleet) -> Vec<Command> {
        let cmds = crate::decide::decide_in(self.run(), fleet, self.now);
        for c in &cmds {
            let e = c.to_event(&self.run_id, "/slipway/conductor", self.now);
            self.push(e);
        }
        cmds
    }

    /// Answers every request in `cmds` per the script.
    pub fn answer(&mut self, cmds: &[Command]) {
        for c in cmds {
            if let Command::Request(data) = c {
                self.answer_request(data);
            }
        }
    }

    /// Decides and answers until the run ends or nothing moves; returns every round's commands.
    pub fn run_to_end(&mut self) -> Vec<Vec<Command>> {
        let mut rounds = Vec::new();
        for _ in 0..64 {
            let cmds = self.decide();
            if cmds.is_empty() {
                break;
            }
            self.answer(&cmds);
            let done = self.run().is_ended();
            rounds.push(cmds);
            if done {
                break;
            }
        }
        rounds
    }

    fn answer_for(&self, stage: &str) -> Answer {
        self.script.get(stage).cloned().unwrap_or(Answer::Succeed)
    }

    fn answer_request(&mut self, data: &EventData) {
        let Some((stage, attempt, _)) = data.stage_fact() else {
            return;
        };
        let stage = stage.to_string();
        let answer = self.answer_for(&stage);
        if answer == Answer::Silent {
            return;
        }
        let kind = crate::events::stage_kind_of(data.type_name()).expect("stage kind");
        if let Answer::Fail(reason) = &answer
            && kind != StageKind::Approval
        {
            if let Some(started) =
                crate::facts::started_data(data.type_name(), &stage, attempt, "sim")
            {
                self.fact(started);
            }
            let mut failed = EventData::stage_failure(kind, &stage, attempt, reason.clone());
            if let EventData::MonitorFailed(m) = &mut failed {
                m.incident_id = Some("inc-1".into());
            }
            self.fact(failed);
            return;
        }
        let verdict = if answer == Answer::Warn {
            Verdict::Warn
        } else {
            Verdict::Pass
        };
        match data {
            EventData::BuildRequested(_) => self.fact(EventData::BuildSucceeded(BuildSucceeded {
                stage,
                attempt,
                artifact: artifact(&self.run_id),
                files: vec!["dist/app".into()],
                log: artifact("log"),
                duration_ms: 10,
            })),
            EventData::TestRequested(r) => self.fact(EventData::TestSucceeded(TestReport {
                stage,
                attempt,
                suite: r.suite.name.clone(),
                exit_code: Some(0),
                summary: Some(TestSummary {
                    tests: 1,
                    passed: 1,
                    ..Default::default()
                }),
                cases: Vec::new(),
                reason: None,
                log_tail: None,
                log: None,
                duration_ms: 5,
            })),
            EventData::DeployRequested(r) | EventData::RollbackRequested(r) => {
                let rollback = matches!(data, EventData::RollbackRequested(_));
                let prev = self.live.get(&r.environment).cloned();
                let started = DeployStarted {
                    stage: stage.clone(),
                    attempt,
                    worker: "sim".into(),
                    environment: r.environment.clone(),
                    version: r.version.clone(),
                    previous_version: prev.as_ref().map(|p| p.0.clone()),
                    previous_artifact: prev.as_ref().map(|p| p.1.clone()),
                };
                let done = DeploySucceeded {
                    stage,
                    attempt,
                    pipeline: r.pipeline.clone(),
                    environment: r.environment.clone(),
                    version: r.version.clone(),
                    artifact: r.artifact.clone(),
                    previous_version: prev.map(|p| p.0),
                    log: None,
                    duration_ms: 3,
                };
                if rollback {
                    self.fact(EventData::RollbackStarted(started));
                    self.fact(EventData::RollbackSucceeded(done));
                } else {
                    self.fact(EventData::DeployStarted(started));
                    self.fact(EventData::DeploySucceeded(done));
                }
                self.live.insert(
                    r.environment.clone(),
                    (r.version.clone(), r.artifact.clone()),
                );
            }
            EventData::EvaluateRequested(_)
            | EventData::PerfRequested(_)
            | EventData::CostRequested(_) => {
                let report = GateReport {
                    stage,
                    attempt,
                    verdict,
                    metrics: BTreeMap::from([("score".to_string(), 1.0)]),
                    checks: vec![crate::thresholds::check(
                        "score",
                        None,
                        1.0,
                        None,
                        &crate::spec::Threshold {
                            min: Some(0.95),
                            ..Default::default()
                        },
                    )],
                    baseline_run: None,
                    details: None,
                    reason: None,
                    duration_ms: 7,
                };
                self.fact(match kind {
                    StageKind::Evaluate => EventData::EvaluateSucceeded(report),
                    StageKind::Perf => EventData::PerfSucceeded(report),
                    _ => EventData::CostSucceeded(report),
                });
            }
            EventData::ApprovalRequested(r) => {
                let reject = matches!(answer, Answer::Fail(_));
                let n = if reject {
                    1
                } else {
                    r.policy.required_approvals
                };
                for i in 0..n {
                    let d = ApprovalDecision {
                        stage: stage.clone(),
                        attempt,
                        approver: format!("approver-{i}"),
                        groups: vec!["release-managers".into()],
                        artifact_digest: r.artifact_digest.clone(),
                        gates_digest: r.gates_digest.clone(),
                        comment: match &answer {
                            Answer::Fail(c) => Some(c.clone()),
                            _ => None,
                        },
                        decided_at: self.now,
                        signature: None,
                        issuer: None,
                    };
                    self.fact(if reject {
                        EventData::ApprovalRejected(d)
                    } else {
                        EventData::ApprovalApproved(d)
                    });
                }
            }
            EventData::PromoteRequested(r) => {
                let live = self.live.get(&r.environment).cloned();
                self.fact(EventData::PromoteStarted(DeployStarted {
                    stage: stage.clone(),
                    attempt,
                    worker: "sim".into(),
                    environment: r.environment.clone(),
                    version: r.version.clone(),
                    previous_version: live.as_ref().map(|p| p.0.clone()),
                    previous_artifact: live.map(|p| p.1),
                }));
                self.fact(EventData::PromoteSucceeded(DeploySucceeded {
                    stage,
                    attempt,
                    pipeline: r.pipeline.clone(),
                    environment: r.environment.clone(),
                    version: r.version.clone(),
                    artifact: r.artifact.clone(),
                    previous_version: None,
                    log: None,
                    duration_ms: 3,
                }));
            }
            EventData::RolloutRequested(r) => {
                if let Some(s) =
                    crate::facts::started_data(data.type_name(), &stage, attempt, "sim")
                {
                    self.fact(s);
                }
                self.fact(EventData::RolloutSucceeded(crate::rollout::RolloutReport {
                    stage,
                    attempt,
                    environment: r.environment.name.clone(),
                    version: r.version.clone(),
                    steps_passed: u32::try_from(r.spec.plan().len()).unwrap_or(u32::MAX),
                    last: None,
                    decided_by: "judge".into(),
                    reason: "every step passed".into(),
                    duration_ms: 11,
                }));
            }
            EventData::MonitorRequested(r) => {
                self.fact(EventData::MonitorSucceeded(MonitorReport {
                    stage,
                    attempt,
                    environment: r.environment.name.clone(),
                    verdict: crate::events::MonitorVerdict::Verified,
                    version: Some(r.version.clone()),
                    probes: 10,
                    metrics: BTreeMap::new(),
                    checks: Vec::new(),
                    incident_id: None,
                    reason: None,
                    duration_ms: 9,
                }))
            }
            _ => {}
        }
    }
}
