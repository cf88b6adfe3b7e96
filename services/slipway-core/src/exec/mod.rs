//! Running a spec's command: argument vector (never a shell string built from event data),
//! a clean environment from an allow-list, a timeout, cancellation, and the combined output in
//! a log file. The command runs in its own process group so a timeout kills everything it
//! started.

pub mod server;
pub mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// What every command run by a worker may see of the service's environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// Where fresh workspaces are made; default: the system's temporary directory.
    pub workspace_root: Option<PathBuf>,
    /// Variables passed through from the service's environment (all others are cleared).
    pub pass_env: Vec<String>,
    /// Git URL schemes a change may use; `file` is off by default (it reads local paths).
    pub git_schemes: Vec<String>,
    /// Keep workspaces after the job (for debugging).
    pub keep_workspaces: bool,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            workspace_root: None,
            pass_env: vec!["PATH".into(), "LANG".into(), "LC_ALL".into(), "TZ".into()],
            git_schemes: vec!["https".into(), "http".into(), "ssh".into(), "git".into()],
            keep_workspaces: false,
        }
    }
}

impl ExecSettings {
    pub fn workspace_root(&self) -> PathBuf {
        self.workspace_root
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("slipway-work"))
    }

    /// The base environment: allow-listed variables plus `HOME`/`TMPDIR` inside the workspace.
    pub fn base_env(&self, home: &Path) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for k in &self.pass_env {
            if let Ok(v) = std::env::var(k) {
                env.insert(k.clone(), v);
            }
        }
        env.entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        env.insert("HOME".into(), home.display().to_string());
        env.insert("TMPDIR".into(), home.display().to_string());
        env
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut,
    Cancelled,
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            _ => None,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::TimedOut => write!(f, "timed out"),
            Exit::Cancelled => write!(f, "cancelled"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub exit: Exit,
    pub duration: Duration,
}

/// A command to run.
#[derive(Debug, Clone)]
pub struct Cmd<'a> {
    pub argv: &'a [String],
    pub cwd: &'a Path,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Output (stdout and stderr, interleaved) is appended here.
    pub log: &'a Path,
}

/// Why a command could not even start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("empty command")]
    Empty,
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open the log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs a command to its end, its timeout or `cancel`.
///
/// # Errors
/// [`ExecError`] when the command cannot start (a missing program is a domain failure the
/// caller reports as the stage's failure).
pub async fn run(cmd: Cmd<'_>, cancel: &CancellationToken) -> Result<Outcome, ExecError> {
    let program = cmd.argv.first().ok_or(ExecError::Empty)?;
    // A relative program path is the workspace's, not the service's working directory. A bare
    // name is looked up in the command's PATH here: handed a bare name and a PATH of its own,
    // the standard library forks the whole service to search in the child, where with a path
    // it spawns without copying the service's memory (posix_spawn).
    // Absolute, since the child resolves the path after changing to its working directory.
    let cwd = std::path::absolute(cmd.cwd).unwrap_or_else(|_| cmd.cwd.to_path_buf());
    let program_path = if program.contains('/') {
        cwd.join(program)
    } else {
        cmd.env
            .get("PATH")
            .and_then(|path| find_in_path(program, path, &cwd))
            .unwrap_or_else(|| PathBuf::from(program))
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cmd.log)
        .map_err(|source| ExecError::Log {
            path: cmd.log.to_path_buf(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| ExecError::Log {
        path: cmd.log.to_path_buf(),
        source,
    })?;
    let command = |path: &Path, args: &[&std::ffi::OsStr]| -> std::io::Result<_> {
        let mut c = tokio::process::Command::new(path);
        c
            // The program sees its name as the spec wrote it, whatever path it was found at.
            .arg0(program)
            .args(args)
            .current_dir(&cwd)
            .env_clear()
            .envs(&cmd.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log_err.try_clone()?))
            .process_group(0)
            .kill_on_drop(true);
        Ok(c)
    };
    let args: Vec<&std::ffi::OsStr> = cmd.argv[1..].iter().map(|a| a.as_ref()).collect();
    let started = Instant::now();
    let spawn_error = |source| ExecError::Spawn {
        program: program.clone(),
        source,
    };
    let spawned = command(&program_path, &args).and_then(|mut c| c.spawn());
    let mut child = match spawned {
        // An executable without a `#!` line: `execvp` runs it with the shell, and so do we.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOEXEC) => {
            let with_script: Vec<&std::ffi::OsStr> = std::iter::once(program_path.as_os_str())
                .chain(args.iter().copied())
                .collect();
            command(Path::new("/bin/sh"), &with_script)
                .and_then(|mut c| c.spawn())
                .map_err(spawn_error)?
        }
        other => other.map_err(spawn_error)?,
    };
    let pid = child.id();
    let exit = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                }
            }
            Err(_) => Exit::Code(-1),
        },
        _ = tokio::time::sleep(cmd.timeout) => Exit::TimedOut,
        _ = cancel.cancelled() => Exit::Cancelled,
    };
    if matches!(exit, Exit::TimedOut | Exit::Cancelled) {
        kill_group(pid);
        let _ = child.kill().await;
    } else {
        // Leftover background processes of a finished command must not outlive the job.
        kill_group(pid);
    }
    Ok(Outcome {
        exit,
        duration: started.elapsed(),
    })
}

