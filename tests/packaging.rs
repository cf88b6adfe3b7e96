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
    // The server has its own user; each service gets only its own password, from systemd.
    let nats = std::fs::read_to_string(root().join("deploy/systemd/slipway-nats.service")).unwrap();
    assert!(nats.contains("User=slipway-nats\n") && nats.contains("-sd /var/lib/slipway-nats"));
    let service = std::fs::read_to_string(root().join("deploy/systemd/slipway@.service")).unwrap();
    for line in [
        "User=slipway\n",
        "LoadCredential=nats-password:/etc/slipway/credentials/%i\n",
        "Environment=SLIPWAY__NATS__PASSWORD_FILE=%d/nats-password\n",
        "InaccessiblePaths=-/var/lib/slipway-nats\n",
    ] {
        assert!(service.contains(line), "slipway@.service lacks {line:?}");
    }
    let sysusers = std::fs::read_to_string(root().join("deploy/systemd/slipway.sysusers")).unwrap();
    assert!(sysusers.contains("u slipway-nats "));
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

/// The resources a kustomization lists, read with PyYAML (an independent reader): each
/// document as JSON.
fn resources(dir: &Path) -> Vec<serde_json::Value> {
    let script = r#"
import json, sys, yaml, pathlib
d = pathlib.Path(sys.argv[1])
k = yaml.safe_load((d / "kustomization.yaml").read_text())
out = {"kustomization": k, "docs": []}
for f in k["resources"]:
    for doc in yaml.safe_load_all((d / f).read_text()):
        if doc:
            doc["__file"] = f
            out["docs"].append(doc)
out["nats_values"] = yaml.safe_load((d / "nats-values.yaml").read_text())
print(json.dumps(out))
"#;
    let (ok, out) = run(Command::new(tool("python3")).arg("-c").arg(script).arg(dir));
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut docs = v["docs"].as_array().unwrap().clone();
    docs.push(serde_json::json!({"kind": "__kustomization", "spec": v["kustomization"]}));
    docs.push(serde_json::json!({"kind": "__nats_values", "spec": v["nats_values"]}));
    docs
}

