//! Fresh workspaces: the change's source checked out (a local directory copied, or a git
//! revision cloned), artifacts packed into a deterministic `tar.gz` and unpacked again.
//!
//! Nothing from an event reaches a shell: git gets its URL and revision as separate arguments
//! after checks that refuse option-looking values and schemes outside the allow-list, and every
//! packed path must stay inside the workspace.

use slipway_domain::digest::Digest;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::exec::{self, Cmd, ExecSettings};
use slipway_domain::events::SourceRef;

/// A domain failure preparing a workspace: the stage fails with this reason.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("source directory {0:?} is not an absolute path to a directory")]
    BadDirectory(String),
    #[error("git URL {url:?} refused: {why}")]
    BadGitUrl { url: String, why: String },
    #[error("git revision {0:?} refused: it must be a plain commit, tag or branch name")]
    BadRevision(String),
    #[error("git {step} failed ({exit}): {tail}")]
    Git {
        step: &'static str,
        exit: String,
        tail: String,
    },
    #[error("artifact path {path:?}: {why}")]
    BadArtifact { path: String, why: String },
    #[error("I/O error in the workspace: {0}")]
    Io(#[from] std::io::Error),
}

/// A job's private directory, removed on drop unless kept.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    keep: bool,
}

impl Workspace {
    /// Creates `<root>/<label>-<random>` with `src/`, `home/` and `out/` inside.
    ///
    /// # Errors
    /// I/O errors creating it.
    pub fn create(settings: &ExecSettings, label: &str) -> Result<Self, WorkspaceError> {
        let base = settings.workspace_root();
        std::fs::create_dir_all(&base)?;
        let root = base.join(format!("{label}-{}", slipway_domain::ids::random()));
        for d in ["src", "home", "out"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        Ok(Self {
            root,
            keep: settings.keep_workspaces,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The checked-out source; commands run here.
    pub fn src(&self) -> PathBuf {
        self.root.join("src")
    }

    /// `HOME` and `TMPDIR` of commands.
    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }

    /// Slipway's own files (logs, packed artifacts): outside `src`, out of the command's way.
    pub fn out(&self) -> PathBuf {
        self.root.join("out")
    }

    /// Checks the source out into `src/`.
    ///
    /// # Errors
    /// [`WorkspaceError`] naming what was refused or failed.
    pub async fn checkout(
        &self,
        source: &SourceRef,
        settings: &ExecSettings,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        match source {
            SourceRef::Directory { path } => {
                let p = Path::new(path);
                if !p.is_absolute() || !p.is_dir() {
                    return Err(WorkspaceError::BadDirectory(path.clone()));
                }
                let (from, to) = (p.to_path_buf(), self.src());
                // The copy must not descend into the workspace itself (a source directory may
                // contain the workspace root): that would copy the copy, forever.
                let avoid = self.root.canonicalize()?;
                tokio::task::spawn_blocking(move || copy_tree(&from, &to, &avoid))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))??;
                Ok(())
            }
            SourceRef::Git { url, revision } => {
                check_git_url(url, &settings.git_schemes)?;
                check_revision(revision)?;
                let log = self.out().join("checkout.log");
                let env = settings.base_env(&self.home());
                let src = self.src().display().to_string();
                let steps: [(&'static str, Vec<String>); 2] = [
                    (
                        "clone",
                        vec![
                            "git".into(),
                            "clone".into(),
                            "--quiet".into(),
                            "--no-checkout".into(),
                            "--".into(),
                            url.clone(),
                            src.clone(),
                        ],
                    ),
                    (
                        "checkout",
                        vec![
                            "git".into(),
                            "-C".into(),
                            src.clone(),
                            "checkout".into(),
                            "--quiet".into(),
                            "--detach".into(),
                            revision.clone(),
                            "--".into(),
                        ],
                    ),
                ];
                for (step, argv) in steps {
                    let mut env = env.clone();
                    // Never prompt for credentials: fail instead.
                    env.insert("GIT_TERMINAL_PROMPT".into(), "0".into());
                    let out = exec::run(
                        Cmd {
                            argv: &argv,
                            cwd: &self.root,
                            env,
                            timeout: Duration::from_secs(300),
                            log: &log,
                        },
                        cancel,
                    )
                    .await
                    .map_err(|e| WorkspaceError::Git {
                        step,
                        exit: "not started".into(),
                        tail: e.to_string(),
                    })?;
                    if !out.exit.success() {
                        return Err(WorkspaceError::Git {
                            step,
                            exit: out.exit.to_string(),
                            tail: exec::log_tail(&log, 10),
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

/// Workspace removals handed to blocking threads and not finished yet.
static REMOVALS: (std::sync::atomic::AtomicUsize, tokio::sync::Notify) = (
    std::sync::atomic::AtomicUsize::new(0),
    tokio::sync::Notify::const_new(),
);

/// Waits until every workspace dropped so far is removed. A runtime that shuts down drops
/// blocking tasks not yet started, so a worker waits for these before it ends.
pub async fn removals_done() {
    use std::sync::atomic::Ordering;
    loop {
        let notified = REMOVALS.1.notified();
        if REMOVALS.0.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

impl Drop for Workspace {
    /// Removes the directory; inside a runtime on a blocking thread, so that a job's result
    /// is not held back by it ([`removals_done`] waits for them).
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.keep {
            return;
        }
        let root = std::mem::take(&mut self.root);
        let remove = move || {
            let _ = std::fs::remove_dir_all(&root);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                REMOVALS.0.fetch_add(1, Ordering::AcqRel);
                drop(rt.spawn_blocking(move || {
                    remove();
                    if REMOVALS.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                        REMOVALS.1.notify_waiters();
                    }
                }));
            }
            Err(_) => remove(),
        }
    }
}

fn check_git_url(url: &str, schemes: &[String]) -> Result<(), WorkspaceError> {
    let refuse = |why: &str| WorkspaceError::BadGitUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    if url.starts_with('-') {
        return Err(refuse("it looks like an option"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(refuse("it contains whitespace or control characters"));
    }
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme {
        Some(s) if schemes.iter().any(|a| a.eq_ignore_ascii_case(&s)) => Ok(()),
        Some(s) => Err(refuse(&format!(
            "scheme {s:?} is not allowed (allowed: {})",
            schemes.join(", ")
        ))),
        None => Err(refuse(
            "it must be a URL with a scheme (local paths are read through the file scheme, if allowed)",
        )),
    }
}

fn check_revision(rev: &str) -> Result<(), WorkspaceError> {
    let ok = !rev.is_empty()
        && !rev.starts_with('-')
        && rev.len() <= 256
        && rev
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-^~".contains(&b))
        && !rev.contains("..");
    if ok {
        Ok(())
    } else {
        Err(WorkspaceError::BadRevision(rev.to_string()))
    }
}

/// Copies a tree; symlinks are copied as links, never followed out of the source, and a
/// directory containing `avoid` (the destination workspace) is not entered.
fn copy_tree(from: &Path, to: &Path, avoid: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if ft.is_dir() {
            let here = entry.path().canonicalize()?;
            if avoid.starts_with(&here) {
                continue;
            }
            std::fs::create_dir_all(&dest)?;
            copy_tree(&entry.path(), &dest, avoid)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dest)?;
        } else if ft.is_file() {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// A packed artifact on disk.
#[derive(Debug, Clone)]
pub struct Packed {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    pub files: Vec<String>,
}

/// Packs `paths` (relative to `src`) into `dest` as a deterministic `tar.gz`: sorted entries,
/// zero times and owners, so the same build output always has the same digest.
///
/// # Errors
/// [`WorkspaceError::BadArtifact`] for a missing path or one that leaves the workspace.
pub fn pack(src: &Path, paths: &[String], dest: &Path) -> Result<Packed, WorkspaceError> {
    let canon_src = src.canonicalize()?;
    let mut files = Vec::new();
    for p in paths {
        slipway_domain::spec::check_relative_path("artifact", p).map_err(|e| {
            WorkspaceError::BadArtifact {
                path: p.clone(),
                why: e.message,
            }
        })?;
        let full = src.join(p);
        let meta = std::fs::symlink_metadata(&full).map_err(|_| WorkspaceError::BadArtifact {
            path: p.clone(),
            why: "does not exist after the build".into(),
        })?;
        let canon = full.canonicalize()?;
        if !canon.starts_with(&canon_src) {
            return Err(WorkspaceError::BadArtifact {
                path: p.clone(),
                why: "resolves outside the workspace".into(),
            });
        }
        // The resolved target decides: a link to a directory inside the workspace is packed.
        let meta = if meta.file_type().is_symlink() {
            std::fs::metadata(&canon)?
        } else {
            meta
        };
        if meta.is_dir() {
            collect(&canon_src, &canon, &mut files)?;
        } else {
            files.push(relative(&canon_src, &canon));
        }
    }
    files.sort();
    files.dedup();
    let out = std::fs::File::create(dest)?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in &files {
        let full = canon_src.join(f);
        let mut file = std::fs::File::open(&full)?;
        let meta = file.metadata()?;
        let mut header = tar::Header::new_gnu();
        header.set_size(meta.len());
        use std::os::unix::fs::PermissionsExt;
        header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, f, &mut file)?;
    }
    let gz = tar.into_inner()?;
    let mut out = gz.finish()?;
    out.flush()?;
    let (digest, size) = sha256_file(dest)?;
    Ok(Packed {
        path: dest.to_path_buf(),
        digest,
        size,
        files,
    })
}

fn relative(base: &Path, p: &Path) -> String {
    p.strip_prefix(base)
        .unwrap_or(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Regular files under `dir`; symlinks inside are skipped (they could point anywhere).
fn collect(base: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            collect(base, &entry.path(), out)?;
        } else if ft.is_file() {
            out.push(relative(base, &entry.path()));
        }
    }
    Ok(())
}

/// Unpacks an artifact; the tar reader refuses entries that would leave `dest`.
///
/// # Errors
/// I/O errors, or an archive that is not a `tar.gz`.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), WorkspaceError> {
    std::fs::create_dir_all(dest)?;
    let f = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    tar.set_preserve_permissions(true);
    tar.unpack(dest)?;
    Ok(())
}

/// `sha256:<hex>` and size of a file.
///
/// # Errors
/// I/O errors reading it.
pub fn sha256_file(path: &Path) -> std::io::Result<(Digest, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((Digest::from_sha256(&hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_in(dir: &Path, keep: bool) -> ExecSettings {
        ExecSettings {
            workspace_root: Some(dir.to_path_buf()),
            keep_workspaces: keep,
            ..Default::default()
        }
    }

    #[test]
    fn a_workspace_is_removed_on_drop_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(&settings_in(dir.path(), false), "job").unwrap();
        std::fs::write(ws.src().join("file"), "x").unwrap();
        let root = ws.root().to_path_buf();
        drop(ws);
        assert!(!root.exists(), "removed at once outside a runtime");

        let kept = Workspace::create(&settings_in(dir.path(), true), "job").unwrap();
        let root = kept.root().to_path_buf();
        drop(kept);
        assert!(root.join("src").is_dir(), "kept");
    }

    #[tokio::test]
    async fn inside_a_runtime_a_workspace_is_removed_off_the_jobs_path() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(&settings_in(dir.path(), false), "job").unwrap();
        std::fs::write(ws.src().join("file"), "x").unwrap();
        let root = ws.root().to_path_buf();
        drop(ws);
        removals_done().await;
        assert!(!root.exists(), "removed once removals are done");
    }

    #[tokio::test]
    async fn a_source_containing_the_workspace_is_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.c"), "int main;").unwrap();
        let settings = ExecSettings {
            workspace_root: Some(dir.path().join("work")),
            ..Default::default()
        };
        let ws = Workspace::create(&settings, "t").unwrap();
        let source = SourceRef::Directory {
            path: dir.path().display().to_string(),
        };
        ws.checkout(&source, &settings, &CancellationToken::new())
            .await
            .unwrap();
        assert!(ws.src().join("main.c").is_file());
        // The workspace root's parent is copied without descending into the workspace.
        assert!(
            !ws.src()
                .join("work")
                .join(ws.root().file_name().unwrap())
                .exists()
        );
    }

    #[test]
    fn git_inputs_are_checked() {
        let schemes = ExecSettings::default().git_schemes;
        assert!(check_git_url("https://example.com/r.git", &schemes).is_ok());
        assert!(check_git_url("--upload-pack=evil", &schemes).is_err());
        assert!(check_git_url("file:///etc", &schemes).is_err());
        assert!(check_git_url("/etc", &schemes).is_err());
        assert!(check_git_url("ext::sh -c evil", &schemes).is_err());
        assert!(check_revision("main").is_ok());
        assert!(check_revision("v1.2.3").is_ok());
        assert!(check_revision("--output=/x").is_err());
        assert!(check_revision("a;b").is_err());
    }

    #[test]
    fn pack_is_deterministic_and_confined() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("dist/sub")).unwrap();
        std::fs::write(src.join("dist/a.txt"), "a").unwrap();
        std::fs::write(src.join("dist/sub/b.txt"), "b").unwrap();
        std::os::unix::fs::symlink("/etc", src.join("escape")).unwrap();
        let p1 = pack(&src, &["dist".into()], &dir.path().join("1.tgz")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(src.join("dist/a.txt"), "a").unwrap();
        let p2 = pack(&src, &["dist".into()], &dir.path().join("2.tgz")).unwrap();
        assert_eq!(p1.digest, p2.digest);
        assert_eq!(p1.files, vec!["dist/a.txt", "dist/sub/b.txt"]);
        let err = pack(&src, &["escape".into()], &dir.path().join("3.tgz")).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let err = pack(&src, &["missing".into()], &dir.path().join("4.tgz")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let out = dir.path().join("out");
        unpack(&p1.path, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("dist/sub/b.txt")).unwrap(),
            "b"
        );
    }
}
