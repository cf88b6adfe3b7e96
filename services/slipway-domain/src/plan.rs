//! The plan: the order of a run's stages, derived from its spec.
//!
//! build → test suites (in parallel) → for each environment in order: [approval] → deploy →
//! [rollout → promote] → [monitor] → [quality gates, after the environment they measure]. Gates without any
//! environment run right after the tests. Cost runs after evaluation and performance, which
//! run in parallel unless the spec says otherwise.

use crate::events::StageKind;
use crate::spec::PipelineSpec;
use crate::stage::StageKey;

/// One step: its stages run together and must all succeed before the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Stages(Vec<String>),
    /// Hold for an approval before deploying to `environment`.
    Approval {
        environment: String,
    },
}

pub fn approval_key(environment: &str) -> String {
    StageKind::Approval.key(Some(environment))
}

/// The steps of a run, in order.
pub fn plan(spec: &PipelineSpec) -> Vec<Step> {
    let mut steps = vec![Step::Stages(vec![StageKind::Build.key(None)])];
    if !spec.test.is_empty() {
        steps.push(Step::Stages(
            spec.test
                .iter()
                .map(|t| StageKind::Test.key(Some(&t.name)))
                .collect(),
        ));
    }
    let gates_at = spec.gates_environment_index();
    if spec.has_gates() && spec.environment.is_empty() {
        gate_steps(spec, &mut steps);
    }
    for (i, env) in spec.environment.iter().enumerate() {
        if env.requires_approval {
            steps.push(Step::Approval {
                environment: env.name.clone(),
            });
        }
        steps.push(Step::Stages(vec![StageKind::Deploy.key(Some(&env.name))]));
        if env.rollout.is_some() {
            steps.push(Step::Stages(vec![StageKind::Rollout.key(Some(&env.name))]));
            steps.push(Step::Stages(vec![StageKind::Promote.key(Some(&env.name))]));
        }
        if spec.monitors(&env.name) {
            steps.push(Step::Stages(vec![StageKind::Monitor.key(Some(&env.name))]));
        }
        if gates_at == Some(i) {
            gate_steps(spec, &mut steps);
        }
    }
    steps
}

fn gate_steps(spec: &PipelineSpec, steps: &mut Vec<Step>) {
    let g = &spec.gates;
    let mut first = Vec::new();
    if g.model_evaluation.is_some() {
        first.push(StageKind::Evaluate.key(None));
    }
    if g.performance.is_some() {
        first.push(StageKind::Perf.key(None));
    }
    if g.parallel {
        if !first.is_empty() {
            steps.push(Step::Stages(first));
        }
    } else {
        steps.extend(first.into_iter().map(|k| Step::Stages(vec![k])));
    }
    if g.cost.is_some() {
        steps.push(Step::Stages(vec![StageKind::Cost.key(None)]));
    }
}

/// Every planned stage key, in order (rollbacks are not planned: they appear when needed).
pub fn planned_stages(spec: &PipelineSpec) -> Vec<String> {
    step_keys(spec).into_iter().flatten().collect()
}

/// The plan's steps as the stage keys each one holds (an approval step: its approval key).
pub fn step_keys(spec: &PipelineSpec) -> Vec<Vec<String>> {
    plan(spec)
        .into_iter()
        .map(|s| match s {
            Step::Stages(keys) => keys,
            Step::Approval { environment } => vec![approval_key(&environment)],
        })
        .collect()
}

/// Whether a run of `spec` can request a stage of one of `kinds` (a rollback follows a failed
/// monitor or rollout, so it can when the plan monitors or rolls out an environment).
pub fn requests_any(spec: &PipelineSpec, kinds: &[StageKind]) -> bool {
    planned_stages(spec).iter().any(|key| {
        let kind = StageKey::parse(key).ok().map(|k| k.kind());
        kind.is_some_and(|k| {
            kinds.contains(&k)
                || (matches!(k, StageKind::Monitor | StageKind::Rollout)
                    && kinds.contains(&StageKind::Rollback))
        })
    })
}

/// Whether a request for `key` is in plan order: every step before the stage's own has
/// succeeded (a rollback: its environment's monitor failed). A request out of order is not
/// the conductor's and is ignored by `fold`, so it can never become a stage attempt.
pub fn in_order(run: &crate::run::Run, key: &str) -> bool {
    use crate::run::StageStatus;
    let status = |k: &str| run.stage(k).map(|s| s.status);
    if let Some(env) = crate::stage::environment_of(key, StageKind::Rollback) {
        return status(&StageKind::Monitor.key(Some(&env))) == Some(StageStatus::Failed)
            || status(&StageKind::Rollout.key(Some(&env))) == Some(StageStatus::Failed);
    }
    for keys in run.step_keys() {
        if keys.iter().any(|k| k == key) {
            return true;
        }
        if !keys
            .iter()
            .all(|k| status(k) == Some(StageStatus::Succeeded))
        {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use StageKind::*;

    #[test]
    fn a_run_requests_the_kinds_its_plan_has() {
        let noop = PipelineSpec::parse(crate::spec::NOOP_PIPELINE).unwrap();
        assert!(requests_any(&noop, &[Build]));
        assert!(requests_any(&noop, &[Test]));
        assert!(requests_any(&noop, &[Deploy, Rollback]));
        for gate in [Evaluate, Perf, Cost, Monitor] {
            assert!(!requests_any(&noop, &[gate]), "{gate:?}");
        }
        // No monitor: no rollback can be asked for.
        assert!(!requests_any(&noop, &[Rollback]));
        assert!(!requests_any(&noop, &[]));

        let monitored = PipelineSpec::parse(crate::sim::MONITORED_PIPELINE).unwrap();
        assert!(requests_any(&monitored, &[Rollback]));
        assert!(requests_any(&monitored, &[Monitor]));
        assert!(!requests_any(&monitored, &[Test]), "no suites");
    }
}