#[test]
fn the_kubernetes_manifests_validate_and_wire_every_service() {
    let dir = root().join("deploy/kubernetes");
    let docs = resources(&dir);
    let kustomization = docs
        .iter()
        .find(|d| d["kind"] == "__kustomization")
        .unwrap()["spec"]
        .clone();
    let files: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    // Every resource valid against the Kubernetes schemas, strictly (no unknown field).
    let (ok, out) = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", "1.30.0"])
        .args(&files)
        .current_dir(&dir));
    assert!(
        ok && !out.contains("ERROR") && !out.contains("WARN"),
        "{out}"
    );
    // The Secrets the kustomization generates, from what make-secrets.sh writes, valid too,
    // and holding every key the Deployments read.
    let scratch = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&dir).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, scratch.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let path = format!(
        "{}:{}",
        slipway_e2e::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (ok, out) = run(Command::new("bash")
        .arg(scratch.path().join("make-secrets.sh"))
        .env("PATH", path));
    assert!(ok, "{out}");
    let secrets = scratch.path().join("secrets");
    let env_keys = |file: &str| -> Vec<String> {
        std::fs::read_to_string(secrets.join(file))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .collect()
    };
    let nats_keys = env_keys("nats.env");
    assert_eq!(
        nats_keys.len(),
        slipway_domain::service::Service::NATS_USERS.len()
    );
    let seed = std::fs::read_to_string(secrets.join("approval-signing.key")).unwrap();
    let public = env_keys("approvals.env");
    assert_eq!(public, ["SLIPWAY__APPROVALS__PUBLIC_KEY"]);
    slipway_domain::signing::SigningKey::from_base64(seed.trim()).unwrap();
    let secret = |name: &str, keys: &[String]| {
        let data: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| (k.clone(), serde_json::json!("c2VjcmV0")))
            .collect();
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "slipway"}, "type": "Opaque", "data": data})
    };
    let generated = scratch.path().join("generated.json");
    std::fs::write(
        &generated,
        serde_json::to_string(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
                secret("slipway-nats", &nats_keys),
                secret("slipway-signing", &["approval-signing.key".to_string()]),
                secret("slipway-approvals", &public),
            ]}),
        )
        .unwrap(),
    )
    .unwrap();
    let (ok, out) = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", "1.30.0"])
        .arg(&generated));
    assert!(ok, "{out}");

    // One Deployment per service, replicated, probed on its health endpoints, with resources,
    // its own NATS user's password from the Secret, and nothing running as root.
    let deployments: Vec<&serde_json::Value> =
        docs.iter().filter(|d| d["kind"] == "Deployment").collect();
    assert_eq!(
        deployments.len(),
        slipway_domain::service::Service::ALL.len()
    );
    for service in slipway_domain::service::Service::ALL {
        let d = deployments
            .iter()
            .find(|d| d["metadata"]["name"] == format!("slipway-{}", service.name()))
            .unwrap_or_else(|| panic!("no Deployment of {}", service.name()));
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert!(
            d["spec"]["replicas"].as_u64().unwrap() >= 2,
            "{}",
            service.name()
        );
        assert_eq!(
            c["command"][0],
            format!("/usr/local/bin/{}", service.binary())
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert!(c["resources"]["limits"]["memory"].is_string());
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        // What runs user code leaves orphans: the pod's pause process (PID 1) reaps them.
        if matches!(service.name(), "builder" | "tester") {
            assert_eq!(spec["shareProcessNamespace"], true, "{}", service.name());
        }
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        let env = |name: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].clone())
        };
        let user = service.nats_user();
        assert_eq!(env("SLIPWAY__NATS__USER"), Some(serde_json::json!(user)));
        let var = slipway_core::config::credentials::password_variable(user);
        assert!(nats_keys.contains(&var), "{var}");
        assert_eq!(
            env("SLIPWAY__NATS__PASSWORD_FILE"),
            Some(serde_json::json!(format!("/var/run/slipway/nats/{var}")))
        );
        assert_eq!(
            env("SLIPWAY__HEALTH__LISTEN"),
            Some(serde_json::json!("0.0.0.0:9090"))
        );
    }
    // The gateway behind a Service and an Ingress; the deployer trusts its key.
    let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "approval"
    );
    let ingress = docs.iter().find(|d| d["kind"] == "Ingress").unwrap();
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"],
        svc["metadata"]["name"]
    );
    let deployer = deployments
        .iter()
        .find(|d| d["metadata"]["name"] == "slipway-deployer")
        .unwrap();
    assert_eq!(
        deployer["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"],
        "slipway-approvals"
    );
    // NATS from the official chart: JetStream on files, three servers, every user's password.
    let values = &docs.iter().find(|d| d["kind"] == "__nats_values").unwrap()["spec"];
    assert_eq!(values["config"]["cluster"]["replicas"], 3);
    assert_eq!(values["config"]["jetstream"]["fileStore"]["enabled"], true);
    // The namespace enforces the restricted Pod Security Standard: so must the chart's pods.
    let namespace = docs.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let pod = &values["podTemplate"]["merge"]["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert!(pod["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    for container in ["container", "reloader"] {
        let c = &values[container]["merge"]["securityContext"];
        assert_eq!(c["allowPrivilegeEscalation"], false, "{container}");
        assert_eq!(
            c["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{container}"
        );
    }
    // What the chart merges in, valid against the schemas too (as a Pod of the two containers).
    let pod_doc = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "nats-0", "namespace": "slipway"},
    "spec": {"securityContext": pod, "containers": [
        {"name": "nats", "image": "nats", "securityContext": values["container"]["merge"]["securityContext"]},
        {"name": "reloader", "image": "reloader", "securityContext": values["reloader"]["merge"]["securityContext"]},
    ]}});
    let pod_file = scratch.path().join("nats-pod.json");
    std::fs::write(&pod_file, pod_doc.to_string()).unwrap();
    let (ok, out) = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", "1.30.0"])
        .arg(&pod_file));
    assert!(ok, "{out}");
    nats_values_start_a_server(values, &secrets.join("nats.env"), &nats_keys);
}

