//! `slipway up` and `slipway demo`: every service as a child process, and a local nats-server
//! when no NATS URL is given.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use slipway_core::bus::NatsSettings;
use slipway_core::config::credentials::{self, Credentials};
use slipway_core::exec::server::{NatsProcess, find_nats_server};
use tokio::process::{Child, Command};

/// The services `up` starts, by binary name.
pub const SERVICES: &[&str] = &slipway_domain::service::Service::BINARIES;

/// Services are stopped with SIGTERM and get this long to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(35);

/// The first restart's delay; each quick exit in a row doubles it, up to the stack's cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// The longest delay between restarts by default: a process is never given up on.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A process that ran this long before it exited is restarted at once again, its backoff reset
/// (systemd's start-rate limit, without its giving up).
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// This many exits within [`CRASH_LOOP_WINDOW`] and a process is reported as crash-looping.
const CRASH_LOOP_EXITS: usize = 5;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);

/// How `up` keeps one process running: its restarts, its backoff, its last exit.
#[derive(Debug, Clone, Default)]
pub struct Restarts {
    /// Restarts over `up`'s life.
    pub total: u64,
    /// Quick exits in a row: the backoff's exponent.
    streak: u32,
    started: Option<Instant>,
    /// When it is started again, after an exit.
    next: Option<Instant>,
    /// How it last ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub last_exit: Option<String>,
    exits: std::collections::VecDeque<Instant>,
    /// Set while it exits too often ([`CRASH_LOOP_EXITS`] within [`CRASH_LOOP_WINDOW`]).
    pub crash_looping: bool,
}

impl Restarts {
    fn started(&mut self, now: Instant) {
        self.started = Some(now);
        self.next = None;
    }

    /// Records an exit at `now` and schedules the next start; returns the delay, and whether the
    /// process has just begun to crash-loop.
    fn exited(&mut self, status: String, now: Instant, cap: Duration) -> (Duration, bool) {
        let ran = self.started.map_or(Duration::ZERO, |s| now - s);
        if ran >= STABLE_AFTER {
            self.streak = 0;
        }
        self.streak = self.streak.saturating_add(1);
        let delay = BACKOFF_FIRST
            .saturating_mul(1 << (self.streak - 1).min(16))
            .min(cap);
        self.total += 1;
        self.last_exit = Some(status);
        self.started = None;
        self.next = Some(now + delay);
        self.exits.push_back(now);
        while self
            .exits
            .front()
            .is_some_and(|t| now - *t > CRASH_LOOP_WINDOW)
        {
            self.exits.pop_front();
        }
        let looping = self.exits.len() >= CRASH_LOOP_EXITS;
        let began = looping && !self.crash_looping;
        self.crash_looping = looping;
        (delay, began)
    }

    /// Whether it is due to start again at `now`.
    fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| t <= now)
    }

    /// Forgets a crash loop once the process has run a stable while.
    fn settle(&mut self, now: Instant) {
        if self.crash_looping && self.started.is_some_and(|s| now - s >= STABLE_AFTER) {
            self.crash_looping = false;
            self.exits.clear();
        }
    }
}

