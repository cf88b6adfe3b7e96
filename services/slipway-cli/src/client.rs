//! The commands that talk to a running Slipway: submit, status, events, watch, replay,
//! changes, cancel, rerun.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use slipway_core::bus::{AppendError, Bus, NatsSettings};
use slipway_domain::decide::run_ended;
use slipway_domain::events::{ChangeSubmitted, EventData, RunEnded, SourceRef};
use slipway_domain::{Event, Phase, Run, cdevents, ids, subjects};

use crate::out::outln;
use crate::show;

/// How long `watch` waits for a run that does not exist yet (just submitted).
const RUN_APPEARS_WITHIN_SECS: u64 = 30;

/// CloudEvents `source` of changes and decisions made with the CLI.
pub const SOURCE: &str = "/slipway/cli";

pub struct Client {
    bus: Bus,
}

fn user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn check_run_id(run: &str) -> anyhow::Result<()> {
    if ids::is_valid_run_id(run) {
        Ok(())
    } else {
        bail!("{run:?} is not a run id (letters, digits, '-' and '_')")
    }
}

/// [`settings`] as the server's `admin` user (backups need every stream's snapshot).
fn admin_settings(url: &str) -> NatsSettings {
    let mut s = settings(url);
    if s.user.is_some() {
        let data =
            std::env::var_os("SLIPWAY_DATA_DIR").map_or_else(|| ".slipway".into(), PathBuf::from);
        let file = slipway_core::config::credentials::password_file(
            &slipway_core::config::credentials::directory(&data),
            "admin",
        );
        // Without the file here, the URL's own credentials (or none) are used.
        let here = file.exists();
        s.user = here.then(|| "admin".into());
        s.password_file = here.then_some(file);
    }
    s.connect_timeout_secs = 10;
    s
}

fn print_manifest(
    m: &slipway_core::store::backup::Manifest,
    verb: &str,
    dir: &Path,
    json_out: bool,
) {
    if json_out {
        outln!("{}", serde_json::to_string_pretty(m).expect("serialises"));
        return;
    }
    for s in &m.streams {
        outln!(
            "{verb} {:<28} {:>8} messages, sequences {}..{}, {} bytes",
            s.name,
            s.messages,
            s.first_seq,
            s.last_seq,
            s.bytes
        );
    }
    outln!("{} streams {verb} {}", m.streams.len(), dir.display());
}

/// `slipway backup DIR`.
pub async fn backup(url: &str, dir: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    let bus = Bus::connect(&admin_settings(url), "slipway-backup").await?;
    let m = slipway_core::store::backup::backup(&bus, dir).await?;
    print_manifest(&m, "backed up into", dir, json_out);
    Ok(ExitCode::SUCCESS)
}

/// `slipway restore DIR`.
pub async fn restore(url: &str, dir: &Path, json_out: bool) -> anyhow::Result<ExitCode> {
    restore_with(&admin_settings(url), dir, json_out).await
}

/// `slipway restore DIR` connecting with `settings`.
pub async fn restore_with(
    settings: &NatsSettings,
    dir: &Path,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let bus = Bus::connect(settings, "slipway-restore").await?;
    let m = slipway_core::store::backup::restore(&bus, dir).await?;
    print_manifest(&m, "restored from", dir, json_out);
    Ok(ExitCode::SUCCESS)
}

