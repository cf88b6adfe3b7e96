//! Approvals that cannot be forged: the gateway signs each decision it records with Ed25519,
//! over the run, the stage, the artifact digest, the gate-results digest, the approver, the
//! decision and its time; the deployer verifies the signature with the configured public key
//! before the policy counts the approval. An approval published straight onto NATS, or a valid
//! one replayed onto another run or another artifact, does not verify.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::events::ApprovalDecision;

/// What a signature covers, in a fixed layout (one field per line, with a version tag). A
/// decision vouched for by an identity provider (`issuer`) is a `v2` message that also covers
/// the issuer and the approver's groups; a configured approver's stays `v1`, so every decision
/// signed before still verifies.
pub fn message(run_id: &str, approved: bool, d: &ApprovalDecision) -> Vec<u8> {
    let mut m = format!(
        "slipway-approval-{}\nrun={run_id}\nstage={}\nattempt={}\nartifact={}\ngates={}\napprover={}\ndecision={}\ntime={}\n",
        if d.issuer.is_some() { "v2" } else { "v1" },
        d.stage,
        d.attempt,
        d.artifact_digest,
        d.gates_digest,
        d.approver,
        if approved { "approve" } else { "reject" },
        d.decided_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    if let Some(issuer) = &d.issuer {
        // Groups as a JSON list: no separator a group name could contain.
        m.push_str(&format!(
            "issuer={issuer}\ngroups={}\n",
            serde_json::to_string(&d.groups).expect("strings serialise")
        ));
    }
    m.into_bytes()
}

/// The gateway's private key.
pub struct SigningKey(Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: it must not reach a log.
        write!(f, "SigningKey(public {})", self.public_base64())
    }
}

impl SigningKey {
    /// From the base64 of a 32-byte Ed25519 seed.
    ///
    /// # Errors
    /// What is wrong with the value (never the value itself).
    pub fn from_base64(seed: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(seed.trim())
            .map_err(|e| format!("the approval signing key is not base64: {e}"))?;
        if bytes.len() != 32 {
            return Err(format!(
                "the approval signing key must be a 32-byte Ed25519 seed, not {} bytes",
                bytes.len()
            ));
        }
        Ed25519KeyPair::from_seed_unchecked(&bytes)
            .map(Self)
            .map_err(|_| "the approval signing key is not a valid Ed25519 seed".into())
    }

    /// A new random key: `(seed, public key)`, both base64.
    pub fn generate() -> (String, String) {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .expect("the system's random source works");
        let key = Self::from_base64(&STANDARD.encode(seed)).expect("a fresh seed is valid");
        (STANDARD.encode(seed), key.public_base64())
    }

    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.0.public_key().as_ref())
    }

    /// The signature (base64) of a decision about `run_id`.
    pub fn sign(&self, run_id: &str, approved: bool, d: &ApprovalDecision) -> String {
        STANDARD.encode(self.0.sign(&message(run_id, approved, d)).as_ref())
    }

    /// The signature (base64) of a person's control of a rollout.
    pub fn sign_control(&self, run_id: &str, c: &crate::rollout::RolloutControl) -> String {
        STANDARD.encode(self.0.sign(&c.message(run_id)).as_ref())
    }
}

/// The public key the deployer verifies approvals with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(Vec<u8>);

