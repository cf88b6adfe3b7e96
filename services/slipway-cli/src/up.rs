//! `slipway up` and `slipway demo`: every service as a child process, and a local nats-server
//! when no NATS URL is given.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use slipway_core::bus::NatsSettings;
use slipway_core::config::credentials::{self, Credentials};
use slipway_core::exec::server::{NatsProcess, find_nats_server};
use tokio::process::{Child, Command};

/// The services `up` starts, by binary name.
pub const SERVICES: &[&str] = &slipway_domain::service::Service::BINARIES;

/// A service that exits this many times is not restarted again: something is wrong.
const MAX_RESTARTS: u32 = 5;

/// Services are stopped with SIGTERM and get this long to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(35);

struct Service {
    name: &'static str,
    child: Option<Child>,
    restarts: u32,
}

/// A running set of services (and maybe their nats-server).
pub struct Stack {
    nats: Option<NatsProcess>,
    /// The server's URL, without credentials.
    pub url: String,
    /// Every user's password when this stack's own server runs the least-privilege users.
    pub credentials: Option<Credentials>,
    services: Vec<Service>,
    env: Vec<(String, String)>,
    bin_dir: PathBuf,
    /// Exits of one service tolerated before giving up (`slipway soak` kills on purpose).
    pub max_restarts: u32,
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    Ok(std::fs::canonicalize(p)?)
}

/// How a stack's own nats-server lets clients in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The least-privilege users, passwords generated into the data directory (the default).
    LeastPrivilege,
    /// Anyone on this host, as any service (`slipway up --insecure`).
    Open,
}

impl Stack {
    /// Starts nats-server (unless `url` is given) and every service.
    pub async fn start(
        url: Option<String>,
        port: u16,
        data_dir: &Path,
        config: Option<&Path>,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        Self::start_env(
            url,
            port,
            data_dir,
            config,
            quiet,
            Vec::new(),
            Access::LeastPrivilege,
        )
        .await
    }

    /// As [`Stack::start`], with `extra_env` added to every service's environment and the
    /// server's `access`.
    pub async fn start_env(
        url: Option<String>,
        port: u16,
        data_dir: &Path,
        config: Option<&Path>,
        quiet: bool,
        extra_env: Vec<(String, String)>,
        access: Access,
    ) -> anyhow::Result<Self> {
        let data_dir = absolute(data_dir)?;
        let (nats, url, credentials) = match url {
            Some(u) => (None, u, None),
            None => {
                let binary = find_nats_server(&[]).map_err(anyhow::Error::msg)?;
                let store = data_dir.join("nats");
                let (args, env, credentials) = match access {
                    Access::Open => (Vec::new(), Vec::new(), None),
                    Access::LeastPrivilege => {
                        let dir = credentials::directory(&data_dir);
                        let c = Credentials::load_or_create(&dir).with_context(|| {
                            format!("cannot keep the NATS passwords in {}", dir.display())
                        })?;
                        let conf = data_dir.join("nats-server.conf");
                        Credentials::write_server_config(&conf)
                            .with_context(|| format!("cannot write {}", conf.display()))?;
                        let args = vec!["-c".to_string(), conf.display().to_string()];
                        (args, c.server_env(), Some(c))
                    }
                };
                let p = NatsProcess::spawn(&binary, port, &store, &args, &env)
                    .map_err(anyhow::Error::msg)?;
                eprintln!(
                    "nats-server {} listening at {} (data in {})",
                    binary.display(),
                    p.url(),
                    store.display()
                );
                let url = p.url();
                (Some(p), url, credentials)
            }
        };
        let bin_dir = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .context("cannot locate the service binaries")?;
        for name in SERVICES {
            if !bin_dir.join(name).is_file() {
                bail!(
                    "{name} not found beside slipway in {}; build the workspace first (cargo build --release)",
                    bin_dir.display()
                );
            }
        }
        let mut env = vec![
            ("SLIPWAY__NATS__URL".to_string(), url.clone()),
            (
                "SLIPWAY__EXEC__WORKSPACE_ROOT".to_string(),
                data_dir.join("work").display().to_string(),
            ),
        ];
        if quiet && std::env::var_os("RUST_LOG").is_none() {
            env.push(("RUST_LOG".into(), "error".into()));
        }
        env.extend(extra_env);
        let loaded = slipway_core::config::Config::load(config)?;
        env.extend(approval_keys(&data_dir, &loaded)?);
        env.extend(gateway_url(&loaded.gateway));
        if let Some(c) = config {
            env.push((
                "SLIPWAY_CONFIG".into(),
                absolute_file(c)?.display().to_string(),
            ));
        }
        let mut stack = Self {
            nats,
            url,
            credentials,
            services: SERVICES
                .iter()
                .map(|name| Service {
                    name,
                    child: None,
                    restarts: 0,
                })
                .collect(),
            env,
            bin_dir,
            max_restarts: MAX_RESTARTS,
        };
        for i in 0..stack.services.len() {
            stack.spawn(i)?;
        }
        Ok(stack)
    }

