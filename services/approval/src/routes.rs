//! The HTTP API: a handler per route, each documented for the OpenAPI description served at
//! `/openapi.json`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse};
use chrono::Utc;
use cloudevents::event::AttributesWriter;
use serde::{Deserialize, Serialize};
use slipway_core::bus::AppendError;
use slipway_domain::digest::Digest;
use slipway_domain::events::{ApprovalDecision, EventData};
use slipway_domain::fold::StageStatus;
use slipway_domain::{Event, Phase, Run, cdevents, ids, policy, subjects};
use utoipa::{OpenApi, ToSchema};

use crate::AppState;
use crate::auth;
use crate::error::{ApiError, ErrorBody};

/// CloudEvents `source` of the gateway's own events.
pub const SOURCE: &str = slipway_domain::service::Service::Approval.source();

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Slipway approval gateway",
        description = "Changes in, runs out, approvals in. Errors are {\"error\": \"...\"}."
    ),
    paths(
        post_change,
        list_runs,
        get_run,
        run_events,
        gate_details,
        post_approval,
        post_rollout_control,
        crate::hooks::github,
        crate::hooks::gitlab,
        crate::signin::login,
        crate::signin::callback,
        crate::signin::logout,
        crate::signin::session,
        crate::console::context,
        crate::console::log_page,
        crate::console::audit,
        run_page,
        audit_page,
        dora,
        healthz,
        services,
        prometheus,
        ui,
        page,
        openapi
    ),
    components(schemas(
        RunIdBody,
        ErrorBody,
        ApprovalBody,
        Decision,
        RecordedDecision,
        Health,
        RolloutControlBody,
        RecordedControl,
        crate::hooks::HookAnswer,
        crate::signin::Whoami
    ))
)]
pub struct ApiDoc;

/// `202` body of an accepted change.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunIdBody {
    pub run_id: String,
}

/// Publishes a change given as a CloudEvent (HTTP binding, binary or structured mode) whose
/// type is `dev.slipway.change.submitted.v1`, or as a CDEvent (`change.merged`,
/// `artifact.packaged`, `artifact.published`; bare JSON or in a CloudEvent), which the conductor
/// delivers with the pipeline registered for it.
#[utoipa::path(
    post,
    path = "/v1/changes",
    request_body(content = String, content_type = "application/cloudevents+json",
        description = "A CloudEvent (structured mode, or binary mode with ce-* headers and a JSON body) of type dev.slipway.change.submitted.v1; or a CDEvent v0.5 change.merged, artifact.packaged or artifact.published, bare or in a CloudEvent"),
    responses(
        (status = 202, description = "Accepted: the run it becomes", body = RunIdBody),
        (status = 400, description = "Not a CloudEvent or CDEvent, not a change, or an invalid spec", body = ErrorBody),
        (status = 413, description = "The body is larger than [gateway] max_body_bytes", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    )
)]
pub async fn post_change(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<RunIdBody>), ApiError> {
    if is_cdevent(&headers, &body) {
        return post_cdevent(&state, &headers, &body).await;
    }
    let mut ce = cloudevents::binding::http::to_event(&headers, body.to_vec())
        .map_err(|e| ApiError::BadRequest(format!("not a CloudEvent: {e}")))?;
    // `time` is optional in CloudEvents; the log always records one.
    if cloudevents::event::AttributesReader::time(&ce).is_none() {
        ce.set_time(Some(Utc::now()));
    }
    let mut event = Event::from_cloudevent(&ce).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // The HTTP caller's trace context, when the event itself carries none.
    if event.traceparent.is_none()
        && let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok())
        && slipway_core::telemetry::trace::parse(tp).is_some()
    {
        event.traceparent = Some(tp.to_string());
        event.tracestate = headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    let EventData::ChangeSubmitted(change) = &event.data else {
        return Err(ApiError::BadRequest(format!(
            "{} is not a change (expected dev.slipway.change.submitted.v1)",
            event.type_name()
        )));
    };
    change.validate().map_err(ApiError::BadRequest)?;
    // What only the git hosts' hooks may say: their source, and a commit from a host (a commit
    // status is reported for those alone).
    if event.source.starts_with("/hooks/") {
        return Err(ApiError::BadRequest(format!(
            "source: {:?} is reserved for the git hosts' hooks (/v1/hooks/...)",
            event.source
        )));
    }
    if let Some(commit) = &change.commit {
        if commit.host.is_some() {
            return Err(ApiError::BadRequest(
                "data.commit.host: set by the git hosts' hooks only (/v1/hooks/...)".into(),
            ));
        }
        if let Some(url) = &commit.url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(ApiError::BadRequest(format!(
                "data.commit.url: {url:?} is not an http(s) URL"
            )));
        }
    }
    state.bus.publish(&event).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RunIdBody {
            run_id: ids::run_id(&event.source, &event.id),
        }),
    ))
}

