//! The approval gateway: Slipway's HTTP face.
//!
//! - `POST /v1/changes`: a change as a CloudEvent (HTTP binding, binary or structured mode);
//! - `GET /v1/runs`, `GET /v1/runs/{id}`, `GET /v1/runs/{id}/events`: runs from the log;
//! - `POST /v1/runs/{id}/approvals`: an approver's decision, authenticated with a bearer
//!   token, checked against the run's approval policy, and appended with run-wide optimistic
//!   concurrency so that of two racing decisions exactly one wins;
//! - `GET /`: the approver page; `GET /healthz`; `GET /openapi.json`.
//!
//! It binds to loopback by default. Reads come from an in-memory fold of the log
//! ([`projection`]); decisions fold the run's log afresh.

pub mod auth;
pub mod console;
pub mod error;
pub mod harden;
pub mod hooks;
pub mod listing;
pub mod metrics;
pub mod oidc;
pub mod openapi;
pub mod projection;
pub mod routes;
pub mod signin;
pub mod tls;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use slipway_core::bus::{Bus, BusError};
use slipway_core::config::{Approver, Config};
use slipway_core::runtime::CancellationToken;
use tracing::info;

use crate::projection::{Notifier, Runs, SharedRuns};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub bus: Bus,
    /// Gate details are read from here.
    pub objects: slipway_core::store::objects::Objects,
    pub runs: SharedRuns,
    /// Ended runs (`None`: the bucket could not be opened; ended runs are folded from the log).
    pub index: Option<slipway_core::store::runs::RunIndex>,
    /// The index's deployments compacted for DORA (`None`: DORA reads the index alone).
    pub dora: Option<slipway_core::store::dora::DoraChunks>,
    pub approvers: Arc<Vec<Approver>>,
    /// Where a run's trace can be seen (`{trace_id}` replaced), if configured.
    pub trace_url_template: Option<String>,
    /// Signs each recorded decision; without it decisions are unsigned and a deployer with a
    /// public key does not count them.
    pub signing: Option<Arc<slipway_domain::signing::SigningKey>>,
    /// Failed authentications allowed per client address and minute.
    pub auth_limiter: Arc<harden::AuthLimiter>,
    /// Longest a request may take.
    pub request_timeout: Duration,
    /// Git host webhooks and where runs' results are reported.
    pub hooks: hooks::Hooks,
    /// Commit links for the page, by change source.
    pub commit_links: Arc<Vec<slipway_core::config::CommitLink>>,
    /// The OpenID Connect provider people sign in with, when configured.
    pub oidc: Option<Arc<oidc::Oidc>>,
    /// Where the gateway is reached (the sign-in's redirect URI is under it).
    pub public_url: String,
    /// What the heartbeat bucket said last (refreshed every few seconds).
    pub running: Arc<RwLock<slipway_core::health::Running>>,
    /// The services that must have a live replica.
    pub required_services: Arc<Vec<String>>,
}

/// The gateway's routes.
pub fn app(state: AppState, max_body_bytes: usize) -> Router {
    let limiter = state.auth_limiter.clone();
    let timeout = state.request_timeout;
    // Only the routes that take a token count and refuse failed authentications: health,
    // metrics, the page and intake answer whatever an address got wrong before.
    let with_token = Router::new()
        .route("/v1/runs/{id}/approvals", post(routes::post_approval))
        .route("/v1/runs/{id}/rollout", post(routes::post_rollout_control))
        .route("/v1/session", get(signin::session))
        .route("/auth/callback", get(signin::callback))
        .route_layer(axum::middleware::from_fn_with_state(
            limiter,
            harden::limit_failed_auth,
        ));
    let routes = Router::new()
        .route("/", get(routes::page))
        .route("/healthz", get(routes::healthz))
        .route("/openapi.json", get(routes::openapi))
        .route("/metrics", get(routes::prometheus))
        .route("/v1/ui", get(routes::ui))
        .route("/auth/login", get(signin::login))
        .route("/auth/logout", post(signin::logout))
        .route("/v1/changes", post(routes::post_change))
        // Not behind the failed-authentication limit: a host's deliveries come from a few
        // shared addresses that anyone's misconfigured hook would otherwise get refused, and
        // a webhook secret cannot be guessed.
        .route("/v1/hooks/github", post(hooks::github))
        .route("/v1/hooks/gitlab", post(hooks::gitlab))
        .route("/v1/runs", get(routes::list_runs))
        .route("/v1/runs/{id}", get(routes::get_run))
        .route("/v1/runs/{id}/events", get(routes::run_events))
        .route("/v1/runs/{id}/gates/{stage}", get(routes::gate_details))
        .route("/v1/metrics/dora", get(routes::dora))
        .route("/v1/runs/{id}/context", get(console::context))
        .route("/v1/runs/{id}/logs/{stage}", get(console::log_page))
        .route("/v1/audit", get(console::audit))
        .route("/v1/services", get(routes::services))
        .route("/runs/{id}", get(routes::run_page))
        .route("/audit", get(routes::audit_page))
        .merge(with_token)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(harden::same_origin_writes))
        .layer(axum::middleware::from_fn(harden::header_limit))
        .layer(axum::middleware::from_fn_with_state(
            timeout,
            harden::time_limit,
        ))
        .with_state(state);
    // Around the whole router rather than each route: a `405` gets its `Allow` header inside
    // the router, after a per-route layer has seen it.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(
            max_body_bytes,
            harden::json_errors,
        ))
        .layer(axum::middleware::from_fn(harden::security_headers))
}

