//! The gateway's one error type: each variant says its status code, and every error goes out
//! as `{"error": "..."}` naming what is wrong.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `400`: the request is malformed; the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// `401`: no bearer token, or one that belongs to no approver.
    #[error("{0}")]
    Unauthorized(String),
    /// `403`: the approval policy says no.
    #[error("{0}")]
    Forbidden(String),
    /// `404`: no such run.
    #[error("{0}")]
    NotFound(String),
    /// `409`: the run is not in a state that allows this (not awaiting approval, another
    /// artifact, a decision already taken).
    #[error("{0}")]
    Conflict(String),
    /// `503`: NATS is unreachable or the run kept changing; try again.
    #[error("{0}")]
    Unavailable(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<slipway_core::bus::BusError> for ApiError {
    fn from(e: slipway_core::bus::BusError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
