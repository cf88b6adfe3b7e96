//! Given a run's events, when deciding, then these commands: the pipeline logic as tables.

use chrono::Duration;

use super::*;
use crate::fold::StageStatus;
use crate::sim::{Answer, Sim, artifact};

const FULL: &str = include_str!("../../../schemas/examples/full-pipeline.toml");

const BUILD_AND_TEST: &str = r#"
[pipeline]
name = "bt"
[build]
command = ["make"]
timeout_secs = 60
[[test]]
name = "unit"
command = ["make", "test"]
timeout_secs = 30
[[test]]
name = "e2e"
command = ["make", "e2e"]
"#;

/// The stage keys each round requested, and how the run ended.
fn requested(rounds: &[Vec<Command>]) -> Vec<Vec<String>> {
    rounds
        .iter()
        .map(|cmds| {
            cmds.iter()
                .map(|c| match c {
                    Command::Request(d) => d.stage_fact().unwrap().0.to_string(),
                    Command::FailStage(d) => format!("fail {}", d.stage_fact().unwrap().0),
                    Command::AutoApprove(_) => "auto-approve".into(),
                    Command::Finish { outcome, .. } => format!("finish {}", outcome.as_str()),
                })
                .collect()
        })
        .collect()
}

fn keys(v: &[&[&str]]) -> Vec<Vec<String>> {
    v.iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

#[test]
fn build_then_suites_in_parallel_then_success() {
    let mut sim = Sim::new(BUILD_AND_TEST);
    let rounds = sim.run_to_end();
    assert_eq!(
        requested(&rounds),
        keys(&[
            &["build"],
            &["test:unit", "test:e2e"],
            &["finish succeeded"]
        ])
    );
    assert_eq!(sim.run().phase, Phase::Succeeded);
    assert_eq!(sim.run().reason.as_deref(), Some("all 3 stages succeeded"));
}

#[test]
fn the_whole_pipeline_in_order() {
    let mut sim = Sim::new(FULL);
    // A version is live in production before this run: the baseline and rollback target.
    sim.live.insert(
        "production".into(),
        ("support-bot-000000000000".into(), artifact("old")),
    );
    let rounds = sim.run_to_end();
    assert_eq!(
        requested(&rounds),
        keys(&[
            &["build"],
            &["test:unit", "test:integration"],
            &["deploy:staging"],
            &["evaluate", "perf"],
            &["cost"],
            &["approval:production"],
            &["deploy:production"],
            &["monitor:production"],
            &["finish succeeded"],
        ])
    );
    let run = sim.run();
    assert_eq!(run.approvals.len(), 2, "two approvers required");
    assert!(
        run.stages
            .iter()
            .all(|s| s.status == StageStatus::Succeeded)
    );
}

#[test]
fn phases_follow_the_work() {
    let mut sim = Sim::new(FULL);
    assert_eq!(sim.run().phase, Phase::Queued);
    let cmds = sim.decide();
    assert_eq!(sim.run().phase, Phase::Running);
    sim.answer(&cmds);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::AwaitingApproval);
}

#[test]
fn failures_end_the_run_with_the_stage_reason() {
    let cases: &[(&str, Answer, Phase, &str)] = &[
        (
            "build",
            Answer::Fail("exit code 2".into()),
            Phase::Failed,
            "build failed: exit code 2",
        ),
        (
            "test:unit",
            Answer::Fail("1 of 3 cases failed".into()),
            Phase::Failed,
            "test:unit failed: 1 of 3",
        ),
        (
            "deploy:staging",
            Answer::Fail("deploy script".into()),
            Phase::Failed,
            "deploy:staging failed",
        ),
        (
            "perf",
            Answer::Fail("p95 regressed".into()),
            Phase::Failed,
            "perf failed: p95 regressed",
        ),
        (
            "approval:production",
            Answer::Fail("not this week".into()),
            Phase::Rejected,
            "rejected by approver-0: not this week",
        ),
    ];
    for (stage, answer, phase, reason) in cases {
        let mut sim = Sim::new(FULL);
        sim.script.insert(stage.to_string(), answer.clone());
        sim.run_to_end();
        let run = sim.run();
        assert_eq!(run.phase, *phase, "{stage}");
        let got = run.reason.as_deref().unwrap_or_default();
        assert!(got.starts_with(reason), "{stage}: {got}");
    }
}

