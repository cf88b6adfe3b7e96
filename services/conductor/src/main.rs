//! `slipway-conductor`: reads its configuration and runs the conductor until a signal.

use slipway_core::config::{Config, config_path_from_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipway_core::telemetry::init("conductor");
    let config = Config::load(config_path_from_args()?.as_deref())?;
    let shutdown = slipway_core::runtime::shutdown_on_signals();
    let otel = slipway_core::otel::install("slipway-conductor");
    let result = conductor::run(config, shutdown).await;
    otel.shutdown().await;
    result?;
    Ok(())
}
