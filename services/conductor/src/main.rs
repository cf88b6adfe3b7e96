//! `slipway-conductor`: reads its configuration and runs the conductor until a signal.

use slipway_core::config::{Config, config_path_from_args};

// The conductor decodes and folds the whole log at start-up, which is mostly small
// allocations: mimalloc replays it about a third faster than the system allocator
// (docs/performance.md). The other services keep the system one: idle, it holds less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    slipway_core::telemetry::init("conductor");
    let config = Config::load(config_path_from_args()?.as_deref())?;
    let shutdown = slipway_core::runtime::shutdown_on_signals();
    let otel = slipway_core::telemetry::otel::install(
        "slipway-conductor",
        config.gateway.public_url.as_deref(),
    );
    let result = conductor::run(config, shutdown).await;
    otel.shutdown().await;
    result?;
    Ok(())
}
