//! Following a rollout to its end by its events (see [`crate::events`]): progress lines as
//! the scheduler reports them, the outcome as soon as it is committed. No polling: the
//! release row is read when following starts, after an event about the app's releases, and
//! after falling behind the bus.

use std::time::Duration;

use crate::events::{Bus, Event};
use crate::registry::{AppRef, Registry, RegistryError, ReleaseStatus};

/// Where progress lines go (a `git push`'s `remote:` lines, a log).
pub trait Progress {
    fn say(&self, line: &str);
}

impl<F: Fn(&str)> Progress for F {
    fn say(&self, line: &str) {
        self(line)
    }
}

/// How a followed rollout did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The reason says whether an earlier release keeps serving (not so on a first deploy).
    #[error("rollout of v{version} failed: {reason}")]
    Failed { version: u32, reason: String },
    #[error("v{0} was superseded by a newer release before it finished rolling out")]
    Superseded(u32),
    #[error("v{version} did not finish rolling out within {}s; it goes on (see `escale ps {app}`)", .waited.as_secs())]
    TimedOut {
        version: u32,
        app: String,
        waited: Duration,
    },
    #[error("release v{0} disappeared (was the app destroyed?)")]
    Gone(u32),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Follows release `version` of `app` until it is active (Ok), failed or superseded, or
/// `limit` has passed, saying progress on `progress`.
pub async fn follow(
    registry: &Registry,
    bus: &Bus,
    app: &AppRef,
    version: u32,
    limit: Duration,
    progress: &(dyn Progress + Sync),
) -> Result<(), FollowError> {
    // Subscribed before the first read: whatever happens after that read is an event here.
    let mut events = bus.subscribe();
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_progress = None;
    let mut check = true;
    loop {
        if check {
            check = false;
            if let Some(outcome) = outcome(registry, app, version).await? {
                return outcome;
            }
        }
        let e = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(FollowError::TimedOut {
                    version,
                    app: app.name.clone(),
                    waited: limit,
                })
            }
            // Fell behind: re-read where the release stands.
            Ok(Err(_missed)) => {
                check = true;
                continue;
            }
            Ok(Ok(e)) => e,
        };
        if e.event.app() != Some(app.name.as_str()) {
            continue;
        }
        match &e.event {
            Event::RolloutProgress {
                release,
                healthy,
                total,
                old,
                ..
            } if *release == version => {
                let now = (*healthy, *total, *old);
                if last_progress != Some(now) {
                    last_progress = Some(now);
                    progress.say(&format!(
                        "{healthy} of {total} new instance(s) healthy, {old} old instance(s) left"
                    ));
                }
            }
            Event::InstanceCrashed { instance, .. } | Event::InstanceUnhealthy { instance, .. }
                if instance.release == version =>
            {
                progress.say(&e.event.summary());
            }
            // The outcome is committed before these are published.
            Event::RolloutSucceeded { .. }
            | Event::RolloutFailed { .. }
            | Event::Changed { .. } => check = true,
            _ => {}
        }
    }
}

/// The outcome of release `version`, if it has one.
async fn outcome(
    registry: &Registry,
    app: &AppRef,
    version: u32,
) -> Result<Option<Result<(), FollowError>>, FollowError> {
    let r = registry
        .release_by_id(app.id, version)
        .await?
        .ok_or(FollowError::Gone(version))?;
    Ok(match r.status {
        ReleaseStatus::Active => Some(Ok(())),
        ReleaseStatus::Deploying => None,
        ReleaseStatus::Superseded => Some(Err(FollowError::Superseded(version))),
        ReleaseStatus::Failed => Some(Err(FollowError::Failed {
            version,
            reason: r.status_reason.unwrap_or_else(|| "no reason given".into()),
        })),
    })
}
