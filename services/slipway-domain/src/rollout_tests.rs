use chrono::{TimeZone, Utc};

use super::*;
use crate::decide::Command;
use crate::embeddings::EmbeddingsSpec;
use crate::events::EventData;
use crate::run::Phase;
use crate::sim::{Answer, CANARY_PIPELINE, Sim, artifact};
use crate::spec::PipelineSpec;

fn spec() -> RolloutSpec {
    let p = PipelineSpec::parse(CANARY_PIPELINE).unwrap();
    p.environment[0].rollout.clone().unwrap()
}

fn ab_spec() -> RolloutSpec {
    let mut s = spec();
    s.strategy = Strategy::Ab;
    s.steps.clear();
    s.analysis.push(AnalysisMetric {
        name: "liked".into(),
        kind: MetricKind::Ratio,
        numerator: Some("feedback_positive_total".into()),
        denominator: Some("feedback_total".into()),
        higher_is_better: true,
        tolerance: None,
        histogram: None,
        quantile: None,
        max_increase_pct: None,
    });
    s.ab = Some(AbSpec {
        metric: "liked".into(),
        min_effect: 0.05,
        significance: 0.05,
        weight: 50.0,
        max_duration_secs: 600,
        winner: OnWin::Promote,
    });
    s
}

fn window(requests: f64, errors: f64) -> Window {
    Window {
        counters: [
            ("http_requests_total".to_string(), requests),
            ("http_errors_total".to_string(), errors),
        ]
        .into(),
        histograms: BTreeMap::new(),
    }
}

fn at(elapsed: u64) -> StepAt {
    StepAt {
        step: 0,
        weight: 5.0,
        elapsed_secs: elapsed,
        duration_secs: 60,
        max_hold_secs: 60,
        ab_p: 1.0,
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap()
}

#[test]
fn a_rollout_spec_is_checked_with_the_field_named() {
    assert!(PipelineSpec::parse(CANARY_PIPELINE).is_ok());
    let bad_steps = CANARY_PIPELINE.replace(
        "{ weight = 50, duration_secs = 60 }",
        "{ weight = 3, duration_secs = 60 }",
    );
    let e = PipelineSpec::parse(&bad_steps).unwrap_err().to_string();
    assert!(e.contains("environment[0].rollout.steps[1].weight"), "{e}");
    let no_traffic = CANARY_PIPELINE.replace(
        "[environment.traffic]\nflag_file = \"/tmp/flags.json\"\n",
        "",
    );
    let e = PipelineSpec::parse(&no_traffic).unwrap_err().to_string();
    assert!(e.contains("environment[0].traffic"), "{e}");
    let relative = CANARY_PIPELINE.replace("/tmp/flags.json", "flags.json");
    let e = PipelineSpec::parse(&relative).unwrap_err().to_string();
    assert!(
        e.contains("environment[0].traffic.flag_file: must be an absolute path"),
        "{e}"
    );
    let ab_without_table = CANARY_PIPELINE.replace("strategy = \"canary\"", "strategy = \"ab\"");
    let e = PipelineSpec::parse(&ab_without_table)
        .unwrap_err()
        .to_string();
    assert!(e.contains("environment[0].rollout.ab"), "{e}");
    let latency_without_histogram = CANARY_PIPELINE.replace(
        "kind = \"ratio\"\nnumerator",
        "kind = \"latency\"\nnumerator",
    );
    let e = PipelineSpec::parse(&latency_without_histogram)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("analysis[0]: a latency metric needs `histogram`"),
        "{e}"
    );
    let unknown =
        CANARY_PIPELINE.replace("strategy = \"canary\"", "strategy = \"canary\"\nstepz = 1");
    let e = PipelineSpec::parse(&unknown).unwrap_err().to_string();
    assert!(e.contains("stepz"), "{e}");
}

