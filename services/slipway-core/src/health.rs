//! Whether a service is alive and ready: answered over HTTP (`[health] listen`, off by default)
//! and published every few seconds as a heartbeat in the `slipway-services` KV bucket, whose
//! entries expire, so the bucket lists the replicas running now (`slipway services`,
//! `GET /v1/services`).
//!
//! - **live**: the service's main loop turned within [`LIVE_WITHIN`] (a wedged loop is not);
//! - **ready**: connected to NATS, its consumer bound and its view of the log caught up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use slipway_domain::service::Service;
pub use slipway_domain::service::{Heartbeat, Supervised, Supervision};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{Bus, BusError};

/// The bucket of heartbeats, a key per replica (`<service>.<replica>`).
pub const SERVICES_BUCKET: &str = "slipway-services";

/// How often a replica says it is there.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A replica silent this long is gone: its heartbeat expires from the bucket.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(20);

/// A loop that has not turned for this long is not live.
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);

/// The optional HTTP endpoint (`[health]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// `host:port` to answer `GET /livez` and `GET /readyz` on (port 0: any free one, which the
    /// heartbeat names). Off when absent.
    pub listen: Option<String>,
}

/// The environment `slipway up` gives a process it restarted.
pub const RESTARTS_ENV: &str = "SLIPWAY_RESTARTS";
pub const LAST_EXIT_ENV: &str = "SLIPWAY_LAST_EXIT";

/// A service's health, shared by its loop, its HTTP endpoint and its heartbeat.
#[derive(Debug, Clone)]
pub struct Health(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    service: Service,
    replica: String,
    started: Instant,
    started_at: DateTime<Utc>,
    /// Milliseconds after `started` the loop last turned.
    turned_ms: AtomicU64,
    bound: AtomicBool,
    caught_up: AtomicBool,
    /// The durable consumer whose lag the heartbeat reports.
    consumer: Mutex<Option<String>>,
    health_url: Mutex<Option<String>>,
}

/// This host's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A KV key token: what a replica id may hold that a key may not becomes `_`.
fn key_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Health {
    pub fn new(service: Service, replica: &str) -> Self {
        Self(Arc::new(Inner {
            service,
            replica: replica.to_string(),
            started: Instant::now(),
            started_at: Utc::now(),
            turned_ms: AtomicU64::new(0),
            bound: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            consumer: Mutex::new(None),
            health_url: Mutex::new(None),
        }))
    }

    /// The replica id a service uses by default: `<service>-<host>-<pid>`.
    pub fn default_replica(service: Service) -> String {
        format!("{}-{}-{}", service.name(), host_name(), std::process::id())
    }

    pub fn service(&self) -> Service {
        self.0.service
    }

    pub fn replica(&self) -> &str {
        &self.0.replica
    }

    /// The main loop turned.
    pub fn turned(&self) {
        let ms = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.turned_ms.store(ms, Ordering::Relaxed);
    }

    /// Its consumer is bound (`consumer` names the durable whose lag to report).
    pub fn bound(&self, consumer: Option<&str>) {
        *self.0.consumer.lock().expect("lock") = consumer.map(str::to_string);
        self.0.bound.store(true, Ordering::Relaxed);
        self.turned();
    }

    /// Its view of the log has caught up (or it keeps none).
    pub fn caught_up(&self) {
        self.0.caught_up.store(true, Ordering::Relaxed);
    }

    pub fn is_live(&self) -> bool {
        let now = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let turned = self.0.turned_ms.load(Ordering::Relaxed);
        now.saturating_sub(turned) <= LIVE_WITHIN.as_millis() as u64
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self, bus: &Bus) -> Result<(), String> {
        if !matches!(
            bus.client().connection_state(),
            async_nats::connection::State::Connected
        ) {
            return Err("not connected to NATS".into());
        }
        if !self.0.bound.load(Ordering::Relaxed) {
            return Err("its consumer is not bound yet".into());
        }
        if !self.0.caught_up.load(Ordering::Relaxed) {
            return Err("catching up with the log".into());
        }
        Ok(())
    }

    /// What the replica says of itself now (`lag` read by the caller).
    pub fn heartbeat(&self, bus: &Bus, lag: Option<u64>) -> Heartbeat {
        let ready = self.readiness(bus);
        Heartbeat {
            service: self.0.service.name().to_string(),
            replica: self.0.replica.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: host_name(),
            pid: std::process::id(),
            started_at: self.0.started_at,
            at: Utc::now(),
            uptime_secs: self.0.started.elapsed().as_secs(),
            live: self.is_live(),
            ready: ready.is_ok(),
            not_ready: ready.err(),
            lag,
            health_url: self.0.health_url.lock().expect("lock").clone(),
            restarts: std::env::var(RESTARTS_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
            last_exit: std::env::var(LAST_EXIT_ENV).ok().filter(|v| !v.is_empty()),
        }
    }

    /// Its key in the bucket.
    pub fn key(&self) -> String {
        format!(
            "{}.{}",
            key_token(self.0.service.name()),
            key_token(&self.0.replica)
        )
    }
}

/// The heartbeat bucket, created on first use: history 1, entries expiring after
/// [`HEARTBEAT_TTL`].
///
/// # Errors
/// [`BusError`] when it can be neither opened nor created.
pub async fn bucket(bus: &Bus) -> Result<kv::Store, BusError> {
    let js = bus.jetstream();
    if let Ok(kv) = js.get_key_value(SERVICES_BUCKET).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: SERVICES_BUCKET.to_string(),
        description: "Slipway's running replicas: a heartbeat each, expiring".into(),
        history: 1,
        max_age: HEARTBEAT_TTL,
        num_replicas: bus.settings().stream.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::nats("create KV bucket", format!("{SERVICES_BUCKET}: {e}")))
}

