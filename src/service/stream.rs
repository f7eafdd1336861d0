//! Live events scoped to who reads them: the one filter the API's event stream and the
//! dashboard's live pages share. A member sees the events of its team's apps only;
//! installation-wide events (nodes, certificates) are an admin's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::events::{Envelope, Event, Subscription};
use crate::registry::{Actor, Registry};

/// What a reader gets next.
pub enum Next {
    /// An event the actor may see.
    Event(Arc<Envelope>),
    /// Nothing for `idle`: time to say the stream is alive.
    Idle,
    /// The reader fell behind and this many events are gone.
    Missed(u64),
}

/// The bus, filtered for one actor (and optionally one app).
pub struct TeamEvents {
    sub: Subscription,
    registry: Registry,
    actor: Actor,
    app: Option<String>,
    /// Apps of events seen so far, and whether the actor may see them.
    visible: HashMap<String, bool>,
}

impl TeamEvents {
    /// Subscribes now: every event published from this call on is considered. The caller
    /// has checked that `actor` may see `app`.
    pub fn new(registry: &Registry, actor: Actor, app: Option<String>) -> TeamEvents {
        TeamEvents {
            sub: registry.bus().subscribe(),
            registry: registry.clone(),
            actor,
            app,
            visible: HashMap::new(),
        }
    }

    /// The next event the actor may see, or [`Next::Idle`] after `idle` without one.
    pub async fn next(&mut self, idle: Duration) -> Next {
        loop {
            let e = match tokio::time::timeout(idle, self.sub.recv()).await {
                Err(_) => return Next::Idle,
                Ok(Err(missed)) => return Next::Missed(missed.0),
                Ok(Ok(e)) => e,
            };
            if self.shows(&e.event).await {
                return Next::Event(e);
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
