//! The NATS JetStream binding of the event log: connect, create the stream, append, read.
//!
//! Facts are appended with [`Bus::publish`] (deduplicated by `Nats-Msg-Id` = event id).
//! Decisions are appended with [`Bus::append`], which adds run-wide optimistic concurrency:
//! `Nats-Expected-Last-Subject-Sequence` with the subject filter `slipway.run.<id>.>`, so a
//! writer that decided on a stale view of the run loses with [`AppendError::Conflict`].

pub mod binding;

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use binding::BindingError;
use slipway_domain::envelope::{EnvelopeError, Event};
use slipway_domain::subjects;

/// The oldest nats-server that honours everything Slipway relies on: `filter_subjects`, strict
/// consumer creation and run-wide optimistic concurrency (2.9 silently ignores them).
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);

/// Messages asked for per batched direct get.
pub const DIRECT_BATCH: usize = 1024;

/// The longest wait for each reply of a direct get (a request on loopback takes well under a
/// millisecond; a reply that never comes is read another way).
const DIRECT_REPLY_WAIT: Duration = Duration::from_secs(2);

/// How a service reaches NATS and how the log's stream is shaped.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    pub url: String,
    /// Give up connecting after this long (the server may still be starting).
    pub connect_timeout_secs: u64,
    /// How often the client pings its server. A connection to a server whose host dropped off
    /// the network sends no reset: it is only known dead after three pings go unanswered, and
    /// then the client moves to another node of the cluster. async-nats's own default (60 s)
    /// left every process on a cut host's server waiting three minutes.
    pub ping_interval_secs: u64,
    pub stream: StreamSettings,
    /// User and password, for a server with `authorization` users (deploy/nats/).
    pub user: Option<String>,
    pub password: Option<String>,
    /// A file holding the user's password instead (what `slipway up` gives each service).
    pub password_file: Option<std::path::PathBuf>,
    /// A NATS credentials file (JWT and NKey seed), for an operator-mode server.
    pub credentials_file: Option<std::path::PathBuf>,
    /// A file holding an NKey seed (`SU...`), for a server with `nkey` users.
    pub nkey_seed_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log.
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("ping_interval_secs", &self.ping_interval_secs)
            .field("stream", &self.stream)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("password_file", &self.password_file)
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .finish()
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            connect_timeout_secs: 15,
            ping_interval_secs: 5,
            stream: StreamSettings::default(),
            user: None,
            password: None,
            password_file: None,
            credentials_file: None,
            nkey_seed_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    pub name: String,
    /// 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// Window within which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    pub duplicate_window_secs: u64,
    pub artifacts_bucket: String,
    pub logs_bucket: String,
    /// The run index: each ended run's state (`slipway_domain::index`).
    pub runs_bucket: String,
    /// Where each service's fold of the log stands (`slipway_domain::checkpoint`).
    pub checkpoints_bucket: String,
    /// The run index's production deployments compacted for DORA (`slipway_domain::dora::Chunk`).
    pub dora_bucket: String,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "SLIPWAY".into(),
            replicas: 1,
            duplicate_window_secs: 120,
            artifacts_bucket: "slipway-artifacts".into(),
            logs_bucket: "slipway-logs".into(),
            runs_bucket: "slipway-runs".into(),
            checkpoints_bucket: "slipway-checkpoints".into(),
            dora_bucket: "slipway-dora".into(),
        }
    }
}

/// Infrastructure failures: NATS unreachable, the stream unusable. Retry, nak, alert.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error(
        "nats-server {found} is too old: Slipway needs {}.{}.{} or newer \
         (older servers silently ignore consumer filters and optimistic concurrency)",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    ServerTooOld { found: String },
    #[error("stream {stream} exists with an incompatible configuration: {differences}")]
    IncompatibleStream { stream: String, differences: String },
    #[error("NATS {operation} failed: {message}")]
    Nats {
        operation: &'static str,
        message: String,
    },
}

