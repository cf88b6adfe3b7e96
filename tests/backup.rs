//! `slipway backup` and `slipway restore`: a backup taken while runs go on, restored into an
//! empty server, gives every run the fold it had in the log at the backup, every artifact by
//! the same digest, the stream's sequences, and services that carry on from it; a damaged
//! backup is refused with nothing restored.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use slipway_core::bus::Bus;
use slipway_domain::Run;
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(120);

fn spec(out: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "kept"
[build]
command = ["sh", "-c", "sleep 1; mkdir -p dist && head -c 3000 /dev/urandom > dist/blob"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["sh", "-c", "sleep 1"]
[[environment]]
name = "production"
[environment.deploy]
command = ["sh", "-c", "mkdir -p \"$OUT\" && cp -r \"$SLIPWAY_ARTIFACT_DIR/dist\" \"$OUT/$SLIPWAY_RUN_ID\""]
env = {{ OUT = "{}" }}
"#,
        out.display()
    )
}

/// Each run's fold from `bus`'s log, through stream sequence `through`.
async fn folds(bus: &Bus, runs: &[String], through: u64) -> Vec<Value> {
    let mut out = Vec::new();
    for run in runs {
        let log = bus.run_log(run).await.unwrap();
        let events: Vec<_> = log
            .into_iter()
            .filter(|r| r.seq <= through)
            .filter_map(|r| r.event.ok())
            .collect();
        out.push(Run::replay(&events).map_or(Value::Null, |r| serde_json::to_value(r).unwrap()));
    }
    out
}

