//! The dashboard's live streams, as Server-Sent Events: the event bus filtered for the
//! session's actor ([`crate::service::stream::TeamEvents`], the filter the API's stream
//! uses), and an app's merged logs ([`crate::service::logs`]). Each `data:` line is JSON;
//! the page's script puts what it shows into the page as text, never as HTML.

use std::time::{Duration, Instant};

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
    let events = TeamEvents::new(&s.registry, session.actor.clone(), q.app);
    let first = stream::once(async { Bytes::from_static(b"retry: 2000\n: subscribed\n\n") });
    let state = (events, Check::new(session, &s));
    let rest = stream::unfold(state, |(mut ev, mut check)| async move {
        let next = ev.next(KEEP_ALIVE).await;
        if !check.still_valid().await {
            return None;
        }
        let chunk = match next {
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
        Some((chunk, (ev, check)))
    });
    Ok(sse(Body::from_stream(
        first.chain(rest).map(Ok::<_, std::io::Error>),
    )))
}

/// A stream's session, asked again at most every [`KEEP_ALIVE`]: a logout (or a deleted
/// user, or the expiry) ends the streams it opened within that time.
struct Check {
    session: Session,
    registry: crate::registry::Registry,
    at: Instant,
    valid: bool,
}

impl Check {
    fn new(session: Session, s: &WebState) -> Check {
        Check {
            session,
            registry: s.registry.clone(),
            at: Instant::now(),
            valid: true,
        }
    }

    async fn still_valid(&mut self) -> bool {
        if self.valid && self.at.elapsed() >= KEEP_ALIVE {
            self.valid = self.session.still_valid(&self.registry).await;
            self.at = Instant::now();
        }
        self.valid
    }
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
    let state = (lines, Check::new(session, &s));
    let rest = stream::unfold(state, |(mut lines, mut check)| async move {
        let next = tokio::time::timeout(KEEP_ALIVE, lines.next()).await;
        if !check.still_valid().await {
            return None;
        }
        let chunk = match next {
            Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            Ok(None) => return None,
            Ok(Some(l)) => Bytes::from(format!(
                "data: {}\n\n",
                serde_json::json!({"time": l.time, "tag": l.tag, "text": l.text})
            )),
        };
        Some((chunk, (lines, check)))
    });
    Ok(sse(Body::from_stream(
        first.chain(rest).map(Ok::<_, std::io::Error>),
    )))
}
