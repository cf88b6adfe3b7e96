//! `slipway-model-evaluator`: reads its configuration and runs the evaluator until a signal.

use slipway_core::config::{Config, config_path_from_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipway_core::telemetry::init("model-evaluator");
    let config = Config::load(config_path_from_args()?.as_deref())?;
    let shutdown = slipway_core::runtime::shutdown_on_signals();
    let otel = slipway_core::telemetry::otel::install(
        "slipway-model-evaluator",
        config.gateway.public_url.as_deref(),
    );
    let result = model_evaluator::run(config, shutdown).await;
    otel.shutdown().await;
    result?;
    Ok(())
}