/// What the chart makes of the values, played out with a real nats-server: the chart writes
/// `/etc/nats-config/nats.conf` with an include for each `$include` key of `config.merge`, the
/// patches mount the users' ConfigMap, and `container.env` (a map: name to value or source) sets
/// the passwords from the Secret. The users then sign in with the passwords make-secrets.sh wrote.
fn nats_values_start_a_server(values: &serde_json::Value, nats_env: &Path, nats_keys: &[String]) {
    // The chart fails on an env that is not a map of strings or sources.
    let env = values["container"]["env"]
        .as_object()
        .expect("container.env is a map, as the chart reads it");
    assert_eq!(env.len(), nats_keys.len());
    for k in nats_keys {
        let source = &env.get(k).unwrap_or_else(|| panic!("the chart lacks {k}"))["valueFrom"]["secretKeyRef"];
        assert_eq!(source["name"], "slipway-nats", "{k}");
        assert_eq!(source["key"], k.as_str(), "{k}");
    }
    let includes: Vec<&str> = values["config"]["merge"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.ends_with("$include"))
        .map(|(_, v)| v.as_str().unwrap())
        .collect();
    assert_eq!(includes.len(), 1, "one include of the users' file");
    let mount = values["container"]["patch"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "/volumeMounts/-")
        .expect("the users' ConfigMap mounted in the nats container");
    let volume = values["statefulSet"]["patch"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "/spec/template/spec/volumes/-")
        .expect("the users' ConfigMap as a volume of the pods");
    assert_eq!(mount["value"]["name"], volume["value"]["name"]);
    assert_eq!(volume["value"]["configMap"]["name"], "slipway-nats-users");

    // The pod's file system as the chart lays it out, under a scratch root.
    let scratch = tempfile::tempdir().unwrap();
    let under_root = |abs: &str| scratch.path().join(abs.trim_start_matches('/'));
    let config_dir = under_root("/etc/nats-config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let users_dir = under_root(mount["value"]["mountPath"].as_str().unwrap());
    std::fs::create_dir_all(&users_dir).unwrap();
    std::fs::copy(
        root().join("deploy/nats/least-privilege.conf"),
        users_dir.join("least-privilege.conf"),
    )
    .unwrap();
    let conf = config_dir.join("nats.conf");
    std::fs::write(&conf, format!("include {};\n", includes[0])).unwrap();
    let passwords: Vec<(String, String)> = std::fs::read_to_string(nats_env)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let server = slipway_core::exec::server::NatsProcess::spawn(
        &slipway_core::testing::nats_binary(),
        0,
        &scratch.path().join("data"),
        &["-c".to_string(), conf.display().to_string()],
        &passwords,
    )
    .unwrap_or_else(|e| panic!("nats-server with the chart's layout: {e}"));
    let password = |user: &str| {
        let var = slipway_core::config::credentials::password_variable(user);
        passwords.iter().find(|(k, _)| *k == var).unwrap().1.clone()
    };
    let url = server.url();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            for user in slipway_domain::service::Service::NATS_USERS {
                async_nats::ConnectOptions::with_user_and_password(
                    user.to_string(),
                    password(user),
                )
                .connect(&url)
                .await
                .unwrap_or_else(|e| panic!("{user} cannot sign in: {e}"));
            }
            let refused = async_nats::ConnectOptions::with_user_and_password(
                "admin".into(),
                "not-the-password".into(),
            )
            .connect(&url);
            let refused = tokio::time::timeout(std::time::Duration::from_secs(5), refused).await;
            assert!(!matches!(refused, Ok(Ok(_))), "a wrong password signed in");
        });
}

/// Undoes what the image test set up, however it ends.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).output();
        }
    }
}

