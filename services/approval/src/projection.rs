//! The gateway's view of the runs: the log folded in memory by an ordered consumer, so reads
//! are answered without touching NATS. Decisions never trust it: an approval folds the run's
//! log afresh and appends with optimistic concurrency.
//!
//! When a run starts waiting for approval (seen live, after catching up, so a restart does not
//! notify again), every configured webhook gets a JSON POST, retried with backoff in the
//! background: a slow or dead webhook never holds a run.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::json;
use slipway_core::bus::{Bus, BusError};
use slipway_core::runtime::CancellationToken;
use slipway_domain::events::{ApprovalRequested, EventData};
use slipway_domain::{Run, cdevents, fold, subjects};
use tracing::{debug, info, warn};

/// Every run, folded from the log.
#[derive(Debug, Default)]
pub struct Runs {
    by_id: HashMap<String, Run>,
    /// Run ids in creation order.
    order: Vec<String>,
    pub caught_up: bool,
}

impl Runs {
    pub fn get(&self, id: &str) -> Option<&Run> {
        self.by_id.get(id)
    }

    /// Runs newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Run> {
        self.order.iter().rev().filter_map(|id| self.by_id.get(id))
    }

    fn fold_in(&mut self, run_id: &str, seq: u64, event: &slipway_domain::Event) {
        match self.by_id.remove(run_id) {
            Some(run) => {
                if let Some(run) = fold(Some(run), event) {
                    self.by_id.insert(run_id.to_string(), run);
                }
            }
            None => {
                if let Some(run) = fold(None, event) {
                    self.order.push(run_id.to_string());
                    self.by_id.insert(run_id.to_string(), run);
                } else if let Some(why) = slipway_domain::fold::unreadable(event) {
                    tracing::error!(%run_id, seq, %why, "A run's first event cannot be read; the gateway cannot show the run.");
                }
            }
        }
    }
}

pub type SharedRuns = Arc<RwLock<Runs>>;

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct Notifier {
    pub webhooks: Vec<String>,
    pub attempts: u32,
    pub public_url: String,
    /// Publish CDEvents on `cdevents.>`.
    pub cdevents: bool,
    pub cdevents_webhooks: Vec<String>,
}

/// Follows the log into `runs` until `shutdown`.
///
/// # Errors
/// [`BusError`] when the log cannot be read at start.
pub async fn follow(
    bus: Bus,
    runs: SharedRuns,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let stream = bus.ensure_stream().await?;
    let target = bus.last_seq().await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::RUNS.to_string(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Nats {
            operation: "create gateway reader",
            message: e.to_string(),
        })?;
    let consumer_empty = {
        let mut c = consumer.clone();
        c.info().await.map(|i| i.num_pending == 0).unwrap_or(false)
    };
    let mut messages = consumer.messages().await.map_err(|e| BusError::Nats {
        operation: "read log",
        message: e.to_string(),
    })?;
    if target == 0 || consumer_empty {
        runs.write().expect("lock").caught_up = true;
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| BusError::Nats {
            operation: "webhook client",
            message: e.to_string(),
        })?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                debug!(error = %e, "Gateway reader error; it resumes by itself.");
                continue;
            }
            None => return Ok(()),
        };
        let Ok(info) = msg.info() else { continue };
        let (seq, pending) = (info.stream_sequence, info.pending);
        let live = runs.read().expect("lock").caught_up;
        // Caught up when nothing of our subjects is left to read (not the whole stream's last
        // sequence, which may be a change on another subject).
        if !live && pending == 0 {
            let mut w = runs.write().expect("lock");
            w.caught_up = true;
            info!(runs = w.order.len(), "Gateway caught up with the log.");
        }
        let rec = slipway_core::bus::recorded(seq, &msg.message);
        let Some((run_id, _, _)) = subjects::parse_run(&rec.subject) else {
            continue;
        };
        let Ok(event) = rec.event else { continue };
        let (notify, cdevents) = {
            let mut w = runs.write().expect("lock");
            w.fold_in(run_id, seq, &event);
            let notify = match (&event.data, live) {
                (EventData::ApprovalRequested(r), true) => w
                    .get(run_id)
                    .map(|run| payload(run, r, &notifier.public_url)),
                _ => None,
            };
            // Live only: a restart does not repeat what was already said.
            let cdevents = match (live, w.get(run_id)) {
                (true, Some(run))
                    if notifier.cdevents || !notifier.cdevents_webhooks.is_empty() =>
                {
                    cdevents::for_event(&event, run, Some(&notifier.public_url))
                }
                _ => Vec::new(),
            };
            (notify, cdevents)
        };
        for cdevent in cdevents {
            publish_cdevent(&bus, &client, &notifier, cdevent).await;
        }
        if let Some(body) = notify {
            for url in &notifier.webhooks {
                tokio::spawn(deliver_json(
                    client.clone(),
                    url.clone(),
                    body.clone(),
                    notifier.attempts,
                ));
            }
        }
    }
}

