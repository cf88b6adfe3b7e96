//! Approver authentication: bearer tokens, of which the configuration holds only sha256
//! hashes, compared in constant time.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use slipway_core::config::Approver;

use crate::error::ApiError;

/// Lower-case hex sha256 of a token, as the configuration stores it.
pub fn token_hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who is asking, and the identity provider that vouched for them (none for a configured
/// approver's static token).
#[derive(Debug, Clone)]
pub struct Caller {
    pub approver: Approver,
    pub issuer: Option<String>,
}

impl Caller {
    fn vouched(o: &crate::oidc::Oidc, name: String, groups: Vec<String>) -> Result<Self, ApiError> {
        let wanted = &o.settings().approver_groups;
        if !wanted.is_empty() && !groups.iter().any(|g| wanted.contains(g)) {
            return Err(ApiError::Forbidden(format!(
                "{name} is in none of the approver groups ({})",
                wanted.join(", ")
            )));
        }
        Ok(Self {
            approver: Approver {
                name,
                groups,
                token_sha256: String::new(),
            },
            issuer: Some(o.settings().issuer.clone()),
        })
    }

    /// Whether the caller may decide where the run's policy names no groups: a configured
    /// approver may; a provider's user only when `[gateway.oidc] approver_groups` is set (and
    /// [`Caller::vouched`] checked it), so signing in alone never makes someone an approver.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`] saying why.
    pub fn may_decide_without_groups(&self, state: &crate::AppState) -> Result<(), ApiError> {
        let configured = state
            .oidc
            .as_deref()
            .is_some_and(|o| !o.settings().approver_groups.is_empty());
        if self.issuer.is_none() || configured {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "the run's policy names no groups, so only configured approvers decide; {} signed in through the identity provider (set [gateway.oidc] approver_groups to let its users decide)",
            self.approver.name
        )))
    }
}

/// Who is asking: a static token's approver, the provider's JWT's subject, or the signed-in
/// session's (whose writes must carry its CSRF token in `X-CSRF-Token`).
///
/// # Errors
/// [`ApiError::Unauthorized`] naming why no one is recognised; [`ApiError::Forbidden`] for a
/// session write without its CSRF token, or a provider's user in none of the approver groups.
pub async fn identify(state: &crate::AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let oidc = state.oidc.as_deref();
    if headers.contains_key(axum::http::header::AUTHORIZATION) {
        let token = bearer(headers)?;
        if let Some(o) = oidc
            && token.split('.').count() == 3
        {
            let who = o
                .verify(token, &o.audiences(), None)
                .await
                .map_err(|e| ApiError::Unauthorized(format!("bearer token refused: {e}")))?;
            return Caller::vouched(o, who.name, who.groups);
        }
        return Ok(Caller {
            approver: approver(headers, &state.approvers)?.clone(),
            issuer: None,
        });
    }
    let cookies = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(o) = oidc
        && crate::oidc::cookie(cookies, crate::oidc::SESSION_COOKIE).is_some()
    {
        let s = o.session(cookies).ok_or_else(|| {
            ApiError::Unauthorized(
                "the session has expired or is not this gateway's: sign in again".into(),
            )
        })?;
        let sent = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !constant_time_eq(sent.as_bytes(), s.csrf.as_bytes()) {
            return Err(ApiError::Forbidden(
                "missing or wrong X-CSRF-Token for the signed-in session".into(),
            ));
        }
        return Caller::vouched(o, s.name, s.groups);
    }
    Err(ApiError::Unauthorized(if oidc.is_some() {
        "missing Authorization: Bearer <token>, or sign in".into()
    } else {
        "missing Authorization: Bearer <token>".into()
    }))
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <token>".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not text".into()))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be Bearer <token>".into()))
}

/// The approver a request's bearer token belongs to.
///
/// # Errors
/// [`ApiError::Unauthorized`] for a missing, malformed or unknown token.
pub fn approver<'a>(
    headers: &HeaderMap,
    approvers: &'a [Approver],
) -> Result<&'a Approver, ApiError> {
    let token = bearer(headers)?;
    let hash = token_hash(token);
    // Every approver is compared, so the time taken does not say which one matched.
    let mut found = None;
    for a in approvers {
        if constant_time_eq(
            hash.as_bytes(),
            a.token_sha256.to_ascii_lowercase().as_bytes(),
        ) {
            found = Some(a);
        }
    }
    found.ok_or_else(|| ApiError::Unauthorized("unknown token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_by_hash_only() {
        let approvers = vec![Approver {
            name: "bob".into(),
            groups: vec![],
            token_sha256: token_hash("s3cret"),
        }];
        let mut h = HeaderMap::new();
        assert!(approver(&h, &approvers).is_err());
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(approver(&h, &approvers).unwrap().name, "bob");
        h.insert("authorization", "Bearer s3cre".parse().unwrap());
        assert!(approver(&h, &approvers).is_err());
        h.insert("authorization", "Basic s3cret".parse().unwrap());
        assert!(approver(&h, &approvers).is_err());
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
