//! What the approver's console reads beside the run itself: the decision's context (the
//! policy, the decisions so far, the deadlines, the commit, what runs in production now, the
//! staging URL, the stage logs there are), the logs page by page, and the audit of decisions.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Duration, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use slipway_domain::fold::StageStatus;
use slipway_domain::{Phase, Run, ids};

use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// The approval a run waits for (or last waited for) and where it stands.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ApprovalContext {
    pub stage: String,
    pub environment: String,
    /// `requested` while it waits; `succeeded`/`failed`/`cancelled` once decided.
    pub status: String,
    pub requested_at: Option<DateTime<Utc>>,
    /// The run's approval policy, as its spec snapshot holds it.
    pub policy: Value,
    /// Decisions for this stage, oldest first, each with when it stops counting.
    pub decisions: Vec<DecisionView>,
    /// Approvals still needed.
    pub missing: u32,
    /// When the run is cancelled if no decision is taken (`requested_at` + the timeout).
    pub timeout_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DecisionView {
    pub approver: String,
    pub groups: Vec<String>,
    pub decision: String,
    pub artifact_digest: String,
    pub comment: Option<String>,
    pub decided_at: DateTime<Utc>,
    /// An approval older than the policy's `expires_after_secs` no longer counts.
    pub counts_until: DateTime<Utc>,
    /// Carries the gateway's signature.
    pub signed: bool,
    /// The signature verifies with this gateway's key (`None`: the gateway has no key).
    pub verified: Option<bool>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CommitView {
    /// The commit or revision.
    pub sha: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
    /// Where it can be seen: the host's link, or the configured template's.
    pub url: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LiveView {
    pub environment: String,
    pub version: String,
    pub since: Option<DateTime<Utc>>,
    /// The run that deployed it.
    pub run_id: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EnvironmentView {
    pub name: String,
    pub url: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LogRef {
    pub stage: String,
    pub attempt: u32,
    pub size: u64,
}

/// `GET /v1/runs/{id}/context`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunContext {
    pub run_id: String,
    /// The gateway's clock, for countdowns that do not trust the browser's.
    pub now: DateTime<Utc>,
    pub approval: Option<ApprovalContext>,
    pub commit: Option<CommitView>,
    /// What runs in the environment the run waits to deploy to (or last deployed to).
    pub production: Option<LiveView>,
    /// Where the run was tried before production (its gates' environment).
    pub staging: Option<EnvironmentView>,
    /// Stages that stored a log, newest attempt of each.
    pub logs: Vec<LogRef>,
    /// Every decision on the run, by stage, oldest first.
    pub decisions: Vec<DecisionView>,
}

fn decision_view(
    state: &AppState,
    run: &Run,
    a: &slipway_domain::run::Approval,
    expires_after: i64,
) -> DecisionView {
    let approve = a.decision == "approve";
    let verified = state.signing.as_ref().map(|k| {
        a.record.signature.is_some()
            && slipway_domain::signing::PublicKey::from_base64(&k.public_base64())
                .is_ok_and(|p| p.verify(&run.run_id, approve, &a.record).is_ok())
    });
    DecisionView {
        approver: a.approver.clone(),
        groups: a.groups.clone(),
        decision: a.decision.to_string(),
        artifact_digest: a.artifact_digest.to_string(),
        comment: a.comment.clone(),
        decided_at: a.decided_at,
        counts_until: a.decided_at + Duration::seconds(expires_after),
        signed: a.record.signature.is_some(),
        verified,
    }
}

/// The commit's link: the host's own, or the first configured template whose source prefix
/// starts the change's source.
fn commit_view(state: &AppState, run: &Run) -> Option<CommitView> {
    let commit = run.change.commit.as_ref();
    let revision = match &run.source {
        slipway_domain::events::SourceRef::Git { revision, .. } => Some(revision.clone()),
        slipway_domain::events::SourceRef::Directory { .. } => None,
    };
    let sha = commit.map(|c| c.sha.clone()).or(revision.clone())?;
    let repository = commit.and_then(|c| c.repository.clone());
    let url = commit.and_then(|c| c.url.clone()).or_else(|| {
        state
            .commit_links
            .iter()
            .find(|l| run.change.source.starts_with(&l.source_prefix))
            .map(|l| {
                l.template
                    .replace("{repository}", repository.as_deref().unwrap_or_default())
                    .replace("{sha}", &sha)
                    .replace("{revision}", revision.as_deref().unwrap_or(&sha))
            })
    });
    Some(CommitView {
        sha: Some(sha),
        repository,
        branch: commit.and_then(|c| c.branch.clone()),
        // A link the page may follow: http(s) only.
        url: url.filter(|u| u.starts_with("https://") || u.starts_with("http://")),
    })
}

/// The newest deployment to `environment` of a succeeded run of `pipeline` other than
/// `except`: what runs there now.
async fn live_in(
    state: &AppState,
    pipeline: &str,
    environment: &str,
    except: &str,
) -> Result<Option<LiveView>, ApiError> {
    let filter = crate::listing::Filter {
        phase: Some(Phase::Succeeded),
        pipeline: Some(pipeline.to_string()),
        since: None,
        until: None,
    };
    let page = crate::listing::page(state, filter, None, 50).await?;
    let mut best: Option<LiveView> = None;
    for run in &page.runs {
        let id = run["run_id"].as_str().unwrap_or_default();
        if id == except {
            continue;
        }
        for d in run["deployments"].as_array().into_iter().flatten() {
            if d["environment"] != environment || d["rolled_back"] == true {
                continue;
            }
            let since = d["deployed_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            if best.as_ref().is_none_or(|b| since > b.since) {
                best = Some(LiveView {
                    environment: environment.to_string(),
                    version: d["version"].as_str().unwrap_or_default().to_string(),
                    since,
                    run_id: id.to_string(),
                });
            }
        }
    }
    Ok(best)
}

/// Stages whose events stored a log (`log` in their data), the newest attempt of each.
async fn log_refs(
    state: &AppState,
    id: &str,
) -> Result<BTreeMap<String, (u32, slipway_domain::events::ObjectRef)>, ApiError> {
    let mut out: BTreeMap<String, (u32, slipway_domain::events::ObjectRef)> = BTreeMap::new();
    for rec in state.bus.run_log(id).await? {
        let Ok(event) = rec.event else { continue };
        let data = event.data.to_json();
        let (Some(stage), Some(log)) = (data["stage"].as_str(), data.get("log")) else {
            continue;
        };
        let Ok(obj) = serde_json::from_value::<slipway_domain::events::ObjectRef>(log.clone())
        else {
            continue;
        };
        let attempt = data["attempt"].as_u64().unwrap_or(0) as u32;
        if out.get(stage).is_none_or(|(a, _)| attempt >= *a) {
            out.insert(stage.to_string(), (attempt, obj));
        }
    }
    Ok(out)
}

/// The decision's context: the approval's policy, decisions and deadline, the commit, what
/// runs in production, the staging URL, the stages' logs.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/context",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "The run's context", body = Object),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn context(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunContext>, ApiError> {
    if !ids::is_valid_run_id(&id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    // The spec snapshot and the signed records live in the run's events, not its JSON.
    let run = crate::routes::run_from_log(&state, &id).await?;
    let policy = run.spec.approval.clone().unwrap_or_else(|| {
        serde_json::from_value(serde_json::json!({})).expect("the policy's defaults")
    });
    let expires_after = policy.expires_after_secs as i64;
    let stage = run
        .stages
        .iter()
        .rev()
        .find(|s| s.name.starts_with("approval:") && s.status != StageStatus::Pending);
    let approval = stage.map(|s| {
        let environment = s.name.trim_start_matches("approval:").to_string();
        let decisions: Vec<DecisionView> = run
            .approvals
            .iter()
            .filter(|a| a.environment == environment)
            .map(|a| decision_view(&state, &run, a, expires_after))
            .collect();
        let counting = run.approvals_for(&s.name).len() as u32;
        ApprovalContext {
            stage: s.name.clone(),
            environment,
            status: serde_json::to_value(s.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            requested_at: s.requested_at,
            policy: serde_json::to_value(&policy).unwrap_or(Value::Null),
            decisions,
            missing: policy.required_approvals.saturating_sub(counting),
            timeout_at: s
                .requested_at
                .map(|t| t + Duration::seconds(policy.timeout_secs as i64)),
        }
    });
    let target = approval
        .as_ref()
        .map(|a| a.environment.clone())
        .or_else(|| run.spec.environment.last().map(|e| e.name.clone()));
    let production = match &target {
        Some(env) => live_in(&state, &run.pipeline, env, &run.run_id).await?,
        None => None,
    };
    let gates_env = run.spec.gates.environment.clone().or_else(|| {
        run.spec
            .environment
            .iter()
            .find(|e| Some(&e.name) != target.as_ref())
            .map(|e| e.name.clone())
    });
    let staging = gates_env.and_then(|name| {
        run.spec
            .environment
            .iter()
            .find(|e| e.name == name)
            .map(|e| EnvironmentView {
                name: e.name.clone(),
                url: e.url.clone(),
            })
    });
    let logs = log_refs(&state, &id)
        .await?
        .into_iter()
        .map(|(stage, (attempt, obj))| LogRef {
            stage,
            attempt,
            size: obj.size,
        })
        .collect();
    let decisions = run
        .approvals
        .iter()
        .map(|a| decision_view(&state, &run, a, expires_after))
        .collect();
    Ok(Json(RunContext {
        run_id: run.run_id.clone(),
        now: Utc::now(),
        approval,
        commit: commit_view(&state, &run),
        production,
        staging,
        logs,
        decisions,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    offset: Option<u64>,
    limit: Option<u64>,
}

/// One page of a stage's log.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LogPage {
    pub stage: String,
    pub attempt: u32,
    /// The whole log's size in bytes.
    pub size: u64,
    pub offset: u64,
    /// Where the next page starts; absent at the end.
    pub next_offset: Option<u64>,
    /// The page's text (invalid UTF-8 replaced).
    pub text: String,
}

/// Largest log page.
const MAX_LOG_PAGE: u64 = 256 * 1024;

/// A stage's stored log (its newest attempt), a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/logs/{stage}",
    params(("id" = String, Path, description = "run id"),
           ("stage" = String, Path, description = "stage key, e.g. build, test:unit, deploy:production"),
           ("offset" = Option<u64>, Query, description = "byte offset (default 0)"),
           ("limit" = Option<u64>, Query, description = "bytes (default and at most 262144)")),
    responses(
        (status = 200, description = "A page of the log", body = Object),
        (status = 400, description = "Bad offset or limit", body = ErrorBody),
        (status = 404, description = "No such run, or the stage stored no log", body = ErrorBody),
    )
)]
pub async fn log_page(
    State(state): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LogPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !ids::is_valid_run_id(&id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    let refs = log_refs(&state, &id).await?;
    let Some((attempt, obj)) = refs.get(&stage) else {
        return Err(ApiError::NotFound(format!(
            "run {id} has no log of stage {stage:?} (stages with logs: {})",
            refs.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    };
    let bytes = slipway_core::store::objects::read(&state.objects, &obj.bucket, &obj.name)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read the log {}: {e}", obj.name)))?;
    let size = bytes.len() as u64;
    let offset = q.offset.unwrap_or(0);
    if offset > size {
        return Err(ApiError::BadRequest(format!(
            "offset: {offset} is beyond the log's {size} bytes"
        )));
    }
    let limit = q.limit.unwrap_or(MAX_LOG_PAGE).clamp(1, MAX_LOG_PAGE);
    let mut end = (offset + limit).min(size);
    // A page ends before a UTF-8 sequence that does not fit, which starts the next page.
    while end < size && end > offset + 3 && (bytes[end as usize] & 0xC0) == 0x80 {
        end -= 1;
    }
    Ok(Json(LogPage {
        stage,
        attempt: *attempt,
        size,
        offset,
        next_offset: (end < size).then_some(end),
        text: String::from_utf8_lossy(&bytes[offset as usize..end as usize]).into_owned(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pipeline: Option<String>,
    approver: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditEntry {
    pub run_id: String,
    pub pipeline: String,
    pub environment: String,
    #[serde(flatten)]
    pub decision: DecisionView,
}

/// `GET /v1/audit`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AuditPage {
    /// Decisions of the page's runs (newest runs first; each run's decisions oldest first).
    pub decisions: Vec<AuditEntry>,
    /// The next page, when there may be more.
    pub next_cursor: Option<String>,
}

/// Every approval decision, run by run (in flight first, then ended runs, newest first), with
/// who decided, on what artifact, when, and whether it is signed; filtered by pipeline and
/// approver.
#[utoipa::path(
    get,
    path = "/v1/audit",
    params(
        ("pipeline" = Option<String>, Query, description = "only this pipeline"),
        ("approver" = Option<String>, Query, description = "only this approver's decisions"),
        ("cursor" = Option<String>, Query, description = "the next page, from next_cursor"),
        ("limit" = Option<usize>, Query, description = "runs looked at per page (default 50, at most 200)"),
    ),
    responses(
        (status = 200, description = "Decisions", body = Object),
        (status = 400, description = "Bad cursor or unknown query field", body = ErrorBody),
    )
)]
pub async fn audit(
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let cursor = q
        .cursor
        .as_deref()
        .map(crate::listing::Cursor::decode)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    let filter = crate::listing::Filter {
        pipeline: q.pipeline.clone(),
        ..Default::default()
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let page = crate::listing::page(&state, filter, cursor, limit).await?;
    let mut decisions = Vec::new();
    for run in &page.runs {
        let has = run["approvals"].as_array().is_some_and(|a| {
            a.iter().any(|d| {
                q.approver
                    .as_deref()
                    .is_none_or(|who| d["approver"].as_str() == Some(who))
            })
        });
        if !has {
            continue;
        }
        // The signed records are in the run's events (its JSON leaves them out).
        let id = run["run_id"].as_str().unwrap_or_default();
        let Ok(folded) = crate::routes::run_from_log(&state, id).await else {
            continue;
        };
        let expires_after = folded
            .spec
            .approval
            .as_ref()
            .map_or(24 * 3600, |p| p.expires_after_secs) as i64;
        for a in &folded.approvals {
            if q.approver.as_deref().is_some_and(|who| who != a.approver) {
                continue;
            }
            decisions.push(AuditEntry {
                run_id: folded.run_id.clone(),
                pipeline: folded.pipeline.clone(),
                environment: a.environment.clone(),
                decision: decision_view(&state, &folded, a, expires_after),
            });
        }
    }
    Ok(Json(AuditPage {
        decisions,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}
