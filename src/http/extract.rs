//! Request extractors: the authenticated [`Auth`] caller, and a [`Json`] body, [`Path`]
//! parameters and a [`Query`] whose rejections are problem+json (unknown fields, wrong types
//! and bad syntax all say what to fix).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::de::DeserializeOwned;

use axum::extract::FromRef;

use super::ApiError;
use crate::auth::token_hash;
use crate::registry::Actor;
use crate::registry::Registry;

/// The authenticated caller. Accepts `Authorization: Bearer <token>` and, for git clients,
/// `Basic` with the token as password (any user name).
pub struct Auth(pub Actor);

impl<S> FromRequestParts<S> for Auth
where
    S: Send + Sync,
    Registry: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Auth, ApiError> {
        let missing = || {
            ApiError::Unauthorized(
                "missing or invalid credentials: send `Authorization: Bearer <token>` (create one with `escale login` or `escale tokens create`)".into(),
            )
        };
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(missing)?;
        let token = if let Some(t) = header.strip_prefix("Bearer ") {
            t.trim().to_string()
        } else if let Some(b) = header.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(missing)?;
            decoded
                .split_once(':')
                .map(|(_, p)| p.to_string())
                .ok_or_else(missing)?
        } else {
            return Err(missing());
        };
        if token.is_empty() || token.len() > 256 {
            return Err(missing());
        }
        let actor = Registry::from_ref(state)
            .actor_for_token(&token_hash(&token))
            .await?
            .ok_or_else(missing)?;
        Ok(Auth(actor))
    }
}

/// A JSON body. Like axum's, but every rejection is a problem+json saying what to fix.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Json<T>, ApiError> {
        // Every body is a JSON object: read as a value first, so that an array is not taken
        // for a struct's fields in order.
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) if !v.is_object() => Err(ApiError::Unprocessable(
                "invalid request body: send a JSON object (see /api/v1/openapi.json)".into(),
            )),
            Ok(axum::Json(v)) => serde_json::from_value(v).map(Json).map_err(|e| {
                ApiError::Unprocessable(format!(
                    "invalid request body: Failed to deserialize the JSON body into the target type: {e}"
                ))
            }),
            Err(rejection) => {
                use axum::extract::rejection::JsonRejection::*;
                Err(match rejection {
                    JsonDataError(e) => {
                        ApiError::Unprocessable(format!("invalid request body: {}", e.body_text()))
                    }
                    JsonSyntaxError(e) => ApiError::BadRequest(format!(
                        "request body is not valid JSON: {}",
                        e.body_text()
                    )),
                    MissingJsonContentType(_) => ApiError::BadRequest(
                        "send the body as JSON with `Content-Type: application/json`".into(),
                    ),
                    other if other.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                        ApiError::PayloadTooLarge(1 << 20)
                    }
                    other => ApiError::BadRequest(other.body_text()),
                })
            }
        }
    }
}

/// Path parameters. Like axum's, but a rejection (e.g. a segment that is not UTF-8) is a
/// problem+json.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) if e.status().is_server_error() => Err(ApiError::Internal(e.body_text())),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// A query string. Like axum's, but a rejection (unknown parameter, wrong type) is a
/// problem+json saying which parameter is wrong.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Query<T>, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