/// A bare CDEvent (a JSON object with a `context`), or a CloudEvent of a CDEvents type.
fn is_cdevent(headers: &HeaderMap, body: &[u8]) -> bool {
    let header_type = headers
        .get("ce-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(cdevents::is_cdevent_type);
    header_type
        || serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
            v.get("context").is_some()
                || v.get("type")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(cdevents::is_cdevent_type)
        })
}

/// Stores a CDEvent taken as a change as it came (the log keeps the original), on
/// `slipway.changes.cdevents`; its context id is the message id, so a repeat is one change. A
/// CDEvent that came in a CloudEvent (HTTP binary or structured mode) keeps its envelope: it is
/// stored in the CloudEvents NATS binding's binary mode (`ce-*` headers, the CDEvent as the
/// payload), as producers on NATS send it; a bare CDEvent is stored as it is.
async fn post_cdevent(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Json<RunIdBody>), ApiError> {
    let incoming = cdevents::parse_incoming(body).map_err(ApiError::BadRequest)?;
    let envelope = if headers.contains_key("ce-specversion") {
        Some(
            cloudevents::binding::http::to_event(headers, body.to_vec())
                .map_err(|e| ApiError::BadRequest(format!("not a CloudEvent: {e}")))?,
        )
    } else if serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("specversion").is_some() && v.get("context").is_none())
    {
        Some(
            serde_json::from_slice::<cloudevents::Event>(body)
                .map_err(|e| ApiError::BadRequest(format!("not a CloudEvent: {e}")))?,
        )
    } else {
        None
    };
    let (nats_headers, payload) = match envelope {
        Some(mut ce) => {
            // The CDEvent is JSON, whatever the envelope said or left out.
            let (_, schema, data) = ce.take_data();
            if let Some(data) = data {
                let json = match data {
                    cloudevents::Data::Json(v) => v,
                    cloudevents::Data::Binary(b) => serde_json::from_slice(&b)
                        .map_err(|e| ApiError::BadRequest(format!("data: not JSON: {e}")))?,
                    cloudevents::Data::String(t) => serde_json::from_str(&t)
                        .map_err(|e| ApiError::BadRequest(format!("data: not JSON: {e}")))?,
                };
                ce.set_data("application/json", json);
                ce.set_dataschema(schema);
            }
            slipway_core::bus::binding::encode(ce)
        }
        None => {
            let mut h = async_nats::HeaderMap::new();
            h.insert("content-type", "application/json");
            (h, Bytes::copy_from_slice(body))
        }
    };
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(nats_headers)
        .message_id(format!("cdevent:{}:{}", incoming.source, incoming.id));
    let ack = state
        .bus
        .jetstream()
        .send_publish(subjects::CDEVENT_CHANGES, msg)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot publish the change: {e}")))?;
    ack.await
        .map_err(|e| ApiError::Unavailable(format!("the change was not stored: {e}")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RunIdBody {
            run_id: ids::run_id(&incoming.source, &incoming.id),
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    phase: Option<String>,
    pipeline: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

impl RunsQuery {
    fn filter(&self) -> Result<crate::listing::Filter, ApiError> {
        let now = Utc::now();
        let time = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|t| crate::listing::parse_time(t, now))
                .transpose()
                .map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
        };
        Ok(crate::listing::Filter {
            phase: match &self.phase {
                Some(p) => {
                    Some(Phase::parse(p).ok_or_else(|| {
                        ApiError::BadRequest(format!("phase: unknown phase {p:?}"))
                    })?)
                }
                None => None,
            },
            pipeline: self.pipeline.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
        })
    }
}

/// Runs: those in flight first, newest created first, then ended runs from the run index,
/// most recently ended first; the same JSON per run as `slipway status --json`. A page that
/// may be followed by more says so with `Link: <...>; rel="next"` (and the cursor alone in
/// `Slipway-Next-Cursor`); the cursor keeps the filters, and paging neither skips nor repeats
/// a run while runs start and end (runs created after the first page wait for the next
/// listing).
#[utoipa::path(
    get,
    path = "/v1/runs",
    params(
        ("phase" = Option<String>, Query, description = "queued, running, awaiting_approval, deploying, monitoring, succeeded, failed, rejected, rolled_back or cancelled"),
        ("pipeline" = Option<String>, Query, description = "only this pipeline"),
        ("since" = Option<String>, Query, description = "runs created at or after this time: RFC 3339, or a window back from now such as 7d, 12h, 90m"),
        ("until" = Option<String>, Query, description = "runs created before this time (same forms as since)"),
        ("limit" = Option<usize>, Query, description = "at most this many (default 100, at most 1000); a filter that matches few runs may give a shorter page with a next cursor"),
        ("cursor" = Option<String>, Query, description = "the next page of a listing, from the previous page's Link or Slipway-Next-Cursor header (its filters come with it)"),
    ),
    responses(
        (status = 200, description = "Runs", body = Vec<Object>,
            headers(("Link" = String, description = "<...>; rel=\"next\" when there may be more"),
                    ("Slipway-Next-Cursor" = String, description = "the next page's cursor"))),
        (status = 400, description = "Unknown phase, bad time, bad cursor or unknown query field", body = ErrorBody),
    )
)]
pub async fn list_runs(
    State(state): State<AppState>,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = q.filter()?;
    let cursor = match &q.cursor {
        Some(c) => {
            let c = crate::listing::Cursor::decode(c).map_err(ApiError::BadRequest)?;
            // A cursor comes with its own filters; others given beside it must be the same.
            if filter != crate::listing::Filter::default() && filter != c.filter {
                return Err(ApiError::BadRequest(
                    "cursor: it continues a listing with other filters (give the cursor alone)"
                        .into(),
                ));
            }
            Some(c)
        }
        None => None,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page = crate::listing::page(&state, filter, cursor, limit).await?;
    let mut response = Json(page.runs).into_response();
    if let Some(next) = page.next {
        let cursor = next.encode();
        let headers = response.headers_mut();
        let link = format!("</v1/runs?cursor={cursor}&limit={limit}>; rel=\"next\"");
        for (name, value) in [("link", link), ("slipway-next-cursor", cursor)] {
            if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
    }
    Ok(response)
}

/// A run's state from the log: the projection, or the log itself for a run the projection has
/// not seen yet.
async fn run_state(state: &AppState, id: &str) -> Result<Run, ApiError> {
    if !ids::is_valid_run_id(id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    if let Some(run) = state.runs.read().expect("lock").get(id) {
        return Ok(run.clone());
    }
    run_from_log(state, id).await
}

/// An ended run's JSON from the run index, when it holds the run.
async fn indexed_json(state: &AppState, id: &str) -> Option<serde_json::Value> {
    let index = state.index.as_ref()?;
    match index.get(id).await {
        Ok(entry) => entry.map(|e| e.run),
        Err(e) => {
            tracing::warn!(run_id = %id, error = %e, "Cannot read the run index: folding the log.");
            None
        }
    }
}

/// A run folded from its log alone.
pub(crate) async fn run_from_log(state: &AppState, id: &str) -> Result<Run, ApiError> {
    fold_log(state, id, false).await.map(|(r, _)| r)
}

/// The run folded from its log, and the log's last sequence. `direct` reads it by direct gets
/// (one round trip; any replica may answer, so it may lag) rather than through a consumer
/// (create, fetch, delete).
async fn fold_log(state: &AppState, id: &str, direct: bool) -> Result<(Run, u64), ApiError> {
    let log = if direct {
        state.bus.run_log_between(id, 1, 0).await?
    } else {
        state.bus.run_log(id).await?
    };
    let last = log.last().map_or(0, |r| r.seq);
    let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
    Run::replay(&events)
        .map(|r| (r, last))
        .ok_or_else(|| ApiError::NotFound(format!("no run {id}")))
}

/// One run (the same JSON as `slipway status RUN --json`).
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "The run", body = Object,
            headers(("Slipway-Read-From" = String, description = "memory (in flight), index (ended) or log"))),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    // The hot path: written straight from the projection under its read lock, with no copy
    // of the run and no intermediate JSON value.
    let projected = ids::is_valid_run_id(&id)
        .then(|| {
            let runs = state.runs.read().expect("lock");
            runs.get(&id)
                .map(|run| serde_json::to_vec(run).expect("run state serialises"))
        })
        .flatten();
    // Where the answer came from, for operators (and tests): the gateway's memory (a run in
    // flight), the run index (an ended run) or the run's log.
    let indexed = match projected {
        Some(_) => None,
        None if ids::is_valid_run_id(&id) => indexed_json(&state, &id).await,
        None => None,
    };
    let (body, from) = match (projected, indexed) {
        (Some(body), _) => (body, "memory"),
        (None, Some(json)) => (serde_json::to_vec(&json).expect("JSON serialises"), "index"),
        (None, None) => (
            serde_json::to_vec(&run_state(&state, &id).await?).expect("run state serialises"),
            "log",
        ),
    };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/json"),
            (
                axum::http::HeaderName::from_static("slipway-read-from"),
                from,
            ),
        ],
        body,
    )
        .into_response())
}