/// The first file named `program` in `path` (`:`-separated; an empty or relative entry is
/// relative to `cwd`, where the command runs) that this process may execute, as `execvp`
/// would find it.
fn find_in_path(program: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    use nix::unistd::{AccessFlags, access};
    path.split(':').find_map(|dir| {
        let candidate = cwd.join(dir).join(program);
        let is_file = std::fs::metadata(&candidate).ok()?.is_file();
        (is_file && access(&candidate, AccessFlags::X_OK).is_ok()).then_some(candidate)
    })
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// [`run`] inside a `command` span of the stage attempt (`process.*` attributes, failed
/// unless the command exits 0).
///
/// # Errors
/// As [`run`].
pub async fn run_in(
    scope: &crate::telemetry::otel::StageScope,
    cmd: Cmd<'_>,
    cancel: &CancellationToken,
) -> Result<Outcome, ExecError> {
    let mut span = scope.span("command");
    if let Some(program) = cmd.argv.first() {
        let name = program.rsplit('/').next().unwrap_or(program);
        span.attr("process.executable.name", name.to_string());
    }
    let outcome = run(cmd, cancel).await;
    match &outcome {
        Ok(o) => {
            if let Some(code) = o.exit.code() {
                span.attr("process.exit.code", i64::from(code));
            }
            if !o.exit.success() {
                let kind = match o.exit {
                    Exit::TimedOut => "timeout",
                    Exit::Cancelled => "cancelled",
                    _ => "command_failed",
                };
                span.fail(kind, o.exit.to_string());
            }
        }
        Err(e) => span.fail("command_not_started", e.to_string()),
    }
    outcome
}

/// The last `max_lines` lines of a log (at most 8 KiB), for a failure's reason.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(8192);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(max_lines);
    lines[from..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn runs_with_clean_env_and_captures_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let settings = ExecSettings::default();
        let mut env = settings.base_env(dir.path());
        env.insert("GREETING".into(), "hi; rm -rf /".into());
        // SAFETY of the test: a variable the child must not see.
        let a = argv(&[
            "sh",
            "-c",
            "echo \"$GREETING\"; echo ${SECRET_TOKEN:-unset}; exit 3",
        ]);
        let out = run(
            Cmd {
                argv: &a,
                cwd: dir.path(),
                env,
                timeout: Duration::from_secs(10),
                log: &log,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "hi; rm -rf /\nunset\n");
    }

    #[tokio::test]
    async fn a_bare_name_is_found_in_the_commands_path_skipping_what_is_not_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        for (bin, mode) in [("bin1", 0o644), ("bin2", 0o755)] {
            std::fs::create_dir(dir.path().join(bin)).unwrap();
            let tool = dir.path().join(bin).join("slipway-test-tool");
            std::fs::write(&tool, format!("#!/bin/sh\necho {bin}\n")).unwrap();
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let mut env = ExecSettings::default().base_env(dir.path());
        // Relative entries are the workspace's; the service's own PATH has neither.
        env.insert("PATH".into(), "bin1:bin2:/usr/bin:/bin".into());
        let a = argv(&["slipway-test-tool"]);
        let cmd = Cmd {
            argv: &a,
            cwd: dir.path(),
            env,
            timeout: Duration::from_secs(10),
            log: &log,
        };
        let out = run(cmd.clone(), &CancellationToken::new()).await.unwrap();
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "bin2\n");

        // Its name as written, not the path it was found at.
        let own = argv(&["sh", "-c", "head -c 3 /proc/$$/cmdline > argv0"]);
        let out = run(
            Cmd {
                argv: &own,
                ..cmd.clone()
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(std::fs::read(dir.path().join("argv0")).unwrap(), b"sh\0");

        // An executable with no `#!` line runs with the shell, as `execvp` runs it.
        let plain = dir.path().join("bin2").join("slipway-plain-script");
        std::fs::write(&plain, "echo plain > plain.out\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = argv(&["slipway-plain-script"]);
        let out = run(
            Cmd {
                argv: &script,
                ..cmd.clone()
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("plain.out")).unwrap(),
            "plain\n"
        );

        let missing = argv(&["slipway-no-such-tool"]);
        let err = run(
            Cmd {
                argv: &missing,
                ..cmd
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("slipway-no-such-tool"), "{err}");
    }

    #[test]
    fn an_empty_path_entry_is_the_working_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_in_path("tool", "/nonexistent:", dir.path()),
            Some(tool)
        );
        assert_eq!(find_in_path("tool", "/nonexistent", dir.path()), None);
        assert_eq!(
            find_in_path("sh", "/usr/bin:/bin", dir.path())
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let a = argv(&["sh", "-c", "sleep 30 & sleep 30"]);
        let out = run(
            Cmd {
                argv: &a,
                cwd: dir.path(),
                env: ExecSettings::default().base_env(dir.path()),
                timeout: Duration::from_millis(200),
                log: &log,
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.exit, Exit::TimedOut);
        assert!(out.duration < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_program_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = argv(&["./no-such-program"]);
        let err = run(
            Cmd {
                argv: &a,
                cwd: dir.path(),
                env: BTreeMap::new(),
                timeout: Duration::from_secs(1),
                log: &dir.path().join("log"),
            },
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no-such-program"));
    }
}
