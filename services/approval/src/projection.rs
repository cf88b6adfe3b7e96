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
use slipway_core::events::{ApprovalRequested, EventData};
use slipway_core::runtime::CancellationToken;
use slipway_core::{Run, fold, subjects};
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

    fn fold_in(&mut self, run_id: &str, event: &slipway_core::Event) {
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
        let notify = {
            let mut w = runs.write().expect("lock");
            w.fold_in(run_id, &event);
            match (&event.data, live) {
                (EventData::ApprovalRequested(r), true) => w
                    .get(run_id)
                    .map(|run| payload(run, r, &notifier.public_url)),
                _ => None,
            }
        };
        if let Some(body) = notify {
            for url in &notifier.webhooks {
                tokio::spawn(deliver(
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

async fn deliver(client: reqwest::Client, url: String, body: serde_json::Value, attempts: u32) {
    let bytes = serde_json::to_vec(&body).expect("JSON serialises");
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=attempts.max(1) {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                info!(%url, attempt, "Approval notification delivered.");
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
    warn!(%url, attempts, "Giving up on an approval notification.");
}
