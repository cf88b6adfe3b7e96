//! Publishing a rollout's traffic weight where the environment says: the flagd flag file, the
//! `slipway-flags` KV bucket, and a command for routers with their own API. The judge and the
//! deployer (after a promotion) both publish; each change is then recorded as a
//! `rollout.weight_set` event by the caller.

use std::path::Path;
use std::time::Duration;

use slipway_domain::rollout::TrafficSpec;
use slipway_domain::traffic::{Weight, flagd_definition_for};

use crate::bus::{Bus, BusError};
use crate::exec::ExecSettings;

/// The KV bucket of flag definitions, one key per flag.
pub const FLAGS_BUCKET: &str = "slipway-flags";

/// Where one weight goes.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub traffic: &'a TrafficSpec,
    pub pipeline: &'a str,
    pub environment: &'a str,
    /// A shadow rollout: the weight is the share of requests mirrored, not served.
    pub shadow: bool,
}

/// Publishes `weight` to every target of the environment, in order (file, KV, command), and
/// says where it went; the first target that fails stops it with the reason (the caller tries
/// again: every target is idempotent for one weight).
///
/// # Errors
/// What failed, naming the target.
pub async fn publish(
    bus: &Bus,
    exec: &ExecSettings,
    to: &Target<'_>,
    weight: Weight,
) -> Result<Vec<String>, String> {
    let key = to.traffic.flag_key_for(to.pipeline, to.environment);
    let definition = flagd_definition_for(&key, weight, to.shadow);
    let bytes = serde_json::to_vec_pretty(&definition).expect("a flag definition serialises");
    let mut published = Vec::new();
    if let Some(file) = &to.traffic.flag_file {
        write_atomically(Path::new(file), &bytes)
            .await
            .map_err(|e| format!("flag file {file}: {e}"))?;
        published.push(file.clone());
    }
    if to.traffic.kv {
        put_flag(bus, &key, bytes.clone())
            .await
            .map_err(|e| format!("KV {FLAGS_BUCKET}/{key}: {e}"))?;
        published.push(format!("kv:{FLAGS_BUCKET}/{key}"));
    }
    if let Some(argv) = &to.traffic.command {
        run_command(exec, argv, to, &key, weight, to.traffic.timeout_secs).await?;
        published.push(format!("command:{}", argv[0]));
    }
    Ok(published)
}

/// Writes beside the target and renames over it, so a reader (flagd's file watcher, an
/// in-process provider) never sees half a file.
async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

async fn put_flag(bus: &Bus, key: &str, bytes: Vec<u8>) -> Result<(), BusError> {
    let kv = crate::store::kv_bucket(
        bus,
        FLAGS_BUCKET,
        "Slipway: rollouts' flagd flag definitions",
    )
    .await?;
    kv.put(key, bytes.into())
        .await
        .map_err(|e| BusError::nats("put flag", e))?;
    Ok(())
}

async fn run_command(
    exec: &ExecSettings,
    argv: &[String],
    to: &Target<'_>,
    key: &str,
    weight: Weight,
    timeout_secs: u64,
) -> Result<(), String> {
    let home = std::env::temp_dir();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(exec.base_env(&home))
        .env("SLIPWAY_WEIGHT", format!("{}", weight.as_percent()))
        .env("SLIPWAY_FLAG_KEY", key)
        .env("SLIPWAY_ENVIRONMENT", to.environment)
        .env("SLIPWAY_PIPELINE", to.pipeline)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(timeout_secs.max(1)), cmd.output())
        .await
        .map_err(|_| {
            format!(
                "traffic command {} timed out after {timeout_secs}s",
                argv[0]
            )
        })?
        .map_err(|e| format!("traffic command {} could not start: {e}", argv[0]))?;
    if out.status.success() {
        return Ok(());
    }
    let tail: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(format!(
        "traffic command {} failed with {}: {tail}",
        argv[0], out.status
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_flag_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags/flags.json");
        for w in [5.0, 50.0] {
            let bytes = serde_json::to_vec(&flagd_definition_for(
                "k",
                Weight::percent(w).unwrap(),
                false,
            ))
            .unwrap();
            write_atomically(&path, &bytes).await.unwrap();
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["flags"]["k"]["targeting"]["fractional"][1][1], 5000);
        // Nothing is left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
