//! Changes from git hosts: GitHub's and GitLab's push and merge webhooks become changes of the
//! pipeline `[[gateway.git_hooks]]` maps their repository and branch to; each run's result goes
//! back to the commit as a status in the host's own format.
//!
//! A delivery is authenticated before anything in it is read: GitHub's `X-Hub-Signature-256`
//! (HMAC-SHA256 of the body with the webhook's secret), GitLab's `X-Gitlab-Token`. The change's
//! id is the host's delivery id, so a redelivery is the same change and makes no second run
//! (the conductor creates a run once per change, whenever the repeat comes).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};
use slipway_core::config::{GitHook, GitHost};
use slipway_domain::events::{ChangeSubmitted, CommitRef, EventData, SourceRef};
use slipway_domain::{Event, Run, ids};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// A configured hook with its secrets read.
#[derive(Debug, Clone)]
pub struct Hook {
    pub config: GitHook,
    secret: Option<String>,
    status_token: Option<String>,
}

/// The configured hooks, secrets read from their files.
#[derive(Debug, Clone, Default)]
pub struct Hooks(pub Arc<Vec<Hook>>);

impl Hooks {
    /// # Errors
    /// What is wrong with a hook's configuration (never the secret itself).
    pub fn load(hooks: &[GitHook]) -> Result<Self, String> {
        let read = |what: &str, inline: &Option<String>, file: &Option<std::path::PathBuf>| match (
            inline, file,
        ) {
            (Some(_), Some(_)) => Err(format!("set {what} or {what}_file, not both")),
            (Some(s), None) => Ok(Some(s.trim().to_string())),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim().to_string()))
                .map_err(|e| format!("{what}_file {}: {e}", p.display())),
            (None, None) => Ok(None),
        };
        let mut out = Vec::new();
        for (i, h) in hooks.iter().enumerate() {
            let at =
                |e: String| format!("[[gateway.git_hooks]] #{} ({}): {e}", i + 1, h.repository);
            let secret = read("secret", &h.secret, &h.secret_file).map_err(at)?;
            if secret.as_deref().is_none_or(str::is_empty) {
                return Err(at(
                    "a secret is required: deliveries are accepted only when signed with it".into(),
                ));
            }
            let status_token =
                read("status_token", &h.status_token, &h.status_token_file).map_err(at)?;
            out.push(Hook {
                config: h.clone(),
                secret,
                status_token,
            });
        }
        Ok(Self(Arc::new(out)))
    }

    /// The hook that reports a run's commit, if any.
    fn for_commit(&self, commit: &CommitRef) -> Option<&Hook> {
        self.0.iter().find(|h| {
            Some(h.config.host.as_str()) == commit.host.as_deref()
                && Some(h.config.repository.as_str()) == commit.repository.as_deref()
                && h.config.status_url.is_some()
        })
    }
}

/// `202` body of a delivery: the run it becomes, or why it makes none.
#[derive(Debug, Serialize, ToSchema)]
pub struct HookAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Why nothing was started (a branch no pipeline follows, a tag, a branch deleted, an
    /// event that is not a push or merge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
}