/// Reads the heartbeat bucket every few seconds for `/healthz`, `/metrics` and
/// `/v1/services`, and turns the gateway's own liveness (ready once its view caught up).
async fn watch_running(
    bus: Bus,
    running: Arc<RwLock<slipway_core::health::Running>>,
    runs: SharedRuns,
    health: slipway_core::health::Health,
    shutdown: CancellationToken,
) {
    loop {
        health.turned();
        if runs.read().expect("lock").caught_up {
            health.caught_up();
        }
        match slipway_core::health::running(&bus).await {
            Ok(now) => *running.write().expect("lock") = now,
            Err(e) => tracing::debug!(error = %e, "The heartbeats cannot be read."),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("configuration error: {0}")]
    Config(String),
}

/// The approval signing key from `[gateway] signing_key` or `signing_key_file`, if any.
///
/// # Errors
/// What is wrong with the setting (never the key).
pub fn signing_key(
    settings: &slipway_core::config::GatewaySettings,
) -> Result<Option<slipway_domain::signing::SigningKey>, GatewayError> {
    let seed = match (&settings.signing_key, &settings.signing_key_file) {
        (Some(_), Some(_)) => {
            return Err(GatewayError::Config(
                "set [gateway] signing_key or signing_key_file, not both".into(),
            ));
        }
        (Some(k), None) => k.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            GatewayError::Config(format!(
                "[gateway] signing_key_file {}: {e}",
                path.display()
            ))
        })?,
        (None, None) => return Ok(None),
    };
    slipway_domain::signing::SigningKey::from_base64(&seed)
        .map(Some)
        .map_err(|e| GatewayError::Config(format!("[gateway] signing key: {e}")))
}

/// Whether a browser keeps `Secure` cookies for pages at `url`: over https, or on loopback.
fn keeps_secure_cookies(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        rest.split(['/', ':']).next().unwrap_or_default()
    };
    scheme == "https"
        || host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// How often the gateway compacts the run index's new deployments into DORA chunks.
const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// Opens the DORA chunks and keeps compacting the index's new deployments into them, until
/// `shutdown` (the first pass at once: after an upgrade it reads the whole index once).
async fn compact_dora(
    bus: &Bus,
    index: &slipway_core::store::runs::RunIndex,
    shutdown: CancellationToken,
) -> Option<slipway_core::store::dora::DoraChunks> {
    let chunks = match slipway_core::store::dora::DoraChunks::open(bus).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot open the DORA chunks: DORA reads the run index alone.");
            return None;
        }
    };
    let (c, index) = (chunks.clone(), index.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COMPACT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match c.compact(&index).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(chunks = n, "DORA chunks written."),
                Err(e) => {
                    tracing::warn!(error = %e, "DORA chunks not written; trying again later.")
                }
            }
        }
    });
    Some(chunks)
}

