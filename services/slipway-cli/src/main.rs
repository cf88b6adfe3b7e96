//! `slipway`: run Slipway locally, submit changes, and follow, replay and cancel runs.
//!
//! Every command talks to NATS (`--nats-url`, default `SLIPWAY_NATS_URL`, else
//! `nats://127.0.0.1:4222`), as the user the URL names, else as the `cli` user of the server
//! `slipway up` started (its password from `$SLIPWAY_DATA_DIR/credentials`, default
//! `.slipway`). Exit codes: 0 success, 1 a run that did not succeed or an operation refused, 2
//! bad usage or an unreachable server.

// Replay, status and the benchmark's replay row decode and fold whole logs: the conductor's
// allocator (see its main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod client;
mod demo;
mod http;
mod org;
mod out;
mod show;
mod soak;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::out::outln;

#[derive(Debug, Parser)]
#[command(
    name = "slipway",
    version,
    about = "Slipway: event-sourced continuous delivery"
)]
struct Cli {
    /// NATS server URL.
    #[arg(long, global = true, env = "SLIPWAY_NATS_URL")]
    nats_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start every service (and, without a NATS URL, a local nats-server under .slipway/).
    Up {
        /// Configuration file passed to every service.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Port of the local nats-server.
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// Directory for the local server's data, its users' passwords and the services'
        /// workspaces.
        #[arg(long, env = "SLIPWAY_DATA_DIR", default_value = ".slipway")]
        data_dir: PathBuf,
        /// Let every local process onto the local nats-server, as any service (by default
        /// each service, the CLI and operators have their own user, passwords generated into
        /// the data directory).
        #[arg(long)]
        insecure: bool,
    },
    /// Publish a change: a pipeline spec and its source.
    Submit {
        /// The pipeline spec (TOML).
        spec: PathBuf,
        /// A local directory or a git URL (default: the spec's directory).
        #[arg(long)]
        source: Option<String>,
        /// Git revision, with a git URL source.
        #[arg(long)]
        revision: Option<String>,
        /// A short description of the change.
        #[arg(long)]
        title: Option<String>,
        /// Wait until the run ends or awaits approval; exit 1 if it did not succeed.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// A run's state (live from the conductor, else folded from the log).
    Status {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// A run's CloudEvents in log order, one structured-mode JSON per line.
    Events { run: String },
    /// Follow a run's phase and stages until it ends.
    Watch {
        run: String,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Rebuild state from the log alone (a fresh fold, no cache).
    Replay {
        run: Option<String>,
        #[arg(long)]
        json: bool,
        /// Compare every ended run (or RUN) folded from the log with its entry in the run
        /// index, and report each entry that is missing or differs (exit 1 if any).
        #[arg(long)]
        verify: bool,
        /// With --verify: write the log's fold over each missing or differing entry.
        #[arg(long, requires = "verify")]
        repair: bool,
    },
    /// Remove from the log the events of runs that ended more than --older-than ago, once
    /// their run index entry equals the fold of their events (the retention policy; by default
    /// nothing is pruned: the log keeps everything). The run index keeps every run's final
    /// state, approvals and deployments. Needs the `admin` user.
    Prune {
        /// Age of the runs to prune, from their end: e.g. 365d, 90d.
        #[arg(long)]
        older_than: String,
        /// Count what would be pruned, and prune nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// The changes received, newest first, with their outcome.
    Changes {
        #[arg(long)]
        json: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// End a run that has not finished.
    Cancel {
        run: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Approve (or reject) a run awaiting approval, through the gateway's HTTP API.
    Approve {
        run: String,
        #[arg(long)]
        reject: bool,
        #[arg(long)]
        comment: Option<String>,
        /// Bearer token (default: SLIPWAY_TOKEN).
        #[arg(long, env = "SLIPWAY_TOKEN", hide_env_values = true)]
        token: String,
        /// Gateway URL (default: SLIPWAY_GATEWAY_URL, else http://127.0.0.1:8080).
        #[arg(long)]
        gateway: Option<String>,
        /// The artifact you reviewed (default: the run's current one).
        #[arg(long)]
        artifact_digest: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A run's rollout: its weights, looks and controls; or control it through the gateway's
    /// HTTP API (`pause`, `resume`, `promote`, `abort`), authorised like an approval.
    Rollout {
        run: String,
        /// `status` (the default), `pause`, `resume`, `promote` or `abort`.
        #[arg(default_value = "status")]
        action: String,
        #[arg(long)]
        comment: Option<String>,
        /// Bearer token for a control (default: SLIPWAY_TOKEN).
        #[arg(long, env = "SLIPWAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Gateway URL (default: SLIPWAY_GATEWAY_URL, else http://127.0.0.1:8080).
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// DORA delivery metrics from the log: per pipeline and overall.
    Dora {
        /// The window, ending now: e.g. 30d, 12h, 90m.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long)]
        json: bool,
    },
    /// Every running replica of every service (from their heartbeats: version, host, uptime,
    /// readiness, lag, health URL), what each `slipway up` keeps running (restarts, last exit,
    /// crash loops), and the required services with no live replica. Exits 1 when one is
    /// missing.
    Services {
        #[arg(long)]
        json: bool,
        /// The services that must have a live replica, as the gateway's
        /// `[gateway] required_services` (default: all nine).
        #[arg(long, value_delimiter = ',', value_name = "SERVICE,...")]
        require: Vec<String>,
    },
    /// Back up the event stream, the object stores and the KV buckets into DIR (a new
    /// directory): JetStream snapshots with a manifest of checksums, taken while runs go on.
    /// Connects as the server's `admin` user (its password from the data directory on this
    /// host, or the URL's).
    Backup {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a server that has none of its streams; the sequences are kept.
    /// Checks every file first: a damaged backup is refused and nothing is written.
    Restore {
        dir: PathBuf,
        /// Restore into the data directory of `slipway up` instead of a running server: its
        /// nats-server is started alone on it for the restore (stop `up` first; its store must
        /// not hold the streams yet). `slipway up --data-dir` then carries on from it.
        #[arg(long)]
        into_data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make the gateway's approval signing key: the Ed25519 seed into SEED_FILE (created,
    /// readable by its owner only), the public key on stdout (the deployers'
    /// `[approvals] public_key`).
    Keygen {
        #[arg(long)]
        seed_file: PathBuf,
    },
    /// Start a new run of the same change.
    Rerun {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Push many runs through no-op stages with faults injected (SIGKILL of services, restarts
    /// of nats-server) and count: lost runs and duplicated side effects must be zero.
    Soak {
        #[arg(long, default_value_t = 300)]
        runs: usize,
        /// Runs submitted per second at most.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Seconds between faults (0: none).
        #[arg(long, default_value_t = 4.0)]
        fault_every: f64,
        /// Seconds to wait for the runs' ends once all are submitted.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Repeat a fault schedule.
        #[arg(long)]
        seed: Option<u64>,
        /// Keep the servers' data here (default: a temporary directory, removed after).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Measure Slipway against the raw JetStream floor on its own nats-server and services:
    /// a markdown table of ratios (docs/performance.md).
    Bench {
        /// Sequential no-op runs for the latency rows.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// No-op runs in flight at once for the throughput row.
        #[arg(long, default_value_t = 100)]
        inflight: usize,
        /// Messages per raw-floor latency row.
        #[arg(long, default_value_t = 2000)]
        raw: usize,
        /// Stored events read back for the read-rate rows.
        #[arg(long, default_value_t = 100_000)]
        stored: usize,
        /// Stored events folded for the replay row.
        #[arg(long, default_value_t = 1_000_000)]
        replay: usize,
        /// Gateway requests, and the load's concurrency.
        #[arg(long, default_value_t = 20_000)]
        gateway_requests: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// CPU-bound builds for the scale-out row (one builder process, then two).
        #[arg(long, default_value_t = 8)]
        scale_builds: usize,
        /// MiB of the artifact stored and read back for the artifact row.
        #[arg(long, default_value_t = 64)]
        artifact_mib: usize,
        /// Keep the servers' data here (default: a temporary directory, removed after).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// The organisation-scale benchmark instead: lead time of many pipelines whose stages
        /// sleep, against their critical paths, and start-up, memory and reads on a long
        /// history (docs/performance.md).
        #[arg(long)]
        org: bool,
        /// With --org: pipelines submitted together.
        #[arg(long, default_value_t = 200)]
        pipelines: usize,
        /// With --org: ended runs written to the log for the history rows.
        #[arg(long, default_value_t = 1_000_000)]
        history: usize,
        /// With --org: every stage's planned duration is multiplied by this.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// With --org: the seed the stage durations are drawn from.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Five changes of the demo model server end to end, production behind a router with
    /// simulated users (the first verified in production, the second stopped by the quality
    /// gates, the third caught by its canary and rolled back, the fourth promoted by an A/B
    /// experiment, the fifth promoted after a shadow), against a private nats-server; then stop.
    Demo {
        /// The demo project (default: deploy/demo/model-server of this repository).
        #[arg(long)]
        project: Option<PathBuf>,
        /// Directory for the demo's server data, workspaces and deployments (emptied first).
        #[arg(long, default_value = ".slipway/demo")]
        data_dir: PathBuf,
        /// Seconds production is watched after each deploy.
        #[arg(long, default_value_t = 8)]
        monitor_window: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    slipway_core::telemetry::init("slipway");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slipway: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn nats_url(cli: &Option<String>) -> String {
    cli.clone()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string())
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let explicit_url = cli.nats_url.clone();
    let url = nats_url(&cli.nats_url);
    if matches!(
        cli.command,
        Command::Up { .. } | Command::Demo { .. } | Command::Soak { .. } | Command::Bench { .. }
    ) {
        out::keep_running_on_closed_pipe();
    }
    match cli.command {
        Command::Up {
            config,
            port,
            data_dir,
            insecure,
        } => {
            let access = if insecure {
                up::Access::Open
            } else {
                up::Access::LeastPrivilege
            };
            up::up(explicit_url, config, port, data_dir, access).await
        }
        Command::Demo {
            project,
            data_dir,
            monitor_window,
        } => demo::demo(project, data_dir, monitor_window).await,
        Command::Soak {
            runs,
            rate,
            fault_every,
            timeout,
            seed,
            data_dir,
            json,
        } => {
            let run = soak::soak(soak::Options {
                runs,
                rate,
                fault_every,
                timeout_secs: timeout,
                seed,
                data_dir,
                json,
            });
            // As for the benchmark: dropping the run kills what it started.
            tokio::select! {
                r = run => r,
                () = up::signal() => {
                    eprintln!("Interrupted: the soak's servers and services are stopped.");
                    Ok(ExitCode::from(130))
                }
            }
        }
        Command::Bench {
            data_dir,
            json,
            org,
            pipelines,
            history,
            time_scale,
            seed,
            ..
        } if org => {
            let keep = data_dir.is_some();
            let run = org::bench(org::Options {
                pipelines,
                history,
                time_scale,
                seed,
                json,
                data_dir,
            });
            tokio::select! {
                r = run => r,
                () = up::signal() => {
                    eprintln!("Interrupted: the benchmark's servers and services are stopped.");
                    if !keep {
                        let _ = std::fs::remove_dir_all(org::default_data_dir());
                    }
                    Ok(ExitCode::from(130))
                }
            }
        }
        Command::Bench {
            runs,
            inflight,
            raw,
            stored,
            replay,
            gateway_requests,
            concurrency,
            scale_builds,
            artifact_mib,
            data_dir,
            json,
            ..
        } => {
            let keep = data_dir.is_some();
            let run = bench::bench(bench::Options {
                runs,
                inflight,
                raw,
                stored,
                replay,
                gateway_requests,
                concurrency,
                scale_builds,
                artifact_mib,
                json,
                data_dir,
            });
            // Interrupted: dropping the run kills the servers and services it started (they
            // are killed on drop), so nothing is left running.
            tokio::select! {
                r = run => r,
                () = up::signal() => {
                    eprintln!("Interrupted: the benchmark's servers and services are stopped.");
                    if !keep {
                        let _ = std::fs::remove_dir_all(bench::default_data_dir());
                    }
                    Ok(ExitCode::from(130))
                }
            }
        }
        Command::Approve {
            run,
            reject,
            comment,
            token,
            gateway,
            artifact_digest,
            json,
        } => {
            let gw = http::gateway_url(gateway);
            match http::decide(&gw, &token, &run, !reject, comment, artifact_digest).await {
                Ok(v) => {
                    if json {
                        outln!("{v}");
                    } else {
                        outln!(
                            "Recorded: {} of run {run} by {} for {}",
                            v["decision"].as_str().unwrap_or(""),
                            v["approver"].as_str().unwrap_or(""),
                            v["artifact_digest"].as_str().unwrap_or("")
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("slipway: {e:#}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Submit {
            spec,
            source,
            revision,
            title,
            wait,
            timeout,
            json,
        } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.submit(&spec, source, revision, title, wait, timeout, json)
                .await
        }
        Command::Status { run, json } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.status(&run, json).await
        }
        Command::Rollout {
            run,
            action,
            comment,
            token,
            gateway,
            json,
        } => {
            if action == "status" {
                let c = client::Client::connect(&client::settings(&url)).await?;
                return c.rollout(&run, json).await;
            }
            let Some(token) = token else {
                eprintln!("slipway: a rollout control needs --token (or SLIPWAY_TOKEN)");
                return Ok(ExitCode::from(2));
            };
            let gw = http::gateway_url(gateway);
            match http::control_rollout(&gw, &token, &run, &action, comment).await {
                Ok(v) => {
                    if json {
                        outln!("{v}");
                    } else {
                        outln!(
                            "Recorded: {} of the rollout of run {run} ({}) by {}",
                            v["action"].as_str().unwrap_or(""),
                            v["stage"].as_str().unwrap_or(""),
                            v["by"].as_str().unwrap_or("")
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("slipway: {e:#}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Events { run } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.events(&run).await
        }
        Command::Watch { run, timeout } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.watch(&run, timeout).await
        }
        Command::Replay {
            run,
            json,
            verify,
            repair,
        } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            if verify {
                c.verify(run.as_deref(), repair, json).await
            } else {
                c.replay(run.as_deref(), json).await
            }
        }
        Command::Prune {
            older_than,
            dry_run,
            json,
        } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.prune(&older_than, dry_run, json).await
        }
        Command::Changes { json, limit } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.changes(json, limit).await
        }
        Command::Cancel { run, reason } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.cancel(&run, reason).await
        }
        Command::Dora { since, json } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.dora(&since, json).await
        }
        Command::Services { json, require } => {
            let known = slipway_domain::service::Service::ALL.map(|s| s.name());
            if let Some(bad) = require.iter().find(|r| !known.contains(&r.as_str())) {
                anyhow::bail!(
                    "--require: no service {bad:?} (known: {})",
                    known.join(", ")
                );
            }
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.services(json, &require).await
        }
        Command::Backup { dir, json } => client::backup(&url, &dir, json).await,
        Command::Restore {
            dir,
            into_data_dir: Some(data),
            json,
        } => {
            std::fs::create_dir_all(&data)?;
            let data = std::fs::canonicalize(&data)?;
            // A store there may be one a running `up` serves: a second server must not share it.
            let store = data.join("nats/jetstream");
            if store.exists() {
                anyhow::bail!(
                    "{} already holds a JetStream store: restore into a new data directory",
                    store.display()
                );
            }
            let port = slipway_core::exec::server::free_port();
            let (mut server, c) = up::own_server(&data, port, up::Access::LeastPrivilege)?;
            let mut settings = client::settings(&server.url());
            if let Some(c) = &c {
                settings.user = Some("admin".into());
                settings.password_file = Some(c.password_file("admin"));
            }
            let result = client::restore_with(&settings, &dir, json).await;
            server.stop();
            result
        }
        Command::Restore {
            dir,
            into_data_dir: None,
            json,
        } => client::restore(&url, &dir, json).await,
        Command::Keygen { seed_file } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let (seed, public) = slipway_domain::signing::SigningKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&seed_file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", seed_file.display()))?;
            f.write_all(seed.as_bytes())?;
            println!("{public}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Rerun { run, json } => {
            let c = client::Client::connect(&client::settings(&url)).await?;
            c.rerun(&run, json).await
        }
    }
}