    /// Starts one more process of a service: a replica, sharing the service's consumer.
    ///
    /// # Errors
    /// When `name` is not a service or its binary cannot start.
    pub fn add_replica(&mut self, name: &str) -> anyhow::Result<()> {
        let name = SERVICES
            .iter()
            .copied()
            .find(|s| *s == name)
            .with_context(|| format!("no service {name}"))?;
        self.services.push(Service {
            name,
            child: None,
            restarts: 0,
        });
        self.spawn(self.services.len() - 1)
    }

    /// How a client connects to this stack's server as `user` (its password from its file on
    /// the least-privilege server; no user on an open one or a server given by URL).
    pub fn settings(&self, user: &str) -> NatsSettings {
        let mut s = NatsSettings {
            url: self.url.clone(),
            connect_timeout_secs: 30,
            ..Default::default()
        };
        if let Some(c) = &self.credentials {
            s.user = Some(user.to_string());
            s.password_file = Some(c.password_file(user));
        }
        s
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.services[i].name;
        // Each service as its own user, its password read from its file.
        let user = self.credentials.as_ref().map(|c| {
            let user = credentials::nats_user_of(name);
            [
                ("SLIPWAY__NATS__USER".to_string(), user.to_string()),
                (
                    "SLIPWAY__NATS__PASSWORD_FILE".to_string(),
                    c.password_file(user).display().to_string(),
                ),
            ]
        });
        let child = Command::new(self.bin_dir.join(name))
            .envs(self.env.iter().cloned())
            .envs(user.into_iter().flatten())
            .stdin(Stdio::null())
            // Own process group: a terminal's Ctrl-C goes to `up`, which stops each service
            // with one SIGTERM (a second signal would make it exit without draining).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.services[i].child = Some(child);
        Ok(())
    }

