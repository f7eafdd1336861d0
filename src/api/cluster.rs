//! Instances (`escale ps`) and logs: what the scheduler observes.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::stream::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, AppState, Auth, Json, Path, Query};
use crate::registry::Release;
use crate::scheduler::{CrashView, InstanceView, UnplacedView};

/// Instances of an app (a page of them, see `Link`), the slots that are crash-looping, and
/// the app's latest release (so `escale ps` can say that it failed, and why).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AppInstances {
    /// By process, slot, release and instance; at most `limit` of them.
    pub instances: Vec<InstanceView>,
    /// Non-empty when instances keep crashing: `escale ps` shows the app as "crashing".
    pub crashing: Vec<CrashView>,
    /// Slots no node can take now, with the reason per node.
    pub unplaced: Vec<UnplacedView>,
    /// The app's newest release, whatever its status (`failed`, with `status_reason`, when
    /// its rollout failed); null before the first deploy.
    pub latest_release: Option<Release>,
}

/// A page of instances.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    /// Most instances to answer, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<i64>,
    /// The `after` of the previous page's `Link: rel="next"`: the key of its last instance.
    /// Instances come in key order (process, slot, release, instance), so an instance that
    /// exists all along is listed once across the pages, whatever starts or stops meanwhile.
    #[serde(default)]
    pub after: Option<String>,
}

/// An instance's place in the list: its process, slot and release (zero-padded so that the
/// text order is the numeric one) and its id, joined by `.` (which no name contains).
pub fn instance_key(i: &InstanceView) -> String {
    format!(
        "{}.{:010}.{:010}.{}",
        i.process, i.slot, i.release, i.instance
    )
}

/// `key` with everything but unreserved URL characters percent-encoded (a cursor in a link).
fn cursor_text(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    params(("app" = String, Path), InstancesQuery),
    responses((status = 200, body = AppInstances, headers(("Link" = String, description = "`<...>; rel=\"next\"` when more instances may follow")))))]
pub async fn list_instances(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Query(q): Query<InstancesQuery>,
) -> Result<Response, ApiError> {
    crate::validate::app_name(&app).map_err(|e| ApiError::NotFound(e.0))?;
    s.registry.app(&actor, &app).await?;
    let limit = super::apps::page_limit(q.limit)? as usize;
    let latest_release = s
        .registry
        .releases(&actor, &app, None, 1)
        .await?
        .into_iter()
        .next();
    let view = view(&s);
    let mut instances: Vec<(String, InstanceView)> = view
        .instances
        .iter()
        .filter(|i| i.app == app)
        .map(|i| (instance_key(i), i.clone()))
        .filter(|(k, _)| q.after.as_ref().is_none_or(|a| k > a))
        .collect();
    instances.sort_by(|a, b| a.0.cmp(&b.0));
    let next = (instances.len() > limit).then(|| {
        instances.truncate(limit);
        let last = instances
            .last()
            .map(|(k, _)| cursor_text(k))
            .unwrap_or_default();
        format!("</api/v1/apps/{app}/instances?limit={limit}&after={last}>; rel=\"next\"")
    });
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
    let mut r = Json(AppInstances {
        instances: instances.into_iter().map(|(_, i)| i).collect(),
        crashing,
        unplaced,
        latest_release,
    })
    .into_response();
    if let Some(link) = next.and_then(|l| l.parse().ok()) {
        r.headers_mut().insert(header::LINK, link);
    }
    Ok(r)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn view(process: &str, slot: u32, release: u32, instance: &str) -> InstanceView {
        InstanceView {
            instance: instance.into(),
            app: "shop".into(),
            process: process.into(),
            release,
            slot,
            node: "local".into(),
            container_id: String::new(),
            container: String::new(),
            state: crate::events::InstanceStatus::Running,
            health: crate::events::HealthStatus::Healthy,
            address: None,
            created_at: 0,
            restarts: 0,
        }
    }

    /// Keys sort numerically by slot and release, group a process's instances, and two
    /// instances of one slot and release apart; a cursor in a link needs no escaping of them.
    #[test]
    fn instance_keys_sort_by_process_slot_release_and_id() {
        let mut keys: Vec<String> = [
            view("web", 10, 1, "shop-web-10-v1-aa"),
            view("web", 2, 12, "shop-web-2-v12-bb"),
            view("web", 2, 3, "shop-web-2-v3-cc"),
            view("web", 2, 3, "shop-web-2-v3-aa"),
            view("worker", 1, 1, "shop-worker-1-v1-dd"),
        ]
        .iter()
        .map(instance_key)
        .collect();
        keys.sort();
        let ids: Vec<&str> = keys.iter().map(|k| k.rsplit('.').next().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "shop-web-2-v3-aa",
                "shop-web-2-v3-cc",
                "shop-web-2-v12-bb",
                "shop-web-10-v1-aa",
                "shop-worker-1-v1-dd"
            ]
        );
        assert_eq!(cursor_text(&keys[0]), keys[0]);
        assert_eq!(cursor_text("a b&c/é"), "a%20b%26c%2F%C3%A9");
    }
}