/// Exit code for a run's phase: 0 when it succeeded or waits for approval.
fn exit_for(phase: Phase) -> ExitCode {
    match phase {
        Phase::Succeeded | Phase::AwaitingApproval => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// How people's commands connect to `url`: as the user it names, else, on this host, as the
/// `cli` user of the server `slipway up` started, whose password `up` keeps in
/// `$SLIPWAY_DATA_DIR/credentials` (default `.slipway`). That password never goes to another
/// host.
pub fn settings(url: &str) -> NatsSettings {
    let data =
        std::env::var_os("SLIPWAY_DATA_DIR").map_or_else(|| ".slipway".into(), PathBuf::from);
    let local = url.split(',').all(|u| {
        let host = u.trim().split_once("://").map_or(u.trim(), |(_, h)| h);
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !port.ends_with(']') => name,
            _ => host,
        };
        matches!(name, "127.0.0.1" | "localhost" | "[::1]")
    });
    NatsSettings {
        url: url.to_string(),
        connect_timeout_secs: 5,
        user: local.then(|| "cli".to_string()),
        password_file: local.then(|| {
            slipway_core::config::credentials::password_file(
                &slipway_core::config::credentials::directory(&data),
                "cli",
            )
        }),
        ..Default::default()
    }
}

impl Client {
    /// Connects with `settings`; a password file that does not exist (yet: `up` may be
    /// writing it as this starts) is looked for again at each attempt, connecting as nobody
    /// meanwhile, as an open server (`up --insecure`) wants.
    pub async fn connect(settings: &NatsSettings) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(settings.connect_timeout_secs.max(1));
        let bus = loop {
            let missing = settings.password_file.as_ref().filter(|p| !p.exists());
            let mut attempt = settings.clone();
            if missing.is_some() {
                attempt.user = None;
                attempt.password_file = None;
                attempt.connect_timeout_secs = 1;
            }
            match Bus::connect(&attempt, "slipway-cli").await {
                Ok(bus) => break bus,
                Err(_) if missing.is_some() && Instant::now() < deadline => {}
                Err(e) => match missing {
                    Some(p) => anyhow::bail!(
                        "{e} (as nobody: the cli user's password file {} does not exist; \
                         `slipway up` writes it, SLIPWAY_DATA_DIR says where)",
                        p.display()
                    ),
                    None => return Err(e.into()),
                },
            }
        };
        bus.ensure_stream_exists().await?;
        Ok(Self { bus })
    }

    /// A run folded from the log alone, with its last sequence.
    ///
    /// # Errors
    /// When the log cannot be read, or the run's first event cannot be (naming where it is).
    async fn fold_log(&self, run: &str) -> anyhow::Result<Option<(Run, u64)>> {
        let log = self.bus.run_log(run).await?;
        let last = log.last().map_or(0, |r| r.seq);
        if let Some((seq, why)) = log.iter().find_map(|r| {
            let e = r.event.as_ref().ok()?;
            Some((r.seq, slipway_domain::fold::unreadable(e)?))
        }) {
            bail!("run {run} (stream sequence {seq}): {why}");
        }
        let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
        Ok(Run::replay(&events).map(|r| (r, last)))
    }

    /// The run's state: the conductor's live view, else a fold of the log.
    async fn state(&self, run: &str) -> anyhow::Result<Option<Value>> {
        let query = self
            .bus
            .client()
            .request(subjects::query_run(run), "".into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), query).await
            && let Ok(v) = serde_json::from_slice::<Value>(&reply.payload)
        {
            if v.get("error").is_none() {
                return Ok(Some(v));
            }
            // The conductor does not know the run (yet): the log may.
        } else {
            tracing::debug!("Conductor not answering; reading the run index, then the log.");
            // An ended run's state, as the conductor would answer it.
            if let Ok(index) = slipway_core::store::runs::RunIndex::open(&self.bus).await
                && let Ok(Some(entry)) = index.get(run).await
            {
                return Ok(Some(entry.run));
            }
        }
        Ok(self.fold_log(run).await?.map(|(r, _)| r.to_json()))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn submit(
        &self,
        spec: &Path,
        source: Option<String>,
        revision: Option<String>,
        title: Option<String>,
        wait: bool,
        timeout: u64,
        json_out: bool,
    ) -> anyhow::Result<ExitCode> {
        let change = change_from(spec, source, revision, title)?;
        self.publish_change(change, wait, timeout, json_out).await
    }

    /// Publishes a change; returns its run id and the change's stream sequence.
    pub async fn send_change(&self, change: ChangeSubmitted) -> anyhow::Result<(String, u64)> {
        let event = Event::new(
            ids::random(),
            SOURCE,
            None,
            slipway_core::bus::now(),
            EventData::ChangeSubmitted(change),
        );
        let appended = self.bus.publish(&event).await?;
        Ok((ids::run_id(&event.source, &event.id), appended.seq))
    }

    /// Waits until the run's state satisfies `until`; fails when the change was rejected or
    /// `timeout` passes.
    pub async fn wait_until(
        &self,
        run: &str,
        change_seq: u64,
        timeout: Duration,
        until: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reason) = self.rejection(change_seq).await? {
                bail!("change rejected: {reason}");
            }
            if let Some(state) = self.state(run).await? {
                if until(&state) {
                    return Ok(state);
                }
                if phase_of(&state).is_final() {
                    return Ok(state);
                }
            }
            if Instant::now() > deadline {
                bail!("run {run} did not get there within {}s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A change of the spec at `spec` and its source (a directory, default the spec's own, or a
/// git URL at a revision).
pub fn change_from(
    spec: &Path,
    source: Option<String>,
    revision: Option<String>,
    title: Option<String>,
) -> anyhow::Result<ChangeSubmitted> {
    {
        let text = std::fs::read_to_string(spec)
            .with_context(|| format!("cannot read the spec {}", spec.display()))?;
        let source = match source {
            Some(s) if s.contains("://") => SourceRef::Git {
                url: s,
                revision: revision.unwrap_or_else(|| "HEAD".into()),
            },
            Some(s) => {
                if revision.is_some() {
                    bail!("--revision needs a git URL as --source");
                }
                let p = std::fs::canonicalize(&s)
                    .with_context(|| format!("source directory {s} does not exist"))?;
                SourceRef::Directory {
                    path: p.display().to_string(),
                }
            }
            None => {
                let dir = spec
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let p = std::fs::canonicalize(dir)?;
                SourceRef::Directory {
                    path: p.display().to_string(),
                }
            }
        };
        let commit = match &source {
            SourceRef::Directory { path } => git_commit(Path::new(path)),
            SourceRef::Git { .. } => None,
        };
        Ok(ChangeSubmitted {
            spec: text,
            source,
            author: Some(user()),
            title,
            rerun_of: None,
            commit,
        })
    }
}

/// The commit a source directory is, when it is a git work tree with nothing changed in its
/// tracked files (otherwise what is built is not that commit, and no commit is claimed).
fn git_commit(dir: &Path) -> Option<slipway_domain::events::CommitRef> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let sha = git(&["rev-parse", "HEAD"]).filter(|s| s.len() >= 40)?;
    if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
        return None;
    }
    let branch = git(&["rev-parse", "--abbrev-ref", "HEAD"]).filter(|b| b != "HEAD");
    let repository = git(&["config", "--get", "remote.origin.url"])
        .as_deref()
        .and_then(repository_of);
    Some(slipway_domain::events::CommitRef {
        sha,
        repository,
        branch,
        host: None,
        url: None,
    })
}

/// `owner/name` of a remote URL (`https://host/owner/name.git`, `git@host:owner/name.git`).
fn repository_of(url: &str) -> Option<String> {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => url.split_once(':')?.1,
    };
    let path = path.trim_end_matches('/').trim_end_matches(".git");
    (!path.is_empty()).then(|| path.to_string())
}

