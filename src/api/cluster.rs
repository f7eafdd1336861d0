//! Instances (`escale ps`) and logs: what the scheduler observes.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use futures_util::stream::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, AppState, Auth, Json, Path, Query};
use crate::scheduler::{CrashView, InstanceView, UnplacedView};

/// Instances of an app and the slots that are crash-looping.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AppInstances {
    pub instances: Vec<InstanceView>,
    /// Non-empty when instances keep crashing: `escale ps` shows the app as "crashing".
    pub crashing: Vec<CrashView>,
    /// Slots no node can take now, with the reason per node.
    #[serde(default)]
    pub unplaced: Vec<UnplacedView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Keep streaming new lines.
    #[serde(default)]
    pub follow: bool,
    /// Lines per instance from the end (default 100, at most 10000).
    #[serde(default)]
    pub tail: Option<usize>,
    /// Only this process type.
    #[serde(default)]
    pub process: Option<String>,
}

/// What the scheduler last observed; empty on a server without one (API-only tests).
fn view(s: &AppState) -> std::sync::Arc<crate::scheduler::ClusterView> {
    match &s.scheduler {
        Some(sched) => sched.view.load_full(),
        None => Default::default(),
    }
}

#[utoipa::path(get, path = "/api/v1/apps/{app}/instances", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), responses((status = 200, body = AppInstances)))]
pub async fn list_instances(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<AppInstances>, ApiError> {
    crate::validate::app_name(&app).map_err(|e| ApiError::NotFound(e.0))?;
    s.registry.app(&actor, &app).await?;
    let view = view(&s);
    let mut instances: Vec<InstanceView> = view
        .instances
        .iter()
        .filter(|i| i.app == app)
        .cloned()
        .collect();
    instances.sort_by(|a, b| (&a.process, a.slot, a.release).cmp(&(&b.process, b.slot, b.release)));
    let crashing = view
        .crashing
        .iter()
        .filter(|c| c.app == app)
        .cloned()
        .collect();
    let unplaced = view
        .unplaced
        .iter()
        .filter(|u| u.app == app)
        .cloned()
        .collect();
    Ok(Json(AppInstances {
        instances,
        crashing,
        unplaced,
    }))
}

/// Streams the merged output of an app's instances as text lines:
/// `<engine time> <instance> <text>`.
#[utoipa::path(get, path = "/api/v1/apps/{app}/logs", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), LogsQuery), responses((status = 200, content_type = "text/plain", description = "log lines")))]
pub async fn logs(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    crate::validate::app_name(&app).map_err(|e| ApiError::NotFound(e.0))?;
    s.registry.app(&actor, &app).await?;
    if let Some(p) = &q.process {
        crate::validate::process_name(p)?;
    }
    let tail = q.tail.unwrap_or(100);
    if tail > 10_000 {
        return Err(ApiError::Unprocessable(format!(
            "tail {tail} is out of range: use 0 to 10000"
        )));
    }
    let lines = crate::service::logs::app_logs(
        &s.services,
        &app,
        crate::service::logs::LogRequest {
            process: q.process,
            follow: q.follow,
            tail: Some(tail),
        },
    )
    .map(|l| {
        Ok::<_, std::io::Error>(bytes::Bytes::from(format!(
            "{} {} {}\n",
            l.time, l.tag, l.text
        )))
    });
    Ok(text_stream(Body::from_stream(lines)))
}

fn text_stream(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .body(body)
        .expect("static response parts")
}
