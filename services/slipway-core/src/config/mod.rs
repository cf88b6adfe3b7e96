//! Service configuration: one TOML file shared by every service, overridden by
//! `SLIPWAY__<SECTION>__<KEY>` environment variables (e.g. `SLIPWAY__NATS__URL`).
//!
//! The file comes from `--config PATH` or `SLIPWAY_CONFIG`; without one, defaults apply.
//! Unknown keys are errors, so a typo never silently falls back to a default.

pub mod credentials;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bus::NatsSettings;
use crate::exec::ExecSettings;
use crate::runtime::WorkerSettings;

/// Everything a Slipway service can be told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsSettings,
    pub worker: WorkerSettings,
    pub exec: ExecSettings,
    pub conductor: ConductorSettings,
    pub gateway: GatewaySettings,
    pub approvals: ApprovalKeys,
    pub pricing: Pricing,
    /// Liveness and readiness over HTTP (`crate::health`).
    pub health: crate::health::HealthSettings,
}

/// How approvals are trusted: the gateway signs each decision; the deployer verifies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalKeys {
    /// The gateway's Ed25519 public key (base64, 32 bytes): the deployer counts only approvals
    /// it signed, and refuses approval-gated deploys when none is configured.
    pub public_key: Option<String>,
}

/// The cost estimator's price list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pricing {
    /// Per model: prices per 1,000 tokens.
    pub models: std::collections::BTreeMap<String, ModelPrice>,
    /// Per instance type: price per hour.
    pub instances: std::collections::BTreeMap<String, InstancePrice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePrice {
    pub per_hour: f64,
}

/// The approval gateway: where it listens, who may approve, whom to notify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Address to bind; loopback by default.
    pub listen: String,
    /// The services that must have a live replica; `/healthz` and the metrics name those that
    /// have none. Default: all nine.
    pub required_services: Vec<String>,
    /// The URL people reach the gateway at, for links in notifications, CDEvents and spans
    /// (every service reads it; `slipway up` sets it from `listen` when unset).
    pub public_url: Option<String>,
    pub approvers: Vec<Approver>,
    /// URLs that get a JSON POST when a run starts waiting for approval.
    pub webhooks: Vec<String>,
    /// Attempts per webhook notification (with exponential backoff from 500 ms).
    pub webhook_attempts: u32,
    /// Largest request body accepted (a change carries its spec).
    pub max_body_bytes: usize,
    /// Longest a request may take before it is abandoned with `503`.
    pub request_timeout_secs: u64,
    /// Failed authentications per client address and minute before it gets `429`.
    pub auth_failures_per_minute: u32,
    /// A trace UI's URL for a trace, with `{trace_id}` in it (e.g. Jaeger's
    /// `http://127.0.0.1:16686/trace/{trace_id}`): the page links each run's trace.
    pub trace_url_template: Option<String>,
    /// The Ed25519 seed (base64, 32 bytes) approvals are signed with; keep it to the gateway.
    pub signing_key: Option<String>,
    /// A file holding the seed instead (readable by the gateway alone).
    pub signing_key_file: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain and private key (PEM files); plain HTTP when
    /// unset.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Publish the CDEvents of runs on `cdevents.<subject>.<predicate>` (core NATS).
    pub cdevents: bool,
    /// URLs that get each CDEvent as a CloudEvent (HTTP binary mode), with retries.
    pub cdevents_webhooks: Vec<String>,
    /// Repositories whose pushes and merges (`POST /v1/hooks/github`, `/v1/hooks/gitlab`)
    /// start a pipeline, and where each run's result goes back as a commit status.
    pub git_hooks: Vec<GitHook>,
    /// Links to a change's commit on the page, per change source: the first whose
    /// `source_prefix` starts the change's CloudEvents source.
    pub commit_links: Vec<CommitLink>,
    /// Sign-in with the organisation's OpenID Connect provider (off when unset).
    pub oidc: Option<OidcSettings>,
}