/// A run's CloudEvents in log order (structured mode).
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/events",
    params(("id" = String, Path, description = "run id")),
    responses(
        (status = 200, description = "The run's events", body = Vec<Object>),
        (status = 404, description = "No such run", body = ErrorBody),
    )
)]
pub async fn run_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    if !ids::is_valid_run_id(&id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    let log = state.bus.run_log(&id).await?;
    if log.is_empty() {
        return Err(ApiError::NotFound(format!("no run {id}")));
    }
    Ok(Json(
        log.into_iter()
            .map(|r| match r.event {
                Ok(e) => e.to_structured_json(),
                Err(err) => serde_json::json!({"seq": r.seq, "subject": r.subject, "error": err.to_string()}),
            })
            .collect(),
    ))
}

/// A gate's stored details (the evaluator's sample outputs and per-item results, the
/// performance gate's latency sample), for review.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/gates/{stage}",
    params(("id" = String, Path, description = "run id"), ("stage" = String, Path, description = "gate stage: evaluate, perf or cost")),
    responses(
        (status = 200, description = "The gate's details", body = Object),
        (status = 404, description = "No such run, gate or details", body = ErrorBody),
    )
)]
pub async fn gate_details(
    State(state): State<AppState>,
    Path((id, stage)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = run_state(&state, &id).await?;
    let gate = run
        .gate(&stage)
        .ok_or_else(|| ApiError::NotFound(format!("run {id} has no {stage:?} gate report")))?;
    let obj = gate.details.clone().ok_or_else(|| {
        ApiError::NotFound(format!("the {stage} gate of run {id} stored no details"))
    })?;
    let buf = slipway_core::store::objects::read(&state.objects, &obj.bucket, &obj.name)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read {}: {e}", obj.name)))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| ApiError::Unavailable(format!("{} is not JSON: {e}", obj.name)))?;
    Ok(Json(v))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approve,
    Reject,
}

/// An approver's decision.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    pub decision: Decision,
    #[serde(default)]
    pub comment: Option<String>,
    /// The artifact the approver looked at; it must be the run's current one.
    pub artifact_digest: String,
}