struct Service {
    name: &'static str,
    child: Option<Child>,
    restarts: Restarts,
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
    /// The longest delay between two restarts of a process (`slipway soak`, which kills on
    /// purpose, wants them quick).
    pub backoff_cap: Duration,
    nats_restarts: Restarts,
    /// Whether the nats-server has listened since its last start (it is announced once).
    nats_listening: bool,
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
                let (p, credentials) = own_server(&data_dir, port, access)?;
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
            // Every service answers /livez and /readyz on a port of its own, which its
            // heartbeat names (`slipway services`).
            (
                "SLIPWAY__HEALTH__LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
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
                    restarts: Restarts::default(),
                })
                .collect(),
            env,
            bin_dir,
            backoff_cap: BACKOFF_CAP,
            nats_restarts: Restarts::default(),
            nats_listening: true,
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
            restarts: Restarts::default(),
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
        // A process started again learns how often, and how its last run ended (its heartbeat
        // says so).
        let restarted = &self.services[i].restarts;
        let history = (restarted.total > 0).then(|| {
            [
                (
                    slipway_core::health::RESTARTS_ENV.to_string(),
                    restarted.total.to_string(),
                ),
                (
                    slipway_core::health::LAST_EXIT_ENV.to_string(),
                    restarted.last_exit.clone().unwrap_or_default(),
                ),
            ]
        });
        let child = Command::new(self.bin_dir.join(name))
            .envs(self.env.iter().cloned())
            .envs(user.into_iter().flatten())
            .envs(history.into_iter().flatten())
            .stdin(Stdio::null())
            // Own process group: a terminal's Ctrl-C goes to `up`, which stops each service
            // with one SIGTERM (a second signal would make it exit without draining).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.services[i].child = Some(child);
        self.services[i].restarts.started(Instant::now());
        Ok(())
    }

    /// Restarts what exited: each service, and the nats-server this stack started (on its
    /// store; the services reconnect by themselves). Never gives up: a process that exits again
    /// soon waits longer, up to `backoff_cap`, and one that exits often is reported as
    /// crash-looping, loudly, while the others go on. Returns at once; call it again.
    pub fn supervise_once(&mut self) {
        let now = Instant::now();
        if let Some(n) = self.nats.as_mut() {
            if let Some(status) = n.exited() {
                let (delay, began) =
                    self.nats_restarts
                        .exited(status.clone(), now, self.backoff_cap);
                eprintln!(
                    "nats-server exited ({status}); restarting it on its store in {:.1}s",
                    delay.as_secs_f64()
                );
                if began {
                    eprintln!(
                        "slipway up: nats-server is crash-looping: {CRASH_LOOP_EXITS} exits within {}s (last: {status}); still restarting it",
                        CRASH_LOOP_WINDOW.as_secs()
                    );
                }
            }
            if self.nats_restarts.due(now) {
                // Not waited for: the server listens once it has recovered its store, which can
                // take long, and the services go on being supervised meanwhile.
                match n.launch_again() {
                    Ok(()) => {
                        self.nats_restarts.started(now);
                        self.nats_listening = false;
                        eprintln!("nats-server starting again on its store");
                    }
                    Err(e) => {
                        let (delay, _) =
                            self.nats_restarts.exited(e.clone(), now, self.backoff_cap);
                        eprintln!(
                            "nats-server did not start again ({e}); next try in {:.1}s",
                            delay.as_secs_f64()
                        );
                    }
                }
            }
            if !self.nats_listening && n.pid().is_some() && n.listening() {
                self.nats_listening = true;
                eprintln!("nats-server is back at {}", n.url());
            }
            self.nats_restarts.settle(now);
        }
        for i in 0..self.services.len() {
            let exited = match self.services[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(status)) => status.map(|s| s.to_string()),
                // Not a reason to stop the others: asked again on the next turn.
                Some(Err(e)) => {
                    eprintln!(
                        "slipway up: cannot read {}'s status: {e}",
                        self.services[i].name
                    );
                    None
                }
                None => None,
            };
            let cap = self.backoff_cap;
            let s = &mut self.services[i];
            if let Some(status) = exited {
                s.child = None;
                let (delay, began) = s.restarts.exited(status.clone(), now, cap);
                eprintln!(
                    "{} exited ({status}); restarting in {:.1}s",
                    s.name,
                    delay.as_secs_f64()
                );
                if began {
                    eprintln!(
                        "slipway up: {} is crash-looping: {CRASH_LOOP_EXITS} exits within {}s (last: {status}); still restarting it, the other services go on",
                        s.name,
                        CRASH_LOOP_WINDOW.as_secs()
                    );
                }
            }
            if s.child.is_none()
                && s.restarts.due(now)
                && let Err(e) = self.spawn(i)
            {
                let s = &mut self.services[i];
                let (delay, _) = s.restarts.exited(format!("{e:#}"), now, cap);
                eprintln!("{e:#}; next try in {:.1}s", delay.as_secs_f64());
            }
            self.services[i].restarts.settle(now);
        }
    }

    /// What this `up` keeps running, as it writes it to the heartbeat bucket.
    pub fn supervision(&self) -> slipway_core::health::Supervision {
        let mut processes: Vec<slipway_core::health::Supervised> = self
            .services
            .iter()
            .map(|s| slipway_core::health::Supervised {
                name: s.name.to_string(),
                running: s.child.is_some(),
                pid: s.child.as_ref().and_then(Child::id),
                restarts: s.restarts.total,
                last_exit: s.restarts.last_exit.clone(),
                crash_looping: s.restarts.crash_looping,
            })
            .collect();
        if let Some(n) = &self.nats {
            processes.push(slipway_core::health::Supervised {
                name: "nats-server".into(),
                running: n.pid().is_some(),
                pid: n.pid(),
                restarts: self.nats_restarts.total,
                last_exit: self.nats_restarts.last_exit.clone(),
                crash_looping: self.nats_restarts.crash_looping,
            });
        }
        slipway_core::health::Supervision {
            host: slipway_core::health::host_name(),
            pid: std::process::id(),
            at: chrono::Utc::now(),
            processes,
        }
    }

    /// SIGKILL to the nats-server this stack started, then the same server on the same store.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart_nats(&mut self) -> anyhow::Result<()> {
        match self.nats.as_mut() {
            Some(n) => {
                n.restart().map_err(anyhow::Error::msg)?;
                self.nats_restarts.started(Instant::now());
                Ok(())
            }
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

/// `up` runs for months: its server's log (`nats/nats-server.log`) rotates at 10 MB and keeps
/// three files in all.
const SERVER_LOG_LIMITS: &str =
    "\n# slipway up: the log rotates\nlogfile_size_limit: 10MB\nlogfile_max_num: 3\n";

/// The nats-server `up` runs on a data directory: its store under `nats/`, and (least
/// privilege) its users' passwords kept in the directory.
///
/// # Errors
/// When no suitable nats-server is found, the passwords cannot be kept, or it does not start.
pub fn own_server(
    data_dir: &Path,
    port: u16,
    access: Access,
) -> anyhow::Result<(NatsProcess, Option<Credentials>)> {
    let binary = find_nats_server(&[]).map_err(anyhow::Error::msg)?;
    let store = data_dir.join("nats");
    let conf = data_dir.join("nats-server.conf");
    let (env, credentials) = match access {
        Access::Open => {
            std::fs::write(&conf, SERVER_LOG_LIMITS)
                .with_context(|| format!("cannot write {}", conf.display()))?;
            (Vec::new(), None)
        }
        Access::LeastPrivilege => {
            let dir = credentials::directory(data_dir);
            let c = Credentials::load_or_create(&dir)
                .with_context(|| format!("cannot keep the NATS passwords in {}", dir.display()))?;
            Credentials::write_server_config(&conf)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(&conf)?
                        .write_all(SERVER_LOG_LIMITS.as_bytes())
                })
                .with_context(|| format!("cannot write {}", conf.display()))?;
            (c.server_env(), Some(c))
        }
    };
    let args = vec!["-c".to_string(), conf.display().to_string()];
    let p = NatsProcess::spawn(&binary, port, &store, &args, &env).map_err(anyhow::Error::msg)?;
    eprintln!(
        "nats-server {} listening at {} (data in {})",
        binary.display(),
        p.url(),
        store.display()
    );
    Ok((p, credentials))
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
    // What `up` keeps running goes to the heartbeat bucket (restarts, exits, crash loops), for
    // the gateway's /healthz, /metrics and /v1/services; written by a task of its own, so a
    // NATS that is down never holds up a restart (of NATS itself, say).
    let (report, reports) = tokio::sync::watch::channel(stack.supervision());
    let reporter = tokio::spawn(report_supervision(stack.settings("admin"), reports));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                stack.supervise_once();
                let _ = report.send(stack.supervision());
            }
        }
    }
    reporter.abort();
    eprintln!("Stopping Slipway…");
    stack.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Writes what `up` keeps running to the heartbeat bucket every few seconds, connecting (and
/// reconnecting) as it can.
async fn report_supervision(
    settings: NatsSettings,
    mut reports: tokio::sync::watch::Receiver<slipway_core::health::Supervision>,
) {
    let mut bus = None;
    loop {
        if bus.is_none() {
            bus = slipway_core::bus::Bus::connect(&settings, "slipway-up")
                .await
                .ok();
        }
        if let Some(b) = &bus {
            let now = reports.borrow_and_update().clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                slipway_core::health::put_supervision(b, &now),
            )
            .await;
        }
        tokio::time::sleep(slipway_core::health::HEARTBEAT_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(5);

    #[test]
    fn quick_exits_double_the_backoff_up_to_the_cap() {
        let mut r = Restarts::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            r.started(now);
            now += Duration::from_millis(100);
            let (delay, _) = r.exited("signal: 9 (SIGKILL)".into(), now, CAP);
            delays.push(delay.as_millis());
            assert!(!r.due(now + delay - Duration::from_millis(1)));
            assert!(r.due(now + delay));
            now += delay;
        }
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(r.total, 8);
        assert_eq!(r.last_exit.as_deref(), Some("signal: 9 (SIGKILL)"));
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let mut r = Restarts::default();
        let mut now = Instant::now();
        for _ in 0..5 {
            r.started(now);
            now += Duration::from_millis(100);
            let (delay, _) = r.exited("exit status: 1".into(), now, CAP);
            now += delay;
        }
        // Just short of stable: the streak goes on.
        r.started(now);
        now += STABLE_AFTER - Duration::from_millis(1);
        assert_eq!(r.exited("exit status: 1".into(), now, CAP).0, CAP);
        // A stable run: back to the first delay.
        r.started(now);
        now += STABLE_AFTER;
        assert_eq!(r.exited("exit status: 1".into(), now, CAP).0, BACKOFF_FIRST);
    }

    #[test]
    fn a_crash_loop_is_reported_once_and_forgotten_after_a_stable_run() {
        let mut r = Restarts::default();
        let mut now = Instant::now();
        let mut began = Vec::new();
        for _ in 0..CRASH_LOOP_EXITS + 2 {
            r.started(now);
            now += Duration::from_millis(100);
            began.push(r.exited("exit status: 101".into(), now, CAP).1);
            now += Duration::from_secs(1);
        }
        // Reported when the fifth exit within the window came, not again after.
        let mut expected = vec![false; CRASH_LOOP_EXITS + 2];
        expected[CRASH_LOOP_EXITS - 1] = true;
        assert_eq!(began, expected);
        assert!(r.crash_looping);
        r.started(now);
        r.settle(now + STABLE_AFTER - Duration::from_millis(1));
        assert!(r.crash_looping, "not yet stable");
        r.settle(now + STABLE_AFTER);
        assert!(!r.crash_looping);
        // Exits spread wider than the window never make a loop.
        let mut r = Restarts::default();
        let mut now = Instant::now();
        for _ in 0..10 {
            r.started(now);
            now += CRASH_LOOP_WINDOW / 3;
            assert!(!r.exited("exit status: 1".into(), now, CAP).1);
        }
        assert!(!r.crash_looping);
    }
}