/// An OpenID Connect provider: the page signs people in with the authorization code flow
/// (PKCE), and the API takes its ID or access tokens (JWTs) as bearer tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The issuer URL; its discovery document is `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// For a confidential client (sent with HTTP Basic to the token endpoint).
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<std::path::PathBuf>,
    /// `aud` values a bearer token may carry; the client id when empty.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The claim naming the approver (a dotted path reaches into objects).
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// The claim listing the approver's groups, which the approval policies' groups name.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The provider's users count as approvers only in one of these groups. Where a run's
    /// policy names no groups (or there is no policy), only these decide; with none set, only
    /// the configured approvers do.
    #[serde(default)]
    pub approver_groups: Vec<String>,
    /// How long a page session lasts.
    #[serde(default = "default_session_secs")]
    pub session_secs: u64,
    /// Least time between two JWKS fetches caused by an unknown key id (a rotation), so
    /// tokens with made-up key ids cannot make the gateway hammer the provider.
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_min_refresh_secs: u64,
    /// The key sessions are signed with (base64, 32 bytes), or a file holding it; by default
    /// derived from the approval signing key (so replicas that share it share sessions), or
    /// random per process.
    #[serde(default)]
    pub session_key_file: Option<std::path::PathBuf>,
}

fn default_name_claim() -> String {
    "preferred_username".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "profile".into(), "groups".into()]
}
fn default_session_secs() -> u64 {
    8 * 3600
}
fn default_jwks_refresh_secs() -> u64 {
    10
}

/// A git host a repository lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GitHost {
    Github,
    Gitlab,
}

impl GitHost {
    pub fn as_str(self) -> &'static str {
        match self {
            GitHost::Github => "github",
            GitHost::Gitlab => "gitlab",
        }
    }
}

/// One repository (and branch) of a git host mapped to a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHook {
    pub host: GitHost,
    /// GitHub's `owner/name` (`repository.full_name`), GitLab's `group/project`
    /// (`project.path_with_namespace`).
    pub repository: String,
    /// Only pushes to (and merges into) this branch; any branch when unset.
    #[serde(default)]
    pub branch: Option<String>,
    /// The pipeline spec (TOML), read when the push arrives.
    pub spec: std::path::PathBuf,
    /// What the pipeline builds from; by default the repository's clone URL at the pushed
    /// commit (a git source given here gets the pushed commit as its revision).
    #[serde(default)]
    pub source: Option<slipway_domain::events::SourceRef>,
    /// GitHub's webhook secret (the `X-Hub-Signature-256` HMAC key), or GitLab's secret token
    /// (`X-Gitlab-Token`).
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the secret instead.
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Where each run's result is posted as a commit status, with `{repository}`, `{project}`
    /// (the repository URL-encoded, GitLab's project id form) and `{sha}` replaced. Unset: no
    /// status is reported.
    #[serde(default)]
    pub status_url: Option<String>,
    /// The token the status is posted with (GitHub: `Authorization: Bearer`, GitLab:
    /// `PRIVATE-TOKEN`), or a file holding it.
    #[serde(default)]
    pub status_token: Option<String>,
    #[serde(default)]
    pub status_token_file: Option<std::path::PathBuf>,
}

/// A commit link for changes from one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitLink {
    /// Changes whose CloudEvents `source` starts with this (`""` matches every change).
    pub source_prefix: String,
    /// The commit's URL, with `{repository}`, `{sha}` and `{revision}` replaced (e.g.
    /// `https://github.com/{repository}/commit/{sha}`).
    pub template: String,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            required_services: slipway_domain::service::Service::ALL
                .iter()
                .map(|s| s.name().to_string())
                .collect(),
            public_url: None,
            approvers: Vec::new(),
            webhooks: Vec::new(),
            webhook_attempts: 5,
            max_body_bytes: 1024 * 1024,
            request_timeout_secs: 30,
            auth_failures_per_minute: 10,
            trace_url_template: None,
            signing_key: None,
            signing_key_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            cdevents: true,
            cdevents_webhooks: Vec::new(),
            git_hooks: Vec::new(),
            commit_links: Vec::new(),
            oidc: None,
        }
    }
}