/// `201` body: the decision as recorded in the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordedDecision {
    pub run_id: String,
    pub stage: String,
    pub decision: Decision,
    pub approver: String,
    pub artifact_digest: String,
    pub comment: Option<String>,
    pub decided_at: String,
    /// Stream sequence of the decision event.
    pub seq: u64,
}

/// The approval stage `run` awaits, and its current artifact, when that is `digest`.
fn awaiting<'a>(
    run: &'a Run,
    id: &str,
    digest: &str,
) -> Result<(&'a slipway_domain::fold::StageState, Digest), ApiError> {
    if run.is_ended() {
        return Err(ApiError::Conflict(format!(
            "run {id} is not awaiting approval (it ended {}: {})",
            run.phase.as_str(),
            run.reason.as_deref().unwrap_or("")
        )));
    }
    let Some(stage) = run
        .stages
        .iter()
        .find(|s| s.name.starts_with("approval:") && s.status == StageStatus::Requested)
    else {
        return Err(ApiError::Conflict(format!(
            "run {id} is not awaiting approval (it is {})",
            run.phase.as_str()
        )));
    };
    let current = run
        .artifact
        .as_ref()
        .map(|a| a.digest.clone())
        .unwrap_or_default();
    if current != *digest {
        return Err(ApiError::Conflict(format!(
            "artifact_digest {digest} is not the run's current artifact {current}"
        )));
    }
    Ok((stage, current))
}