#[test]
fn a_clearly_worse_candidate_is_aborted_at_once_and_a_good_one_promoted_when_the_step_is_done() {
    let s = spec();
    // 20% errors against 1%, on 400 requests each: abort before the step's time is up.
    let bad = look(&s, at(10), &window(400.0, 4.0), &window(400.0, 80.0), now());
    assert!(matches!(bad.decision, StepDecision::Abort(_)), "{bad:?}");
    assert_eq!(bad.analysis.decision, "abort");
    assert!(
        bad.analysis
            .reason
            .contains("errors: candidate 0.2000 vs stable 0.0100"),
        "{}",
        bad.analysis.reason
    );
    let c = &bad.analysis.comparisons[0];
    assert_eq!(
        (c.verdict.as_str(), c.test.as_str()),
        ("fail", "proportions")
    );
    assert_eq!(bad.analysis.score, Some(0.0));

    let good_early = look(&s, at(10), &window(400.0, 4.0), &window(400.0, 5.0), now());
    assert!(
        matches!(good_early.decision, StepDecision::Hold(_)),
        "{good_early:?}"
    );
    let good = look(&s, at(60), &window(400.0, 4.0), &window(400.0, 5.0), now());
    assert_eq!(good.decision, StepDecision::Promote);
    assert_eq!(good.analysis.score, Some(100.0));
}

#[test]
fn too_few_requests_hold_and_a_step_held_too_long_aborts() {
    let s = spec();
    let few = look(&s, at(60), &window(400.0, 0.0), &window(20.0, 0.0), now());
    assert!(
        matches!(&few.decision, StepDecision::Hold(r) if r.contains("100 each")),
        "{few:?}"
    );
    let long = look(&s, at(121), &window(400.0, 0.0), &window(20.0, 0.0), now());
    assert!(
        matches!(&long.decision, StepDecision::Abort(r) if r.contains("held 61s")),
        "{long:?}"
    );
}

#[test]
fn latency_is_compared_on_the_histograms_buckets() {
    let mut s = spec();
    s.analysis = vec![AnalysisMetric {
        name: "p95".into(),
        kind: MetricKind::Latency,
        numerator: None,
        denominator: None,
        higher_is_better: false,
        tolerance: None,
        histogram: Some("latency_seconds".into()),
        quantile: Some(0.95),
        max_increase_pct: Some(20.0),
    }];
    let hist = |fast: f64, slow: f64| {
        let mut w = window(fast + slow, 0.0);
        w.histograms.insert(
            "latency_seconds".into(),
            vec![
                (0.1, fast),
                (0.5, fast + slow),
                (f64::INFINITY, fast + slow),
            ],
        );
        w
    };
    // The candidate's requests mostly land in the slow bucket.
    let slow = look(&s, at(60), &hist(380.0, 20.0), &hist(100.0, 300.0), now());
    assert!(matches!(slow.decision, StepDecision::Abort(_)), "{slow:?}");
    assert_eq!(slow.analysis.comparisons[0].test, "mann_whitney");
    let same = look(&s, at(60), &hist(380.0, 20.0), &hist(379.0, 21.0), now());
    assert_eq!(same.decision, StepDecision::Promote, "{same:?}");
}

fn feedback(requests: f64, given: f64, liked: f64) -> Window {
    let mut w = window(requests, 0.0);
    w.counters.insert("feedback_total".into(), given);
    w.counters.insert("feedback_positive_total".into(), liked);
    w
}

#[test]
fn an_ab_experiment_decides_for_the_better_variant_and_keeps_the_stable_one_otherwise() {
    let s = ab_spec();
    let mut step = at(30);
    step.duration_secs = 600;
    // 60% against 40% liked on 2,000 answers each: the candidate wins.
    let win = look(
        &s,
        step,
        &feedback(2000.0, 2000.0, 800.0),
        &feedback(2000.0, 2000.0, 1200.0),
        now(),
    );
    assert_eq!(win.decision, StepDecision::Promote, "{win:?}");
    assert_eq!(win.winner, Some(AbWinner::Candidate));
    let f = win.analysis.ab.as_ref().unwrap();
    assert!((f.effect - 0.2).abs() < 1e-9);
    assert!(
        f.interval[0] > 0.0 && f.interval[1] > f.interval[0],
        "{f:?}"
    );
    assert_eq!(f.winner.as_deref(), Some("candidate"));
    // The other way round: the stable one wins and the candidate is rolled back.
    let lose = look(
        &s,
        step,
        &feedback(2000.0, 2000.0, 1200.0),
        &feedback(2000.0, 2000.0, 800.0),
        now(),
    );
    assert!(
        matches!(&lose.decision, StepDecision::Abort(r) if r.contains("version in service is better"))
    );
    // No difference: hold, then keep the stable one at the maximum duration.
    let same = look(
        &s,
        step,
        &feedback(2000.0, 2000.0, 1000.0),
        &feedback(2000.0, 2000.0, 1000.0),
        now(),
    );
    assert!(matches!(same.decision, StepDecision::Hold(_)), "{same:?}");
    step.elapsed_secs = 600;
    let out = look(
        &s,
        step,
        &feedback(2000.0, 2000.0, 1000.0),
        &feedback(2000.0, 2000.0, 1000.0),
        now(),
    );
    assert!(matches!(&out.decision, StepDecision::Abort(r) if r.contains("no difference found")));
    // A guardrail (errors) failing aborts whatever the decided metric says.
    let mut bad = feedback(2000.0, 2000.0, 1200.0);
    bad.counters.insert("http_errors_total".into(), 400.0);
    let guard = look(&s, step, &feedback(2000.0, 2000.0, 800.0), &bad, now());
    assert!(matches!(&guard.decision, StepDecision::Abort(r) if r.contains("guardrail")));
}