#[test]
fn a_monitor_breach_rolls_back_to_the_previous_version() {
    let mut sim = Sim::new(FULL);
    sim.live.insert(
        "production".into(),
        ("support-bot-000000000000".into(), artifact("old")),
    );
    sim.script.insert(
        "monitor:production".into(),
        Answer::Fail("error rate 7% > 1%".into()),
    );
    let rounds = sim.run_to_end();
    let flat: Vec<String> = requested(&rounds).concat();
    assert_eq!(
        flat[flat.len() - 2..],
        [
            "rollback:production".to_string(),
            "finish rolled_back".to_string()
        ]
    );
    let rb = rounds
        .iter()
        .flatten()
        .find_map(|c| match c {
            Command::Request(EventData::RollbackRequested(r)) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(rb.version, "support-bot-000000000000");
    assert_eq!(rb.artifact, artifact("old"));
    let run = sim.run();
    assert_eq!(run.phase, Phase::RolledBack);
    assert!(
        run.reason
            .as_deref()
            .unwrap()
            .contains("rolled back to support-bot-000000000000")
    );
}

#[test]
fn a_monitor_breach_without_an_earlier_version_fails() {
    let mut sim = Sim::new(FULL);
    sim.script
        .insert("monitor:production".into(), Answer::Fail("down".into()));
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::Failed);
    assert!(
        sim.run()
            .reason
            .as_deref()
            .unwrap()
            .contains("no earlier version")
    );
}

#[test]
fn a_silent_worker_fails_at_the_timeout_with_a_reason() {
    let mut sim = Sim::new(BUILD_AND_TEST);
    sim.script.insert("test:unit".into(), Answer::Silent);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::Running);
    // 30 s timeout plus 5 + 30/4 = 12 s of grace: nothing before, a failure after.
    let requested = sim.run().stage("test:unit").unwrap().requested_at.unwrap();
    sim.now = requested + Duration::seconds(41);
    assert!(decide(sim.run(), sim.now).is_empty());
    // The deadline others read (the gateway's overdue metric) is the one the conductor keeps.
    let stage = sim.run().stage("test:unit").unwrap();
    assert_eq!(
        stage_deadline(sim.run(), stage, sim.now),
        Some(requested + Duration::seconds(42))
    );
    let done = sim.run().stage("build").unwrap();
    assert_eq!(stage_deadline(sim.run(), done, sim.now), None);
    sim.now = requested + Duration::seconds(42);
    let cmds = sim.decide();
    let Command::FailStage(EventData::TestFailed(r)) = &cmds[0] else {
        panic!("{cmds:?}")
    };
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("no worker answered within 42s"),
        "{r:?}"
    );
    assert!(r.reason.as_deref().unwrap().contains("tester"));
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::Failed);
}

#[test]
fn an_approval_that_never_comes_cancels_the_run() {
    let mut sim = Sim::new(FULL);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::AwaitingApproval);
    sim.now += Duration::seconds(259_200);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::Cancelled);
    assert!(
        sim.run()
            .reason
            .as_deref()
            .unwrap()
            .contains("no approval decision")
    );
}

#[test]
fn clean_gates_auto_approve_and_warnings_wait_for_a_human() {
    let auto = FULL.replace("auto_approve = \"never\"", "auto_approve = \"when_clean\"");
    let mut sim = Sim::new(&auto);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    let rounds = sim.run_to_end();
    assert!(
        requested(&rounds)
            .concat()
            .contains(&"auto-approve".to_string())
    );
    assert_eq!(sim.run().phase, Phase::Succeeded);

    let mut sim = Sim::new(&auto);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.script.insert("perf".into(), Answer::Warn);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::AwaitingApproval);
}

