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

/// The approver a request's bearer token belongs to.
///
/// # Errors
/// [`ApiError::Unauthorized`] for a missing, malformed or unknown token.
pub fn approver<'a>(
    headers: &HeaderMap,
    approvers: &'a [Approver],
) -> Result<&'a Approver, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <token>".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be Bearer <token>".into()))?;
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
