//! An app's merged logs: the lines of its instances (each tagged `process.slot[vN]`), and,
//! when followed, the lines of instances that start later (the event bus says when). The
//! API's `GET /apps/{app}/logs` and the dashboard's live log both read this; the caller has
//! checked that its actor may see the app.

use std::collections::HashSet;

use futures_util::stream::{self, BoxStream, StreamExt};

use super::Services;
use crate::events::{Event, Subscription};

/// One line of an instance's output.
#[derive(Debug, Clone)]
pub struct Line {
    /// The engine's timestamp.
    pub time: String,
    /// `process.slot[vN]`.
    pub tag: String,
    /// The text, without its line end.
    pub text: String,
}

/// Which lines to read.
#[derive(Debug, Clone, Default)]
pub struct LogRequest {
    /// Only this process type.
    pub process: Option<String>,
    /// Keep streaming new lines, from instances that start later too.
    pub follow: bool,
    /// Lines per instance from the end (`None`: all).
    pub tail: Option<usize>,
}

type Lines = BoxStream<'static, Line>;

/// The lines of `app`'s instances as one stream (ends when not following and every
/// instance's log is read).
pub fn app_logs(services: &Services, app: &str, req: LogRequest) -> BoxStream<'static, Line> {
    // Subscribed before the view is read: an instance started after it is an event here.
    let events = req.follow.then(|| services.registry.bus().subscribe());
    let view = match &services.scheduler {
        Some(sched) => sched.view.load_full(),
        None => Default::default(),
    };
    let mut lines = stream::SelectAll::new();
    let mut following = HashSet::new();
    for i in view
        .instances
        .iter()
        .filter(|i| i.app == app && !i.container_id.is_empty())
    {
        if req.process.as_deref().is_some_and(|p| p != i.process) {
            continue;
        }
        let tag = format!("{}.{}[v{}]", i.process, i.slot, i.release);
        if let Some(l) = instance_lines(
            services,
            &i.node,
            &i.container_id,
            tag,
            req.follow,
            req.tail,
        ) {
            following.insert(i.instance.clone());
            lines.push(l);
        }
    }
    let Some(events) = events else {
        return lines.boxed();
    };
    let follow = Follow {
        services: services.clone(),
        app: app.to_string(),
        process: req.process,
        events,
        lines,
        following,
    };
    stream::unfold(
        follow,
        |mut f| async move { f.next().await.map(|l| (l, f)) },
    )
    .boxed()
}

/// The lines of one container, tagged; `None` when its node is not known here.
fn instance_lines(
    services: &Services,
    node: &str,
    container_id: &str,
    tag: String,
    follow: bool,
    tail: Option<usize>,
) -> Option<Lines> {
    let node = services.scheduler.as_ref()?.engine(node)?;
    Some(
        node.logs(container_id, follow, tail)
            .filter_map(move |l| {
                let tag = tag.clone();
                async move {
                    l.ok().map(|l| Line {
                        time: l.time,
                        tag,
                        text: l.text.trim_end_matches('\n').to_string(),
                    })
                }
            })
            .boxed(),
    )
}

/// Following: the lines of the instances followed so far, and the bus, which says when
/// another instance of the app starts.
struct Follow {
    services: Services,
    app: String,
    process: Option<String>,
    events: Subscription,
    lines: stream::SelectAll<Lines>,
    following: HashSet<String>,
}

impl Follow {
    async fn next(&mut self) -> Option<Line> {
        loop {
            tokio::select! {
                Some(line) = self.lines.next(), if !self.lines.is_empty() => return Some(line),
                e = self.events.recv() => {
                    let Ok(e) = e else { continue };
                    let Event::InstanceStarted { instance: i } = &e.event else {
                        continue;
                    };
                    if i.app != self.app
                        || self.process.as_deref().is_some_and(|p| p != i.process)
                        || !self.following.insert(i.instance.clone())
                    {
                        continue;
                    }
                    let tag = format!("{}.{}[v{}]", i.process, i.slot, i.release);
                    if let Some(l) = instance_lines(&self.services, &i.node, &i.container_id, tag, true, None) {
                        self.lines.push(l);
                    }
                }
            }
        }
    }
}