impl PublicKey {
    /// From the base64 of a 32-byte Ed25519 public key.
    ///
    /// # Errors
    /// What is wrong with the value.
    pub fn from_base64(key: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(key.trim())
            .map_err(|e| format!("the approval public key is not base64: {e}"))?;
        if bytes.len() != 32 {
            return Err(format!(
                "the approval public key must be 32 bytes of Ed25519, not {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// Whether the decision carries the gateway's valid signature for `run_id`.
    ///
    /// # Errors
    /// Why it does not verify.
    pub fn verify(&self, run_id: &str, approved: bool, d: &ApprovalDecision) -> Result<(), String> {
        let Some(sig) = d.signature.as_deref() else {
            return Err(format!(
                "{}'s {} is not signed by the gateway",
                d.approver,
                if approved { "approval" } else { "rejection" }
            ));
        };
        let sig = STANDARD
            .decode(sig)
            .map_err(|_| format!("{}'s signature is not base64", d.approver))?;
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&message(run_id, approved, d), &sig)
            .map_err(|_| {
                format!(
                    "{}'s signature does not match this run, artifact and decision",
                    d.approver
                )
            })
    }
}

impl PublicKey {
    /// Whether a rollout control carries the gateway's valid signature for `run_id`.
    ///
    /// # Errors
    /// Why it does not verify.
    pub fn verify_control(
        &self,
        run_id: &str,
        c: &crate::rollout::RolloutControl,
    ) -> Result<(), String> {
        let sig = c.signature.as_deref().ok_or_else(|| {
            format!(
                "{}'s {} is not signed by the gateway",
                c.by,
                c.action.as_str()
            )
        })?;
        let sig = STANDARD
            .decode(sig)
            .map_err(|_| format!("{}'s signature is not base64", c.by))?;
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&c.message(run_id), &sig)
            .map_err(|_| format!("{}'s signature does not match this run and control", c.by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> ApprovalDecision {
        ApprovalDecision {
            stage: "approval:production".into(),
            attempt: 1,
            approver: "bob".into(),
            groups: vec!["release-managers".into()],
            artifact_digest: format!("sha256:{}", "a".repeat(64)).into(),
            gates_digest: format!("sha256:{}", "b".repeat(64)).into(),
            comment: None,
            decided_at: chrono::Utc::now(),
            signature: None,
            issuer: None,
        }
    }

    #[test]
    fn signed_decisions_verify_and_nothing_else_does() {
        let (seed, public) = SigningKey::generate();
        let key = SigningKey::from_base64(&seed).unwrap();
        let public = PublicKey::from_base64(&public).unwrap();
        let mut d = decision();
        assert!(
            public
                .verify("r1", true, &d)
                .unwrap_err()
                .contains("not signed")
        );
        d.signature = Some(key.sign("r1", true, &d));
        assert_eq!(public.verify("r1", true, &d), Ok(()));
        // Replayed onto another run, another artifact, as a rejection, or by someone else.
        assert!(public.verify("r2", true, &d).is_err());
        assert!(public.verify("r1", false, &d).is_err());
        let mut other = d.clone();
        other.artifact_digest = format!("sha256:{}", "c".repeat(64)).into();
        assert!(public.verify("r1", true, &other).is_err());
        let mut other = d.clone();
        other.approver = "dave".into();
        assert!(public.verify("r1", true, &other).is_err());
        // A provider's approver: the issuer and the groups are signed too.
        let mut vouched = decision();
        vouched.issuer = Some("https://idp.example".into());
        vouched.signature = Some(key.sign("r1", true, &vouched));
        assert_eq!(public.verify("r1", true, &vouched), Ok(()));
        let mut more = vouched.clone();
        more.groups.push("admins".into());
        assert!(
            public.verify("r1", true, &more).is_err(),
            "groups are signed"
        );
        let mut elsewhere = vouched.clone();
        elsewhere.issuer = Some("https://evil.example".into());
        assert!(public.verify("r1", true, &elsewhere).is_err());
        let mut dropped = vouched.clone();
        dropped.issuer = None;
        assert!(public.verify("r1", true, &dropped).is_err(), "v2 is not v1");
        // Another gateway's key.
        let (_, stranger) = SigningKey::generate();
        assert!(
            PublicKey::from_base64(&stranger)
                .unwrap()
                .verify("r1", true, &d)
                .is_err()
        );
        // The key never shows in Debug output.
        assert!(!format!("{key:?}").contains(&seed));
        assert!(SigningKey::from_base64("not base64!").is_err());
        assert!(SigningKey::from_base64(&STANDARD.encode([1u8; 16])).is_err());
    }
}
