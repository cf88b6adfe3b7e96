//! Structured logs through `tracing`, filtered by `RUST_LOG` (default `info`).

pub mod otel;
pub mod trace;

/// Installs the log subscriber once; later calls are no-ops.
pub fn init(service: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
    tracing::debug!(service, "Logging initialised.");
}
