//! The gateway's view of the runs: the runs in flight, folded in memory by an ordered consumer
//! so reads are answered without touching NATS. A run that ends stays until the run index holds
//! it (the conductor writes its entry), then leaves: ended runs are read from the index, so the
//! gateway's memory and start follow the work in flight, not the history. It starts from its
//! checkpoint (the runs it held and the sequence read through) and the log after it.
//! Decisions never trust it: an approval folds the run's log afresh and appends with optimistic
//! concurrency.
//!
//! When a run starts waiting for approval (seen live, after catching up, so a restart does not
//! notify again), every configured webhook gets a JSON POST, retried with backoff in the
//! background: a slow or dead webhook never holds a run.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::json;
use slipway_core::bus::{Bus, BusError};
use slipway_core::runtime::CancellationToken;
use slipway_core::store::checkpoints::Checkpoints;
use slipway_core::store::runs::RunIndex;
use slipway_domain::checkpoint::Checkpoint;
use slipway_domain::events::{ApprovalRequested, EventData};
use slipway_domain::{Run, cdevents, fold, subjects};
use tracing::{debug, info, warn};

use crate::metrics::Delivery;

/// Where a run stands in a listing: its creation, then its id.
pub type ListKey = (DateTime<Utc>, String);

/// The runs the gateway holds: those in flight, and those ended but not yet in the run index.
#[derive(Debug, Default)]
pub struct Runs {
    by_id: HashMap<String, Run>,
    /// The same runs by creation: the order of a listing.
    order: BTreeSet<ListKey>,
    pub caught_up: bool,
    /// The delivery metrics of the runs that ended since the gateway started.
    pub delivery: Delivery,
    /// Every message up to this stream sequence is folded in.
    pub through: u64,
}

impl Runs {
    pub fn get(&self, id: &str) -> Option<&Run> {
        self.by_id.get(id)
    }

    /// Runs newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Run> {
        self.order
            .iter()
            .rev()
            .filter_map(|(_, id)| self.by_id.get(id))
    }

    /// Held runs that have ended (each leaves once the index holds it).
    pub fn ended(&self) -> Vec<String> {
        self.by_id
            .values()
            .filter(|r| r.is_ended())
            .map(|r| r.run_id.clone())
            .collect()
    }

    /// How many runs are held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// An ended run the index now holds leaves memory.
    pub fn indexed(&mut self, run_id: &str) {
        if self.by_id.get(run_id).is_some_and(Run::is_ended)
            && let Some(run) = self.by_id.remove(run_id)
        {
            self.order.remove(&(run.created_at, run.run_id));
        }
    }

    fn fold_in(&mut self, run_id: &str, seq: u64, event: &slipway_domain::Event) {
        match self.by_id.remove(run_id) {
            Some(run) => {
                let was_ended = run.is_ended();
                if let Some(run) = fold(Some(run), event) {
                    if !was_ended && run.is_ended() {
                        self.delivery.add(&run);
                        if !self.caught_up {
                            // Ended before the gateway caught up: the run index holds it (the
                            // conductor indexes what ends; `slipway replay --verify --repair`
                            // fills what it missed), and a start that reads a long log must
                            // not hold or look up every run it ever had.
                            self.order.remove(&(run.created_at, run.run_id));
                            return;
                        }
                    }
                    self.by_id.insert(run_id.to_string(), run);
                }
            }
            None => {
                if let Some(run) = fold(None, event) {
                    if run.is_ended() && !self.caught_up {
                        return;
                    }
                    self.order.insert((run.created_at, run_id.to_string()));
                    self.by_id.insert(run_id.to_string(), run);
                } else if let Some(why) = slipway_domain::fold::unreadable(event) {
                    tracing::error!(%run_id, seq, %why, "A run's first event cannot be read; the gateway cannot show the run.");
                }
            }
        }
    }

    /// A message of the log: folded in when it is about a run the gateway holds, or about a
    /// run it has not seen (its creation). An ended run's late event is the log's alone.
    fn take(&mut self, run_id: &str, seq: u64, event: &slipway_domain::Event) -> bool {
        let known = self.by_id.contains_key(run_id);
        if known || matches!(event.data, EventData::RunCreated(_)) {
            self.fold_in(run_id, seq, event);
            return true;
        }
        false
    }
}

pub type SharedRuns = Arc<RwLock<Runs>>;

/// The gateway's key in the checkpoints bucket.
const CHECKPOINT: &str = "gateway";

/// How often, at most, the gateway writes its checkpoint and lets indexed runs go.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct Notifier {
    pub webhooks: Vec<String>,
    pub attempts: u32,
    pub public_url: String,
    /// Publish CDEvents on `cdevents.>`.
    pub cdevents: bool,
    pub cdevents_webhooks: Vec<String>,
    /// Where runs of commits from git hosts report their results.
    pub hooks: crate::hooks::Hooks,
}

