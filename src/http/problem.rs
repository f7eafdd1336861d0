//! The API's one error type and its `application/problem+json` rendering (RFC 9457).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::registry::RegistryError;
use crate::validate::ValidationError;

/// Everything a handler can fail with. Each maps to one status and a message a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("too many failed attempts; try again in {0} seconds")]
    TooManyRequests(u64),
    #[error("{0}")]
    Unavailable(String),
    /// Overloaded for now: 503 with `Retry-After` (seconds).
    #[error("{message}")]
    Busy { message: String, retry_after: u64 },
    #[error("request body too large: the limit is {0} bytes")]
    PayloadTooLarge(usize),
    #[error("this route does not accept that method; see /api/v1/openapi.json")]
    MethodNotAllowed,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of an error response.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "invalid-input",
            ApiError::TooManyRequests(_) => "rate-limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Busy { .. } => "busy",
            ApiError::PayloadTooLarge(_) => "too-large",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if matches!(self, ApiError::Busy { .. }) {
            tracing::warn!(error = %self, "request refused: overloaded");
        } else if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let detail = match &self {
            // Do not leak internals; the log has them.
            ApiError::Internal(_) => {
                "the server failed to handle this request; its log says why".to_string()
            }
            other => other.to_string(),
        };
        let body = Problem {
            kind: format!("urn:escale:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail,
        };
        let mut resp = (
            status,
            serde_json::to_string(&body).expect("problem serialises"),
        )
            .into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"escale\", Basic realm=\"escale\""),
                );
            }
            ApiError::TooManyRequests(secs)
            | ApiError::Busy {
                retry_after: secs, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            _ => {}
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            RegistryError::Conflict(m) => ApiError::Conflict(m),
            RegistryError::Missing(m) => ApiError::NotFound(m),
            // What the change refers to (its app, its user) was removed by a concurrent
            // request between the lookup and the write.
            RegistryError::Database(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                ApiError::Conflict(
                    "what this change refers to was removed meanwhile by another request; nothing was changed"
                        .into(),
                )
            }
            RegistryError::Invalid(m) => ApiError::Unprocessable(m),
            RegistryError::Forbidden(m) => ApiError::Forbidden(m),
            // Names the release for the operator; nothing was changed.
            RegistryError::UnreadableRelease { .. } => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::service::ServiceError> for ApiError {
    fn from(e: crate::service::ServiceError) -> ApiError {
        use crate::service::ServiceError as S;
        match e {
            S::Registry(e) => e.into(),
            e @ S::Busy(_) => ApiError::Conflict(e.to_string()),
            e @ (S::Image { .. } | S::Invalid(_)) => ApiError::Unprocessable(e.to_string()),
            e @ S::NoScheduler => ApiError::Unavailable(e.to_string()),
            S::Conflict(m) => ApiError::Conflict(m),
            e @ S::Cluster(_) => ApiError::Internal(e.to_string()),
            S::Backup(e) => {
                use crate::backup::BackupError as B;
                match e {
                    e @ B::NotFound(_) => ApiError::NotFound(e.to_string()),
                    e @ B::Busy => ApiError::Conflict(e.to_string()),
                    // The object store failed or refused: the message names the fix.
                    e @ (B::Upload { .. } | B::S3(_)) => ApiError::Unavailable(e.to_string()),
                    B::Registry(e) => e.into(),
                    e => ApiError::Internal(e.to_string()),
                }
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> ApiError {
        ApiError::Unprocessable(e.0)
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> ApiError {
        match e {
            crate::auth::AuthError::WeakPassword => ApiError::Unprocessable(e.to_string()),
            crate::auth::AuthError::Busy(wait) => ApiError::Busy {
                message: e.to_string(),
                retry_after: wait.as_secs().max(1),
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}