impl BusError {
    pub fn nats(operation: &'static str, e: impl std::fmt::Display) -> Self {
        BusError::Nats {
            operation,
            message: e.to_string(),
        }
    }
}

/// Why a decision was not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the run since the state the decision was made on.
    #[error("run {run_id} changed since sequence {expected}: re-fold and decide again")]
    Conflict { run_id: String, expected: u64 },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A message that is not a Slipway event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Binding(#[from] BindingError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// An acknowledged append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The id was already in the log: nothing new was stored.
    pub duplicate: bool,
}

/// A message read back from the log.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub seq: u64,
    pub subject: String,
    pub event: Result<Event, DecodeError>,
    /// Set when the message is not an event, so the raw bytes can still be shown.
    pub raw: Option<bytes::Bytes>,
}

/// Decodes a stored or delivered message into an event.
///
/// # Errors
/// [`DecodeError`] naming what is wrong with the message.
pub fn decode(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Event, DecodeError> {
    if let Some(e) = headers.and_then(|h| binding::decode_fast(h, payload)) {
        return Ok(e);
    }
    let ce = binding::decode(headers, payload)?;
    Ok(Event::from_cloudevent(&ce)?)
}

/// Told of each new append to a run's subject (not a duplicate): its subject, run, event, and
/// when the publish began and was acknowledged.
pub type AppendObserver = fn(&str, &str, &Event, std::time::SystemTime, std::time::SystemTime);

/// The process's observer of appends, installed by telemetry ([`crate::telemetry::otel::install`]), so
/// the bus itself knows nothing of it.
static APPENDS: std::sync::OnceLock<AppendObserver> = std::sync::OnceLock::new();

/// Installs the process's observer of appends; the first one installed stays.
pub fn observe_appends(observer: AppendObserver) {
    let _ = APPENDS.set(observer);
}

/// A connection to NATS with the log's stream: connect, append, read. Nothing else lives
/// here: the caches of objects ([`crate::store::objects::Objects`]) and deploys
/// ([`crate::store::baseline::Deploys`]) are composed around a bus, and telemetry observes it.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
}