/// Folds in the checkpoint's runs (each read again from its own subjects); the sequence it was
/// folded through, or `None` when there is no checkpoint to use (the whole log is read then).
async fn restore(
    bus: &Bus,
    runs: &SharedRuns,
    checkpoints: Option<&Checkpoints>,
) -> Result<Option<u64>, BusError> {
    let Some(checkpoints) = checkpoints else {
        return Ok(None);
    };
    let (stream_created, last_seq) = bus.stream_state().await?;
    let bytes = match checkpoints.get(CHECKPOINT).await {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => {
            warn!(error = %e, "Cannot read the gateway's checkpoint: folding the whole log.");
            return Ok(None);
        }
    };
    let checkpoint = match Checkpoint::usable(&bytes, &stream_created, last_seq) {
        Ok(c) => c,
        Err(why) => {
            warn!(%why, "Gateway checkpoint not used: folding the whole log.");
            return Ok(None);
        }
    };
    for run_id in &checkpoint.in_flight {
        for rec in bus.run_log(run_id).await? {
            if let Ok(event) = rec.event {
                runs.write().expect("lock").fold_in(run_id, rec.seq, &event);
            }
        }
    }
    let mut w = runs.write().expect("lock");
    w.through = checkpoint.through;
    info!(
        through = checkpoint.through,
        runs = w.len(),
        "Gateway starting from its checkpoint."
    );
    Ok(Some(checkpoint.through))
}

/// Lets the held runs the index now holds go, and writes where the fold stands.
async fn sweep(
    runs: &SharedRuns,
    index: Option<&RunIndex>,
    checkpoints: Option<&Checkpoints>,
    stream_created: &str,
    written: &mut u64,
) {
    if let Some(index) = index {
        let ended = runs.read().expect("lock").ended();
        for run_id in ended {
            if let Ok(Some(_)) = index.revision(&run_id).await {
                runs.write().expect("lock").indexed(&run_id);
            }
        }
    }
    let Some(checkpoints) = checkpoints else {
        return;
    };
    let checkpoint = {
        let r = runs.read().expect("lock");
        if !r.caught_up || r.through == *written {
            return;
        }
        Checkpoint {
            fold: slipway_domain::index::FOLD_VERSION,
            stream_created: stream_created.to_string(),
            through: r.through,
            in_flight: r.by_id.keys().cloned().collect(),
            unanswered: Vec::new(),
        }
    };
    match checkpoints.put(CHECKPOINT, &checkpoint).await {
        Ok(()) => *written = checkpoint.through,
        Err(e) => warn!(error = %e, "Cannot write the gateway's checkpoint."),
    }
}