fn ignored(why: String) -> (StatusCode, Json<HookAnswer>) {
    (
        StatusCode::ACCEPTED,
        Json(HookAnswer {
            run_id: None,
            ignored: Some(why),
        }),
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What a push or merge says, whichever host sent it.
#[derive(Debug)]
struct Push {
    repository: String,
    branch: String,
    sha: String,
    clone_url: Option<String>,
    author: Option<String>,
    title: Option<String>,
    url: Option<String>,
}

fn text(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn first_line(s: Option<String>) -> Option<String> {
    s.and_then(|m| m.lines().next().map(str::to_string))
}

/// A push to a branch or a merged pull request, from GitHub's payload; `Err` says why the
/// event starts nothing.
fn github_push(event: &str, body: &Value) -> Result<Push, String> {
    let repository =
        text(body, "/repository/full_name").ok_or("the payload has no repository.full_name")?;
    let clone_url = text(body, "/repository/clone_url");
    match event {
        "push" => {
            let r = text(body, "/ref").unwrap_or_default();
            let Some(branch) = r.strip_prefix("refs/heads/") else {
                return Err(format!("{r} is not a branch"));
            };
            if body["deleted"].as_bool() == Some(true) {
                return Err(format!("branch {branch} was deleted"));
            }
            let sha = text(body, "/after").ok_or("the push has no `after` commit")?;
            Ok(Push {
                repository,
                branch: branch.to_string(),
                sha,
                clone_url,
                // Who pushed, as the host authenticated them: a commit's author is whatever
                // the committer wrote, and would let anyone pass as someone else.
                author: text(body, "/sender/login").or_else(|| text(body, "/pusher/name")),
                title: first_line(text(body, "/head_commit/message")),
                url: text(body, "/head_commit/url"),
            })
        }
        "pull_request" => {
            let merged = body["action"] == "closed" && body["pull_request"]["merged"] == true;
            if !merged {
                return Err(format!(
                    "pull request {}, not merged",
                    body["action"].as_str().unwrap_or("?")
                ));
            }
            let sha = text(body, "/pull_request/merge_commit_sha")
                .ok_or("the merged pull request has no merge_commit_sha")?;
            Ok(Push {
                branch: text(body, "/pull_request/base/ref").unwrap_or_default(),
                url: text(body, "/repository/html_url").map(|u| format!("{u}/commit/{sha}")),
                sha,
                repository,
                clone_url,
                author: text(body, "/pull_request/user/login"),
                title: text(body, "/pull_request/title"),
            })
        }
        other => Err(format!("{other} events start nothing")),
    }
}

/// A push to a branch or an accepted merge request, from GitLab's payload.
fn gitlab_push(event: &str, body: &Value) -> Result<Push, String> {
    let repository = text(body, "/project/path_with_namespace")
        .ok_or("the payload has no project.path_with_namespace")?;
    let clone_url = text(body, "/project/git_http_url");
    match event {
        "Push Hook" => {
            let r = text(body, "/ref").unwrap_or_default();
            let Some(branch) = r.strip_prefix("refs/heads/") else {
                return Err(format!("{r} is not a branch"));
            };
            let sha = text(body, "/checkout_sha")
                .or_else(|| text(body, "/after"))
                .filter(|s| s.bytes().any(|b| b != b'0'))
                .ok_or_else(|| format!("branch {branch} was deleted"))?;
            let head = body["commits"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["id"] == sha.as_str()).or(c.last()));
            Ok(Push {
                repository,
                branch: branch.to_string(),
                author: text(body, "/user_username").or_else(|| text(body, "/user_name")),
                title: first_line(head.and_then(|c| text(c, "/title").or(text(c, "/message")))),
                url: head.and_then(|c| text(c, "/url")),
                sha,
                clone_url,
            })
        }
        "Merge Request Hook" => {
            let attrs = &body["object_attributes"];
            if attrs["action"] != "merge" {
                return Err(format!(
                    "merge request {}, not merged",
                    attrs["action"].as_str().unwrap_or("?")
                ));
            }
            let sha = text(attrs, "/merge_commit_sha")
                .or_else(|| text(attrs, "/last_commit/id"))
                .ok_or("the merge request has no merge_commit_sha")?;
            Ok(Push {
                repository,
                branch: text(attrs, "/target_branch").unwrap_or_default(),
                author: text(body, "/user/username"),
                title: text(attrs, "/title"),
                url: text(body, "/project/web_url").map(|u| format!("{u}/-/commit/{sha}")),
                sha,
                clone_url,
            })
        }
        other => Err(format!("{other} events start nothing")),
    }
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`, compared
/// in constant time.
fn github_signed(secret: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = decode_hex(hex) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, body, &tag).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A git commit id: 40 (SHA-1) or 64 (SHA-256) hex digits.
pub fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
fn same_secret(a: &str, b: &str) -> bool {
    // Compared as digests, so neither the length nor the content leaks through timing.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"slipway gitlab token");
    let tag = ring::hmac::sign(&key, a.as_bytes());
    ring::hmac::verify(&key, b.as_bytes(), tag.as_ref()).is_ok()
}

/// A GitHub webhook delivery: `push`, a merged `pull_request`, or `ping`.
#[utoipa::path(
    post,
    path = "/v1/hooks/github",
    request_body(content = Object, description = "GitHub's webhook payload; X-GitHub-Event, X-GitHub-Delivery and X-Hub-Signature-256 headers"),
    responses(
        (status = 202, description = "The run the push became, or why it starts none", body = HookAnswer),
        (status = 200, description = "A ping answered", body = HookAnswer),
        (status = 400, description = "A header or the payload is malformed, or the mapped spec is invalid", body = ErrorBody),
        (status = 401, description = "Missing or wrong X-Hub-Signature-256", body = ErrorBody),
        (status = 404, description = "No GitHub hook is configured", body = ErrorBody),
        (status = 503, description = "NATS unavailable, or the mapped spec cannot be read", body = ErrorBody),
    )
)]
pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<HookAnswer>), ApiError> {
    let hooks: Vec<&Hook> = host_hooks(&state, GitHost::Github)?;
    let signature = header(&headers, "x-hub-signature-256").ok_or_else(|| {
        ApiError::Unauthorized("missing X-Hub-Signature-256 (set the webhook's secret)".into())
    })?;
    let signed: Vec<&Hook> = hooks
        .into_iter()
        .filter(|h| github_signed(h.secret.as_deref().unwrap_or_default(), &body, signature))
        .collect();
    if signed.is_empty() {
        return Err(ApiError::Unauthorized(
            "X-Hub-Signature-256 does not match the body under any configured secret".into(),
        ));
    }
    let event = header(&headers, "x-github-event")
        .ok_or_else(|| ApiError::BadRequest("missing X-GitHub-Event".into()))?;
    if event == "ping" {
        return Ok((
            StatusCode::OK,
            Json(HookAnswer {
                run_id: None,
                ignored: Some("ping".into()),
            }),
        ));
    }
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ApiError::BadRequest("missing X-GitHub-Delivery".into()))?;
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the payload is not JSON: {e}")))?;
    match github_push(event, &payload) {
        Ok(push) => start(&state, GitHost::Github, &signed, delivery, push).await,
        Err(why) => Ok(ignored(why)),
    }
}

/// A GitLab webhook delivery: `Push Hook` or a merged `Merge Request Hook`.
#[utoipa::path(
    post,
    path = "/v1/hooks/gitlab",
    request_body(content = Object, description = "GitLab's webhook payload; X-Gitlab-Event, X-Gitlab-Token and Idempotency-Key (or X-Gitlab-Event-UUID) headers"),
    responses(
        (status = 202, description = "The run the push became, or why it starts none", body = HookAnswer),
        (status = 400, description = "A header or the payload is malformed, or the mapped spec is invalid", body = ErrorBody),
        (status = 401, description = "Missing or wrong X-Gitlab-Token", body = ErrorBody),
        (status = 404, description = "No GitLab hook is configured", body = ErrorBody),
        (status = 503, description = "NATS unavailable, or the mapped spec cannot be read", body = ErrorBody),
    )
)]
pub async fn gitlab(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<HookAnswer>), ApiError> {
    let hooks = host_hooks(&state, GitHost::Gitlab)?;
    let token = header(&headers, "x-gitlab-token")
        .ok_or_else(|| ApiError::Unauthorized("missing X-Gitlab-Token".into()))?;
    let signed: Vec<&Hook> = hooks
        .into_iter()
        .filter(|h| same_secret(h.secret.as_deref().unwrap_or_default(), token))
        .collect();
    if signed.is_empty() {
        return Err(ApiError::Unauthorized(
            "X-Gitlab-Token is not the secret token of any configured hook".into(),
        ));
    }
    let event = header(&headers, "x-gitlab-event")
        .ok_or_else(|| ApiError::BadRequest("missing X-Gitlab-Event".into()))?;
    // GitLab keeps `Idempotency-Key` across retries of one delivery; older versions send the
    // event's UUID alone.
    let delivery = header(&headers, "idempotency-key")
        .or_else(|| header(&headers, "x-gitlab-event-uuid"))
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            ApiError::BadRequest("missing Idempotency-Key or X-Gitlab-Event-UUID".into())
        })?;
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the payload is not JSON: {e}")))?;
    match gitlab_push(event, &payload) {
        Ok(push) => start(&state, GitHost::Gitlab, &signed, delivery, push).await,
        Err(why) => Ok(ignored(why)),
    }
}

fn host_hooks(state: &AppState, host: GitHost) -> Result<Vec<&Hook>, ApiError> {
    let hooks: Vec<&Hook> = state
        .hooks
        .0
        .iter()
        .filter(|h| h.config.host == host)
        .collect();
    if hooks.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no {} hook is configured ([[gateway.git_hooks]] host = \"{}\")",
            host.as_str(),
            host.as_str()
        )));
    }
    Ok(hooks)
}

/// Publishes the change the push is for the hook (among those whose secret signed it) that
/// maps its repository and branch.
async fn start(
    state: &AppState,
    host: GitHost,
    signed: &[&Hook],
    delivery: &str,
    push: Push,
) -> Result<(StatusCode, Json<HookAnswer>), ApiError> {
    let Some(hook) = signed.iter().find(|h| {
        h.config.repository == push.repository
            && h.config.branch.as_deref().is_none_or(|b| b == push.branch)
    }) else {
        return Ok(ignored(format!(
            "no pipeline follows {} branch {}",
            push.repository, push.branch
        )));
    };
    let spec = std::fs::read_to_string(&hook.config.spec).map_err(|e| {
        ApiError::Unavailable(format!(
            "cannot read the spec {} mapped to {}: {e}",
            hook.config.spec.display(),
            push.repository
        ))
    })?;
    let source = match &hook.config.source {
        Some(SourceRef::Git { url, .. }) => SourceRef::Git {
            url: url.clone(),
            revision: push.sha.clone(),
        },
        Some(other) => other.clone(),
        None => SourceRef::Git {
            url: push.clone_url.clone().ok_or_else(|| {
                ApiError::BadRequest("the payload names no clone URL and the hook no source".into())
            })?,
            revision: push.sha.clone(),
        },
    };
    let change = ChangeSubmitted {
        spec,
        source,
        author: push.author.clone(),
        title: push.title.clone(),
        rerun_of: None,
        commit: Some(CommitRef {
            sha: push.sha.clone(),
            repository: Some(push.repository.clone()),
            branch: Some(push.branch.clone()),
            host: Some(host.as_str().into()),
            url: push.url.clone(),
        }),
    };
    change.validate().map_err(|e| {
        ApiError::BadRequest(format!("the spec mapped to {}: {e}", push.repository))
    })?;
    let source = format!("/hooks/{}/{}", host.as_str(), push.repository);
    // The change is the commit on its branch, from the signed payload: a redelivery, a replay
    // under another delivery id, and the push and merge events of one merge are one change.
    let id = ids::derived(&[host.as_str(), &push.repository, &push.branch, &push.sha]);
    tracing::info!(%delivery, repository = %push.repository, branch = %push.branch, sha = %push.sha, "Change from a git host.");
    let event = Event::new(
        id.clone(),
        source.clone(),
        None,
        Utc::now(),
        EventData::ChangeSubmitted(change),
    );
    state.bus.publish(&event).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(HookAnswer {
            run_id: Some(ids::run_id(&source, &id)),
            ignored: None,
        }),
    ))
}

/// The commit status a run's state is, in the host's words; `None` for a state not reported.
pub fn status_state(host: GitHost, run: &Run) -> &'static str {
    use slipway_domain::Phase;
    match (host, run.phase) {
        (_, Phase::Succeeded) => "success",
        (GitHost::Github, Phase::Failed | Phase::Rejected | Phase::RolledBack) => "failure",
        (GitHost::Github, Phase::Cancelled) => "error",
        (GitHost::Github, _) => "pending",
        (GitHost::Gitlab, Phase::Failed | Phase::Rejected | Phase::RolledBack) => "failed",
        (GitHost::Gitlab, Phase::Cancelled) => "canceled",
        (GitHost::Gitlab, Phase::Queued) => "pending",
        (GitHost::Gitlab, _) => "running",
    }
}

/// A request to a host's API: where, with which headers, what.
pub type StatusPost = (String, Vec<(&'static str, String)>, Value);

/// The commit status of `run` for the hook that maps its commit: the URL, the headers and the
/// body the host's API takes. `None` when the run's commit is on no hook that reports.
pub fn commit_status(hooks: &Hooks, run: &Run, public_url: &str) -> Option<StatusPost> {
    let commit = run.change.commit.as_ref()?;
    let hook = hooks.for_commit(commit)?;
    // Only a change a hook made (the gateway refuses `/hooks/` sources and hosts at its other
    // door), and only a commit id: nothing a submitter wrote reaches the host's API.
    let repository = commit.repository.as_deref()?;
    if run.change.source != format!("/hooks/{}/{repository}", hook.config.host.as_str())
        || !is_commit_id(&commit.sha)
    {
        return None;
    }
    let host = hook.config.host;
    let url = hook
        .config
        .status_url
        .as_deref()?
        .replace("{repository}", repository)
        .replace("{project}", &repository.replace('/', "%2F"))
        .replace("{sha}", &commit.sha);
    let state = status_state(host, run);
    let target = format!("{}/runs/{}", public_url.trim_end_matches('/'), run.run_id);
    let description: String = match (&run.reason, run.phase.is_final()) {
        (Some(r), true) => format!("{}: {r}", run.phase.as_str()),
        _ => run.phase.as_str().replace('_', " "),
    }
    .chars()
    .take(140)
    .collect();
    let context = format!("slipway/{}", run.pipeline);
    let mut headers = vec![("content-type", "application/json".to_string())];
    let body = match host {
        GitHost::Github => {
            headers.push(("accept", "application/vnd.github+json".into()));
            headers.push(("x-github-api-version", "2022-11-28".into()));
            if let Some(t) = &hook.status_token {
                headers.push(("authorization", format!("Bearer {t}")));
            }
            json!({"state": state, "target_url": target, "description": description, "context": context})
        }
        GitHost::Gitlab => {
            if let Some(t) = &hook.status_token {
                headers.push(("private-token", t.clone()));
            }
            json!({"state": state, "target_url": target, "description": description,
                   "name": context, "ref": commit.branch})
        }
    };
    Some((url, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_signatures_are_checked_over_the_exact_body() {
        // GitHub's documented example: secret "It's a Secret to Everybody", body "Hello, World!".
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(github_signed(
            "It's a Secret to Everybody",
            b"Hello, World!",
            sig
        ));
        assert!(!github_signed(
            "It's a Secret to Everybody",
            b"Hello, World?",
            sig
        ));
        assert!(!github_signed("another secret", b"Hello, World!", sig));
        assert!(!github_signed(
            "It's a Secret to Everybody",
            b"Hello, World!",
            &sig[7..]
        ));
        assert!(!github_signed("x", b"", "sha256=zz"));
        assert!(same_secret("token", "token"));
        assert!(!same_secret("token", "token2"));
    }

    #[test]
    fn pushes_and_merges_are_read_and_the_rest_ignored() {
        let push = json!({"ref": "refs/heads/main", "after": "abc123", "deleted": false,
            "repository": {"full_name": "acme/shop", "clone_url": "https://github.com/acme/shop.git"},
            "head_commit": {"message": "Faster checkout\n\nDetails", "url": "https://github.com/acme/shop/commit/abc123",
                            "author": {"username": "alice"}},
            "pusher": {"name": "alice"}, "sender": {"login": "alice"}});
        let p = github_push("push", &push).unwrap();
        assert_eq!(
            (
                p.branch.as_str(),
                p.sha.as_str(),
                p.title.as_deref(),
                p.author.as_deref()
            ),
            ("main", "abc123", Some("Faster checkout"), Some("alice"))
        );
        let mut tag = push.clone();
        tag["ref"] = json!("refs/tags/v1");
        assert!(
            github_push("push", &tag)
                .unwrap_err()
                .contains("not a branch")
        );
        let mut gone = push.clone();
        gone["deleted"] = json!(true);
        assert!(github_push("push", &gone).unwrap_err().contains("deleted"));
        assert!(github_push("issues", &push).is_err());
        let opened = json!({"action": "opened", "repository": {"full_name": "acme/shop"},
            "pull_request": {"merged": false}});
        assert!(
            github_push("pull_request", &opened)
                .unwrap_err()
                .contains("not merged")
        );

        let gl = json!({"ref": "refs/heads/main", "checkout_sha": "def456", "user_username": "bob",
            "project": {"path_with_namespace": "acme/shop", "git_http_url": "https://gitlab.example/acme/shop.git"},
            "commits": [{"id": "def456", "title": "Fix the cart", "url": "https://gitlab.example/acme/shop/-/commit/def456"}]});
        let p = gitlab_push("Push Hook", &gl).unwrap();
        assert_eq!(
            (p.sha.as_str(), p.title.as_deref()),
            ("def456", Some("Fix the cart"))
        );
        let mut deleted = gl.clone();
        deleted["checkout_sha"] = Value::Null;
        deleted["after"] = json!("0000000000000000000000000000000000000000");
        assert!(
            gitlab_push("Push Hook", &deleted)
                .unwrap_err()
                .contains("deleted")
        );
        let mr = json!({"object_attributes": {"action": "merge", "target_branch": "main",
            "merge_commit_sha": "fff", "title": "Feature"}, "user": {"username": "carol"},
            "project": {"path_with_namespace": "acme/shop", "web_url": "https://gitlab.example/acme/shop"}});
        let p = gitlab_push("Merge Request Hook", &mr).unwrap();
        assert_eq!(
            (p.branch.as_str(), p.sha.as_str(), p.url.as_deref()),
            (
                "main",
                "fff",
                Some("https://gitlab.example/acme/shop/-/commit/fff")
            )
        );
    }
}