impl Bus {
    /// Connects (retrying while the server starts), refusing servers older than 2.11.
    ///
    /// # Errors
    /// [`BusError::Connect`] or [`BusError::ServerTooOld`].
    pub async fn connect(settings: &NatsSettings, client_name: &str) -> Result<Self, BusError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(settings.connect_timeout_secs.max(1));
        // Credentials in the URL are taken out of it, so they never reach a log or an error.
        let (url, url_user) = split_userinfo(&settings.url);
        let client = loop {
            let mut opts = async_nats::ConnectOptions::new()
                .name(client_name)
                .connection_timeout(Duration::from_secs(2))
                .ping_interval(Duration::from_secs(settings.ping_interval_secs.max(1)))
                // The URL's order is the operator's: each host lists its own node first.
                .retain_servers_order()
                .max_reconnects(None);
            if let (Some(u), Some(p)) = (&settings.user, &settings.password) {
                opts = opts.user_and_password(u.clone(), p.clone());
            } else if let Some((u, p)) = url_user.clone() {
                opts = opts.user_and_password(u, p);
            } else if let (Some(u), Some(path)) = (&settings.user, &settings.password_file) {
                let password = std::fs::read_to_string(path).map_err(|e| BusError::Connect {
                    url: url.clone(),
                    message: format!("password_file {}: {e}", path.display()),
                })?;
                opts = opts.user_and_password(u.clone(), password.trim().to_string());
            }
            if let Some(path) = &settings.nkey_seed_file {
                let seed = std::fs::read_to_string(path).map_err(|e| BusError::Connect {
                    url: url.clone(),
                    message: format!("nkey_seed_file {}: {e}", path.display()),
                })?;
                opts = opts.nkey(seed.trim().to_string());
            }
            if let Some(path) = &settings.credentials_file {
                opts = opts
                    .credentials_file(path)
                    .await
                    .map_err(|e| BusError::Connect {
                        url: url.clone(),
                        message: format!("credentials_file {}: {e}", path.display()),
                    })?;
            }
            // A comma-separated list: the nodes of a cluster, tried in the order given.
            let addrs: Result<Vec<async_nats::ServerAddr>, _> =
                url.split(',').map(|u| u.trim().parse()).collect();
            let addrs = addrs.map_err(|e| BusError::Connect {
                url: url.clone(),
                message: format!("not a NATS URL (or comma-separated list of them): {e}"),
            })?;
            match opts.connect(addrs).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    debug!(url = %url, error = %e, "NATS not reachable yet; retrying.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(BusError::Connect {
                        url: url.clone(),
                        message: e.to_string(),
                    });
                }
            }
        };
        let version = client.server_info().version;
        check_server_version(&version)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Acknowledges a delivery and waits for the server to confirm it, as
    /// `Message::double_ack` does, but through the connection's shared reply subscription:
    /// `double_ack` subscribes and unsubscribes an inbox of its own for every ack, two changes
    /// to the server's subject table per job.
    ///
    /// # Errors
    /// [`BusError`] when the message has no reply subject or the server does not confirm.
    pub async fn ack_confirmed(&self, msg: &jetstream::Message) -> Result<(), BusError> {
        let reply = msg
            .reply
            .clone()
            .ok_or_else(|| BusError::nats("ack", "the message has no reply subject"))?;
        self.client
            .request(reply, bytes::Bytes::from_static(b"+ACK"))
            .await
            .map_err(|e| BusError::nats("ack", e))?;
        Ok(())
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    pub fn stream_name(&self) -> &str {
        &self.settings.stream.name
    }

    /// The stream configuration Slipway wants.
    pub fn stream_config(&self) -> stream::Config {
        let s = &self.settings.stream;
        stream::Config {
            name: s.name.clone(),
            description: Some("Slipway event log: the only source of truth".into()),
            subjects: subjects::STREAM_SUBJECTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: s.replicas,
            duplicate_window: Duration::from_secs(s.duplicate_window_secs),
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Creates the stream, or checks that the existing one fits.
    ///
    /// Tunables (duplicate window, direct gets) are updated in place, and the replicas raised
    /// to this client's, never lowered: a client with default settings (a `slipway` command, a
    /// service whose configuration forgot `[nats.stream] replicas`) must not shrink the log's
    /// replication, as one did when it reached a cluster during an election. A different
    /// storage, retention or subject set is an [`BusError::IncompatibleStream`] naming each
    /// difference.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be created or does not fit.
    pub async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        let want = self.stream_config();
        match self.js.get_stream(&want.name).await {
            Ok(mut existing) => {
                let have = existing
                    .info()
                    .await
                    .map_err(|e| BusError::nats("stream info", e))?
                    .config
                    .clone();
                let mut diffs = Vec::new();
                if have.storage != want.storage {
                    diffs.push(format!(
                        "storage is {:?}, want {:?}",
                        have.storage, want.storage
                    ));
                }
                if have.retention != want.retention {
                    diffs.push(format!(
                        "retention is {:?}, want {:?}",
                        have.retention, want.retention
                    ));
                }
                let mut hs = have.subjects.clone();
                let mut ws = want.subjects.clone();
                hs.sort();
                ws.sort();
                if hs != ws {
                    diffs.push(format!("subjects are {hs:?}, want {ws:?}"));
                }
                // Limits that would silently drop events from the log.
                if !have.max_age.is_zero() {
                    diffs.push(format!("max_age is {:?}, want none", have.max_age));
                }
                if have.max_messages > 0 {
                    diffs.push(format!("max_msgs is {}, want none", have.max_messages));
                }
                if have.max_bytes > 0 {
                    diffs.push(format!("max_bytes is {}, want none", have.max_bytes));
                }
                if have.max_messages_per_subject > 0 {
                    diffs.push(format!(
                        "max_msgs_per_subject is {}, want none",
                        have.max_messages_per_subject
                    ));
                }
                if !diffs.is_empty() {
                    return Err(BusError::IncompatibleStream {
                        stream: want.name.clone(),
                        differences: diffs.join("; "),
                    });
                }
                // Direct gets serve the workers' reads of a run's log (a stream made before
                // they did is switched on here).
                let replicas = have.num_replicas.max(want.num_replicas);
                if have.num_replicas > want.num_replicas {
                    debug!(
                        stream = %want.name,
                        kept = have.num_replicas,
                        asked = want.num_replicas,
                        "Keeping the stream's replicas: a client never lowers them."
                    );
                }
                if have.num_replicas != replicas
                    || have.duplicate_window != want.duplicate_window
                    || have.allow_direct != want.allow_direct
                {
                    info!(
                        stream = %want.name,
                        replicas,
                        duplicate_window_secs = want.duplicate_window.as_secs(),
                        "Updating the stream's replicas, duplicate window and direct gets."
                    );
                    let mut update = have.clone();
                    update.num_replicas = replicas;
                    update.duplicate_window = want.duplicate_window;
                    update.allow_direct = want.allow_direct;
                    self.js
                        .update_stream(update)
                        .await
                        .map_err(|e| BusError::nats("stream update", e))?;
                }
                Ok(existing)
            }
            Err(_) => match self.js.create_stream(want.clone()).await {
                Ok(s) => {
                    info!(stream = %want.name, "Created the event log stream.");
                    Ok(s)
                }
                // Another service created it between our get and create: check it again.
                Err(e) => match self.js.get_stream(&want.name).await {
                    Ok(s) => Ok(s),
                    Err(_) => Err(BusError::nats("stream create", e)),
                },
            },
        }
    }

    /// For clients (the CLI): creates the stream when it is missing, and otherwise leaves it
    /// as the services configured it (a client's defaults must not retune a cluster's stream).
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be created.
    pub async fn ensure_stream_exists(&self) -> Result<(), BusError> {
        if self.js.get_stream_no_info(self.stream_name()).await.is_ok()
            && self.js.get_stream(self.stream_name()).await.is_ok()
        {
            return Ok(());
        }
        self.ensure_stream().await.map(|_| ())
    }

    /// Appends a fact. A duplicate id is success: the fact is already in the log.
    ///
    /// # Errors
    /// [`BusError`] when no PubAck came.
    pub async fn publish(&self, event: &Event) -> Result<Appended, BusError> {
        self.publish_message(event, None)
            .await
            .map_err(|e| match e {
                AppendError::Bus(b) => b,
                AppendError::Conflict { .. } => unreachable!("no expectation was set"),
            })
    }

    /// Appends a decision about `run_id`, expecting the run's last event to be `expected`
    /// (0 when the run must not exist yet).
    ///
    /// # Errors
    /// [`AppendError::Conflict`] when the run moved on; [`AppendError::Bus`] otherwise.
    pub async fn append(
        &self,
        event: &Event,
        run_id: &str,
        expected: u64,
    ) -> Result<Appended, AppendError> {
        self.publish_message(event, Some((run_id, expected))).await
    }

    async fn publish_message(
        &self,
        event: &Event,
        expect: Option<(&str, u64)>,
    ) -> Result<Appended, AppendError> {
        let subject = event.nats_subject();
        let started = std::time::SystemTime::now();
        let (headers, payload) = binding::encode(event.to_cloudevent());
        let mut msg = PublishMessage::build()
            .headers(headers)
            .payload(payload)
            .message_id(&event.id);
        if let Some((run_id, seq)) = expect {
            msg = msg.expected_last_subject_sequence(seq).header(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                subjects::run(run_id),
            );
        }
        let ack = self
            .js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|e| BusError::nats("publish", e))?
            .await;
        match ack {
            Ok(ack) => {
                debug!(%subject, seq = ack.sequence, duplicate = ack.duplicate, "Appended.");
                if !ack.duplicate
                    && let Some(observe) = APPENDS.get()
                    && let Some((run_id, _, _)) = subjects::parse_run(&subject)
                {
                    observe(
                        &subject,
                        run_id,
                        event,
                        started,
                        std::time::SystemTime::now(),
                    );
                }
                Ok(Appended {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                })
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                let (run_id, expected) = expect.unwrap_or_default();
                Err(AppendError::Conflict {
                    run_id: run_id.to_string(),
                    expected,
                })
            }
            Err(e) => Err(BusError::nats("publish ack", e).into()),
        }
    }

    /// Every stored message on `filters`, in log order, from `start_seq` on (1 = all).
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn read(
        &self,
        filters: &[String],
        start_seq: u64,
    ) -> Result<Vec<Recorded>, BusError> {
        let mut out = Vec::new();
        self.read_each(filters, start_seq, |r| out.push(r)).await?;
        Ok(out)
    }

    /// [`Bus::read`], handing each message to `each` as it comes rather than holding them
    /// all (a read of every deploy ever made, say).
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn read_each(
        &self,
        filters: &[String],
        start_seq: u64,
        mut each: impl FnMut(Recorded),
    ) -> Result<(), BusError> {
        self.read_raw(filters, start_seq, |seq, m| each(recorded(seq, m)))
            .await
    }

    /// [`Bus::read_each`] with each message as stored, undecoded: a reader that wants a few
    /// kinds out of the whole log reads it unfiltered and decodes only those (a consumer
    /// filtered by wildcards over every run's subjects is served many times slower).
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn read_raw(
        &self,
        filters: &[String],
        start_seq: u64,
        each: impl FnMut(u64, &async_nats::Message),
    ) -> Result<(), BusError> {
        let stream = self
            .js
            .get_stream_no_info(self.stream_name())
            .await
            .map_err(|e| BusError::nats("get stream", e))?;
        let deliver_policy = if start_seq <= 1 {
            jetstream::consumer::DeliverPolicy::All
        } else {
            jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_seq,
            }
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subjects: filters.to_vec(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats("create reader", e))?;
        // The creation's answer says how many messages there are: no separate info request.
        let info = consumer.cached_info();
        let (pending, name) = (info.num_pending, info.name.clone());
        let out = Self::read_all(consumer, pending, each).await;
        // Readers are deleted when done rather than left to expire: under load (a read per
        // job and per decision) expiring ones pile up against the server's limits. The
        // caller does not wait for it.
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        out
    }

    async fn read_all(
        consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>,
        pending: u64,
        mut each: impl FnMut(u64, &async_nats::Message),
    ) -> Result<(), BusError> {
        if pending == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::nats("read", e))?;
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| BusError::nats("read", "no message within 10s"))?
        {
            let msg = msg.map_err(|e| BusError::nats("read", e))?;
            let info = msg.info().map_err(|e| BusError::nats("read info", e))?;
            let (seq, left) = (info.stream_sequence, info.pending);
            each(seq, &msg.message);
            if left == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Every event of one run, in log order.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn run_log(&self, run_id: &str) -> Result<Vec<Recorded>, BusError> {
        self.read(&[subjects::run(run_id)], 1).await
    }

    /// Every event of one run, in log order, up to at least stream sequence `through` (an
    /// event of the run the caller already holds, such as the request it is working on).
    ///
    /// Read by batched direct gets: one request and its replies, where an ordered consumer
    /// costs a create, a fetch and a delete. Any replica of the stream may answer a direct
    /// get, and one just restarted may lag: a log that stops short of `through`, or a direct
    /// read that fails, is read again through a consumer, as [`Bus::run_log`] does.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn run_log_through(
        &self,
        run_id: &str,
        through: u64,
    ) -> Result<Vec<Recorded>, BusError> {
        self.run_log_between(run_id, 1, through).await
    }

    /// A run's events from stream sequence `from`, up to at least `through`, read as
    /// [`Bus::run_log_through`] reads them.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn run_log_between(
        &self,
        run_id: &str,
        from: u64,
        through: u64,
    ) -> Result<Vec<Recorded>, BusError> {
        let subject = subjects::run(run_id);
        match self.read_direct(&subject, from).await {
            Ok(log) if log.last().is_some_and(|r| r.seq >= through) => return Ok(log),
            Ok(_) => debug!(
                run_id,
                through,
                "Direct read stopped short (a lagging replica?); reading through a consumer."
            ),
            Err(e) => warn!(run_id, error = %e, "Direct read failed; reading through a consumer."),
        }
        self.read(&[subject], from).await
    }

    /// Every message on `subject` (one filter; wildcards allowed) from `start_seq`, by
    /// batched direct gets (NATS 2.11+, ADR-31): pages of [`DIRECT_BATCH`], each answered by
    /// its messages and an end-of-batch status that says how many are left.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn read_direct(
        &self,
        subject: &str,
        start_seq: u64,
    ) -> Result<Vec<Recorded>, BusError> {
        let mut pages = DirectPages::open(&self.client, self.stream_name()).await?;
        let mut out = Vec::new();
        let mut seq = start_seq.max(1);
        loop {
            let page = pages.next(subject, seq, DIRECT_BATCH).await?;
            for (stored_seq, stored_subject, m) in &page.messages {
                let mut r = recorded(*stored_seq, m);
                r.subject.clone_from(stored_subject);
                out.push(r);
            }
            match page.next_seq() {
                Some(next) => seq = next,
                None => return Ok(out),
            }
        }
    }

    /// The last stream sequence now (0 for an empty stream).
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn last_seq(&self) -> Result<u64, BusError> {
        Ok(self.stream_state().await?.1)
    }

    /// When the log's stream was created (Unix nanoseconds, as text) and its last sequence:
    /// what a checkpoint is checked against.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn stream_state(&self) -> Result<(String, u64), BusError> {
        let mut stream = self
            .js
            .get_stream(self.stream_name())
            .await
            .map_err(|e| BusError::nats("get stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::nats("stream info", e))?;
        let created = info.created.unix_timestamp_nanos().to_string();
        Ok((created, info.state.last_sequence))
    }

    /// One stored message by sequence.
    ///
    /// # Errors
    /// [`BusError`] when it cannot be read.
    pub async fn get(&self, seq: u64) -> Result<Recorded, BusError> {
        let stream = self
            .js
            .get_stream_no_info(self.stream_name())
            .await
            .map_err(|e| BusError::nats("get stream", e))?;
        let m = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| BusError::nats("get message", e))?;
        let event = decode(Some(&m.headers), &m.payload);
        let raw = event.is_err().then(|| m.payload.clone());
        Ok(Recorded {
            seq,
            subject: m.subject.to_string(),
            event,
            raw,
        })
    }
}

