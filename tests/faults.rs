//! Crash faults, for real: many runs in flight while services and nats-server itself are
//! killed with SIGKILL at random moments and restarted (the server on the same store). Every
//! change acknowledged becomes a run that succeeds, as it does without faults; no deploy takes
//! effect twice for a run and environment; each run has one artifact. Loopback only, bounded
//! in kills and time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use slipway_domain::events::EventData;
use slipway_e2e::{Stack, project};

const SERVICES: &[&str] = &[
    "slipway-conductor",
    "slipway-builder",
    "slipway-tester",
    "slipway-deployer",
];

fn spec(counts: &Path) -> String {
    let deploy = format!(
        r#"[environment.deploy]
command = ["sh", "-c", "sleep 0.2; c={c}/$SLIPWAY_ENVIRONMENT; echo \"$SLIPWAY_RUN_ID\" >> $c.calls; grep -qx \"$SLIPWAY_DEPLOY_KEY\" $c.keys 2>/dev/null || {{ echo \"$SLIPWAY_DEPLOY_KEY\" >> $c.keys; echo \"$SLIPWAY_RUN_ID\" >> $c; }}"]
timeout_secs = 15
idempotent = true
"#,
        c = counts.display()
    );
    format!(
        r#"
[pipeline]
name = "faults"
[build]
command = ["sh", "-c", "sleep 0.3; mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["sh", "-c", "sleep 0.2"]
[[environment]]
name = "staging"
{deploy}
[[environment]]
name = "production"
{deploy}
"#
    )
}

/// A small deterministic generator, seeded per run of the test (printed, to reproduce).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn runs_survive_sigkill_of_every_service_and_the_server() {
    let mut stack = Stack::start_with(SERVICES);
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let dir = project(stack.dir.path(), "faults", &spec(&counts), &[]);
    let seed = std::env::var("SLIPWAY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fault seed {seed} (SLIPWAY_FAULT_SEED={seed} repeats this schedule)");
    let mut rng = Lcg(seed);

    // Changes acknowledged by the server (the CLI returned their run ids).
    let mut runs = Vec::new();
    for _ in 0..10 {
        let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
        runs.push(v["run_id"].as_str().unwrap().to_string());
    }

    // Faults: at most 8 kills over at most 30 s, each restarted at once.
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for _ in 0..8 {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(300 + rng.next(900)));
        let target = rng.next(SERVICES.len() as u64 + 1) as usize;
        if target == SERVICES.len() {
            // The server, on the same store: what it acknowledged must survive.
            stack.nats.restart();
            *kills.entry("nats-server").or_default() += 1;
        } else {
            let name = SERVICES[target];
            stack.service(name).kill();
            std::thread::sleep(Duration::from_millis(100 + rng.next(300)));
            stack.spawn(name);
            *kills.entry(name).or_default() += 1;
        }
    }
    eprintln!("killed: {kills:?}");

    // Every run reaches the end it reaches without faults: success. (The deploy command is
    // idempotent by its deploy key, so a deploy whose worker died is run again with the same
    // key; a deploy that is not idempotent is never repeated: docs/reliability.md.)
    for run in &runs {
        let s = stack.wait_for(run, Duration::from_secs(180), |s| {
            matches!(s["phase"].as_str(), Some("succeeded" | "failed"))
        });
        assert_eq!(
            s["phase"],
            "succeeded",
            "run {run}: {}\n{}",
            s["reason"],
            stack.logs()
        );
    }

    // Each deploy's effect happened exactly once per run and environment (the command may
    // have been called again after a crash; its key made the repeat a no-op).
    let mut repeated_calls = 0;
    for env in ["staging", "production"] {
        let effects = std::fs::read_to_string(counts.join(env)).unwrap_or_default();
        let calls =
            std::fs::read_to_string(counts.join(format!("{env}.calls"))).unwrap_or_default();
        for run in &runs {
            let n = effects.lines().filter(|l| l.trim() == run).count();
            assert_eq!(n, 1, "{run} deployed to {env} {n} times");
            repeated_calls += calls.lines().filter(|l| l.trim() == run).count() - 1;
        }
    }
    eprintln!("deploy commands called again after a crash: {repeated_calls}");

    // One artifact per run, and the log folds to the live state (nothing acknowledged lost).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bus = rt.block_on(stack.bus());
    for run in &runs {
        let log = rt.block_on(bus.run_log(run)).unwrap();
        let artifacts: std::collections::BTreeSet<slipway_domain::digest::Digest> = log
            .iter()
            .filter_map(|r| match &r.event.as_ref().ok()?.data {
                EventData::BuildSucceeded(b) => Some(b.artifact.digest.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(artifacts.len(), 1, "{run}: artifacts {artifacts:?}");
        stack.assert_replay_matches(run);
    }
    assert_eq!(stack.refusals(), Vec::<String>::new());
}
