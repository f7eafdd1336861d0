//! `PUT/GET/DELETE /api/v1/apps/{app}/webhook`: an app's push webhook (see [`crate::webhooks`]).
//! The secret is shown once, in the answer of the `PUT` that set it.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, Auth, Json, Path};
use crate::registry::Webhook;
use crate::validate::app_name;

/// Secrets users give are at least this long.
const MIN_SECRET: usize = 16;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// The repository fetched on a push: `https://` or `http://` (`file://` when allowed).
    pub repository: String,
    /// The branch whose pushes deploy (default `main`).
    pub branch: Option<String>,
    /// The shared secret; generated when absent.
    pub secret: Option<String>,
}

/// The webhook as set, with its secret (shown this once) and where to send deliveries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// The shared secret: the GitHub/Gitea "secret" or the GitLab "secret token".
    pub secret: String,
    /// The path deliveries are sent to, on the API listener.
    pub path: String,
}

/// The webhook of an app, without its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookInfo {
    #[serde(flatten)]
    pub webhook: Webhook,
    pub path: String,
}

/// Sets an app's push webhook (replacing any); the secret is generated unless given and is
/// shown only in this answer.
#[utoipa::path(put, path = "/api/v1/apps/{app}/webhook", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = WebhookRequest,
    responses((status = 200, body = WebhookCreated), (status = 404, body = super::Problem),
        (status = 422, body = super::Problem)))]
pub async fn set_webhook(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<WebhookRequest>,
) -> Result<Json<WebhookCreated>, ApiError> {
    app_name(&app)?;
    // Another team's app is "not found" before anything about the request is said.
    s.registry.app(&actor, &app).await?;
    let branch = req.branch.unwrap_or_else(|| "main".into());
    crate::webhooks::check_branch(&branch)?;
    crate::webhooks::check_repo_url(&req.repository, &s.config.webhooks).await?;
    let secret = match req.secret {
        Some(sec) => {
            if sec.len() < MIN_SECRET
                || sec.len() > 256
                || !sec.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ApiError::Unprocessable(format!(
                    "a webhook secret is {MIN_SECRET} to 256 printable ASCII characters without spaces; leave it out to have one generated"
                )));
            }
            sec
        }
        None => crate::auth::random_hex(32),
    };
    let webhook = s
        .registry
        .set_webhook(&actor, &app, &req.repository, &branch, &secret)
        .await?;
    Ok(Json(WebhookCreated {
        webhook,
        secret,
        path: format!("/hooks/{app}"),
    }))
}

/// An app's push webhook (never its secret).
#[utoipa::path(get, path = "/api/v1/apps/{app}/webhook", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)),
    responses((status = 200, body = WebhookInfo), (status = 404, body = super::Problem)))]
pub async fn get_webhook(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<WebhookInfo>, ApiError> {
    app_name(&app)?;
    let webhook = s.registry.webhook(&actor, &app).await?;
    Ok(Json(WebhookInfo {
        webhook,
        path: format!("/hooks/{app}"),
    }))
}

/// Removes an app's push webhook; deliveries are refused from then on.
#[utoipa::path(delete, path = "/api/v1/apps/{app}/webhook", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)),
    responses((status = 204), (status = 404, body = super::Problem)))]
pub async fn remove_webhook(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    app_name(&app)?;
    s.registry.remove_webhook(&actor, &app).await?;
    Ok(StatusCode::NO_CONTENT)
}