#[test]
fn an_approval_for_another_artifact_does_not_count() {
    let mut sim = Sim::new(FULL);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    let (now, run_id) = (sim.now, sim.run_id.clone());
    let approval = |approver: &str, digest: &str| {
        let d = ApprovalDecision {
            stage: "approval:production".into(),
            attempt: 1,
            approver: approver.into(),
            groups: vec![],
            artifact_digest: digest.into(),
            gates_digest: Default::default(),
            comment: None,
            decided_at: now,
            signature: None,
            issuer: None,
        };
        Event::new(
            ids::derived(&[approver, digest]),
            "/slipway/approval",
            Some(run_id.clone()),
            now,
            EventData::ApprovalApproved(d),
        )
    };
    let digest = sim.run().artifact.as_ref().unwrap().digest.clone();
    let stale = approval("bob", "sha256:0000");
    let bob = approval("bob", digest.as_str());
    let bob_again = approval("bob", digest.as_str());
    sim.push(stale);
    sim.push(bob);
    // The same approver twice (a new event id) still counts once.
    let mut again = bob_again;
    again.id = "another-id".into();
    sim.push(again);
    let st = sim.run().stage("approval:production").unwrap();
    assert_eq!(
        st.status,
        StageStatus::Requested,
        "one valid approver of two"
    );
    let carol = approval("carol", digest.as_str());
    sim.push(carol);
    assert_eq!(
        sim.run().stage("approval:production").unwrap().status,
        StageStatus::Succeeded
    );
}

#[test]
fn nothing_changes_an_ended_run() {
    let mut sim = Sim::new(BUILD_AND_TEST);
    sim.run_to_end();
    let before = sim.run().clone();
    // A late fact and a second end are ignored.
    let late = crate::facts::fact(
        crate::service::Service::Tester,
        &sim.run_id,
        EventData::stage_failure(StageKind::Test, "test:unit", 1, "late".into()),
        sim.now,
    );
    sim.push(late);
    let after = sim.run();
    assert_eq!(after.phase, before.phase);
    assert_eq!(after.stages, before.stages);
    assert!(decide(after, sim.now + Duration::days(30)).is_empty());
}

#[test]
fn deciding_on_a_replay_asks_for_nothing_new() {
    let mut sim = Sim::new(FULL);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    let replayed = Run::replay(&sim.log).unwrap();
    assert_eq!(&replayed, sim.run());
    assert!(decide(&replayed, sim.now).is_empty());
}

#[test]
fn decisions_have_deterministic_ids() {
    let mut a = Sim::new(BUILD_AND_TEST);
    let mut b = Sim::new(BUILD_AND_TEST);
    a.run_to_end();
    b.run_to_end();
    let ids = |s: &Sim| s.log.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
}

const TWO_ENVS: &str = r#"
[pipeline]
name = "lanes"
[build]
command = ["make"]
[[environment]]
name = "staging"
url = "http://127.0.0.1:1"
[environment.deploy]
command = ["./deploy"]
[[environment]]
name = "production"
url = "http://127.0.0.1:2"
requires_approval = true
[environment.deploy]
command = ["./deploy"]
[approval]
"#;

/// Decides and answers `sim` among `others` until nothing moves.
fn advance(sim: &mut Sim, others: &[&Sim]) -> Vec<String> {
    let mut asked = Vec::new();
    for _ in 0..32 {
        let mut runs: Vec<&Run> = others.iter().map(|s| s.run()).collect();
        runs.push(sim.run());
        let fleet = Fleet::of(runs);
        let cmds = sim.decide_in(&fleet);
        if cmds.is_empty() {
            break;
        }
        asked.extend(requested(std::slice::from_ref(&cmds)).concat());
        sim.answer(&cmds);
        if sim.run().is_ended() {
            break;
        }
    }
    asked
}