#[test]
fn watched_at_every_look_an_ab_experiment_of_two_equal_variants_rarely_decides() {
    // A/A: both variants liked 40% of the time; 200 experiments, each looked at 30 times as
    // the judge looks (cumulative windows, the p-value carried from look to look). The always-
    // valid test decides (either way) in at most its alpha of them; a difference of 10 points
    // is found in nearly all.
    let s = ab_spec();
    let run = |p_candidate: f64, seed: u64| -> Option<StepDecision> {
        let mut rng = crate::stats::Rng::new(seed);
        let (mut st, mut ca) = (feedback(0.0, 0.0, 0.0), feedback(0.0, 0.0, 0.0));
        let mut step = at(0);
        step.duration_secs = 10_000;
        for look_no in 1..=30u64 {
            for (w, p) in [(&mut st, 0.4), (&mut ca, p_candidate)] {
                for _ in 0..100 {
                    *w.counters.get_mut("http_requests_total").unwrap() += 1.0;
                    *w.counters.get_mut("feedback_total").unwrap() += 1.0;
                    if rng.unit() < p {
                        *w.counters.get_mut("feedback_positive_total").unwrap() += 1.0;
                    }
                }
            }
            step.elapsed_secs = look_no;
            let l = look(&s, step, &st, &ca, now());
            assert!(l.ab_p <= step.ab_p, "the always-valid p-value never rises");
            step.ab_p = l.ab_p;
            if !matches!(l.decision, StepDecision::Hold(_)) {
                return Some(l.decision);
            }
        }
        None
    };
    let decided = (0..200).filter(|i| run(0.4, 1000 + i).is_some()).count();
    assert!(
        decided <= 10,
        "A/A decided {decided} of 200 (alpha 0.05 allows 10)"
    );
    let found = (0..50)
        .filter(|i| run(0.5, 5000 + i) == Some(StepDecision::Promote))
        .count();
    assert!(found >= 45, "40% against 50% found in {found} of 50");
}

#[test]
fn a_pause_stops_a_steps_clock_and_extends_its_timeout() {
    let t = now();
    let control = |action, secs| RolloutControl {
        stage: "rollout:production".into(),
        attempt: 1,
        action,
        by: "bob".into(),
        groups: vec![],
        comment: None,
        at: t + chrono::Duration::seconds(secs),
        signature: None,
    };
    let controls = [
        control(ControlAction::Pause, 10),
        control(ControlAction::Resume, 40),
        control(ControlAction::Pause, 100),
    ];
    let at = |secs| t + chrono::Duration::seconds(secs);
    assert_eq!(paused_secs(&controls, t, at(50)), 30);
    assert_eq!(
        paused_secs(&controls, t, at(130)),
        60,
        "the open pause counts to now"
    );
    assert_eq!(
        paused_secs(&controls, at(20), at(50)),
        20,
        "only within the step"
    );
    assert_eq!(paused_secs(&controls[..0], t, at(50)), 0);

    // The conductor does not time out a rollout stage for the time people held it.
    let mut sim = canary_sim();
    sim.script
        .insert("rollout:production".into(), Answer::Silent);
    sim.run_to_end();
    let limit = crate::decide::stage_timeout(&sim.run().spec, "rollout:production").unwrap();
    let started = sim
        .run()
        .stage("rollout:production")
        .unwrap()
        .requested_at
        .unwrap();
    let mut paused = control(ControlAction::Pause, 0);
    paused.at = started;
    sim.fact(EventData::RolloutControlled(paused));
    sim.now = started + limit + chrono::Duration::seconds(60);
    assert!(
        sim.decide().is_empty(),
        "paused since the start: not timed out"
    );
}

