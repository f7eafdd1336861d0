//! `/api/v1/backups`: take a backup now, list them, download one. Admins only; everything
//! goes through [`crate::service`] (restoring is offline: `escale backup restore`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState, Auth, Json, Path};
use crate::backup::{BackupInfo, Created};

#[utoipa::path(post, path = "/api/v1/backups", tag = "system", security(("token" = [])),
    responses((status = 201, body = Created), (status = 403, body = super::Problem), (status = 409, body = super::Problem),
        (status = 503, description = "the backup is on the server's disk but its upload to the bucket ([backup.s3]) failed", body = super::Problem)))]
pub async fn create_backup(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.services.create_backup(&actor).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/backups", tag = "system", security(("token" = [])),
    responses((status = 200, body = [BackupInfo]), (status = 403, body = super::Problem),
        (status = 503, description = "the bucket ([backup.s3]) could not be listed", body = super::Problem)))]
pub async fn list_backups(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<Json<Vec<BackupInfo>>, ApiError> {
    Ok(Json(s.services.list_backups(&actor).await?))
}

#[utoipa::path(get, path = "/api/v1/backups/{name}", tag = "system", security(("token" = [])),
    params(("name" = String, Path)),
    responses((status = 200, description = "the sealed backup file", content_type = "application/octet-stream"),
        (status = 403, body = super::Problem), (status = 404, body = super::Problem)))]
pub async fn download_backup(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let path = s.services.backup_file(&actor, &name)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot open the backup: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read the backup: {e}")))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}
