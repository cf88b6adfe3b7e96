//! A rollout's flag file as teams' applications read it: OpenFeature's flagd provider for
//! Python (in-process, file mode; `deploy/setup.sh --python-tools` installs it) evaluates the
//! flag Slipway writes for many users and yields the configured split, each user staying on
//! one variant.

use std::process::Command;

use serde_json::Value;
use slipway_domain::traffic::{Weight, flagd_definition};

const EVALUATE: &str = "import sys, json\n\
from openfeature import api\n\
from openfeature.evaluation_context import EvaluationContext\n\
from openfeature.contrib.provider.flagd import FlagdProvider\n\
from openfeature.contrib.provider.flagd.config import ResolverType\n\
api.set_provider_and_wait(FlagdProvider(resolver_type=ResolverType.FILE, offline_flag_source_path=sys.argv[1]))\n\
client = api.get_client()\n\
keys = [f'user-{i}' for i in range(int(sys.argv[2]))]\n\
print(json.dumps([client.get_string_value('model-version', 'unset', EvaluationContext(targeting_key=k)) for k in keys]))\n";

/// Each user's variant as the provider evaluates the flag file, once it has read it; `None`
/// (the caller skips) when the provider is not installed, outside CI.
fn evaluate(flags: &Value, users: usize) -> Option<Vec<String>> {
    let python = slipway_e2e::venv_python_with("openfeature.contrib.provider.flagd")?;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flags.json");
    std::fs::write(&file, serde_json::to_vec_pretty(flags).unwrap()).unwrap();
    let out = Command::new(&python)
        .args(["-c", EVALUATE])
        .arg(&file)
        .arg(users.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the provider refused the flag file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_flagd_provider_splits_users_by_the_weight_slipway_writes() {
    let users = 20_000;
    for percent in [0.0, 5.0, 50.0, 100.0] {
        let flags = flagd_definition("model-version", Weight::percent(percent).unwrap());
        let Some(variants) = evaluate(&flags, users) else {
            return;
        };
        assert_eq!(variants.len(), users);
        let other = variants
            .iter()
            .filter(|v| *v != "stable" && *v != "candidate")
            .count();
        assert_eq!(other, 0, "{percent}%: {other} users got neither slot");
        let share =
            100.0 * variants.iter().filter(|v| *v == "candidate").count() as f64 / users as f64;
        // 20,000 users: a binomial share's standard deviation is at most 0.35 points.
        assert!(
            (share - percent).abs() <= 1.0,
            "{percent}% configured, {share:.2}% of users on the candidate"
        );
        // Evaluated again, every user gets the same variant (bucketing by targeting key).
        let again = evaluate(&flags, users).unwrap();
        let moved = again.iter().zip(&variants).filter(|(a, b)| a != b).count();
        assert_eq!(moved, 0, "{percent}%: {moved} users changed variant");
    }
}
