//! The approval policy, as pure checks: who may decide (the gateway answers `403` when the
//! policy says no) and whether the log holds an approval production may be deployed on (the
//! deployer refuses otherwise, whatever the request says).

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};

use crate::events::{StageKind, Verdict};
use crate::plan::planned_stages;
use crate::run::POLICY_APPROVER;
use crate::run::{Run, StageStatus};
use crate::spec::{ApprovalPolicy, AutoApprove};
use crate::stage::StageKey;

/// Someone who may approve (from the gateway's configuration): only the sha256 of their token
/// is stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approver {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Lower-case hex sha256 of the bearer token (`printf %s TOKEN | sha256sum`).
    pub token_sha256: String,
}

/// Why an approver may not decide on a run, if they may not.
///
/// # Errors
/// The policy's reason, for a `403`.
pub fn check_approver(
    policy: &ApprovalPolicy,
    approver: &str,
    groups: &[String],
    author: Option<&str>,
) -> Result<(), String> {
    if !policy.allow_self_approval && author == Some(approver) {
        return Err(format!(
            "{approver} authored this change and the policy forbids self-approval"
        ));
    }
    if !policy.allowed_groups.is_empty()
        && !groups.iter().any(|g| policy.allowed_groups.contains(g))
    {
        return Err(format!(
            "{approver} is in none of the allowed groups ({})",
            policy.allowed_groups.join(", ")
        ));
    }
    Ok(())
}

/// The gate stages of the run's plan, and whether each passed.
fn gates(run: &Run) -> Vec<(String, Option<StageStatus>)> {
    planned_stages(&run.spec)
        .into_iter()
        .filter(|k| {
            matches!(
                StageKey::parse(k).ok().map(|k| k.kind()),
                Some(StageKind::Evaluate | StageKind::Perf | StageKind::Cost)
            )
        })
        .map(|k| {
            let status = run.stage(&k).map(|s| s.status);
            (k, status)
        })
        .collect()
}