/// A delivered message as a [`Recorded`].
/// Reads one stream by batched direct gets (NATS 2.11+, ADR-31): each request is answered by up
/// to a batch of messages on a subject and an end-of-batch status saying how many are left.
/// No consumer is made; every page's replies come to one inbox.
#[derive(Debug)]
pub struct DirectPages {
    client: async_nats::Client,
    api: String,
    inbox: String,
    replies: async_nats::Subscriber,
}

/// One page of a [`DirectPages`] read.
#[derive(Debug)]
pub struct DirectPage {
    /// Each message with its stream sequence and subject.
    pub messages: Vec<(u64, String, async_nats::Message)>,
    /// Messages on the subject after this page.
    pub pending: u64,
}

impl DirectPage {
    /// Where the next page starts; `None` when nothing is left.
    pub fn next_seq(&self) -> Option<u64> {
        (self.pending > 0)
            .then(|| self.messages.last().map(|(seq, _, _)| seq + 1))
            .flatten()
    }
}

impl DirectPages {
    /// Subscribes the inbox every page of `stream` is answered on.
    ///
    /// # Errors
    /// [`BusError`] when the inbox cannot be subscribed.
    pub async fn open(client: &async_nats::Client, stream: &str) -> Result<Self, BusError> {
        let inbox = client.new_inbox();
        let replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::nats("direct read", e))?;
        Ok(Self {
            client: client.clone(),
            api: format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            replies,
        })
    }

    /// Up to `batch` messages on `subject` from stream sequence `seq`.
    ///
    /// # Errors
    /// [`BusError`] on no reply in time, a status other than the end of a batch or nothing
    /// found, a reply without its sequence, or a page that says more are left yet holds none.
    pub async fn next(
        &mut self,
        subject: &str,
        seq: u64,
        batch: usize,
    ) -> Result<DirectPage, BusError> {
        let request = serde_json::json!({
            "seq": seq,
            "next_by_subj": subject,
            "batch": batch,
        });
        self.client
            .publish_with_reply(
                self.api.clone(),
                self.inbox.clone(),
                request.to_string().into(),
            )
            .await
            .map_err(|e| BusError::nats("direct read", e))?;
        let mut messages = Vec::new();
        let pending = loop {
            let m = tokio::time::timeout(DIRECT_REPLY_WAIT, self.replies.next())
                .await
                .map_err(|_| BusError::nats("direct read", "no reply in time"))?
                .ok_or_else(|| BusError::nats("direct read", "reply subscription closed"))?;
            match m.status.map(|s| s.as_u16()) {
                None | Some(200) => {
                    let headers = m.headers.as_ref();
                    let stored_seq = headers
                        .and_then(|h| h.get("Nats-Sequence"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .ok_or_else(|| {
                            BusError::nats("direct read", "a reply without Nats-Sequence")
                        })?;
                    let stored_subject = headers
                        .and_then(|h| h.get("Nats-Subject"))
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default();
                    messages.push((stored_seq, stored_subject, m));
                }
                // End of batch: how many messages on the subject are left after it.
                Some(204) => {
                    break m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Num-Pending"))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                }
                // Nothing (more) on the subject.
                Some(404) => break 0,
                Some(code) => {
                    return Err(BusError::nats(
                        "direct read",
                        format!(
                            "status {code}: {}",
                            m.description.as_deref().unwrap_or("no description")
                        ),
                    ));
                }
            }
        };
        if pending > 0 && messages.is_empty() {
            return Err(BusError::nats(
                "direct read",
                format!("{pending} messages said to be left, none returned"),
            ));
        }
        Ok(DirectPage { messages, pending })
    }
}

pub fn recorded(seq: u64, m: &async_nats::Message) -> Recorded {
    let event = decode(m.headers.as_ref(), &m.payload);
    let raw = event.is_err().then(|| m.payload.clone());
    Recorded {
        seq,
        subject: m.subject.to_string(),
        event,
        raw,
    }
}

/// `nats://user:password@host:port` as the URL without them, and them.
fn split_userinfo(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        format!("{scheme}://{host}"),
        Some((user.to_string(), password.to_string())),
    )
}

/// Refuses servers older than [`MIN_SERVER_VERSION`].
///
/// # Errors
/// [`BusError::ServerTooOld`] naming the version found.
pub fn check_server_version(version: &str) -> Result<(), BusError> {
    let core = version.trim_start_matches('v');
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    if found >= MIN_SERVER_VERSION {
        Ok(())
    } else {
        warn!(version, "nats-server is too old.");
        Err(BusError::ServerTooOld {
            found: version.to_string(),
        })
    }
}

/// The current time; the I/O layer's clock, passed into the pure logic as a value.
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.11.0").is_ok());
        assert!(check_server_version("v2.12.0-beta.1").is_ok());
        let err = check_server_version("2.9.10").unwrap_err().to_string();
        assert!(err.contains("2.9.10") && err.contains("2.11.0"), "{err}");
    }
}