#[test]
fn the_image_is_linted_built_and_self_contained() {
    let (_, uid) = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "building the image needs root (debootstrap, podman), as CI has"
    );
    // hadolint: the Containerfile is clean, and a careless one is not.
    let containerfile = root().join("deploy/container/Containerfile");
    let (ok, out) = run(Command::new(tool("hadolint")).arg(&containerfile));
    assert!(ok && out.trim().is_empty(), "{out}");
    let careless = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        careless.path(),
        "FROM debian\nRUN apt-get install git\nUSER root\n",
    )
    .unwrap();
    let (ok, _) = run(Command::new(tool("hadolint")).arg(careless.path()));
    assert!(!ok, "hadolint let a careless Containerfile through");

    // Built by podman from this build's binaries, with no registry.
    let tag = format!("localhost/slipway:test-{}", std::process::id());
    tool("debootstrap");
    let (ok, out) = run(Command::new("bash")
        .arg(root().join("deploy/container/build.sh"))
        .args([
            "--bin-dir",
            &slipway_e2e::bin_dir().display().to_string(),
            "--tag",
            &tag,
        ]));
    assert!(ok, "{out}");
    let mut cleanup = Cleanup(vec![vec![
        "podman".into(),
        "rmi".into(),
        "-f".into(),
        tag.clone(),
    ]]);

    // Mounted, its binaries run in a chroot of it: each answers --version.
    let (ok, mnt) = run(Command::new(tool("podman")).args(["image", "mount", &tag]));
    assert!(ok, "{mnt}");
    cleanup.0.push(vec![
        "podman".into(),
        "image".into(),
        "unmount".into(),
        tag.clone(),
    ]);
    let mnt = PathBuf::from(mnt.trim());
    let version = env!("CARGO_PKG_VERSION");
    let mut binaries: Vec<&str> = slipway_domain::service::Service::BINARIES.to_vec();
    binaries.push("slipway");
    for b in &binaries {
        let (ok, out) = run(Command::new("chroot")
            .args(["--userspec=10001:10001"])
            .arg(&mnt)
            .arg(format!("/usr/local/bin/{b}"))
            .arg("--version"));
        assert!(ok && out.contains(version), "{b} --version: {out}");
    }
    let passwd = std::fs::read_to_string(mnt.join("etc/passwd")).unwrap();
    assert!(passwd.contains("slipway:x:10001:10001"), "{passwd}");

    // A run from the image's own root: `slipway up` in a chroot of a container made from it
    // (not started: these machines cannot set up its cgroups), against a nats-server on the
    // host, as the image's user.
    let name = format!("slipway-test-{}", std::process::id());
    let (ok, out) = run(Command::new(tool("podman")).args(["create", "--name", &name, &tag]));
    assert!(ok, "{out}");
    cleanup.0.push(vec![
        "podman".into(),
        "rm".into(),
        "-f".into(),
        name.clone(),
    ]);
    let (ok, root_dir) = run(Command::new(tool("podman")).args(["mount", &name]));
    assert!(ok, "{root_dir}");
    cleanup
        .0
        .push(vec!["podman".into(), "umount".into(), name.clone()]);
    let root_dir = PathBuf::from(root_dir.trim());
    let (ok, out) = run(Command::new("mount")
        .args(["-t", "proc", "proc"])
        .arg(root_dir.join("proc")));
    assert!(ok, "{out}");
    cleanup.0.push(vec![
        "umount".into(),
        "-l".into(),
        root_dir.join("proc").display().to_string(),
    ]);
    let nats = slipway_core::testing::TestNats::start();
    let url = nats.plain_url();
    let [gateway] = slipway_core::exec::server::free_ports::<1>();
    let home = root_dir.join("var/lib/slipway");
    std::fs::create_dir_all(home.join("project")).unwrap();
    std::fs::write(
        home.join("project/slipway.toml"),
        "[pipeline]\nname = \"from-the-image\"\n[build]\ncommand = [\"sh\", \"-c\", \"mkdir -p dist && git --version > dist/v\"]\nartifacts = [\"dist\"]\n[[test]]\nname = \"unit\"\ncommand = [\"sh\", \"-c\", \"grep -q git \\\"$SLIPWAY_ARTIFACT_DIR/dist/v\\\"\"]\n",
    )
    .unwrap();
    std::fs::write(
        home.join("slipway.toml"),
        format!("[gateway]\nlisten = \"127.0.0.1:{gateway}\"\n"),
    )
    .unwrap();
    let (ok, out) = run(Command::new("chown").args(["-R", "10001:10001"]).arg(&home));
    assert!(ok, "{out}");
    let chroot = tool("chroot");
    let chrooted = |args: &[&str]| {
        // The environment is cleared: the program is named by its path.
        let mut c = Command::new(&chroot);
        c.args(["--userspec=10001:10001"])
            .arg(&root_dir)
            .arg("/usr/local/bin/slipway")
            .args(["--nats-url", &url])
            .args(args)
            .env_clear()
            .env("HOME", "/var/lib/slipway")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        c
    };
    let mut up = chrooted(&[
        "up",
        "--data-dir",
        "/var/lib/slipway/data",
        "--config",
        "/var/lib/slipway/slipway.toml",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let (ok, out) = run(&mut chrooted(&[
        "submit",
        "/var/lib/slipway/project/slipway.toml",
        "--wait",
        "--json",
        "--timeout",
        "90",
    ]));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let status = up.wait().unwrap();
    let mut up_log = String::new();
    use std::io::Read as _;
    let _ = up.stderr.take().unwrap().read_to_string(&mut up_log);
    assert!(ok && out.contains("\"succeeded\""), "{out}\n{up_log}");
    assert!(status.success(), "{status}\n{up_log}");
}