/// Why the run's artifact may not be deployed to `environment` now, if it may not: a gate
/// that has not passed, or no approval the policy accepts for exactly this artifact.
///
/// With `approvers` (the configured registry), an approval counts only from a configured
/// approver, judged by the groups the configuration gives them, not those the event claims.
/// With `key`, a decision counts only with the gateway's valid signature for this run.
pub fn deploy_refusal(
    run: &Run,
    environment: &str,
    now: DateTime<Utc>,
    approvers: Option<&[Approver]>,
    key: Option<&crate::signing::PublicKey>,
) -> Option<String> {
    let Some(env) = run.spec.environment(environment) else {
        return Some(format!("the run's spec has no environment {environment:?}"));
    };
    let Some(artifact) = run.artifact.as_ref() else {
        return Some("the run has no built artifact".into());
    };
    if env.requires_approval {
        for (key, status) in gates(run) {
            if status != Some(StageStatus::Succeeded) {
                let s = status.map_or("not run".to_string(), |s| format!("{s:?}").to_lowercase());
                return Some(format!("gate {key} has not passed ({s})"));
            }
        }
    }
    if !env.requires_approval {
        return None;
    }
    let Some(policy) = run.spec.approval.as_ref() else {
        return Some("the environment requires approval but the spec has no policy".into());
    };
    let mut notes = Vec::new();
    let decisions: Vec<_> = run
        .approvals
        .iter()
        .filter(|a| a.environment == environment && a.artifact_digest == artifact.digest)
        // The conductor's automatic approval is judged by the policy below, not signed.
        .filter(|a| {
            let Some(k) = key else { return true };
            if a.approver == POLICY_APPROVER && a.decision == "approve" {
                return true;
            }
            match k.verify(&run.run_id, a.decision == "approve", &a.record) {
                Ok(()) => true,
                Err(why) => {
                    notes.push(why);
                    false
                }
            }
        })
        .collect();
    if let Some(r) = decisions.iter().find(|a| a.decision == "reject") {
        return Some(format!("rejected by {}", r.approver));
    }
    let clean = run.gates.iter().all(|g| g.verdict == Verdict::Pass);
    let expiry =
        Duration::seconds(i64::try_from(policy.expires_after_secs).unwrap_or(i64::MAX / 1000));
    let mut accepted = BTreeSet::new();
    for a in decisions.iter().filter(|a| a.decision == "approve") {
        if a.approver == POLICY_APPROVER {
            if policy.auto_approve == AutoApprove::WhenClean && clean {
                return None;
            }
            notes.push("an automatic approval the policy does not allow".to_string());
            continue;
        }
        if now > a.decided_at + expiry {
            notes.push(format!("{}'s approval expired", a.approver));
            continue;
        }
        // Against the registry, the groups are the configured ones, never the event's claim;
        // an identity provider's approver has the groups the gateway signed with the decision
        // (the signature was verified above), and none when nothing verified it.
        let groups = match (approvers, &a.record.issuer) {
            (_, Some(_)) if key.is_some() => a.groups.clone(),
            (Some(_), Some(issuer)) => {
                notes.push(format!(
                    "{} signed in through {issuer}, but no key verifies the gateway's signature",
                    a.approver
                ));
                continue;
            }
            (Some(registry), None) => match registry.iter().find(|r| r.name == a.approver) {
                Some(r) => r.groups.clone(),
                None => {
                    notes.push(format!("{} is not a configured approver", a.approver));
                    continue;
                }
            },
            (None, _) => a.groups.clone(),
        };
        if let Err(why) = check_approver(policy, &a.approver, &groups, run.change.author.as_deref())
        {
            notes.push(why);
            continue;
        }
        accepted.insert(a.approver.as_str());
    }
    if accepted.len() >= policy.required_approvals as usize {
        return None;
    }
    let mut reason = format!(
        "{} of {} required approvals for artifact {} accepted",
        accepted.len(),
        policy.required_approvals,
        artifact.digest
    );
    if !notes.is_empty() {
        reason.push_str(&format!(" ({})", notes.join("; ")));
    }
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Answer, Sim};

    const SPEC: &str = include_str!("../../../schemas/examples/full-pipeline.toml");

    fn policy() -> ApprovalPolicy {
        crate::spec::PipelineSpec::parse(SPEC)
            .unwrap()
            .approval
            .unwrap()
    }

    #[test]
    fn approvers_are_checked_against_the_policy() {
        let p = policy();
        let rm = vec!["release-managers".to_string()];
        assert!(check_approver(&p, "bob", &rm, Some("alice")).is_ok());
        let err = check_approver(&p, "alice", &rm, Some("alice")).unwrap_err();
        assert!(err.contains("self-approval"), "{err}");
        let err = check_approver(&p, "bob", &["interns".into()], Some("alice")).unwrap_err();
        assert!(err.contains("allowed groups"), "{err}");
    }

    #[test]
    fn production_needs_passed_gates_and_accepted_approvals() {
        // Approved by two release managers (the simulation's approvers): accepted.
        let mut sim = Sim::new(SPEC);
        sim.script
            .insert("deploy:production".into(), Answer::Silent);
        sim.run_to_end();
        assert_eq!(
            deploy_refusal(sim.run(), "production", sim.now, None, None),
            None
        );
        // Against a registry, only configured approvers count, with their configured groups.
        let registry = vec![Approver {
            name: "approver-0".into(),
            groups: vec!["release-managers".into()],
            token_sha256: String::new(),
        }];
        let why = deploy_refusal(sim.run(), "production", sim.now, Some(&registry), None).unwrap();
        assert!(
            why.contains("approver-1 is not a configured approver"),
            "{why}"
        );
        // Staging needs nothing.
        assert_eq!(
            deploy_refusal(sim.run(), "staging", sim.now, None, None),
            None
        );
        // Too late: the approvals expired.
        let late = sim.now + Duration::days(2);
        let why = deploy_refusal(sim.run(), "production", late, None, None).unwrap();
        assert!(why.contains("expired"), "{why}");

        // Waiting for approval: refused, naming the count.
        let mut sim = Sim::new(SPEC);
        sim.script
            .insert("approval:production".into(), Answer::Silent);
        sim.run_to_end();
        let why = deploy_refusal(sim.run(), "production", sim.now, None, None).unwrap();
        assert!(why.starts_with("0 of 2 required approvals"), "{why}");

        // A gate that failed: refused.
        let mut sim = Sim::new(SPEC);
        sim.script
            .insert("perf".into(), Answer::Fail("slow".into()));
        sim.run_to_end();
        let why = deploy_refusal(sim.run(), "production", sim.now, None, None).unwrap();
        assert!(why.contains("gate perf has not passed"), "{why}");
    }

    #[test]
    fn a_providers_approvers_count_with_the_groups_the_gateway_signed() {
        use crate::signing::{PublicKey, SigningKey};
        let mut sim = Sim::new(SPEC);
        sim.script
            .insert("deploy:production".into(), Answer::Silent);
        sim.run_to_end();
        let (seed, public) = SigningKey::generate();
        let key = SigningKey::from_base64(&seed).unwrap();
        let public = PublicKey::from_base64(&public).unwrap();
        let mut run = sim.run().clone();
        for a in &mut run.approvals {
            a.record.issuer = Some("https://idp.example".into());
            a.record.signature = Some(key.sign(&run.run_id, true, &a.record));
        }
        // Neither approver is configured, and a configured one shares a name with one of them
        // in another group: the groups the gateway signed decide.
        let registry = vec![Approver {
            name: "approver-0".into(),
            groups: vec!["interns".into()],
            token_sha256: String::new(),
        }];
        assert_eq!(
            deploy_refusal(&run, "production", sim.now, Some(&registry), Some(&public)),
            None
        );
        // Groups added after signing do not verify, so that approval does not count.
        let mut forged = run.clone();
        forged.approvals[1].groups = vec!["admins".into()];
        forged.approvals[1].record.groups = vec!["admins".into()];
        let why = deploy_refusal(
            &forged,
            "production",
            sim.now,
            Some(&registry),
            Some(&public),
        )
        .unwrap();
        assert!(why.starts_with("1 of 2 required approvals"), "{why}");
        // With a registry and no key to verify them, a provider's approvals do not count.
        let why = deploy_refusal(&run, "production", sim.now, Some(&registry), None).unwrap();
        assert!(why.contains("no key verifies"), "{why}");
    }
}