/// What the heartbeat bucket says is running: every replica, and what each `slipway up` keeps
/// running.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Running {
    /// By service, then replica.
    pub replicas: Vec<Heartbeat>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supervisors: Vec<Supervision>,
}

impl Running {
    /// The services of `required` with no live replica.
    pub fn missing(&self, required: &[&str]) -> Vec<String> {
        required
            .iter()
            .filter(|s| !self.replicas.iter().any(|r| r.service == **s && r.live))
            .map(|s| (*s).to_string())
            .collect()
    }

    /// The processes some `up` reports as crash-looping.
    pub fn crash_looping(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .supervisors
            .iter()
            .flat_map(|s| s.processes.iter())
            .filter(|p| p.crash_looping)
            // By service name, as `missing_services` and the metrics say it (`nats-server`
            // stays itself).
            .map(|p| {
                p.name
                    .strip_prefix("slipway-")
                    .unwrap_or(&p.name)
                    .to_string()
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The key of the record `slipway up` on `host` keeps.
pub fn supervision_key(host: &str) -> String {
    format!("up.{}", key_token(host))
}

/// Reads the bucket: entries older than [`HEARTBEAT_TTL`] are left out (the bucket drops them
/// soon).
///
/// # Errors
/// [`BusError`] when the bucket cannot be read.
pub async fn running(bus: &Bus) -> Result<Running, BusError> {
    use futures_util::StreamExt;
    let kv = bucket(bus).await?;
    let mut keys = kv
        .keys()
        .await
        .map_err(|e| BusError::nats("list heartbeats", e))?;
    let mut out = Running::default();
    let fresh = |at: DateTime<Utc>| {
        Utc::now().signed_duration_since(at).num_milliseconds() <= HEARTBEAT_TTL.as_millis() as i64
    };
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        let Ok(Some(v)) = kv.get(&key).await else {
            continue;
        };
        if key.starts_with("up.") {
            if let Ok(s) = serde_json::from_slice::<Supervision>(&v)
                && fresh(s.at)
            {
                out.supervisors.push(s);
            }
        } else if let Ok(h) = serde_json::from_slice::<Heartbeat>(&v)
            && fresh(h.at)
        {
            out.replicas.push(h);
        }
    }
    out.replicas
        .sort_by(|a, b| (&a.service, &a.replica).cmp(&(&b.service, &b.replica)));
    out.supervisors.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(out)
}

/// Writes what `slipway up` keeps running.
///
/// # Errors
/// [`BusError`] when the bucket cannot be written.
pub async fn put_supervision(bus: &Bus, s: &Supervision) -> Result<(), BusError> {
    let kv = bucket(bus).await?;
    kv.put(
        supervision_key(&s.host),
        serde_json::to_vec(s).expect("serialises").into(),
    )
    .await
    .map_err(|e| BusError::nats("write supervision", e))?;
    Ok(())
}

/// Starts the HTTP endpoint (when configured) and the heartbeat, until `shutdown`.
pub async fn start(
    bus: &Bus,
    health: &Health,
    settings: &HealthSettings,
    shutdown: CancellationToken,
) {
    if let Some(listen) = &settings.listen {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                let addr = listener
                    .local_addr()
                    .map_or_else(|_| listen.clone(), |a| a.to_string());
                *health.0.health_url.lock().expect("lock") = Some(format!("http://{addr}"));
                info!(%addr, "Health endpoint ready (/livez, /readyz).");
                tokio::spawn(serve(
                    listener,
                    bus.clone(),
                    health.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                warn!(%listen, error = %e, "The health endpoint cannot listen; going on without it.")
            }
        }
    }
    tokio::spawn(beat(bus.clone(), health.clone(), shutdown));
}

/// Puts the heartbeat every [`HEARTBEAT_EVERY`], and deletes it on a clean stop.
async fn beat(bus: Bus, health: Health, shutdown: CancellationToken) {
    let mut kv = None;
    loop {
        if kv.is_none() {
            kv = bucket(&bus)
                .await
                .inspect_err(|e| debug!(error = %e, "No heartbeat bucket yet."))
                .ok();
        }
        if let Some(store) = &kv {
            let lag = lag(&bus, &health).await;
            let beat = health.heartbeat(&bus, lag);
            let body = serde_json::to_vec(&beat).expect("a heartbeat serialises");
            if let Err(e) = store.put(health.key(), body.into()).await {
                debug!(error = %e, "The heartbeat was not written.");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
    }
    if let Some(store) = &kv {
        let _ = store.delete(health.key()).await;
    }
}

/// The requests the replica's consumer holds and has not finished: its service's durable,
/// which every replica of the service shares.
async fn lag(bus: &Bus, health: &Health) -> Option<u64> {
    let name = health.0.consumer.lock().expect("lock").clone()?;
    let stream = bus
        .jetstream()
        .get_stream(&bus.settings().stream.name)
        .await
        .ok()?;
    let info = stream.consumer_info(&name).await.ok()?;
    Some(info.num_pending + info.num_ack_pending as u64)
}

/// `GET /livez`, `GET /readyz`: 200 or 503, the heartbeat as the body.
async fn serve(
    listener: tokio::net::TcpListener,
    bus: Bus,
    health: Health,
    shutdown: CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let app = {
        let (b1, h1, b2, h2) = (bus.clone(), health.clone(), bus, health);
        axum::Router::new()
            .route(
                "/livez",
                axum::routing::get(move || {
                    let (bus, health) = (b1.clone(), h1.clone());
                    async move {
                        let beat = health.heartbeat(&bus, None);
                        let code = if beat.live {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (code, axum::Json(beat)).into_response()
                    }
                }),
            )
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let (bus, health) = (b2.clone(), h2.clone());
                    async move {
                        let beat = health.heartbeat(&bus, None);
                        let code = if beat.ready && beat.live {
                            StatusCode::OK
                        } else {
                            StatusCode::SERVICE_UNAVAILABLE
                        };
                        (code, axum::Json(beat)).into_response()
                    }
                }),
            )
    };
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_tokens_and_liveness_follows_the_loop() {
        let h = Health::new(Service::Builder, "builder-host.a-42");
        assert_eq!(h.key(), "builder.builder-host_a-42");
        h.turned();
        assert!(h.is_live());
        // A loop that last turned longer ago than LIVE_WITHIN is not live.
        h.0.turned_ms.store(0, Ordering::Relaxed);
        let h2 = Health(Arc::new(Inner {
            started: Instant::now() - LIVE_WITHIN - Duration::from_secs(1),
            ..Arc::try_unwrap(Health::new(Service::Builder, "x").0).unwrap()
        }));
        assert!(!h2.is_live());
    }
}