/// Follows the log into `runs` until `shutdown`, from the gateway's checkpoint when it has one.
///
/// # Errors
/// [`BusError`] when the log cannot be read at start.
pub async fn follow(
    bus: Bus,
    runs: SharedRuns,
    index: Option<RunIndex>,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let stream = bus.ensure_stream().await?;
    let checkpoints = match Checkpoints::open(&bus).await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "Cannot open the checkpoints: every start folds the whole log.");
            None
        }
    };
    let (stream_created, _) = bus.stream_state().await?;
    let start = restore(&bus, &runs, checkpoints.as_ref())
        .await?
        .map_or(1, |through| through + 1);
    let mut written = start.saturating_sub(1);
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::RUNS.to_string(),
            deliver_policy: if start <= 1 {
                jetstream::consumer::DeliverPolicy::All
            } else {
                jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                }
            },
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Nats {
            operation: "create gateway reader",
            message: e.to_string(),
        })?;
    // The creation's answer says what is left to read.
    if consumer.cached_info().num_pending == 0 {
        let mut w = runs.write().expect("lock");
        w.caught_up = true;
        info!(runs = w.len(), "Gateway caught up with the log.");
    }
    let mut messages = consumer.messages().await.map_err(|e| BusError::Nats {
        operation: "read log",
        message: e.to_string(),
    })?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| BusError::Nats {
            operation: "webhook client",
            message: e.to_string(),
        })?;
    // Commit statuses go out one after another, in the order the log says them: a host shows
    // the last status it got, so a run's start must never land after its end.
    let (statuses, mut queued) =
        tokio::sync::mpsc::unbounded_channel::<(String, Vec<(&'static str, String)>, Vec<u8>)>();
    {
        let (client, attempts) = (client.clone(), notifier.attempts);
        tokio::spawn(async move {
            while let Some((url, headers, bytes)) = queued.recv().await {
                deliver(client.clone(), url, headers, bytes, attempts).await;
            }
        });
    }
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                sweep(&runs, index.as_ref(), checkpoints.as_ref(), &stream_created, &mut written).await;
                continue;
            }
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
            info!(runs = w.len(), "Gateway caught up with the log.");
        }
        let rec = slipway_core::bus::recorded(seq, &msg.message);
        runs.write().expect("lock").through = seq;
        let Some((run_id, _, _)) = subjects::parse_run(&rec.subject) else {
            continue;
        };
        let Ok(event) = rec.event else { continue };
        let (notify, cdevents) = {
            let mut w = runs.write().expect("lock");
            if !w.take(run_id, seq, &event) {
                continue;
            }
            let notify = match (&event.data, live) {
                (EventData::ApprovalRequested(r), true) => w
                    .get(run_id)
                    .map(|run| payload(run, r, &notifier.public_url)),
                _ => None,
            };
            // A run of a git host's commit: its status when it starts and when it ends.
            let status = match (live, w.get(run_id)) {
                (true, Some(run))
                    if matches!(event.data, EventData::RunCreated(_))
                        || (run.is_ended() && event_ends_run(&event)) =>
                {
                    crate::hooks::commit_status(&notifier.hooks, run, &notifier.public_url)
                }
                _ => None,
            };
            if let Some((url, headers, body)) = status {
                let bytes = serde_json::to_vec(&body).expect("JSON serialises");
                let _ = statuses.send((url, headers, bytes));
            }
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

/// The notification: the run, its gates and its page's link; with `text` and `blocks`, the
/// same in the form Slack-compatible incoming webhooks (Slack, Mattermost, Rocket.Chat) post
/// as a message.
pub fn payload(run: &Run, r: &ApprovalRequested, public_url: &str) -> serde_json::Value {
    let url = format!("{}/runs/{}", public_url.trim_end_matches('/'), run.run_id);
    let (text, blocks) = chat_message(run, r, &url);
    json!({
        "event": "approval.requested",
        "run_id": run.run_id,
        "pipeline": run.pipeline,
        "environment": r.environment,
        "artifact_digest": r.artifact_digest,
        "gates": run.gates,
        "change": run.change,
        "stages": run.stages,
        "url": url,
        "text": text,
        "blocks": blocks,
    })
}

/// Whether the event is one that ends a run (`run.succeeded`, `run.failed`, ...).
fn event_ends_run(event: &slipway_domain::Event) -> bool {
    matches!(
        event.data,
        EventData::RunSucceeded(_)
            | EventData::RunFailed(_)
            | EventData::RunCancelled(_)
            | EventData::RunRejected(_)
            | EventData::RunRolledBack(_)
    )
}

/// Escapes what Slack's mrkdwn reads as markup in text that comes from a change.
fn mrkdwn(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chat message: a one-line `text` (what notifications and clients without blocks show)
/// and Block Kit blocks: the headline, the change, each gate's verdict, a button to the page.
fn chat_message(run: &Run, r: &ApprovalRequested, url: &str) -> (String, serde_json::Value) {
    let gates: Vec<String> = r
        .gates
        .iter()
        .map(|g| {
            let verdict = serde_json::to_value(g.verdict)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{} {verdict}", g.stage)
        })
        .collect();
    let gates = if gates.is_empty() {
        "no gates".to_string()
    } else {
        gates.join(", ")
    };
    let headline = format!(
        "{} awaits approval for {}",
        mrkdwn(&run.pipeline),
        mrkdwn(&r.environment)
    );
    let text = format!(
        "{headline} (run {}; {gates}): <{url}|review it>",
        run.run_id
    );
    let change = match (&run.change.title, &run.change.author) {
        (Some(t), Some(a)) => format!("{} by {}", mrkdwn(t), mrkdwn(a)),
        (Some(t), None) => mrkdwn(t),
        (None, Some(a)) => format!("by {}", mrkdwn(a)),
        (None, None) => format!("change {}", mrkdwn(&run.change.id)),
    };
    let blocks = json!([
        {"type": "section", "text": {"type": "mrkdwn", "text": format!("*{headline}*\n{change}")}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": format!("*Run*\n<{url}|{}>", run.run_id)},
            {"type": "mrkdwn", "text": format!("*Artifact*\n`{}`", r.artifact_digest)},
            {"type": "mrkdwn", "text": format!("*Gates*\n{gates}")},
            {"type": "mrkdwn", "text": format!("*Approvals needed*\n{}", r.policy.required_approvals)},
        ]},
        {"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Review and decide"},
             "url": url, "style": "primary"}
        ]}
    ]);
    (text, blocks)
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
