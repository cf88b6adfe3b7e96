//! What ships to run Slipway beyond one shell, each checked with the real tool: the systemd
//! units (`systemd-analyze verify`) and the Prometheus alert rules (`promtool test rules`).
//! `deploy/setup.sh --ops-tools` installs the tools (CI runs it); a missing tool fails the test,
//! saying how to get it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    slipway_core::testing::workspace_root()
}

/// A tool from `.venv/bin` or the PATH, or a failure naming the setup step.
fn tool(name: &str) -> PathBuf {
    let local = root().join(".venv/bin").join(name);
    if local.is_file() {
        return local;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("{name} is missing: run `bash deploy/setup.sh --ops-tools`"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The units, with their paths pointed at this build's binaries and a scratch `/etc/slipway`.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let bins = slipway_e2e::bin_dir();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let nats = slipway_core::testing::nats_binary();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.ends_with(".service") || name.ends_with(".target")) {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/nats-server", &nats.display().to_string())
            .replace("/usr/local/bin/", &format!("{}/", bins.display()))
            .replace("/etc/slipway/", &format!("{}/", etc.display()));
        if name == "slipway@.service" {
            // Every instance the target wants, as systemd instantiates the template.
            for service in slipway_domain::service::Service::ALL {
                let unit = dir.join(format!("slipway@{}.service", service.name()));
                std::fs::write(&unit, &text).unwrap();
                std::fs::write(etc.join(format!("{}.env", service.name())), "").unwrap();
                out.push(unit);
            }
        } else {
            std::fs::write(dir.join(&name), &text).unwrap();
            out.push(dir.join(&name));
        }
    }
    std::fs::write(etc.join("nats.env"), "").unwrap();
    out.sort();
    out
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_in(dir.path());
    assert_eq!(units.len(), slipway_domain::service::Service::ALL.len() + 2);
    let (ok, out) = run(Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .args(&units)
        .current_dir(dir.path()));
    // Warnings (an unknown key, say) fail too: systemd would ignore the line.
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    // Restarted always, never given up on, as an unprivileged user with no way to gain more.
    for unit in ["slipway@.service", "slipway-nats.service"] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit)).unwrap();
        for line in [
            "Restart=always",
            "StartLimitIntervalSec=0",
            "User=slipway",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(line), "{unit} lacks {line:?}");
        }
    }
    // A broken unit is refused: the check can fail.
    let bad = dir.path().join("broken.service");
    std::fs::write(&bad, "[Service]\nExecStart=slipway-conductor\n").unwrap();
    let (ok, out) = run(Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .arg(&bad));
    assert!(!ok, "{out}");
}

#[test]
fn the_alert_rules_fire_as_their_tests_say() {
    let dir = root().join("deploy/prometheus");
    let promtool = tool("promtool");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules", "slipway-alerts.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules", "slipway-alerts.test.yml"])
        .current_dir(&dir));
    assert!(ok && out.contains("SUCCESS"), "{out}");
    // Every alert the rules define has a test, and every metric they read is one the gateway
    // exports (or the scrape's own `up`).
    let rules = std::fs::read_to_string(dir.join("slipway-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("slipway-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for a in &alerts {
        assert!(tests.contains(&format!("alertname: {a}")), "no test of {a}");
    }
    let gateway_src =
        std::fs::read_to_string(root().join("services/approval/src/metrics.rs")).unwrap();
    for metric in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("slipway_"))
    {
        assert!(
            gateway_src.contains(&format!("\"{metric}"))
                || gateway_src.contains(&format!("{metric}{{")),
            "the rules read {metric}, which the gateway does not export"
        );
    }
}
