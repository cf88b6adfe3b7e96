//! The builder against a real nats-server: git sources at a revision, refused sources and
//! artifact paths, the stored artifact's contents.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use slipway_core::bus::Bus;
use slipway_core::config::Config;
use slipway_core::runtime::CancellationToken;
use slipway_core::testing::TestNats;
use slipway_domain::events::{EventData, SourceRef};
use slipway_domain::sim::Sim;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository with two commits; returns (first, second) revisions.
fn repo(dir: &Path) -> (String, String) {
    git(dir, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(dir.join("version.txt"), "v1\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "--quiet", "-m", "one"]);
    let first = git(dir, &["rev-parse", "HEAD"]);
    std::fs::write(dir.join("version.txt"), "v2\n").unwrap();
    git(dir, &["commit", "--quiet", "-am", "two"]);
    (first, git(dir, &["rev-parse", "HEAD"]))
}

const SPEC: &str = r#"
[pipeline]
name = "git"
[build]
command = ["sh", "-c", "mkdir -p dist && cp version.txt dist/ && ln -sf /etc/passwd dist/escape"]
artifacts = ["dist/version.txt"]
timeout_secs = 60
"#;

struct Harness {
    nats: TestNats,
    bus: Bus,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _work: tempfile::TempDir,
}

async fn start(git_schemes: &[&str]) -> Harness {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let work = tempfile::tempdir().unwrap();
    let config = Config {
        nats: nats.settings(),
        exec: slipway_core::exec::ExecSettings {
            workspace_root: Some(work.path().to_path_buf()),
            git_schemes: git_schemes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { builder::run(config, s).await.unwrap() });
    Harness {
        nats,
        bus,
        shutdown,
        task,
        _work: work,
    }
}

impl Harness {
    async fn build(&self, spec: &str, source: SourceRef) -> EventData {
        let change = slipway_domain::ids::random();
        let mut sim = Sim::with_source(spec, source, &change);
        sim.decide();
        for e in &sim.log {
            self.bus.publish(e).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.bus.run_log(&sim.run_id).await.unwrap();
            if let Some(e) = log.into_iter().filter_map(|r| r.event.ok()).find(|e| {
                matches!(
                    e.data,
                    EventData::BuildSucceeded(_) | EventData::BuildFailed(_)
                )
            }) {
                return e.data;
            }
            assert!(Instant::now() < deadline, "no build result");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        drop(self.nats);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_a_git_revision_and_stores_its_artifact() {
    let h = start(&["file"]).await;
    let src = tempfile::tempdir().unwrap();
    let (first, _second) = repo(src.path());
    let url = format!("file://{}", src.path().display());
    let data = h
        .build(
            SPEC,
            SourceRef::Git {
                url,
                revision: first,
            },
        )
        .await;
    let EventData::BuildSucceeded(ok) = data else {
        panic!("{data:?}")
    };
    assert_eq!(ok.files, vec!["dist/version.txt"]);
    // The stored artifact is the first revision's file, and its digest checks out.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.tar.gz");
    slipway_core::store::objects::get_file(
        &slipway_core::store::objects::Objects::new(&h.bus),
        &ok.artifact,
        &archive,
    )
    .await
    .unwrap();
    slipway_core::exec::workspace::unpack(&archive, &dir.path().join("out")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/dist/version.txt")).unwrap(),
        "v1\n"
    );
    assert_eq!(
        ok.artifact.name,
        format!("sha256/{}", ok.artifact.digest.hex())
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sources_and_escaping_artifacts_fail_the_build_with_the_reason() {
    let h = start(&["https"]).await;
    let src = tempfile::tempdir().unwrap();
    let (first, _) = repo(src.path());
    let cases = [
        (
            SourceRef::Git {
                url: format!("file://{}", src.path().display()),
                revision: first.clone(),
            },
            "scheme \"file\" is not allowed",
        ),
        (
            SourceRef::Git {
                url: "--upload-pack=touch /tmp/pwned".into(),
                revision: "main".into(),
            },
            "looks like an option",
        ),
        (
            SourceRef::Git {
                url: "https://example.invalid/r.git".into(),
                revision: "--output=/tmp/x".into(),
            },
            "revision",
        ),
        (
            SourceRef::Directory {
                path: "relative/dir".into(),
            },
            "not an absolute path",
        ),
    ];
    for (source, expected) in cases {
        let data = h.build(SPEC, source.clone()).await;
        let EventData::BuildFailed(f) = data else {
            panic!("{source:?} built: {data:?}")
        };
        assert!(f.reason.contains("checkout failed"), "{}", f.reason);
        assert!(f.reason.contains(expected), "{}", f.reason);
    }
    // A declared artifact that is a symlink out of the workspace is refused.
    let escaping = SPEC.replace(
        "artifacts = [\"dist/version.txt\"]",
        "artifacts = [\"dist/escape\"]",
    );
    std::fs::write(src.path().join("marker"), "x").unwrap();
    let data = h
        .build(
            &escaping,
            SourceRef::Directory {
                path: src.path().display().to_string(),
            },
        )
        .await;
    let EventData::BuildFailed(f) = data else {
        panic!("{data:?}")
    };
    assert!(f.reason.contains("outside the workspace"), "{}", f.reason);
    assert!(!Path::new("/tmp/pwned").exists());
    h.stop().await;
}
