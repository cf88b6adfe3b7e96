//! Property tests of `fold`: any order-preserving delivery with duplicates folds to the same
//! state, replaying the whole log equals the incrementally folded state, and the run index
//! entry made of that state reads back as a fresh fold of the log.

use chrono::Duration;
use proptest::prelude::*;

use crate::fold::{Run, fold};
use crate::plan::planned_stages;
use crate::sim::{Answer, Sim};
use crate::spec::PipelineSpec;

const FULL: &str = include_str!("../../../schemas/examples/full-pipeline.toml");

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        6 => Just(Answer::Succeed),
        1 => Just(Answer::Fail("scripted failure".into())),
        1 => Just(Answer::Warn),
        1 => Just(Answer::Silent),
    ]
}

/// A whole simulated run with random answers per stage (timeouts included).
fn simulated_log() -> impl Strategy<Value = Sim> {
    let spec = PipelineSpec::parse(FULL).unwrap();
    let stages = planned_stages(&spec);
    let n = stages.len() + 1;
    (proptest::collection::vec(answer(), n), any::<bool>()).prop_map(move |(answers, auto)| {
        let text = if auto {
            FULL.replace("auto_approve = \"never\"", "auto_approve = \"when_clean\"")
        } else {
            FULL.to_string()
        };
        let mut sim = Sim::new(&text);
        sim.live.insert(
            "production".into(),
            ("old-version".into(), crate::sim::artifact("old")),
        );
        for (stage, a) in stages
            .iter()
            .chain(["rollback:production".to_string()].iter())
            .zip(&answers)
        {
            sim.script.insert(stage.clone(), a.clone());
        }
        for _ in 0..8 {
            sim.run_to_end();
            if sim.run().is_ended() {
                break;
            }
            // Let silent stages time out.
            sim.now += Duration::days(10);
        }
        sim
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn replay_equals_the_incremental_state(sim in simulated_log()) {
        let replayed = Run::replay(&sim.log);
        prop_assert_eq!(replayed.as_ref(), sim.run.as_ref());
        prop_assert!(sim.run().is_ended(), "every simulated run ends: {:?}", sim.run().phase);
    }

    #[test]
    fn the_index_entry_written_at_a_runs_end_equals_a_fresh_fold_of_its_log(sim in simulated_log()) {
        // What the conductor writes (its incremental state, through its bytes) against what
        // `slipway replay --verify` folds from the log alone.
        let written = crate::index::IndexEntry::of(sim.run(), sim.log.len() as u64);
        let read = crate::index::IndexEntry::read(&written.to_bytes()).unwrap().unwrap();
        let fresh = Run::replay(&sim.log).unwrap();
        prop_assert!(crate::index::differences(&read.run, &fresh.to_json(), 5).is_empty());
        prop_assert_eq!(&read.deployed, &crate::dora::deployed(&fresh));
        prop_assert_eq!(
            crate::index::read_deployed(&written.to_bytes()).unwrap(),
            crate::dora::deployed(&fresh)
        );
    }

    #[test]
    fn redelivery_with_duplicates_folds_to_the_same_state(
        sim in simulated_log(),
        dups in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..200),
    ) {
        // Deliver the log in order; after each event, maybe redeliver an earlier one.
        let mut state = None;
        for (i, e) in sim.log.iter().enumerate() {
            state = fold(state, e);
            if let Some((again, which)) = dups.get(i)
                && *again
            {
                let j = which.index(i + 1);
                state = fold(state, &sim.log[j]);
            }
        }
        // And a burst of duplicates after the end.
        for (_, which) in dups.iter().take(20) {
            state = fold(state, &sim.log[which.index(sim.log.len())]);
        }
        let replayed = Run::replay(&sim.log);
        prop_assert_eq!(state, replayed);
    }
}

#[test]
fn runs_with_the_same_snapshot_share_one_spec_and_plan() {
    let a = Sim::nth(FULL, 1);
    let b = Sim::nth(FULL, 2);
    let other = Sim::nth(&FULL.replace("timeout_secs = ", "timeout_secs = 1"), 3);
    let (a, b, other) = (a.run(), b.run(), other.run());
    assert!(std::sync::Arc::ptr_eq(&a.spec, &b.spec));
    assert_eq!(a.step_keys(), b.step_keys());
    assert!(!std::sync::Arc::ptr_eq(&a.spec, &other.spec));
    assert_ne!(a.spec, other.spec);
}

#[test]
fn an_ended_run_lets_its_event_ids_go_and_still_ignores_every_later_event() {
    let mut sim = Sim::new(FULL);
    sim.run_to_end();
    let run = sim.run().clone();
    assert!(run.is_ended());
    assert!(run.seen.is_empty());
    assert!(run.approvals_by_stage.is_empty() && run.started_previous.is_empty());
    // Any event again, a repeat or not, changes nothing.
    let mut after = run.clone();
    for e in &sim.log {
        crate::fold::fold_into(&mut after, e);
    }
    assert_eq!(after, run);
}
