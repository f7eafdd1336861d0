//! `GET /api/v1/events/stream`: the event bus as Server-Sent Events, for `escale deploy`
//! and `escale events -f` (and next the dashboard). A member sees the events of its team's
//! apps only; installation-wide events (nodes, certificates) are an admin's.

use std::collections::HashMap;
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
use crate::events::{Envelope, Event, Subscription};
use crate::registry::{Actor, Registry};

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
    let sub = s.registry.bus().subscribe();
    let reader = Reader {
        sub,
        registry: s.registry.clone(),
        actor,
        app: q.app,
        visible: HashMap::new(),
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
    sub: Subscription,
    registry: Registry,
    actor: Actor,
    app: Option<String>,
    /// Apps of events seen so far, and whether the actor may see them.
    visible: HashMap<String, bool>,
    started: bool,
}

impl Reader {
    async fn next(&mut self) -> Bytes {
        if !self.started {
            self.started = true;
            return Bytes::from_static(b": subscribed\n\n");
        }
        loop {
            let e = match tokio::time::timeout(KEEP_ALIVE, self.sub.recv()).await {
                Err(_) => return Bytes::from_static(b": keep-alive\n\n"),
                Ok(Err(missed)) => {
                    return Bytes::from(format!(
                        "event: missed\ndata: {{\"missed\":{}}}\n\n",
                        missed.0
                    ))
                }
                Ok(Ok(e)) => e,
            };
            if self.shows(&e.event).await {
                return frame(&e);
            }
        }
    }

    async fn shows(&mut self, e: &Event) -> bool {
        let Some(app) = e.app() else {
            return self.app.is_none() && self.actor.is_admin();
        };
        if self.app.as_deref().is_some_and(|a| a != app) {
            return false;
        }
        if self.actor.is_admin() {
            return true;
        }
        // An app created or destroyed since: ask again (names are reused across teams).
        if let Event::Changed { action, .. } = e {
            if action.starts_with("app.") {
                self.visible.remove(app);
            }
        }
        if let Some(v) = self.visible.get(app) {
            return *v;
        }
        let v = self.registry.app(&self.actor, app).await.is_ok();
        self.visible.insert(app.to_string(), v);
        v
    }
}

fn frame(e: &Envelope) -> Bytes {
    let mut v = serde_json::to_value(e).expect("events serialise");
    v["summary"] = e.event.summary().into();
    let kind = v["type"].as_str().unwrap_or("event").to_string();
    Bytes::from(format!("id: {}\nevent: {kind}\ndata: {v}\n\n", e.seq))
}