#[test]
fn one_deploy_per_environment_at_a_time_in_creation_order() {
    let mut a = Sim::nth(TWO_ENVS, 1);
    let mut b = Sim::nth(TWO_ENVS, 2);
    a.script.insert("deploy:staging".into(), Answer::Silent);
    // A holds staging (its deploy never finishes); B builds but waits for staging.
    assert!(advance(&mut a, &[&b]).contains(&"deploy:staging".to_string()));
    let asked = advance(&mut b, &[&a]);
    assert!(asked.contains(&"build".to_string()));
    assert!(!asked.contains(&"deploy:staging".to_string()), "{asked:?}");
    assert_eq!(
        b.run().stage("deploy:staging").unwrap().status,
        StageStatus::Pending
    );

    // A's deploy finishes: B goes next.
    let request = a
        .log
        .iter()
        .rev()
        .find(|e| e.type_name() == "dev.slipway.deploy.requested.v1")
        .unwrap()
        .data
        .clone();
    a.script.remove("deploy:staging");
    a.answer(&[Command::Request(request)]);
    assert!(advance(&mut b, &[&a]).contains(&"deploy:staging".to_string()));
}

#[test]
fn an_older_run_waiting_for_an_environment_goes_first() {
    let mut a = Sim::nth(TWO_ENVS, 1);
    let mut b = Sim::nth(TWO_ENVS, 2);
    a.script.insert("build".into(), Answer::Silent);
    advance(&mut a, &[&b]);
    // B is ready for staging before A, but A is older and still on its way: B waits for it
    // only once A waits for staging too.
    b.script.insert("deploy:staging".into(), Answer::Silent);
    let build = a
        .log
        .iter()
        .rev()
        .find(|e| e.type_name() == "dev.slipway.build.requested.v1")
        .unwrap()
        .data
        .clone();
    a.script.remove("build");
    a.answer(&[Command::Request(build)]);
    // A now waits for staging (its build is done); B, newer, must not jump the queue.
    let asked = advance(&mut b, &[&a]);
    assert!(!asked.contains(&"deploy:staging".to_string()), "{asked:?}");
    assert!(advance(&mut a, &[&b]).contains(&"deploy:staging".to_string()));
}

#[test]
fn a_newer_approved_run_supersedes_an_older_one_waiting_for_production() {
    let mut holder = Sim::nth(TWO_ENVS, 1);
    let mut older = Sim::nth(TWO_ENVS, 2);
    let mut newer = Sim::nth(TWO_ENVS, 3);
    holder
        .script
        .insert("deploy:production".into(), Answer::Silent);
    advance(&mut holder, &[]);
    assert_eq!(
        holder.run().stage("deploy:production").unwrap().status,
        StageStatus::Requested
    );
    // Both later runs get approved while production is busy: they wait.
    advance(&mut older, &[&holder]);
    assert_eq!(
        older.run().stage("approval:production").unwrap().status,
        StageStatus::Succeeded
    );
    assert_eq!(older.run().phase, Phase::Running);
    advance(&mut newer, &[&holder, &older]);
    assert_eq!(
        newer.run().stage("approval:production").unwrap().status,
        StageStatus::Succeeded
    );
    // The older one is superseded by the newer approved one.
    advance(&mut older, &[&holder, &newer]);
    assert_eq!(older.run().phase, Phase::Cancelled);
    let reason = older.run().reason.clone().unwrap();
    assert!(
        reason.contains(&newer.run_id) && reason.contains("superseded"),
        "{reason}"
    );
    // Runs of another pipeline never interact.
    let other = TWO_ENVS.replace("name = \"lanes\"", "name = \"other\"");
    let mut stranger = Sim::nth(&other, 4);
    let fleet_free = advance(&mut stranger, &[&holder]);
    assert!(fleet_free.contains(&"deploy:production".to_string()));
}