/// The notification: the run, its gates and the page's link.
pub fn payload(run: &Run, r: &ApprovalRequested, public_url: &str) -> serde_json::Value {
    json!({
        "event": "approval.requested",
        "run_id": run.run_id,
        "pipeline": run.pipeline,
        "environment": r.environment,
        "artifact_digest": r.artifact_digest,
        "gates": run.gates,
        "change": run.change,
        "stages": run.stages,
        "url": format!("{}/#run-{}", public_url.trim_end_matches('/'), run.run_id),
    })
}

/// The CloudEvents binary-mode attributes of a CDEvent (`ce-*` headers on NATS and HTTP).
fn cloudevent_headers(cdevent: &serde_json::Value) -> Vec<(&'static str, String)> {
    let ctx = &cdevent["context"];
    let text = |k: &str| ctx[k].as_str().unwrap_or_default().to_string();
    vec![
        ("ce-specversion", "1.0".into()),
        ("ce-id", text("id")),
        ("ce-source", text("source")),
        ("ce-type", text("type")),
        ("ce-time", text("timestamp")),
        (
            "ce-subject",
            cdevent["subject"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        ("content-type", "application/json".into()),
    ]
}

/// Says a CDEvent on `cdevents.<subject>.<predicate>` and to each CDEvents webhook.
async fn publish_cdevent(
    bus: &Bus,
    client: &reqwest::Client,
    notifier: &Notifier,
    cdevent: serde_json::Value,
) {
    let headers = cloudevent_headers(&cdevent);
    let body = serde_json::to_vec(&cdevent).expect("JSON serialises");
    if notifier.cdevents {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &headers {
            h.insert(*k, v.as_str());
        }
        let subject = cdevents::subject_of(&cdevent);
        if let Err(e) = bus
            .client()
            .publish_with_headers(subject, h, body.clone().into())
            .await
        {
            warn!(error = %e, "Cannot publish a CDEvent.");
        }
    }
    for url in &notifier.cdevents_webhooks {
        tokio::spawn(deliver(
            client.clone(),
            url.clone(),
            headers.clone(),
            body.clone(),
            notifier.attempts,
        ));
    }
}

async fn deliver_json(
    client: reqwest::Client,
    url: String,
    body: serde_json::Value,
    attempts: u32,
) {
    let bytes = serde_json::to_vec(&body).expect("JSON serialises");
    deliver(
        client,
        url,
        vec![("content-type", "application/json".to_string())],
        bytes,
        attempts,
    )
    .await;
}

async fn deliver(
    client: reqwest::Client,
    url: String,
    headers: Vec<(&'static str, String)>,
    bytes: Vec<u8>,
    attempts: u32,
) {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=attempts.max(1) {
        let mut req = client.post(&url).body(bytes.clone());
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                info!(%url, attempt, "Notification delivered.");
                return;
            }
            Ok(r) => {
                warn!(%url, attempt, status = %r.status(), "Webhook refused the notification.")
            }
            Err(e) => warn!(%url, attempt, error = %e, "Webhook unreachable."),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
    warn!(%url, attempts, "Giving up on a notification.");
}
