//! Removing what a destroyed app leaves outside the registry: its git repository and the
//! images escale built for it, on every node.
//!
//! Destroying an app deletes its registry rows in one transaction (releases with their build
//! logs, config, domains, webhook settings cascade). What lives outside the database is keyed
//! by the app's uid, which is never reused, so a leftover is never inherited by a later app of
//! the same name; it is removed right after the destroy ([`destroyed`]) and, whatever failed
//! then (an image still used by a container being drained, a node down, a file system error),
//! by the next collection ([`collect`]), which runs at start and every
//! [`COLLECT_INTERVAL`]: anything labelled or stored for a uid the registry no longer has
//! goes.

use std::collections::HashSet;
use std::time::Duration;

use crate::images::{builder, Builder};
use crate::registry::AppRef;
use crate::service::Services;

/// How often leftovers of destroyed apps are collected.
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(600);

/// What a collection removed and what it could not remove yet.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub repos: usize,
    pub images: usize,
    /// Images of destroyed apps still there (in use by a container, or a node failed).
    pub images_pending: usize,
    /// Why something could not be removed, if it could not.
    pub errors: Vec<String>,
}

/// Right after `app` was destroyed: removes its repository now (a failure is logged and noted
/// in the audit log; the collection finishes it), and removes its images in the background
/// as soon as its containers are gone.
pub async fn destroyed(state: &Services, actor: &str, app: &AppRef) {
    if let Err(e) = crate::git::remove_repo(&state.config.data_dir, &app.uid).await {
        tracing::warn!(app = %app.name, uid = %app.uid, error = %e, "cannot remove the git repository of a destroyed app; the next collection retries");
        let detail = format!(
            "the git repository of `{}` could not be removed yet ({e}); it is retried every {} minutes and never given to another app",
            app.name,
            COLLECT_INTERVAL.as_secs() / 60
        );
        if let Err(e) = state
            .registry
            .note_cleanup_pending(actor, &app.name, &detail)
            .await
        {
            tracing::warn!(app = %app.name, error = %e, "recording a pending cleanup");
        }
    }
    let state = state.clone();
    let name = app.name.clone();
    tokio::spawn(async move {
        // The reconciler drains and removes the app's containers first (drain grace + stop
        // timeout); an image in use cannot be removed before.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut wait = Duration::from_millis(500);
        loop {
            let c = collect(&state).await;
            if c.images_pending == 0 && c.errors.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(app = %name, pending = c.images_pending, errors = ?c.errors, "images of a destroyed app are still there; the periodic collection retries");
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(15));
        }
    });
}

/// Removes the repositories and built images of apps the registry no longer has.
pub async fn collect(state: &Services) -> Collected {
    let mut out = Collected::default();
    let installation = state.registry.installation_id().to_string();
    // What is there is listed before the registry is asked what to keep: anything created
    // after the listing (a new app's repository or build) is not in the listing.
    let mut listed = Vec::new();
    if let Some(sched) = &state.scheduler {
        for node in sched.docker_nodes() {
            match node.list_installation_images(&installation).await {
                Ok(images) => listed.push((node.clone(), images)),
                Err(e) => out.errors.push(e.to_string()),
            }
        }
    }
    let (live, names): (HashSet<String>, HashSet<String>) = match state.registry.all_apps().await {
        Ok(apps) => apps.into_iter().map(|a| (a.uid, a.name)).unzip(),
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    match crate::git::collect_repos(&state.config.data_dir, &live).await {
        Ok(n) => out.repos = n,
        Err(e) => out.errors.push(format!("removing git repositories: {e}")),
    }
    for (node, images) in listed {
        for img in images {
            let orphan = match builder(&img.labels) {
                Builder::App(uid) => !live.contains(&uid),
                // Built before uids: by app name.
                Builder::Unknown => img
                    .labels
                    .get(crate::node::LABEL_APP)
                    .is_none_or(|a| !names.contains(a)),
                Builder::Other => false,
            };
            if !orphan {
                continue;
            }
            // By tag, then the image itself (untagged, or left untagged by the removals).
            let mut ok = true;
            for r in img.repo_tags.iter().chain(std::iter::once(&img.id)) {
                if let Err(e) = node.remove_image(r).await {
                    tracing::info!(node = %node.name, image = %r, error = %e, "image of a destroyed app not removed yet");
                    ok = false;
                    break;
                }
            }
            if ok {
                out.images += 1;
            } else {
                out.images_pending += 1;
            }
        }
    }
    if out.repos + out.images > 0 {
        tracing::info!(
            repos = out.repos,
            images = out.images,
            pending = out.images_pending,
            "collected what destroyed apps left"
        );
    }
    out
}

/// Collects at start and every [`COLLECT_INTERVAL`] until `shutdown`.
pub async fn run(state: Services, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        collect(&state).await;
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(COLLECT_INTERVAL) => {}
        }
    }
}

pub use crate::images::built_for_label;