/// Connects, follows the log, and serves until `shutdown`.
///
/// # Errors
/// [`GatewayError`] when NATS cannot be reached or the address cannot be bound.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let settings = config.gateway.clone();
    let signing = signing_key(&settings)?.map(Arc::new);
    let tls = match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(c), Some(k)) => Some(tls::config(c, k)?),
        (None, None) => None,
        _ => {
            return Err(GatewayError::Config(
                "set both [gateway] tls_cert_file and tls_key_file, or neither".into(),
            ));
        }
    };
    if signing.is_none() {
        tracing::warn!(
            "No [gateway] signing_key: approvals are recorded unsigned, and a deployer that verifies them will not count them."
        );
    }
    let bus = Bus::connect(&config.nats, "slipway-approval").await?;
    bus.ensure_stream().await?;
    let health = slipway_core::health::Health::new(
        slipway_core::runtime::Service::Approval,
        &slipway_core::health::Health::default_replica(slipway_core::runtime::Service::Approval),
    );
    slipway_core::health::start(&bus, &health, &config.health, shutdown.clone()).await;
    health.bound(None);
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: settings.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            addr: settings.listen.clone(),
            source,
        })?;
    let hooks = hooks::Hooks::load(&settings.git_hooks).map_err(GatewayError::Config)?;
    let seed_text = match (&settings.signing_key, &settings.signing_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(p)) => std::fs::read_to_string(p).ok(),
        (None, None) => None,
    };
    let oidc = match &settings.oidc {
        Some(o) => {
            let url = settings
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", settings.listen));
            if !keeps_secure_cookies(&url) {
                return Err(GatewayError::Config(format!(
                    "[gateway.oidc] needs the gateway reached over https ([gateway] public_url is {url}): its session cookies are Secure"
                )));
            }
            Some(Arc::new(
                oidc::Oidc::new(o.clone(), seed_text.as_deref()).map_err(GatewayError::Config)?,
            ))
        }
        None => None,
    };
    let runs: SharedRuns = Arc::new(RwLock::new(Runs::default()));
    let notifier = Notifier {
        hooks: hooks.clone(),
        webhooks: settings.webhooks.clone(),
        attempts: settings.webhook_attempts,
        public_url: settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        cdevents: settings.cdevents,
        cdevents_webhooks: settings.cdevents_webhooks.clone(),
    };
    let index = match slipway_core::store::runs::RunIndex::open(&bus).await {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot open the run index: ended runs are folded from the log.");
            None
        }
    };
    let follower = tokio::spawn(projection::follow(
        bus.clone(),
        runs.clone(),
        index.clone(),
        notifier,
        shutdown.clone(),
    ));
    metrics::export_lag(bus.clone(), Duration::from_secs(5), shutdown.clone());
    let running = Arc::new(RwLock::new(slipway_core::health::Running::default()));
    tokio::spawn(watch_running(
        bus.clone(),
        running.clone(),
        runs.clone(),
        health,
        shutdown.clone(),
    ));
    let dora = match &index {
        Some(index) => compact_dora(&bus, index, shutdown.clone()).await,
        None => None,
    };
    let state = AppState {
        objects: slipway_core::store::objects::Objects::new(&bus),
        bus,
        runs,
        index,
        dora,
        approvers: Arc::new(settings.approvers.clone()),
        trace_url_template: settings.trace_url_template.clone(),
        signing,
        auth_limiter: Arc::new(harden::AuthLimiter::new(
            settings.auth_failures_per_minute,
            Duration::from_secs(60),
        )),
        request_timeout: Duration::from_secs(settings.request_timeout_secs.max(1)),
        hooks,
        commit_links: Arc::new(settings.commit_links.clone()),
        oidc,
        public_url: settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        running,
        required_services: Arc::new(settings.required_services.clone()),
    };
    info!(%addr, approvers = settings.approvers.len(), https = tls.is_some(), "Approval gateway listening.");
    let s = shutdown.clone();
    let router = app(state, settings.max_body_bytes);
    match tls {
        Some(cfg) => tls::serve(listener, router, cfg, shutdown.clone()).await,
        None => axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await
        .map_err(|source| GatewayError::Listen {
            addr: addr.to_string(),
            source,
        })?,
    }
    shutdown.cancel();
    let _ = follower.await;
    info!("Approval gateway stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn secure_cookies_need_https_or_loopback() {
        for ok in [
            "https://slipway.example",
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://[::1]:8080",
        ] {
            assert!(super::keeps_secure_cookies(ok), "{ok}");
        }
        for bad in [
            "http://slipway.example",
            "http://10.0.0.5:8080",
            "slipway.example",
        ] {
            assert!(!super::keeps_secure_cookies(bad), "{bad}");
        }
    }
}