    /// Restarts services that exited (with a growing delay), until `stop`.
    pub async fn supervise_once(&mut self) -> anyhow::Result<()> {
        for i in 0..self.services.len() {
            let exited = match self.services[i].child.as_mut() {
                Some(c) => c.try_wait()?.map(|s| s.to_string()),
                None => Some("not running".into()),
            };
            if let Some(status) = exited {
                let s = &mut self.services[i];
                s.restarts += 1;
                if s.restarts > self.max_restarts {
                    bail!(
                        "{} keeps exiting ({status}); giving up after {} restarts",
                        s.name,
                        self.max_restarts
                    );
                }
                let delay = if self.max_restarts == u32::MAX {
                    Duration::from_millis(100)
                } else {
                    Duration::from_millis(500 * u64::from(s.restarts.min(10)))
                };
                eprintln!(
                    "{} exited ({status}); restarting in {:.1}s",
                    s.name,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// SIGKILL to the nats-server this stack started, then the same server on the same store.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart_nats(&mut self) -> anyhow::Result<()> {
        match self.nats.as_mut() {
            Some(n) => n.restart().map_err(anyhow::Error::msg),
            None => bail!("this stack did not start its nats-server"),
        }
    }

    /// Stops every process of service `name` as [`Stack::stop`] does (SIGTERM, then SIGKILL
    /// after a grace period) and waits for each to end.
    ///
    /// # Errors
    /// When `name` is not a service of this stack.
    pub async fn stop_service(&mut self, name: &str) -> anyhow::Result<()> {
        let mut found = false;
        for s in self.services.iter_mut().filter(|s| s.name == name) {
            found = true;
            let Some(mut c) = s.child.take() else {
                continue;
            };
            if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
        anyhow::ensure!(found, "no service {name} in this stack");
        Ok(())
    }

    /// Starts again every process of service `name` that is not running.
    ///
    /// # Errors
    /// When its binary cannot start.
    pub fn spawn_service(&mut self, name: &str) -> anyhow::Result<()> {
        for i in 0..self.services.len() {
            if self.services[i].name == name && self.services[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// The names of this stack's services.
    pub fn service_names(&self) -> Vec<&'static str> {
        self.services.iter().map(|s| s.name).collect()
    }

    /// `(service, pid)` of every running service.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.services
            .iter()
            .filter_map(|s| Some((s.name, s.child.as_ref()?.id()?)))
            .collect()
    }

    /// `("nats-server", pid)` when this stack started its own server.
    pub fn nats_pid(&self) -> Option<(&'static str, u32)> {
        Some(("nats-server", self.nats.as_ref()?.pid()?))
    }

    /// SIGTERM every service, wait for them to drain, then stop nats-server.
    pub async fn stop(mut self) {
        for s in &self.services {
            if let Some(pid) = s.child.as_ref().and_then(Child::id)
                && let Ok(pid) = i32::try_from(pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for s in &mut self.services {
            if let Some(mut c) = s.child.take()
                && tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err()
            {
                let _ = c.kill().await;
            }
        }
        if let Some(mut n) = self.nats.take() {
            n.stop();
        }
    }
}

/// When the configuration names no approval keys, a key pair kept in the data directory (the
/// seed readable by its owner only): the gateway signs with it, the deployer verifies.
fn approval_keys(
    data_dir: &Path,
    loaded: &slipway_core::config::Config,
) -> anyhow::Result<Vec<(String, String)>> {
    if loaded.approvals.public_key.is_some()
        || loaded.gateway.signing_key.is_some()
        || loaded.gateway.signing_key_file.is_some()
    {
        return Ok(Vec::new());
    }
    let seed_path = data_dir.join("approval-signing.key");
    let seed = match std::fs::read_to_string(&seed_path) {
        Ok(s) => s,
        Err(_) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let (seed, _) = slipway_domain::signing::SigningKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&seed_path)
                .with_context(|| format!("cannot write {}", seed_path.display()))?;
            f.write_all(seed.as_bytes())?;
            seed
        }
    };
    let key = slipway_domain::signing::SigningKey::from_base64(&seed)
        .map_err(|e| anyhow::anyhow!("{}: {e}", seed_path.display()))?;
    Ok(vec![
        (
            "SLIPWAY__GATEWAY__SIGNING_KEY_FILE".into(),
            seed_path.display().to_string(),
        ),
        ("SLIPWAY__APPROVALS__PUBLIC_KEY".into(), key.public_base64()),
    ])
}

/// How people and tools connect to a least-privilege server `up` started.
pub fn connect_hint(url: &str, c: &Credentials, data_dir: &Path) -> String {
    let here = std::fs::canonicalize(".slipway").ok();
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let cli = if here.as_deref() == Some(data.as_path()) {
        "slipway commands run from this directory connect as the `cli` user by themselves; \
         from elsewhere"
            .to_string()
    } else {
        "slipway commands connect as the `cli` user".to_string()
    };
    format!(
        "NATS lets in only Slipway's least-privilege users; their passwords are in {dir} \
         (readable by you alone).\n  {cli} with SLIPWAY_DATA_DIR={data}\n  \
         as an operator (every permission): nats --server {url} --user admin --password \"$(cat {admin})\"",
        dir = c.dir().display(),
        data = data.display(),
        admin = c.password_file("admin").display(),
    )
}

/// When the configuration gives the gateway no `public_url`, its listen address as one, so
/// that every service's spans link runs to the gateway this stack starts (not for an address
/// that listens on every interface, whose name for people this cannot know).
fn gateway_url(g: &slipway_core::config::GatewaySettings) -> Option<(String, String)> {
    if g.public_url.is_some() || g.listen.starts_with("0.0.0.0") || g.listen.starts_with("[::]") {
        return None;
    }
    let scheme = if g.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    Some((
        "SLIPWAY__GATEWAY__PUBLIC_URL".into(),
        format!("{scheme}://{}", g.listen),
    ))
}

pub fn absolute_file(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{} does not exist", p.display()))
}

/// The first SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `slipway up`.
pub async fn up(
    url: Option<String>,
    config: Option<PathBuf>,
    port: u16,
    data_dir: PathBuf,
    access: Access,
) -> anyhow::Result<ExitCode> {
    let mut stack = Stack::start_env(
        url,
        port,
        &data_dir,
        config.as_deref(),
        false,
        Vec::new(),
        access,
    )
    .await?;
    eprintln!(
        "Slipway is up: NATS at {}; services: {}. Ctrl-C stops everything.",
        stack.url,
        SERVICES.join(", ")
    );
    match &stack.credentials {
        Some(c) => eprintln!("{}", connect_hint(&stack.url, c, &data_dir)),
        None if stack.nats.is_some() => eprintln!(
            "NATS is open to every local process (--insecure): any of them can read the log, \
             publish any fact or delete it."
        ),
        None => {}
    }
    let stop = signal();
    tokio::pin!(stop);
    let outcome = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Err(e) = stack.supervise_once().await {
                    break Err(e);
                }
            }
        }
    };
    eprintln!("Stopping Slipway…");
    stack.stop().await;
    outcome.map(|()| ExitCode::SUCCESS)
}