/// Attempts at appending a decision while other writers move the run on.
const APPEND_ATTEMPTS: usize = 8;

/// Approves or rejects a run awaiting approval.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/approvals",
    params(("id" = String, Path, description = "run id")),
    request_body = ApprovalBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Recorded", body = RecordedDecision),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The policy says no", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "Not awaiting approval, or not the run's current artifact", body = ErrorBody),
        (status = 413, description = "The body is larger than [gateway] max_body_bytes", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; Retry-After says when to try again", body = ErrorBody),
        (status = 503, description = "NATS unavailable, or the run kept changing", body = ErrorBody),
    )
)]
pub async fn post_approval(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<RecordedDecision>), ApiError> {
    let caller = auth::identify(&state, &headers).await?;
    let approver = caller.approver.clone();
    let body: ApprovalBody =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                let path = e.path().to_string();
                ApiError::BadRequest(if path == "." {
                    format!("body: {}", e.inner())
                } else {
                    format!("{path}: {}", e.inner())
                })
            })?;
    if !ids::is_valid_run_id(&id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    for attempt in 0..APPEND_ATTEMPTS {
        // Decide on the log itself, never on the projection. The first read is a direct get,
        // which any replica may answer: one that lags can only make the append conflict or the
        // run look not (yet) awaiting this approval, and either way the log is read again
        // through a consumer before anything is answered.
        let direct = attempt == 0;
        let (run, last) = match fold_log(&state, &id, direct).await {
            Ok(read) => read,
            Err(_) if direct => continue,
            Err(e) => return Err(e),
        };
        let (stage, current) = match awaiting(&run, &id, &body.artifact_digest) {
            Ok(awaited) => awaited,
            Err(_) if direct => continue,
            Err(e) => return Err(e),
        };
        let policy =
            run.spec.approval.as_ref().ok_or_else(|| {
                ApiError::Conflict("the run's spec has no approval policy".into())
            })?;
        if policy.allowed_groups.is_empty() {
            caller.may_decide_without_groups(&state)?;
        }
        policy::check_approver(
            policy,
            &approver.name,
            &approver.groups,
            run.change.author.as_deref(),
        )
        .map_err(ApiError::Forbidden)?;
        let gates_digest = slipway_domain::decide::gates_digest(&run);
        let decided_at = Utc::now();
        let mut decision = ApprovalDecision {
            stage: stage.name.clone(),
            attempt: stage.attempt,
            approver: approver.name.clone(),
            groups: approver.groups.clone(),
            artifact_digest: current.clone(),
            gates_digest,
            comment: body.comment.clone(),
            decided_at,
            signature: None,
            issuer: caller.issuer.clone(),
        };
        let approve = matches!(body.decision, Decision::Approve);
        decision.signature = state
            .signing
            .as_ref()
            .map(|k| k.sign(&id, approve, &decision));
        let data = match body.decision {
            Decision::Approve => EventData::ApprovalApproved(decision),
            Decision::Reject => EventData::ApprovalRejected(decision),
        };
        let event_id = ids::derived(&[
            &id,
            data.type_name(),
            &stage.name,
            &stage.attempt.to_string(),
            &approver.name,
        ]);
        let mut event = Event::new(event_id, SOURCE, Some(id.clone()), decided_at, data);
        event.traceparent = run.traceparent.clone();
        let (stage_name, stage_attempt) = (stage.name.clone(), stage.attempt);
        match state.bus.append(&event, &id, last).await {
            Ok(a) => {
                // A decision that ends the approval stage: the span is for the process that
                // appended it to emit, once its publishing is over.
                if !a.duplicate
                    && let Some(after) = slipway_domain::fold(Some(run), &event)
                    && let Some(span) = slipway_core::telemetry::otel::stage_span(
                        &after,
                        &stage_name,
                        stage_attempt,
                        std::time::SystemTime::now(),
                    )
                {
                    slipway_core::telemetry::otel::emit(span);
                }
                return Ok((
                    StatusCode::CREATED,
                    Json(RecordedDecision {
                        run_id: id.clone(),
                        stage: stage_name,
                        decision: body.decision,
                        approver: approver.name.clone(),
                        artifact_digest: current.to_string(),
                        comment: body.comment.clone(),
                        decided_at: event.time.to_rfc3339(),
                        seq: a.seq,
                    }),
                ));
            }
            // Another writer moved the run on: look again (it may no longer await approval).
            Err(AppendError::Conflict { .. }) => continue,
            Err(AppendError::Bus(e)) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable(format!(
        "run {id} kept changing; the decision was not recorded, try again"
    )))
}

/// A person's control of a rollout in progress.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutControlBody {
    /// `pause`, `resume`, `promote` or `abort`.
    pub action: String,
    #[serde(default)]
    pub comment: Option<String>,
}

