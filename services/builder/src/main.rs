//! `slipway-builder`: reads its configuration and runs the builder until a signal.

use slipway_core::config::{Config, config_path_from_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipway_core::telemetry::init("builder");
    let config = Config::load(config_path_from_args()?.as_deref())?;
    let shutdown = slipway_core::runtime::shutdown_on_signals();
    let otel = slipway_core::telemetry::otel::install(
        "slipway-builder",
        config.gateway.public_url.as_deref(),
    );
    let result = builder::run(config, shutdown).await;
    otel.shutdown().await;
    result?;
    Ok(())
}
