//! The page's sign-in routes: `/auth/login` sends the browser to the identity provider,
//! `/auth/callback` comes back from it with a session, `/auth/logout` ends it, and
//! `/v1/session` says who the page is signed in as (and its CSRF token).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::oidc;

fn provider(state: &AppState) -> Result<&oidc::Oidc, ApiError> {
    state
        .oidc
        .as_deref()
        .ok_or_else(|| ApiError::NotFound("sign-in is not configured ([gateway.oidc])".into()))
}

fn redirect_uri(state: &AppState) -> String {
    format!("{}/auth/callback", state.public_url.trim_end_matches('/'))
}

fn cookies(headers: &HeaderMap) -> &str {
    headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    /// The gateway path to come back to.
    next: Option<String>,
}

/// Starts a sign-in: to the provider's authorization endpoint (code flow, PKCE S256).
#[utoipa::path(
    get,
    path = "/auth/login",
    params(("next" = Option<String>, Query, description = "the page path to return to")),
    responses(
        (status = 303, description = "To the identity provider"),
        (status = 404, description = "Sign-in is not configured", body = ErrorBody),
        (status = 503, description = "The identity provider cannot be reached", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let o = provider(&state)?;
    let (location, cookie) = o
        .login(&redirect_uri(&state), q.next.as_deref().unwrap_or("/"))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the identity provider: {e}")))?;
    Ok((
        StatusCode::SEE_OTHER,
        [(header::LOCATION, location), (header::SET_COOKIE, cookie)],
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    // Providers add more (session_state, iss); they are not needed.
}

/// The provider's answer: the code is exchanged, the ID token verified, a session begun.
#[utoipa::path(
    get,
    path = "/auth/callback",
    params(("code" = Option<String>, Query, description = "the authorization code"),
           ("state" = Option<String>, Query, description = "the sign-in's state")),
    responses(
        (status = 303, description = "Signed in: back to the page, with the session cookie"),
        (status = 400, description = "No code or state", body = ErrorBody),
        (status = 401, description = "The sign-in failed; the error says why", body = ErrorBody),
        (status = 404, description = "Sign-in is not configured", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address", body = ErrorBody),
    )
)]
pub async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, ApiError> {
    let o = provider(&state)?;
    if let Some(e) = q.error {
        return Err(ApiError::Unauthorized(format!(
            "the identity provider refused the sign-in: {e}{}",
            q.error_description
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )));
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return Err(ApiError::BadRequest(
            "the callback needs code and state".into(),
        ));
    };
    let (session, cookie, back) = o
        .callback(cookies(&headers), &code, &st, &redirect_uri(&state))
        .await
        .map_err(|e| ApiError::Unauthorized(format!("sign-in failed: {e}")))?;
    tracing::info!(approver = %session.name, groups = ?session.groups, "Signed in.");
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, back)]).into_response();
    let h = resp.headers_mut();
    for c in [cookie, oidc::cleared(oidc::login_cookie_name())] {
        if let Ok(v) = c.parse() {
            h.append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// Ends the page's session.
#[utoipa::path(post, path = "/auth/logout",
    responses((status = 204, description = "Signed out")))]
pub async fn logout() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, oidc::cleared(oidc::SESSION_COOKIE))],
    )
        .into_response()
}

/// Who is asking.
#[derive(Debug, Serialize, ToSchema, Default)]
pub struct Whoami {
    /// False when the request carries no session and no token (nothing else is given then).
    pub signed_in: bool,
    /// Whether the page can sign in with the identity provider.
    pub sign_in_available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// `session` (signed in on the page) or `token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The token the page sends in `X-CSRF-Token` with each write (sessions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
    /// When the session ends (RFC 3339; sessions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// The signed-in session (or the bearer token's approver).
#[utoipa::path(
    get,
    path = "/v1/session",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "Who is asking (signed_in false without a valid session or a token; a session no longer valid is cleared)", body = Whoami),
        (status = 401, description = "A bearer token that is not valid", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address", body = ErrorBody),
    )
)]
pub async fn session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let available = state.oidc.is_some();
    let has_cookie = oidc::cookie(cookies(&headers), oidc::SESSION_COOKIE).is_some();
    if !headers.contains_key(header::AUTHORIZATION) {
        if let Some(o) = state.oidc.as_deref()
            && let Some(s) = o.session(cookies(&headers))
        {
            return Ok(Json(Whoami {
                signed_in: true,
                sign_in_available: available,
                name: Some(s.name),
                groups: s.groups,
                via: Some("session".into()),
                csrf: Some(s.csrf),
                expires_at: chrono::DateTime::from_timestamp(s.expires, 0).map(|t| t.to_rfc3339()),
            })
            .into_response());
        }
        let mut resp = Json(Whoami {
            sign_in_available: available,
            ..Whoami::default()
        })
        .into_response();
        if has_cookie {
            // A session that is no longer valid (expired, or signed with another key): the
            // browser forgets it, and the page offers to sign in again.
            if let Ok(v) = oidc::cleared(oidc::SESSION_COOKIE).parse() {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
        return Ok(resp);
    }
    let a = crate::auth::identify(&state, &headers).await?.approver;
    Ok(Json(Whoami {
        signed_in: true,
        sign_in_available: available,
        name: Some(a.name),
        groups: a.groups,
        via: Some("token".into()),
        csrf: None,
        expires_at: None,
    })
    .into_response())
}
