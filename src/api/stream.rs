//! `GET /api/v1/events/stream`: the event bus as Server-Sent Events, for `escale deploy`
//! and `escale events -f` (the dashboard has its own, on the same filter: `crate::service::stream`). A member sees the events of its team's
//! apps only; installation-wide events (nodes, certificates) are an admin's.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, AppState, Auth, Query};
use crate::events::Envelope;
use crate::service::stream::{Next, TeamEvents};

/// How often a quiet stream says it is alive (a comment line), so that idle-closing
/// middleboxes and the proxy's own idle timeout keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Only the events of this app.
    #[serde(default)]
    pub app: Option<String>,
}

/// Live events, as `text/event-stream`: each `event:` is the event's `type`, each `data:`
/// the event as JSON with a `summary` line for people. `event: missed` says the reader fell
/// behind and some events are gone (re-read what you follow).
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "apps", security(("token" = [])),
    params(StreamQuery), responses((status = 200, content_type = "text/event-stream", description = "live events")))]
pub async fn stream_events(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    if let Some(app) = &q.app {
        crate::validate::app_name(app).map_err(|e| ApiError::NotFound(e.0))?;
        s.registry.app(&actor, app).await?;
    }
    // Subscribed before the answer starts: a client that has the headers sees every event
    // published from then on.
    let reader = Reader {
        events: TeamEvents::new(&s.registry, actor, q.app),
        started: false,
    };
    let body = stream::unfold(reader, |mut r| async move {
        let chunk = r.next().await;
        Some((Ok::<_, std::io::Error>(chunk), r))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Body::from_stream(body))
        .expect("static response parts"))
}

struct Reader {
    events: TeamEvents,
    started: bool,
}

impl Reader {
    async fn next(&mut self) -> Bytes {
        if !self.started {
            self.started = true;
            return Bytes::from_static(b": subscribed\n\n");
        }
        match self.events.next(KEEP_ALIVE).await {
            Next::Idle => Bytes::from_static(b": keep-alive\n\n"),
            Next::Missed(n) => Bytes::from(format!("event: missed\ndata: {{\"missed\":{n}}}\n\n")),
            Next::Event(e) => frame(&e),
        }
    }
}

fn frame(e: &Envelope) -> Bytes {
    let mut v = serde_json::to_value(e).expect("events serialise");
    v["summary"] = e.event.summary().into();
    let kind = v["type"].as_str().unwrap_or("event").to_string();
    Bytes::from(format!("id: {}\nevent: {kind}\ndata: {v}\n\n", e.seq))
}