fn canary_sim() -> Sim {
    let mut sim = Sim::new(CANARY_PIPELINE);
    sim.live.insert(
        "production".into(),
        ("svc-000000000000".into(), artifact("old")),
    );
    sim
}

fn requests_of(rounds: &[Vec<Command>]) -> Vec<EventData> {
    rounds
        .iter()
        .flatten()
        .filter_map(|c| match c {
            Command::Request(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_rollout_deploys_the_candidate_slot_then_judges_then_promotes_to_the_stable_slot() {
    let mut sim = canary_sim();
    let rounds = sim.run_to_end();
    let reqs = requests_of(&rounds);
    let keys: Vec<&str> = reqs
        .iter()
        .filter_map(|d| d.stage_fact().map(|f| f.0))
        .collect();
    assert_eq!(
        keys,
        [
            "build",
            "deploy:production",
            "rollout:production",
            "promote:production",
            "monitor:production"
        ]
    );
    let EventData::DeployRequested(d) = &reqs[1] else {
        panic!()
    };
    assert_eq!(d.slot, Some(Slot::Candidate));
    let EventData::RolloutRequested(r) = &reqs[2] else {
        panic!()
    };
    assert_eq!(r.stable_version.as_deref(), Some("svc-000000000000"));
    assert_eq!(
        r.traffic.flag_key_for("svc", "production"),
        "svc-production"
    );
    let EventData::PromoteRequested(p) = &reqs[3] else {
        panic!()
    };
    assert_eq!(p.slot, Some(Slot::Stable));
    assert_eq!(sim.run().phase, Phase::Succeeded);
}

#[test]
fn an_aborted_rollout_rolls_the_candidate_slot_back_and_ends_rolled_back() {
    let mut sim = canary_sim();
    sim.script.insert(
        "rollout:production".into(),
        Answer::Fail("errors: candidate 0.2 vs stable 0.01".into()),
    );
    let rounds = sim.run_to_end();
    let reqs = requests_of(&rounds);
    let EventData::RollbackRequested(rb) = reqs.last().unwrap() else {
        panic!("{reqs:?}")
    };
    assert_eq!(rb.slot, Some(Slot::Candidate));
    assert_eq!(rb.version, "svc-000000000000");
    let run = sim.run();
    assert_eq!(run.phase, Phase::RolledBack);
    assert!(
        run.reason
            .as_deref()
            .unwrap()
            .contains("rollout:production failed"),
        "{:?}",
        run.reason
    );
    assert_eq!(
        run.stage("promote:production").unwrap().status,
        crate::run::StageStatus::Cancelled
    );
}

#[test]
fn rollout_events_fold_into_the_runs_view() {
    let mut sim = canary_sim();
    sim.script
        .insert("rollout:production".into(), Answer::Silent);
    sim.run_to_end();
    assert_eq!(sim.run().phase, Phase::RollingOut);
    let t = now();
    let run_id = sim.run_id.clone();
    let weight = |step, weight, cause| WeightSet {
        stage: "rollout:production".into(),
        attempt: 1,
        environment: "production".into(),
        step,
        weight,
        cause,
        published: vec!["/tmp/flags.json".into()],
        at: t,
    };
    for w in [
        weight(0, 5.0, WeightCause::Step),
        weight(1, 50.0, WeightCause::Step),
    ] {
        let id = weight_event_id(&run_id, &w);
        // Twice: a repeat after a restart is the same event.
        for _ in 0..2 {
            sim.push(crate::Event::new(
                id.clone(),
                "/slipway/monitor",
                Some(run_id.clone()),
                t,
                EventData::RolloutWeightSet(w.clone()),
            ));
        }
    }
    sim.fact(EventData::RolloutControlled(RolloutControl {
        stage: "rollout:production".into(),
        attempt: 1,
        action: ControlAction::Pause,
        by: "ana".into(),
        groups: vec![],
        comment: None,
        at: t,
        signature: None,
    }));
    // Rollout events about another stage are not a rollout's.
    let mut stray = WeightSet {
        stage: "deploy:production".into(),
        attempt: 1,
        environment: "production".into(),
        step: 3,
        weight: 100.0,
        cause: WeightCause::Step,
        published: vec![],
        at: t,
    };
    sim.push(crate::Event::new(
        "stray",
        "/x",
        Some(run_id.clone()),
        t,
        EventData::RolloutWeightSet(stray.clone()),
    ));
    stray.stage = "rollout:production".into();
    let v = &sim.run().rollouts[0];
    assert_eq!((v.weight, v.step, v.paused), (50.0, 1, true));
    assert_eq!(v.weights.len(), 2);
    assert_eq!(v.environment, "production");
    let json = sim.run().to_json();
    assert_eq!(json["phase"], "rolling_out");
    assert_eq!(json["rollouts"][0]["weight"], 50.0);
}

#[test]
fn the_first_deploy_to_a_rollout_environment_has_no_stable_version() {
    let mut sim = Sim::new(CANARY_PIPELINE);
    let reqs = requests_of(&sim.run_to_end());
    let r = reqs
        .iter()
        .find_map(|d| match d {
            EventData::RolloutRequested(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(r.stable_version, None);
}

fn shadow_spec() -> RolloutSpec {
    let mut s = spec();
    s.strategy = Strategy::Shadow;
    s.steps.clear();
    s.shadow = Some(ShadowSpec {
        share: 10.0,
        duration_secs: 60,
        pairs: "/shadow/pairs".into(),
        min_pairs: 50,
        min_agreement: Some(0.8),
        min_similarity: Some(0.9),
        embeddings: Some(EmbeddingsSpec {
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key_env: None,
        }),
    });
    s
}

fn figures(n: u64, agreeing: u64, similarity: f64) -> ShadowFigures {
    let mut f = ShadowFigures::default();
    for i in 0..n {
        f.add(i + 1, i < agreeing, Some(similarity));
    }
    f
}

#[test]
fn a_shadow_is_judged_on_agreement_and_similarity_with_their_intervals() {
    let s = shadow_spec();
    assert!(s.validate("r").is_ok());
    assert_eq!(
        s.plan(),
        vec![Plan {
            weight: 10.0,
            duration_secs: 60
        }]
    );
    let w = window(1000.0, 10.0);
    let shadow = |f: &ShadowFigures, elapsed| look_shadow(&s, at(elapsed), &w, &w, f, now());
    // Too few pairs: nothing judged.
    let few = shadow(&figures(10, 0, 0.0), 60);
    assert!(matches!(&few.decision, StepDecision::Hold(r) if r.contains("10 mirrored pairs")));
    // Clearly below a bound (its whole interval): aborted before the time is up.
    let bad = shadow(&figures(100, 20, 0.95), 5);
    assert!(
        matches!(&bad.decision, StepDecision::Abort(r) if r.contains("agreement 0.200")),
        "{bad:?}"
    );
    // Meeting both once the time is up: promoted, with the figures in the look.
    let good = shadow(&figures(200, 190, 0.97), 60);
    assert_eq!(good.decision, StepDecision::Promote);
    let f = good.analysis.shadow.as_ref().unwrap();
    assert_eq!((f.pairs, f.agreed, f.cursor), (200, 190, 200));
    assert!((f.similarity.unwrap() - 0.97).abs() < 1e-9);
    let iv = f.agreement_interval.unwrap();
    assert!(iv[0] < 0.95 && iv[1] > 0.95);
    // Still shadowed: hold; and a point below its bound at the end aborts.
    assert!(matches!(
        shadow(&figures(200, 190, 0.97), 30).decision,
        StepDecision::Hold(_)
    ));
    let marginal = shadow(&figures(200, 155, 0.97), 60);
    assert!(
        matches!(&marginal.decision, StepDecision::Abort(r) if r.contains("agreement 0.775 is below 0.8")),
        "{marginal:?}"
    );
    // A shadow without a bound, or a similarity bound without embeddings, is refused.
    let mut no_bound = shadow_spec();
    let sh = no_bound.shadow.as_mut().unwrap();
    sh.min_agreement = None;
    sh.min_similarity = None;
    assert!(
        no_bound
            .validate("r")
            .unwrap_err()
            .to_string()
            .contains("r.shadow: needs a bound")
    );
    let mut no_emb = shadow_spec();
    no_emb.shadow.as_mut().unwrap().embeddings = None;
    assert!(
        no_emb
            .validate("r")
            .unwrap_err()
            .to_string()
            .contains("r.shadow.embeddings")
    );
    assert!(agree(" 42\n", "42") && !agree("42", "43"));
}