#[test]
fn a_runs_end_ends_every_stage_that_had_not_ended() {
    // Two suites: one running when the run is cancelled, one requested and never started;
    // nothing after them was ever requested.
    let spec = format!(
        "{BUILD_AND_TEST}[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"./deploy\"]\n"
    );
    let mut sim = Sim::new(&spec);
    sim.script.insert("test:unit".into(), Answer::Silent);
    sim.script.insert("test:e2e".into(), Answer::Silent);
    sim.run_to_end();
    let started = crate::facts::started_data(
        "dev.slipway.test.requested.v1",
        "test:unit",
        FIRST_ATTEMPT,
        "tester-1",
    )
    .unwrap();
    sim.push(crate::facts::fact(
        crate::service::Service::Tester,
        &sim.run_id,
        started,
        sim.now,
    ));
    assert_eq!(
        sim.run().stage("test:unit").unwrap().status,
        StageStatus::Running
    );
    let end = sim.now + Duration::seconds(4);
    sim.push(Event::new(
        "cancel-1",
        "/slipway/cli",
        Some(sim.run_id.clone()),
        end,
        EventData::RunCancelled(crate::events::RunEnded {
            reason: "cancelled by alice".into(),
            stage: None,
            by: Some("alice".into()),
        }),
    ));
    let run = sim.run().clone();
    assert_eq!(run.phase, Phase::Cancelled);
    let stage = |k: &str| run.stage(k).unwrap();
    assert_eq!(stage("build").status, StageStatus::Succeeded);
    for (key, cut) in [
        ("test:unit", "while this stage ran"),
        ("test:e2e", "before this stage started"),
        ("deploy:staging", "before this stage was requested"),
    ] {
        let s = stage(key);
        assert_eq!(s.status, StageStatus::Cancelled, "{key}");
        assert!(s.status.is_terminal());
        assert_eq!(s.finished_at, Some(end), "{key}");
        let reason = s.reason.as_deref().unwrap();
        assert!(
            reason.contains("the run was cancelled")
                && reason.contains(cut)
                && reason.contains("cancelled by alice"),
            "{key}: {reason}"
        );
    }
    assert_eq!(run.to_json()["stages"][1]["status"], "cancelled");
    // The worker's late fact changes nothing, and replay agrees with the live fold.
    let late = crate::facts::fact(
        crate::service::Service::Tester,
        &sim.run_id,
        EventData::stage_failure(StageKind::Test, "test:unit", 1, "the run ended".into()),
        sim.now,
    );
    sim.push(late);
    assert_eq!(sim.run().stages, run.stages);
    assert_eq!(&Run::replay(&sim.log).unwrap(), sim.run());
}

#[test]
fn a_snapshot_is_folded_as_it_was_accepted_and_one_that_cannot_be_read_says_so() {
    let sim = Sim::new(BUILD_AND_TEST);
    let mut created = sim.log[0].clone();
    let EventData::RunCreated(c) = &mut created.data else {
        panic!("the first event creates the run")
    };
    // A field a later release removed, and a name today's validation refuses.
    c.spec["build"]["cache_dir"] = serde_json::json!("/var/cache");
    c.spec["pipeline"]["name"] = serde_json::json!("Old Name!");
    let read = crate::spec::PipelineSpec::from_snapshot(&c.spec).unwrap();
    assert!(read.validate().is_err(), "today's rules refuse it");
    let run = Run::replay([&created]).expect("the run still shows");
    assert_eq!(run.spec.pipeline.name, "Old Name!");
    assert_eq!(crate::fold::unreadable(&created), None);

    // Not a spec at all: no run, and the reason to report.
    c_spec_mut(&mut created)["build"] = serde_json::json!("make");
    assert!(Run::replay([&created]).is_none());
    let why = crate::fold::unreadable(&created).unwrap();
    assert!(
        why.contains("spec snapshot cannot be read") && why.contains("build"),
        "{why}"
    );
}

fn c_spec_mut(e: &mut Event) -> &mut serde_json::Value {
    match &mut e.data {
        EventData::RunCreated(c) => &mut c.spec,
        _ => panic!("a creation"),
    }
}