impl Client {
    async fn publish_change(
        &self,
        change: ChangeSubmitted,
        wait: bool,
        timeout: u64,
        json_out: bool,
    ) -> anyhow::Result<ExitCode> {
        let (run_id, change_seq) = self.send_change(change).await?;
        if !wait {
            if json_out {
                outln!("{}", json!({ "run_id": run_id }));
            } else {
                outln!("{run_id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !json_out {
            eprintln!("Submitted; run {run_id}. Waiting for it to end…");
        }
        let deadline = Instant::now() + Duration::from_secs(timeout);
        loop {
            if let Some(reason) = self.rejection(change_seq).await? {
                if json_out {
                    outln!("{}", json!({"run_id": null, "rejected": reason}));
                } else {
                    eprintln!("Change rejected: {reason}");
                }
                return Ok(ExitCode::from(1));
            }
            if let Some(state) = self.state(&run_id).await? {
                let phase = phase_of(&state);
                if phase.is_final() || phase == Phase::AwaitingApproval {
                    if json_out {
                        outln!(
                            "{}",
                            json!({"run_id": run_id, "phase": phase.as_str(), "reason": state["reason"]})
                        );
                    } else {
                        outln!("{run_id}");
                        show::print_status(&state);
                    }
                    return Ok(exit_for(phase));
                }
            }
            if Instant::now() > deadline {
                bail!("run {run_id} did not end within {timeout}s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The rejection of the change stored at `seq`, if the conductor rejected it.
    async fn rejection(&self, seq: u64) -> anyhow::Result<Option<String>> {
        let recs = self
            .bus
            .read(&[subjects::REJECTED.to_string()], seq)
            .await?;
        Ok(recs.into_iter().find_map(|r| match r.event {
            Ok(Event {
                data: EventData::ChangeRejected(x),
                ..
            }) if x.change_seq == seq => Some(x.reason),
            _ => None,
        }))
    }

    pub async fn status(&self, run: &str, json_out: bool) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let Some(state) = self.state(run).await? else {
            eprintln!("slipway: no run {run}");
            return Ok(ExitCode::from(1));
        };
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&state)?);
        } else {
            show::print_status(&state);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// A run's rollouts: weights, looks, controls.
    pub async fn rollout(&self, run: &str, json_out: bool) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let Some(state) = self.state(run).await? else {
            eprintln!("slipway: no run {run}");
            return Ok(ExitCode::from(1));
        };
        let rollouts = state.get("rollouts").cloned().unwrap_or(json!([]));
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&rollouts)?);
        } else if rollouts.as_array().is_none_or(Vec::is_empty) {
            outln!("run {run} has no rollout (yet)");
        } else {
            show::print_rollouts(&state);
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn events(&self, run: &str) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let log = self.bus.run_log(run).await?;
        if log.is_empty() {
            eprintln!("slipway: no run {run}");
            return Ok(ExitCode::from(1));
        }
        for r in log {
            match r.event {
                Ok(e) => outln!("{}", serde_json::to_string(&e.to_structured_json())?),
                Err(err) => outln!(
                    "{}",
                    json!({"seq": r.seq, "subject": r.subject, "error": err.to_string()})
                ),
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn watch(&self, run: &str, timeout: u64) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let mut sub = self
            .bus
            .client()
            .subscribe(format!("slipway.run.{run}.>"))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(timeout);
        // A run just submitted exists once the conductor has answered its change: give it a
        // moment before saying there is no such run.
        let appear_by = Instant::now() + Duration::from_secs(RUN_APPEARS_WITHIN_SECS.min(timeout));
        let mut last: Option<Value> = None;
        loop {
            let Some(state) = self.state(run).await? else {
                if Instant::now() < appear_by {
                    let _ = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
                    continue;
                }
                eprintln!("slipway: no run {run}");
                return Ok(ExitCode::from(1));
            };
            show::print_changes(last.as_ref(), &state);
            let phase = phase_of(&state);
            if phase.is_final() {
                return Ok(exit_for(phase));
            }
            last = Some(state);
            if Instant::now() > deadline {
                bail!("run {run} did not end within {timeout}s");
            }
            // Wake on the run's next event, or re-check in a second.
            let _ = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
        }
    }

    pub async fn replay(&self, run: Option<&str>, json_out: bool) -> anyhow::Result<ExitCode> {
        if let Some(run) = run {
            check_run_id(run)?;
            let state = match self.fold_log(run).await? {
                Some((state, _)) => state.to_json(),
                None => {
                    // A run whose events the retention policy pruned: the index keeps it.
                    let index = slipway_core::store::runs::RunIndex::open(&self.bus).await?;
                    let Some(entry) = index.get(run).await? else {
                        eprintln!("slipway: no run {run}");
                        return Ok(ExitCode::from(1));
                    };
                    eprintln!(
                        "slipway: run {run}'s events were pruned (slipway prune); its state is the run index's"
                    );
                    entry.run
                }
            };
            if json_out {
                outln!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                show::print_status(&state);
            }
            return Ok(ExitCode::SUCCESS);
        }
        let started = Instant::now();
        let log = self.bus.read(&[subjects::RUNS.to_string()], 1).await?;
        let n = log.len();
        let mut runs: HashMap<String, Option<Run>> = HashMap::new();
        let mut order = Vec::new();
        let mut unreadable = 0;
        for r in log {
            let Some((id, _, _)) = subjects::parse_run(&r.subject) else {
                continue;
            };
            let Ok(e) = r.event else { continue };
            let slot = runs.entry(id.to_string()).or_insert_with(|| {
                order.push(id.to_string());
                None
            });
            if slot.is_none()
                && let Some(why) = slipway_domain::fold::unreadable(&e)
            {
                eprintln!("slipway: run {id} (stream sequence {}): {why}", r.seq);
                unreadable += 1;
            }
            *slot = slipway_domain::fold(slot.take(), &e);
        }
        let states: Vec<Value> = order
            .iter()
            .filter_map(|id| runs.get(id).and_then(|r| r.as_ref()).map(Run::to_json))
            .collect();
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&states)?);
        } else {
            let mut by_phase: BTreeMap<String, usize> = BTreeMap::new();
            for s in &states {
                *by_phase
                    .entry(phase_of(s).as_str().to_string())
                    .or_default() += 1;
            }
            outln!(
                "Replayed {n} events into {} runs in {:.3}s:",
                states.len(),
                started.elapsed().as_secs_f64()
            );
            for (p, c) in by_phase {
                outln!("  {p:<18} {c}");
            }
        }
        // Every run folded, or each one that did not said why.
        Ok(if unreadable == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    /// Folds every run (or `run`) from the log alone and compares each ended one with its entry
    /// in the run index; with `repair`, writes the fold over each entry missing or different.
    pub async fn verify(
        &self,
        run: Option<&str>,
        repair: bool,
        json_out: bool,
    ) -> anyhow::Result<ExitCode> {
        use slipway_domain::index::{IndexEntry, differences};
        if let Some(run) = run {
            check_run_id(run)?;
        }
        let index = slipway_core::store::runs::RunIndex::open(&self.bus).await?;
        let filter = run.map_or_else(|| subjects::RUNS.to_string(), subjects::run);
        let log = self.bus.read(&[filter], 1).await?;
        // Each run folded from the log, with the stream sequence of its last event.
        let mut runs: HashMap<String, (Option<Run>, u64)> = HashMap::new();
        let mut order = Vec::new();
        for r in log {
            let Some((id, _, _)) = subjects::parse_run(&r.subject) else {
                continue;
            };
            let Ok(e) = r.event else { continue };
            let slot = runs.entry(id.to_string()).or_insert_with(|| {
                order.push(id.to_string());
                (None, 0)
            });
            slot.0 = slipway_domain::fold(slot.0.take(), &e);
            slot.1 = r.seq;
        }
        let (mut matching, mut missing, mut differing, mut repaired) =
            (0, Vec::new(), Vec::new(), 0);
        for id in &order {
            let Some((Some(folded), through)) = runs.get(id) else {
                continue;
            };
            if !folded.is_ended() {
                continue;
            }
            let fresh = folded.to_json();
            let wrong = match index.get(id).await? {
                None => {
                    missing.push(id.clone());
                    true
                }
                Some(entry) => {
                    let found = differences(&entry.run, &fresh, 5);
                    if !found.is_empty() {
                        differing.push(json!({"run_id": id, "differences": found}));
                    }
                    !found.is_empty()
                }
            };
            if !wrong {
                matching += 1;
                continue;
            }
            if repair {
                index.put(id, &IndexEntry::of(folded, *through)).await?;
                repaired += 1;
            }
        }
        if repaired > 0 && !differing.is_empty() {
            // A DORA chunk may hold a replaced entry's deployment: they are made again.
            slipway_core::store::dora::DoraChunks::open(&self.bus)
                .await?
                .clear()
                .await?;
        }
        let checked = matching + missing.len() + differing.len();
        if json_out {
            outln!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "checked": checked,
                    "matching": matching,
                    "missing": missing,
                    "differing": differing,
                    "repaired": repaired,
                }))?
            );
        } else {
            outln!(
                "Verified {checked} ended runs against the run index: {matching} match, {} missing, {} differ{}.",
                missing.len(),
                differing.len(),
                if repair {
                    format!(", {repaired} repaired")
                } else {
                    String::new()
                }
            );
            for id in &missing {
                outln!("  {id}: not in the index");
            }
            for d in &differing {
                for line in d["differences"].as_array().into_iter().flatten() {
                    outln!(
                        "  {}: {}",
                        d["run_id"].as_str().unwrap_or_default(),
                        line.as_str().unwrap_or_default()
                    );
                }
            }
        }
        let clean = missing.is_empty() && differing.is_empty();
        Ok(if clean || repair {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    /// `slipway prune --older-than AGE`: removes from the log the events of every run that
    /// ended before now - AGE and whose index entry equals the fold of its events, except its
    /// approvals, deploys and rollbacks (the audit trail, kept in the log with the approvals'
    /// signed records); the run index keeps its final state. A run whose entry differs is kept
    /// and named. `--dry-run` only counts.
    pub async fn prune(
        &self,
        older_than: &str,
        dry_run: bool,
        json_out: bool,
    ) -> anyhow::Result<ExitCode> {
        use slipway_domain::index::differences;
        let age = slipway_domain::dora::parse_window(older_than).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            age > chrono::Duration::zero(),
            "--older-than must be longer than 0 (the default policy keeps everything)"
        );
        let cutoff = slipway_core::bus::now() - age;
        let index = slipway_core::store::runs::RunIndex::open(&self.bus).await?;
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (mut pruned, mut events, mut kept, mut young) = (0u64, 0u64, Vec::new(), 0u64);
        // The gates compare with the reports of the run that built what is live, and a
        // rollback deploys with its builder's spec: those runs keep their events.
        let builders = slipway_core::store::baseline::Deploys::new(&self.bus)
            .builders()
            .await?;
        let mut below = index.last_revision().await? + 1;
        while below > 1 {
            let chunk = 4096.min(below - 1);
            for e in index.before(below, chunk).await? {
                let Some(entry) = e.entry else {
                    kept.push(json!({"run_id": e.run_id, "why": "an entry of another fold version (slipway replay --verify --repair)"}));
                    continue;
                };
                let finished = entry.run["finished_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                if finished.is_none_or(|f| f >= cutoff) {
                    young += 1;
                    continue;
                }
                if builders.contains(&e.run_id) {
                    kept.push(json!({"run_id": e.run_id, "why": "it built a version live or lately deployed (a gate's baseline, a rollback's deploy tooling)"}));
                    continue;
                }
                let log = self.bus.run_log(&e.run_id).await?;
                // The audit trail stays in the log: approvals (with their signed records),
                // deploys and rollbacks.
                let audit = |s: &str| {
                    matches!(
                        s.split('.').nth(3),
                        Some("approval" | "deploy" | "rollback")
                    )
                };
                let prunable: std::collections::BTreeSet<String> = log
                    .iter()
                    .map(|r| r.subject.clone())
                    .filter(|s| !audit(s))
                    .collect();
                if prunable.is_empty() {
                    continue; // pruned before
                }
                let n = log.iter().filter(|r| !audit(&r.subject)).count() as u64;
                let folded: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
                let same = Run::replay(&folded)
                    .filter(Run::is_ended)
                    .map(|r| differences(&entry.run, &r.to_json(), 1).is_empty());
                if same != Some(true) {
                    kept.push(json!({"run_id": e.run_id, "why": "its index entry differs from its events (slipway replay --verify)"}));
                    continue;
                }
                if !dry_run {
                    for subject in &prunable {
                        stream
                            .purge()
                            .filter(subject)
                            .await
                            .map_err(|err| anyhow::anyhow!("cannot prune {}: {err}", e.run_id))?;
                    }
                }
                pruned += 1;
                events += n;
            }
            below -= chunk;
        }
        let report = json!({
            "older_than": older_than,
            "cutoff": cutoff,
            "dry_run": dry_run,
            "pruned_runs": pruned,
            "pruned_events": events,
            "kept": kept,
            "younger_runs": young,
        });
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            outln!(
                "{} {pruned} ended runs ({events} events) that ended before {cutoff}; {young} younger kept; {} kept as not verified",
                if dry_run { "Would prune" } else { "Pruned" },
                kept.len()
            );
            for k in &kept {
                outln!(
                    "  kept {}: {}",
                    k["run_id"].as_str().unwrap_or_default(),
                    k["why"].as_str().unwrap_or_default()
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `require`: the services that must have a live replica; empty means all of them.
    pub async fn services(&self, json_out: bool, require: &[String]) -> anyhow::Result<ExitCode> {
        let running = slipway_core::health::running(&self.bus).await?;
        let required: Vec<&str> = if require.is_empty() {
            slipway_domain::service::Service::ALL
                .iter()
                .map(|s| s.name())
                .collect()
        } else {
            require.iter().map(String::as_str).collect()
        };
        let missing = running.missing(&required);
        if json_out {
            let mut v = serde_json::to_value(&running)?;
            v["missing"] = json!(missing);
            outln!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            show::print_services(&running, &missing);
        }
        Ok(if missing.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    pub async fn dora(&self, since: &str, json_out: bool) -> anyhow::Result<ExitCode> {
        let window = slipway_domain::dora::parse_window(since).map_err(anyhow::Error::msg)?;
        let now = slipway_core::bus::now();
        let report = match self.dora_from_index(now - window, now).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DORA from the whole log (no run index or checkpoint to read).");
                slipway_domain::dora::report_of(self.deployed_from_log().await?, now - window, now)
            }
        };
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            show::print_dora(&report);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// DORA from the run index (its DORA chunks and the entries after them) and from the
    /// runs the conductor's checkpoint holds in flight with the log after it: the window, not
    /// the history.
    async fn dora_from_index(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<slipway_domain::dora::Report> {
        let index = slipway_core::store::runs::RunIndex::open(&self.bus).await?;
        let checkpoints = slipway_core::store::checkpoints::Checkpoints::open(&self.bus).await?;
        let (created, last) = self.bus.stream_state().await?;
        let bytes = checkpoints
            .get("conductor")
            .await?
            .ok_or_else(|| anyhow::anyhow!("no conductor checkpoint"))?;
        let checkpoint = slipway_domain::checkpoint::Checkpoint::usable(&bytes, &created, last)
            .map_err(anyhow::Error::msg)?;
        // The chunks when this user may read them; the index alone otherwise.
        let chunks = slipway_core::store::dora::DoraChunks::open(&self.bus)
            .await
            .ok();
        let mut runs: HashMap<String, Option<Run>> = HashMap::new();
        let mut fold_in = |r: slipway_core::bus::Recorded| {
            let Some((id, _, _)) = subjects::parse_run(&r.subject) else {
                return;
            };
            let Ok(e) = r.event else { return };
            let slot = runs.entry(id.to_string()).or_default();
            *slot = slipway_domain::fold(slot.take(), &e);
        };
        for run_id in &checkpoint.in_flight {
            self.bus
                .run_log(run_id)
                .await?
                .into_iter()
                .for_each(&mut fold_in);
        }
        self.bus
            .read(&[subjects::RUNS.to_string()], checkpoint.through + 1)
            .await?
            .into_iter()
            .for_each(&mut fold_in);
        let held: HashMap<String, slipway_domain::dora::Deployed> = runs
            .values()
            .flatten()
            .filter_map(|run| slipway_domain::dora::deployed(run).map(|d| (run.run_id.clone(), d)))
            .collect();
        Ok(slipway_core::store::dora::report(&index, chunks.as_ref(), since, until, held).await?)
    }

    /// Production deployments of every run, folded from the whole log.
    async fn deployed_from_log(&self) -> anyhow::Result<Vec<slipway_domain::dora::Deployed>> {
        let log = self.bus.read(&[subjects::RUNS.to_string()], 1).await?;
        let mut runs: HashMap<String, Option<Run>> = HashMap::new();
        for r in log {
            let Some((id, _, _)) = subjects::parse_run(&r.subject) else {
                continue;
            };
            let Ok(e) = r.event else { continue };
            let slot = runs.entry(id.to_string()).or_default();
            *slot = slipway_domain::fold(slot.take(), &e);
        }
        Ok(runs
            .values()
            .flatten()
            .filter_map(slipway_domain::dora::deployed)
            .collect())
    }

    pub async fn changes(&self, json_out: bool, limit: usize) -> anyhow::Result<ExitCode> {
        let recs = self
            .bus
            .read(
                &[
                    subjects::CHANGES.to_string(),
                    subjects::REJECTED.to_string(),
                    subjects::RUN_CREATED.to_string(),
                ],
                1,
            )
            .await?;
        let mut outcomes: HashMap<u64, Value> = HashMap::new();
        let mut runs_by_id: HashMap<String, u64> = HashMap::new();
        let mut changes = Vec::new();
        for r in &recs {
            match &r.event {
                Ok(Event {
                    data: EventData::ChangeRejected(x),
                    ..
                }) => {
                    outcomes.insert(x.change_seq, json!({"rejected": x.reason}));
                }
                Ok(Event {
                    data: EventData::RunCreated(c),
                    ..
                }) => {
                    outcomes.insert(c.change.seq, json!({"run_id": c.run_id}));
                    runs_by_id.insert(c.run_id.clone(), c.change.seq);
                }
                _ if r.subject.starts_with("slipway.changes.") => changes.push(r),
                _ => {}
            }
        }
        let mut rows = Vec::new();
        for r in changes.iter().rev().take(limit) {
            let (id, source, time) = match &r.event {
                Ok(e) => (
                    Some(e.id.clone()),
                    Some(e.source.clone()),
                    Some(e.time.to_rfc3339()),
                ),
                // A CDEvent taken as a change: its context says what it is.
                Err(_) => match r.raw.as_deref().map(cdevents::parse_incoming) {
                    Some(Ok(c)) => (Some(c.id), Some(c.source), Some(c.timestamp.to_rfc3339())),
                    _ => (None, None, None),
                },
            };
            let outcome = outcomes.get(&r.seq).cloned().unwrap_or_else(|| {
                // A repeat of an earlier change: it has that change's run.
                let dup = match (&id, &source) {
                    (Some(i), Some(s)) => {
                        let run = ids::run_id(s, i);
                        runs_by_id.contains_key(&run).then_some(run)
                    }
                    _ => None,
                };
                match dup {
                    Some(run) => json!({"run_id": run, "duplicate": true}),
                    None => json!({"pending": true}),
                }
            });
            rows.push(json!({
                "seq": r.seq,
                "subject": r.subject,
                "id": id,
                "source": source,
                "time": time,
                "outcome": outcome,
            }));
        }
        if json_out {
            outln!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            show::print_changes_table(&rows);
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn cancel(&self, run: &str, reason: Option<String>) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let reason = reason.unwrap_or_else(|| format!("cancelled by {}", user()));
        for _ in 0..10 {
            let Some((state, last)) = self.fold_log(run).await? else {
                eprintln!("slipway: no run {run}");
                return Ok(ExitCode::from(1));
            };
            if state.is_ended() {
                eprintln!(
                    "slipway: run {run} already ended ({}): {}",
                    state.phase.as_str(),
                    state.reason.unwrap_or_default()
                );
                return Ok(ExitCode::from(1));
            }
            let data = run_ended(
                Phase::Cancelled,
                RunEnded {
                    reason: reason.clone(),
                    stage: None,
                    by: Some(user()),
                },
            );
            let mut event = Event::new(
                ids::run_end(run),
                SOURCE,
                Some(run.to_string()),
                slipway_core::bus::now(),
                data,
            );
            event.traceparent = state.traceparent.clone();
            match self.bus.append(&event, run, last).await {
                Ok(a) if a.duplicate => {
                    eprintln!("slipway: run {run} already ended");
                    return Ok(ExitCode::from(1));
                }
                Ok(_) => {
                    outln!("Run {run} cancelled: {reason}");
                    return Ok(ExitCode::SUCCESS);
                }
                // The run moved on while we decided: look again.
                Err(AppendError::Conflict { .. }) => continue,
                Err(AppendError::Bus(e)) => return Err(e.into()),
            }
        }
        bail!("run {run} kept changing; cancellation not recorded, try again")
    }

    pub async fn rerun(&self, run: &str, json_out: bool) -> anyhow::Result<ExitCode> {
        check_run_id(run)?;
        let Some((state, _)) = self.fold_log(run).await? else {
            eprintln!("slipway: no run {run}");
            return Ok(ExitCode::from(1));
        };
        let rec = self.bus.get(state.change.seq).await?;
        let Ok(Event {
            data: EventData::ChangeSubmitted(mut change),
            ..
        }) = rec.event
        else {
            bail!(
                "the change of run {run} (stream sequence {}) cannot be read back",
                state.change.seq
            );
        };
        change.rerun_of = Some(run.to_string());
        self.publish_change(change, false, 0, json_out).await
    }
}

pub fn phase_of(state: &Value) -> Phase {
    state["phase"]
        .as_str()
        .and_then(Phase::parse)
        .unwrap_or(Phase::Queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_git_work_tree_is_its_commit_and_a_changed_one_is_none() {
        assert_eq!(
            repository_of("https://github.com/acme/shop.git").as_deref(),
            Some("acme/shop")
        );
        assert_eq!(
            repository_of("git@gitlab.example:group/sub/proj.git").as_deref(),
            Some("group/sub/proj")
        );
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            assert!(
                std::process::Command::new("git")
                    .arg("-C")
                    .arg(dir.path())
                    .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                    .args(args)
                    .output()
                    .unwrap()
                    .status
                    .success(),
                "git {args:?}"
            )
        };
        assert_eq!(git_commit(dir.path()), None, "not a work tree");
        git(&["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("a"), "1").unwrap();
        git(&["add", "a"]);
        git(&["commit", "-qm", "first"]);
        git(&[
            "remote",
            "add",
            "origin",
            "https://github.com/acme/shop.git",
        ]);
        let c = git_commit(dir.path()).unwrap();
        assert_eq!(c.sha.len(), 40);
        assert_eq!(
            (c.branch.as_deref(), c.repository.as_deref()),
            (Some("main"), Some("acme/shop"))
        );
        std::fs::write(dir.path().join("a"), "2").unwrap();
        assert_eq!(git_commit(dir.path()), None, "changed since the commit");
    }
}