pub use slipway_domain::policy::Approver;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConductorSettings {
    /// How often stage timeouts are checked.
    pub tick_millis: u64,
    /// Pipelines started by CDEvents (`change.merged`, `artifact.packaged`/`published`): a
    /// CDEvent names no spec, so the conductor looks up which registered pipeline delivers it.
    pub cdevents: Vec<CdeventsPipeline>,
}

impl Default for ConductorSettings {
    fn default() -> Self {
        Self {
            tick_millis: 500,
            cdevents: Vec::new(),
        }
    }
}

/// A pipeline a CDEvent starts: what it matches, its spec, and where its source is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdeventsPipeline {
    /// `change.merged`: the repository (`subject.content.repository.id`, or its `source`).
    #[serde(default)]
    pub repository: Option<String>,
    /// `artifact.packaged` / `artifact.published`: artifact ids (purls) starting with this.
    #[serde(default)]
    pub artifact_prefix: Option<String>,
    /// The pipeline spec (TOML), read when the CDEvent arrives.
    pub spec: std::path::PathBuf,
    /// What the pipeline builds from.
    pub source: slipway_domain::events::SourceRef,
}

impl CdeventsPipeline {
    /// Whether this pipeline delivers the CDEvent.
    pub fn matches(&self, incoming: &slipway_domain::cdevents::Incoming) -> bool {
        if incoming.ty.starts_with("dev.cdevents.change.merged.") {
            let repo = incoming.repository.as_deref();
            let src = incoming.repository_source.as_deref();
            self.repository
                .as_deref()
                .is_some_and(|r| Some(r) == repo || Some(r) == src)
        } else {
            self.artifact_prefix
                .as_deref()
                .is_some_and(|p| incoming.subject_id.starts_with(p))
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads the file (if any) and the environment overrides.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or value at fault.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path: Option<PathBuf> = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("SLIPWAY_CONFIG").map(PathBuf::from));
        let mut b = config::Config::builder();
        if let Some(p) = &path {
            if !p.is_file() {
                return Err(ConfigError(format!("{} is not a file", p.display())));
            }
            b = b.add_source(config::File::from(p.as_path()).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("SLIPWAY")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // Lists come comma-separated, e.g. SLIPWAY__EXEC__GIT_SCHEMES=https,file.
                .list_separator(",")
                .with_list_parse_key("exec.pass_env")
                .with_list_parse_key("exec.git_schemes"),
        );
        let c = b.build().map_err(|e| ConfigError(e.to_string()))?;
        c.try_deserialize().map_err(|e| ConfigError(e.to_string()))
    }
}

/// `--config PATH` from a service's arguments, the only argument services take.
///
/// # Errors
/// [`ConfigError`] for any other argument.
pub fn config_path_from_args() -> Result<Option<PathBuf>, ConfigError> {
    let mut all = std::env::args();
    let program = all.next().unwrap_or_default();
    let mut args = all;
    match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => Ok(None),
        (Some("--version"), None, None) => {
            let name = Path::new(&program)
                .file_name()
                .map_or_else(|| program.clone(), |n| n.to_string_lossy().to_string());
            println!("{name} {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0)
        }
        (Some("--config"), Some(p), None) => Ok(Some(PathBuf::from(p))),
        _ => Err(ConfigError(
            "usage: <service> [--config PATH | --version] (settings also from SLIPWAY__* variables)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_read_and_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[nats]\nurl = \"nats://127.0.0.1:1\"\n[nats.stream]\nreplicas = 3\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.nats.url, "nats://127.0.0.1:1");
        assert_eq!(c.nats.stream.replicas, 3);
        std::fs::write(&p, "[nats]\nurll = \"x\"\n").unwrap();
        let err = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
    }
}
