//! Least privilege on the bus, against a real nats-server running the shipped
//! `deploy/nats/least-privilege.conf`: each service's user may publish only its own facts; a
//! worker that tries to publish an approval, or to delete the log, is refused by the server
//! and nothing reaches the log. (Every other end-to-end test also runs under this
//! configuration: `Stack` starts it.)

use std::time::Duration;

use async_nats::jetstream;
use slipway_e2e::Stack;

async fn js_as(stack: &Stack, user: &str) -> jetstream::Context {
    let (u, p) = stack.nats.credentials(user).unwrap();
    let client = async_nats::ConnectOptions::with_user_and_password(u, p)
        .connect(stack.nats.plain_url())
        .await
        .unwrap();
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client)
}

/// Whether an acknowledged publish of `subject` by `user` is stored.
async fn can_publish(stack: &Stack, user: &str, subject: &str) -> bool {
    let js = js_as(stack, user).await;
    match js.publish(subject.to_string(), "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_may_publish_only_its_own_facts() {
    let stack = Stack::start_with(&[]);
    let bus = stack.bus().await; // the admin creates the stream
    let run = "3f0b8a3e-0000-5000-8000-000000000001";
    let approval = format!("slipway.run.{run}.approval.approved");

    // A worker publishing an approval: refused by the server, nothing stored.
    for user in ["builder", "deployer", "tester", "monitor"] {
        assert!(
            !can_publish(&stack, user, &approval).await,
            "{user} published an approval"
        );
    }
    assert!(
        !can_publish(&stack, "cli", &approval).await,
        "cli published an approval"
    );
    let stored = bus.read(std::slice::from_ref(&approval), 1).await.unwrap();
    assert!(stored.is_empty(), "a refused approval reached the log");
    let log = std::fs::read_to_string(stack.nats.process.store.join("nats-server.log")).unwrap();
    assert!(
        log.contains("user:builder")
            && log.contains("Publish Violation")
            && log.contains(&approval),
        "the server logged the refusal"
    );

    // Only the gateway writes approvers' decisions.
    assert!(can_publish(&stack, "gateway", &approval).await);
    // Each worker its own facts, and not another's; requests only from the conductor.
    let fact = |s: &str| format!("slipway.run.{run}.{s}");
    assert!(can_publish(&stack, "builder", &fact("build.succeeded")).await);
    assert!(!can_publish(&stack, "builder", &fact("deploy.succeeded")).await);
    assert!(!can_publish(&stack, "builder", &fact("build.requested")).await);
    assert!(!can_publish(&stack, "tester", &fact("build.succeeded")).await);
    assert!(can_publish(&stack, "deployer", &fact("rollback.succeeded")).await);
    assert!(!can_publish(&stack, "monitor", &fact("run.succeeded")).await);
    assert!(can_publish(&stack, "conductor", &fact("deploy.requested")).await);
    // The conductor's automatic approval has its own type; approvers' decisions are not its.
    assert!(can_publish(&stack, "conductor", &fact("approval.auto_approved")).await);
    assert!(!can_publish(&stack, "conductor", &approval).await);
    assert!(!can_publish(&stack, "conductor", &fact("deploy.succeeded")).await);
    assert!(!can_publish(&stack, "gateway", &fact("deploy.requested")).await);
    assert!(can_publish(&stack, "cli", "slipway.changes.cli").await);

    // No service may delete the log or purge it.
    for user in ["builder", "conductor", "gateway", "cli"] {
        let js = js_as(&stack, user).await;
        assert!(
            js.delete_stream("SLIPWAY").await.is_err(),
            "{user} deleted the log"
        );
        let stream = js.get_stream("SLIPWAY").await.unwrap();
        assert!(stream.purge().await.is_err(), "{user} purged the log");
    }
    assert!(
        !bus.read(&[fact("build.succeeded")], 1)
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_policys_automatic_approval_deploys_under_least_privilege() {
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-deployer"]);
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let spec = format!(
        r#"
[pipeline]
name = "auto"
[build]
command = ["sh", "-c", "mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
[[environment]]
name = "production"
requires_approval = true
[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID\" >> {}/production"]
[approval]
auto_approve = "when_clean"
"#,
        counts.display()
    );
    let dir = slipway_e2e::project(stack.dir.path(), "auto", &spec, &[]);
    let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    let run = v["run_id"].as_str().unwrap().to_string();
    stack.wait_phase(&run, "succeeded", Duration::from_secs(60));
    let deployed = std::fs::read_to_string(counts.join("production")).unwrap();
    assert_eq!(deployed.trim(), run);
    let events = stack.slipway_ok(&["events", &run]);
    assert!(events.contains("dev.slipway.approval.auto_approved.v1"));
    assert_eq!(stack.refusals(), Vec::<String>::new());
}
