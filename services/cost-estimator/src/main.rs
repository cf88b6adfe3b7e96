//! `slipway-cost-estimator`: reads its configuration and runs the cost gate until a signal.

use slipway_core::config::{Config, config_path_from_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipway_core::telemetry::init("cost-estimator");
    let config = Config::load(config_path_from_args()?.as_deref())?;
    let shutdown = slipway_core::runtime::shutdown_on_signals();
    let otel = slipway_core::telemetry::otel::install(
        "slipway-cost-estimator",
        config.gateway.public_url.as_deref(),
    );
    let result = cost_estimator::run(config, shutdown).await;
    otel.shutdown().await;
    result?;
    Ok(())
}
