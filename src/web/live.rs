//! The dashboard's live streams, as Server-Sent Events: the event bus filtered for the
//! session's actor ([`crate::service::stream::TeamEvents`], the filter the API's stream
//! uses), and an app's merged logs ([`crate::service::logs`]). Each `data:` line is JSON;
//! the page's script puts what it shows into the page as text, never as HTML.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;

use super::session::Session;
use super::{WebError, WebState};
use crate::http::{ApiError, Path};
use crate::service::stream::{Next, TeamEvents};

/// A quiet stream says it is alive this often.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub struct LiveQuery {
    #[serde(default)]
    app: Option<String>,
}

fn sse(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts")
}

/// `GET /live[?app=NAME]`: the events the session's actor may see, each as
/// `data: {"type", "app", "summary", "at"}`.
pub async fn events(
    State(s): State<WebState>,
    session: Session,
    Query(q): Query<LiveQuery>,
) -> Result<Response, WebError> {
    if let Some(app) = &q.app {
        crate::validate::app_name(app).map_err(|e| ApiError::NotFound(e.0))?;
        s.registry.app(&session.actor, app).await?;
    }
    let events = TeamEvents::new(&s.registry, session.actor, q.app);
    let first = stream::once(async { Bytes::from_static(b"retry: 2000\n: subscribed\n\n") });
    let rest = stream::unfold(events, |mut ev| async move {
        let chunk = match ev.next(KEEP_ALIVE).await {
            Next::Idle => Bytes::from_static(b": keep-alive\n\n"),
            Next::Missed(n) => Bytes::from(format!(
                "data: {}\n\n",
                serde_json::json!({"type": "missed", "summary": format!("{n} events missed; reload the page")})
            )),
            Next::Event(e) => {
                let v = serde_json::json!({
                    "type": type_of(&e.event),
                    "app": e.event.app(),
                    "summary": e.event.summary(),
                    "at": e.at,
                });
                Bytes::from(format!("data: {v}\n\n"))
            }
        };
        Some((chunk, ev))
    });
    Ok(sse(Body::from_stream(
        first.chain(rest).map(Ok::<_, std::io::Error>),
    )))
}

/// The event's `type` as the API names it (`instance_started`, `changed`, ...).
fn type_of(e: &crate::events::Event) -> String {
    serde_json::to_value(e)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `GET /apps/{app}/logs/live`: the app's last lines, then new ones as they are written
/// (instances that start later included), each as `data: {"time", "tag", "text"}`.
pub async fn logs(
    State(s): State<WebState>,
    session: Session,
    Path(app): Path<String>,
) -> Result<Response, WebError> {
    crate::validate::app_name(&app).map_err(|e| ApiError::NotFound(e.0))?;
    s.registry.app(&session.actor, &app).await?;
    let lines = crate::service::logs::app_logs(
        &s.services,
        &app,
        crate::service::logs::LogRequest {
            process: None,
            follow: true,
            tail: Some(200),
        },
    );
    let first = stream::once(async { Bytes::from_static(b"retry: 2000\n: following\n\n") });
    let rest = stream::unfold(lines, |mut lines| async move {
        let chunk = match tokio::time::timeout(KEEP_ALIVE, lines.next()).await {
            Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            Ok(None) => return None,
            Ok(Some(l)) => Bytes::from(format!(
                "data: {}\n\n",
                serde_json::json!({"time": l.time, "tag": l.tag, "text": l.text})
            )),
        };
        Some((chunk, lines))
    });
    Ok(sse(Body::from_stream(
        first.chain(rest).map(Ok::<_, std::io::Error>),
    )))
}