/// `201` body: the control as recorded in the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecordedControl {
    pub run_id: String,
    pub stage: String,
    pub action: String,
    pub by: String,
    pub at: String,
    pub seq: u64,
}

/// Pauses, resumes, promotes or aborts a run's rollout in progress. Authorised like an
/// approval: an approver of the run's policy groups (any configured approver when the run has
/// no policy); promoting obeys its self-approval rule.
/// The rollouts' judge acts on it at its next look.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/rollout",
    params(("id" = String, Path, description = "run id")),
    request_body = RolloutControlBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Recorded", body = RecordedControl),
        (status = 400, description = "Malformed body or unknown action", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The policy says no", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "No rollout in progress", body = ErrorBody),
        (status = 413, description = "The body is larger than [gateway] max_body_bytes", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; Retry-After says when to try again", body = ErrorBody),
        (status = 503, description = "NATS unavailable, or no signing key to sign the control with", body = ErrorBody),
    )
)]
pub async fn post_rollout_control(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<RecordedControl>), ApiError> {
    let caller = auth::identify(&state, &headers).await?;
    let approver = caller.approver.clone();
    // The judge counts only signed controls: one recorded unsigned would be ignored in silence.
    let Some(signing) = state.signing.as_ref() else {
        return Err(ApiError::Unavailable(
            "the gateway has no signing key ([gateway] signing_key): rollout controls cannot be signed".into(),
        ));
    };
    let body: RolloutControlBody =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| ApiError::BadRequest(format!("{}: {}", e.path(), e.inner())))?;
    let action = slipway_domain::rollout::ControlAction::parse(&body.action).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "action: {:?} is not one of pause, resume, promote, abort",
            body.action
        ))
    })?;
    if !ids::is_valid_run_id(&id) {
        return Err(ApiError::NotFound(format!("no run {id:?}")));
    }
    let (run, _) = fold_log(&state, &id, false).await?;
    let Some(stage) = run.stages.iter().find(|s| {
        s.name.starts_with("rollout:")
            && matches!(s.status, StageStatus::Requested | StageStatus::Running)
    }) else {
        return Err(ApiError::Conflict(format!(
            "run {id} has no rollout in progress (it is {})",
            run.phase.as_str()
        )));
    };
    // Under the run's approval policy: its groups, and for promoting (the only control that is
    // an approval) its self-approval rule. Without a policy, any configured approver.
    if run
        .spec
        .approval
        .as_ref()
        .is_none_or(|p| p.allowed_groups.is_empty())
    {
        caller.may_decide_without_groups(&state)?;
    }
    if let Some(policy) = run.spec.approval.as_ref() {
        let author = (action == slipway_domain::rollout::ControlAction::Promote)
            .then_some(run.change.author.as_deref())
            .flatten();
        policy::check_approver(policy, &approver.name, &approver.groups, author)
            .map_err(ApiError::Forbidden)?;
    }
    let at = Utc::now();
    let mut control = slipway_domain::rollout::RolloutControl {
        stage: stage.name.clone(),
        attempt: stage.attempt,
        action,
        by: approver.name.clone(),
        groups: approver.groups.clone(),
        comment: body.comment.clone(),
        at,
        signature: None,
    };
    control.signature = Some(signing.sign_control(&id, &control));
    let event_id = ids::derived(&[
        &id,
        "rollout.controlled",
        &stage.name,
        &stage.attempt.to_string(),
        action.as_str(),
        &approver.name,
        &at.to_rfc3339(),
    ]);
    let mut event = Event::new(
        event_id,
        SOURCE,
        Some(id.clone()),
        at,
        EventData::RolloutControlled(control),
    );
    event.traceparent = run.traceparent.clone();
    let a = state.bus.publish(&event).await?;
    Ok((
        StatusCode::CREATED,
        Json(RecordedControl {
            run_id: id,
            stage: stage.name.clone(),
            action: action.as_str().into(),
            by: approver.name,
            at: event.time.to_rfc3339(),
            seq: a.seq,
        }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoraQuery {
    since: Option<String>,
}

/// DORA delivery metrics from the log, per pipeline and overall, for a window ending now.
#[utoipa::path(
    get,
    path = "/v1/metrics/dora",
    params(("since" = Option<String>, Query, description = "window length, e.g. 30d (default), 12h, 90m")),
    responses(
        (status = 200, description = "The metrics", body = Object),
        (status = 400, description = "Bad window", body = ErrorBody),
    )
)]
pub async fn dora(
    State(state): State<AppState>,
    query: Result<Query<DoraQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let window = slipway_domain::dora::parse_window(q.since.as_deref().unwrap_or("30d"))
        .map_err(|e| ApiError::BadRequest(format!("since: {e}")))?;
    let now = Utc::now();
    let since = now - window;
    // The runs held now (in flight, or ended and not yet indexed) and the production
    // deployments of the runs indexed in the window: what the window holds, not the history.
    let held: std::collections::HashMap<String, slipway_domain::dora::Deployed> = state
        .runs
        .read()
        .expect("lock")
        .newest_first()
        .filter_map(|run| slipway_domain::dora::deployed(run).map(|d| (run.run_id.clone(), d)))
        .collect();
    let report = match &state.index {
        Some(index) => {
            slipway_core::store::dora::report(index, state.dora.as_ref(), since, now, held).await?
        }
        None => slipway_domain::dora::report_of(held.into_values(), since, now),
    };
    Ok(Json(
        serde_json::to_value(report).expect("report serialises"),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`; `degraded` when NATS is unreachable (503), a required service has no live replica
    /// or a process is crash-looping (still 200: the gateway itself serves).
    pub status: String,
    pub nats: String,
    pub caught_up: bool,
    /// Required services with no live replica (from their heartbeats).
    pub missing_services: Vec<String>,
    /// Services (and `nats-server`) a `slipway up` reports exiting again and again.
    pub crash_looping: Vec<String>,
}

/// Liveness: the gateway and its NATS connection.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let connected = matches!(
        state.bus.client().connection_state(),
        async_nats::connection::State::Connected
    );
    let caught_up = state.runs.read().expect("lock").caught_up;
    let (missing_services, crash_looping) = {
        let running = state.running.read().expect("lock");
        let required: Vec<&str> = state.required_services.iter().map(String::as_str).collect();
        (running.missing(&required), running.crash_looping())
    };
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let fine = connected && missing_services.is_empty() && crash_looping.is_empty();
    (
        status,
        Json(Health {
            status: if fine { "ok" } else { "degraded" }.into(),
            missing_services,
            crash_looping,
            nats: if connected {
                "connected"
            } else {
                "disconnected"
            }
            .into(),
            caught_up,
        }),
    )
}

/// Every running replica of every service, from their heartbeats, and what each `slipway up`
/// keeps running (restarts, last exits, crash loops).
#[utoipa::path(get, path = "/v1/services",
    responses((status = 200, description = "The replicas running now", body = Object)))]
pub async fn services(State(state): State<AppState>) -> Json<ServiceList> {
    let running = state.running.read().expect("lock").clone();
    let required: Vec<&str> = state.required_services.iter().map(String::as_str).collect();
    Json(ServiceList {
        missing: running.missing(&required),
        replicas: running.replicas,
        supervisors: running.supervisors,
    })
}

/// `GET /v1/services`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ServiceList {
    /// Every replica with a fresh heartbeat, by service then replica.
    pub replicas: Vec<slipway_core::health::Heartbeat>,
    /// What each `slipway up` keeps running.
    pub supervisors: Vec<slipway_core::health::Supervision>,
    /// Required services with no live replica.
    pub missing: Vec<String>,
}

/// This document.
#[utoipa::path(get, path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::DOCUMENT.clone())
}

/// Prometheus text: delivery metrics from the log, consumer lag from JetStream.
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4",
        content_type = "text/plain", body = String)))]
pub async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = {
        let runs = state.runs.read().expect("lock");
        let mut b = runs
            .delivery
            .render(runs.newest_first().filter(|r| !r.is_ended()));
        b.push_str(&crate::metrics::render_overdue(
            runs.newest_first().filter(|r| !r.is_ended()),
            slipway_core::bus::now(),
        ));
        b
    };
    let connected =
        state.bus.client().connection_state() == async_nats::connection::State::Connected;
    body.push_str(&crate::metrics::render_connected(connected));
    // Asking a server the gateway is not connected to would only make the scrape time out.
    if connected {
        body.push_str(&crate::metrics::render_lag(&state.bus).await);
    }
    {
        let running = state.running.read().expect("lock");
        body.push_str(&crate::metrics::render_services(
            &running,
            &state.required_services,
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// What the page needs to know of the configuration.
#[utoipa::path(get, path = "/v1/ui",
    responses((status = 200, description = "The page's settings", body = Object)))]
pub async fn ui(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "trace_url_template": state.trace_url_template,
        "sign_in": state.oidc.is_some(),
        "commit_links": state.commit_links.iter().map(|l| serde_json::json!({
            "source_prefix": l.source_prefix, "template": l.template})).collect::<Vec<_>>(),
    }))
}

/// The approver page.
#[utoipa::path(get, path = "/",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// A run's page: the console, opened on the run (it stays valid after the run ends).
#[utoipa::path(get, path = "/runs/{id}", params(("id" = String, Path, description = "run id")),
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
pub async fn run_page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The audit of decisions: the console, opened on it.
#[utoipa::path(get, path = "/audit",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
pub async fn audit_page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}