fn slipway_admin(stack: &Stack, args: &[&str]) -> std::process::Output {
    stack.slipway_as("admin", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_mid_run_restores_every_run_and_artifact_and_the_services_carry_on() {
    let stack = Stack::start();
    let out = stack.dir.path().join("deployed");
    let dir = project(stack.dir.path(), "kept", &spec(&out), &[]);
    let runs: Vec<String> = (0..8)
        .map(|_| {
            let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
            v["run_id"].as_str().unwrap().to_string()
        })
        .collect();
    // Some ended, some in flight: then the backup.
    stack.wait_phase(&runs[0], "succeeded", LONG);
    let backup = stack.dir.path().join("backup");
    let taken = slipway_admin(&stack, &["backup", backup.to_str().unwrap(), "--json"]);
    assert!(
        taken.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&taken.stdout),
        String::from_utf8_lossy(&taken.stderr)
    );
    let manifest: Value = serde_json::from_slice(&taken.stdout).unwrap();
    let streams = manifest["streams"].as_array().unwrap();
    let names: Vec<&str> = streams
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for needed in [
        "SLIPWAY",
        "OBJ_slipway-artifacts",
        "OBJ_slipway-logs",
        "KV_slipway-checkpoints",
    ] {
        assert!(names.contains(&needed), "{names:?}");
    }
    assert!(!names.contains(&"KV_slipway-services"), "{names:?}");
    let log = streams.iter().find(|s| s["name"] == "SLIPWAY").unwrap();
    let through = log["last_seq"].as_u64().unwrap();
    let old_bus = stack.bus().await;
    let then = folds(&old_bus, &runs, through).await;
    let in_flight = then
        .iter()
        .filter(|r| !r.is_null() && !matches!(r["phase"].as_str(), Some("succeeded" | "failed")))
        .count();
    assert!(in_flight > 0, "the backup was taken with runs in flight");
    for run in &runs {
        stack.wait_phase(run, "succeeded", LONG);
    }

    // An empty server: the restore, then the services on it.
    let mut restored = Stack::start_with(&[]);
    let done = slipway_admin(&restored, &["restore", backup.to_str().unwrap()]);
    assert!(
        done.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let new_bus = restored.bus().await;
    let (_, last) = new_bus.stream_state().await.unwrap();
    assert_eq!(last, through, "the log's sequences are kept");
    assert_eq!(
        folds(&new_bus, &runs, u64::MAX).await,
        then,
        "every run folds as it did"
    );
    // `slipway replay` agrees, and every artifact is there by its digest.
    let objects = slipway_core::store::objects::Objects::new(&new_bus);
    let mut artifacts = 0;
    for (run, state) in runs.iter().zip(&then) {
        if state.is_null() {
            continue;
        }
        let replayed: Value = serde_json::from_slice(
            &restored
                .slipway_as("admin", &["replay", run, "--json"])
                .stdout,
        )
        .unwrap();
        assert_eq!(replayed["phase"], state["phase"], "{run}");
        if let Some(a) = state["artifact"].as_object() {
            let bytes = slipway_core::store::objects::read(
                &objects,
                a["bucket"].as_str().unwrap(),
                a["object"].as_str().unwrap(),
            )
            .await
            .unwrap();
            assert_eq!(
                slipway_domain::digest::Digest::of(&bytes).to_string(),
                a["digest"].as_str().unwrap()
            );
            artifacts += 1;
        }
    }
    assert!(artifacts > 0);
    for s in slipway_e2e::SERVICES {
        restored.spawn(s);
    }
    for run in &runs {
        restored.wait_phase(run, "succeeded", LONG);
    }
    let v = restored.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    restored.wait_phase(v["run_id"].as_str().unwrap(), "succeeded", LONG);

    // A damaged backup: refused, naming the file, and the server is left without a stream.
    let damaged = stack.dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(&backup).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, damaged.join(p.file_name().unwrap())).unwrap();
    }
    let file = damaged.join("SLIPWAY.snapshot");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let empty = Stack::start_with(&[]);
    let refused = slipway_admin(&empty, &["restore", damaged.to_str().unwrap()]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("SLIPWAY.snapshot: checksum"), "{err}");
    let client = empty.nats_client().await;
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    use futures_util::StreamExt;
    assert!(names.next().await.is_none(), "nothing was restored");

    // A backup whose checksums hold but whose last stream the server cannot take (its snapshot
    // cut short, the manifest made to match): the streams restored before it are removed again.
    let cut = stack.dir.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    for e in std::fs::read_dir(&backup).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, cut.join(p.file_name().unwrap())).unwrap();
    }
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(cut.join("manifest.json")).unwrap()).unwrap();
    let streams = manifest["streams"].as_array_mut().unwrap();
    assert!(streams.len() > 1);
    let last = streams.last_mut().unwrap();
    let last_name = last["name"].as_str().unwrap().to_string();
    let file = cut.join(last["file"].as_str().unwrap());
    let bytes = std::fs::read(&file).unwrap();
    let short = &bytes[..bytes.len() / 2];
    std::fs::write(&file, short).unwrap();
    use sha2::Digest as _;
    last["bytes"] = json!(short.len());
    last["sha256"] = json!(format!("sha256:{:x}", sha2::Sha256::digest(short)));
    std::fs::write(
        cut.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let refused = slipway_admin(&empty, &["restore", cut.to_str().unwrap()]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains(&last_name), "{err}");
    let mut names = js.stream_names();
    assert!(
        names.next().await.is_none(),
        "the streams restored before {last_name} were left: {err}"
    );

    // On one host: restored into the data directory of `slipway up`, which carries on from it.
    let data = stack.dir.path().join("up-data");
    let into = std::process::Command::new(slipway_e2e::bin_dir().join("slipway"))
        .args(["restore", backup.to_str().unwrap(), "--into-data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        into.status.success(),
        "{}",
        String::from_utf8_lossy(&into.stderr)
    );
    // Not twice into one store (it may be the store a running `up` serves).
    let again = std::process::Command::new(slipway_e2e::bin_dir().join("slipway"))
        .args(["restore", backup.to_str().unwrap(), "--into-data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds a JetStream store"), "{err}");
    let [port, gw] = slipway_core::exec::server::free_ports::<2>();
    let config = stack.dir.path().join("up.toml");
    std::fs::write(&config, format!("[gateway]\nlisten = \"127.0.0.1:{gw}\"\n")).unwrap();
    let up = Up(
        std::process::Command::new(slipway_e2e::bin_dir().join("slipway"))
            .args(["up", "--port", &port.to_string(), "--data-dir"])
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + LONG;
    for run in &runs {
        loop {
            let out = std::process::Command::new(slipway_e2e::bin_dir().join("slipway"))
                .args(["--nats-url", &url, "status", run, "--json"])
                .env("SLIPWAY_DATA_DIR", &data)
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if v["phase"] == "succeeded" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{run}: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    drop(up);
}

/// `slipway up`, interrupted so it stops what it started.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
