//! Least-privilege NATS users for a nats-server Slipway starts itself (`slipway up`, `demo`,
//! the tests): the shipped `deploy/nats/least-privilege.conf`, built into the binary, with a
//! password per user generated into the data directory and kept across restarts.
//!
//! The passwords live in `<data>/credentials/nats-<user>.password` (the directory mode 0700,
//! each file 0600, like the approval signing key); the server reads them from its environment
//! (`SLIPWAY_NATS_PASS_<USER>`, which the configuration refers to), and each service is given
//! its own user and the path of its password file (`[nats] user`, `password_file`).

use slipway_domain::service::Service;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The shipped least-privilege configuration.
pub const LEAST_PRIVILEGE_CONF: &str = include_str!("../../../../deploy/nats/least-privilege.conf");

/// The users of [`LEAST_PRIVILEGE_CONF`]: `admin` for operators, one per service, `cli` for
/// people's `slipway` commands.
pub const NATS_USERS: &[&str] = &Service::NATS_USERS;

/// The user a service binary connects as (`slipway-approval` is `gateway`); a binary that is no
/// service connects as itself, without the `slipway-` prefix.
pub fn nats_user_of(binary: &str) -> &str {
    match Service::of_binary(binary) {
        Some(service) => service.nats_user(),
        None => binary.strip_prefix("slipway-").unwrap_or(binary),
    }
}

/// The environment variable the configuration reads `user`'s password from.
pub fn password_variable(user: &str) -> String {
    format!(
        "SLIPWAY_NATS_PASS_{}",
        user.to_uppercase().replace('-', "_")
    )
}

/// Where the passwords of a data directory are kept.
pub fn directory(data_dir: &Path) -> PathBuf {
    data_dir.join("credentials")
}

/// The password file of `user` in a credentials directory.
pub fn password_file(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("nats-{user}.password"))
}

/// Makes a password file whole or not at all (written aside, then renamed into place), so a
/// crash never leaves an empty one; when another process made it first, its password wins.
fn create(path: &Path) -> std::io::Result<String> {
    // A letter first: the server's configuration reads a bare `12e4…` as a number. Two random
    // UUIDs: 244 bits.
    let password = format!(
        "pw-{}{}",
        slipway_domain::ids::random(),
        slipway_domain::ids::random()
    )
    .replace('-', "");
    let aside = path.with_extension(format!("new-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&aside)?;
    f.write_all(password.as_bytes())?;
    f.sync_all()?;
    // `link` fails when the name exists: the first writer's password stays.
    let linked = std::fs::hard_link(&aside, path);
    std::fs::remove_file(&aside)?;
    match linked {
        Ok(()) => Ok(password),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?.trim().to_string())
        }
        Err(e) => Err(e),
    }
}

/// Every user's password, read from a credentials directory or made there.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    dir: PathBuf,
    passwords: BTreeMap<String, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Passwords never reach a log.
        f.debug_struct("Credentials")
            .field("dir", &self.dir)
            .field("users", &self.passwords.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Reads each user's password from `dir`, making the ones missing (and `dir`, mode 0700).
    /// A directory or file that others may read is made private again.
    ///
    /// # Errors
    /// When the directory or a file cannot be made or read, or a file is empty.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut passwords = BTreeMap::new();
        for user in NATS_USERS {
            let path = password_file(dir, user);
            let password = match std::fs::read_to_string(&path) {
                Ok(p) => {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                    p.trim().to_string()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
                Err(e) => return Err(e),
            };
            if password.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} is empty; delete it to have a new password made",
                    path.display()
                )));
            }
            passwords.insert((*user).to_string(), password);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            passwords,
        })
    }

    /// The directory the passwords are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `user`'s password.
    pub fn password(&self, user: &str) -> Option<&str> {
        self.passwords.get(user).map(String::as_str)
    }

    /// `user`'s password file.
    pub fn password_file(&self, user: &str) -> PathBuf {
        password_file(&self.dir, user)
    }

    /// The server's environment: every password under the name the configuration reads.
    pub fn server_env(&self) -> Vec<(String, String)> {
        self.passwords
            .iter()
            .map(|(u, p)| (password_variable(u), p.clone()))
            .collect()
    }

    /// Writes [`LEAST_PRIVILEGE_CONF`] to `path` for the server (it holds no secret).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_server_config(path: &Path) -> std::io::Result<()> {
        std::fs::write(path, LEAST_PRIVILEGE_CONF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_made_once_private_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("credentials");
        let first = Credentials::load_or_create(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for user in NATS_USERS {
            let file = first.password_file(user);
            assert_eq!(mode(&file), 0o600, "{user}");
            let p = first.password(user).unwrap();
            assert!(p.starts_with("pw") && p.len() > 60, "{user}: {p}");
        }
        assert_ne!(first.password("admin"), first.password("cli"));
        // Kept across restarts; a file others could read is made private again.
        std::fs::set_permissions(
            first.password_file("cli"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let again = Credentials::load_or_create(&dir).unwrap();
        assert_eq!(again, first);
        assert_eq!(mode(&again.password_file("cli")), 0o600);
        assert!(!format!("{again:?}").contains(again.password("admin").unwrap()));
        // The configuration names every user and reads each password from the environment.
        for (var, _) in again.server_env() {
            assert!(LEAST_PRIVILEGE_CONF.contains(&format!("${var}")), "{var}");
        }
        assert_eq!(again.server_env().len(), NATS_USERS.len());
        // An emptied file is an error that says what to do.
        std::fs::write(again.password_file("builder"), "").unwrap();
        let e = Credentials::load_or_create(&dir).unwrap_err().to_string();
        assert!(e.contains("nats-builder.password is empty"), "{e}");
    }
}
