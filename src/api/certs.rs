//! TLS certificates of an app's host names: upload one, list their states, remove one.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{ApiError, AppState, Auth, Json, Path};
use crate::certs::{CertError, CertState};
use crate::validate;

/// An uploaded certificate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CertRequest {
    /// A custom domain of the app, or `APP.<apps_domain>`.
    pub domain: String,
    /// PEM chain: the leaf first, then intermediates.
    pub cert_pem: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key_pem: String,
}

impl From<CertError> for ApiError {
    fn from(e: CertError) -> ApiError {
        match e {
            CertError::Registry(r) => r.into(),
            CertError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CertError::Acme(_) => ApiError::Internal(e.to_string()),
            other => ApiError::Unprocessable(other.to_string()),
        }
    }
}

fn app_name(name: &str) -> Result<(), ApiError> {
    validate::app_name(name).map_err(|e| ApiError::NotFound(e.0))
}

/// Certificate state of each host name of the app (`APP.<apps_domain>` first, then its domains).
#[utoipa::path(get, path = "/api/v1/apps/{app}/certs", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), responses((status = 200, body = [CertState])))]
pub async fn list_certs(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<Vec<CertState>>, ApiError> {
    app_name(&app)?;
    Ok(Json(s.certs.states(&actor, &app).await?))
}

/// Uploads a certificate and its key; served at once. 422 when the key does not match, the
/// certificate does not cover the domain, or has expired.
#[utoipa::path(post, path = "/api/v1/apps/{app}/certs", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = CertRequest,
    responses((status = 201, body = CertState), (status = 422, body = super::Problem)))]
pub async fn add_cert(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<CertRequest>,
) -> Result<(StatusCode, Json<CertState>), ApiError> {
    app_name(&app)?;
    // The app must be visible before anything about the domain is said.
    s.registry.app(&actor, &app).await?;
    let domain = validate::api_domain(&req.domain)?;
    let st = s
        .certs
        .upload(&actor, &app, &domain, &req.cert_pem, &req.key_pem)
        .await?;
    Ok((StatusCode::CREATED, Json(st)))
}

/// Removes the certificate of a host name of the app.
#[utoipa::path(delete, path = "/api/v1/apps/{app}/certs/{domain}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("domain" = String, Path)), responses((status = 204)))]
pub async fn remove_cert(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, domain)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app_name(&app)?;
    s.registry.app(&actor, &app).await?;
    let domain = validate::api_domain(&domain)?;
    s.certs.remove(&actor, &app, &domain).await?;
    Ok(StatusCode::NO_CONTENT)
}
