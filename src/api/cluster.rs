//! Instances (`escale ps`) and logs: what the scheduler observes.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use futures_util::stream::{self, StreamExt};
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
    // Subscribed before the view is read: an instance started after it is an event here.
    let events = q.follow.then(|| s.registry.bus().subscribe());
    let view = view(&s);
    let mut lines = stream::SelectAll::new();
    let mut following = std::collections::HashSet::new();
    for i in view
        .instances
        .iter()
        .filter(|i| i.app == app && !i.container_id.is_empty())
    {
        if q.process.as_deref().is_some_and(|p| p != i.process) {
            continue;
        }
        let tag = format!("{}.{}[v{}]", i.process, i.slot, i.release);
        if let Some(l) = instance_lines(&s, &i.node, &i.container_id, tag, q.follow, Some(tail)) {
            following.insert(i.instance.clone());
            lines.push(l);
        }
    }
    let Some(events) = events else {
        return Ok(text_stream(Body::from_stream(lines)));
    };
    // Following: instances that start from now on join the stream, from their first line.
    let follow = Follow {
        s,
        app,
        process: q.process,
        events,
        lines,
        following,
    };
    let body = stream::unfold(follow, |mut f| async move {
        f.next()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), f))
    });
    Ok(text_stream(Body::from_stream(body)))
}

type Lines = futures_util::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

/// The lines of one container, each prefixed with its time and `tag`; `None` when its node
/// is not known here.
fn instance_lines(
    s: &AppState,
    node: &str,
    container_id: &str,
    tag: String,
    follow: bool,
    tail: Option<usize>,
) -> Option<Lines> {
    let node = s.scheduler.as_ref()?.engine(node)?;
    Some(
        node.logs(container_id, follow, tail)
            .filter_map(move |l| {
                let tag = tag.clone();
                async move {
                    l.ok().map(|l| {
                        Ok::<_, std::io::Error>(bytes::Bytes::from(format!(
                            "{} {tag} {}\n",
                            l.time,
                            l.text.trim_end_matches('\n')
                        )))
                    })
                }
            })
            .boxed(),
    )
}

/// `logs -f`: the lines of the instances followed so far, and the bus, which says when
/// another instance of the app starts.
struct Follow {
    s: AppState,
    app: String,
    process: Option<String>,
    events: crate::events::Subscription,
    lines: stream::SelectAll<Lines>,
    following: std::collections::HashSet<String>,
}

impl Follow {
    async fn next(&mut self) -> Option<bytes::Bytes> {
        loop {
            tokio::select! {
                Some(line) = self.lines.next(), if !self.lines.is_empty() => {
                    match line {
                        Ok(l) => return Some(l),
                        Err(_) => continue,
                    }
                }
                e = self.events.recv() => {
                    let Ok(e) = e else { continue };
                    let crate::events::Event::InstanceStarted { instance: i } = &e.event else {
                        continue;
                    };
                    if i.app != self.app
                        || self.process.as_deref().is_some_and(|p| p != i.process)
                        || !self.following.insert(i.instance.clone())
                    {
                        continue;
                    }
                    let tag = format!("{}.{}[v{}]", i.process, i.slot, i.release);
                    if let Some(l) = instance_lines(&self.s, &i.node, &i.container_id, tag, true, None) {
                        self.lines.push(l);
                    }
                }
            }
        }
    }
}

fn text_stream(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .body(body)
        .expect("static response parts")
}
