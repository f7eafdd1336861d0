//! [`AppLocks`]: one deploy at a time per app, with an async queue (no polling).
//!
//! Locks are keyed by the app's uid (never reused), so a destroyed and re-created app of the
//! same name is another app. An entry lives while someone holds or waits for it.
//!
//! escale's own housekeeping (pruning images) takes the locks too, with
//! [`AppLocks::try_lock_background`]: a deploy that finds one of those waits for it (at most
//! [`BACKGROUND_WAIT`]) instead of being refused; only another user's deploy refuses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::registry::AppRef;

/// What holds a lock now, since when, and whether it is escale's own background work.
type Holder = Arc<Mutex<Option<(String, Instant, bool)>>>;

/// How long a deploy waits for escale's background work holding its app's lock.
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(60);

/// Another deploy holds the app: what it is and for how long.
#[derive(Debug, Clone, thiserror::Error)]
#[error("another deploy of `{app}` is in progress ({holder}, for {}s); try again when it has finished (see `escale releases {app}`)", .held.as_secs())]
pub struct Busy {
    pub app: String,
    pub holder: String,
    pub held: Duration,
}

/// How long a queued deploy waits for its turn.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    pub limit: Duration,
}

struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// What holds it now, and since when.
    holder: Holder,
    /// Holders and waiters; the entry is dropped at 0.
    users: usize,
}

/// The per-app deploy locks.
#[derive(Default)]
pub struct AppLocks {
    slots: Mutex<HashMap<String, Slot>>,
}

/// Held while a deploy of an app runs; released on drop (whatever the outcome, a panic
/// included).
pub struct DeployGuard {
    locks: Arc<AppLocks>,
    uid: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    holder: Holder,
}

impl std::fmt::Debug for DeployGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployGuard")
            .field("app", &self.uid)
            .finish()
    }
}

impl Drop for DeployGuard {
    fn drop(&mut self) {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.locks.release(&self.uid);
    }
}

impl AppLocks {
    fn enter(&self, uid: &str) -> (Arc<tokio::sync::Mutex<()>>, Holder) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(uid.to_string()).or_insert_with(|| Slot {
            lock: Arc::new(tokio::sync::Mutex::new(())),
            holder: Arc::new(Mutex::new(None)),
            users: 0,
        });
        slot.users += 1;
        (slot.lock.clone(), slot.holder.clone())
    }

    fn release(&self, uid: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(uid) {
            slot.users -= 1;
            if slot.users == 0 {
                slots.remove(uid);
            }
        }
    }

    fn busy(app: &AppRef, holder: &Mutex<Option<(String, Instant, bool)>>) -> Busy {
        let (what, since, _) = holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| ("another deploy".to_string(), Instant::now(), false));
        Busy {
            app: app.name.clone(),
            holder: what,
            held: since.elapsed(),
        }
    }

    fn granted(
        self: &Arc<Self>,
        app: &AppRef,
        what: String,
        background: bool,
        guard: tokio::sync::OwnedMutexGuard<()>,
        holder: Holder,
    ) -> DeployGuard {
        *holder.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((what, Instant::now(), background));
        DeployGuard {
            locks: self.clone(),
            uid: app.uid.clone(),
            _guard: guard,
            holder,
        }
    }

    /// The lock of `app` for `what`, or [`Busy`] at once when another deploy holds it. When
    /// escale's background work holds it, waits for it (at most [`BACKGROUND_WAIT`]).
    pub async fn try_lock(
        self: &Arc<Self>,
        app: &AppRef,
        what: String,
    ) -> Result<DeployGuard, Busy> {
        let (lock, holder) = self.enter(&app.uid);
        match lock.clone().try_lock_owned() {
            Ok(g) => Ok(self.granted(app, what, false, g, holder)),
            Err(_) => {
                let background = holder
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|h| h.2);
                if background {
                    if let Ok(g) = tokio::time::timeout(BACKGROUND_WAIT, lock.lock_owned()).await {
                        return Ok(self.granted(app, what, false, g, holder));
                    }
                }
                let busy = Self::busy(app, &holder);
                self.release(&app.uid);
                Err(busy)
            }
        }
    }

    /// The lock of `app` for escale's own background work `what`, or [`Busy`] at once; a
    /// deploy that comes meanwhile waits for it rather than being refused.
    pub fn try_lock_background(
        self: &Arc<Self>,
        app: &AppRef,
        what: String,
    ) -> Result<DeployGuard, Busy> {
        let (lock, holder) = self.enter(&app.uid);
        match lock.try_lock_owned() {
            Ok(g) => Ok(self.granted(app, what, true, g, holder)),
            Err(_) => {
                let busy = Self::busy(app, &holder);
                self.release(&app.uid);
                Err(busy)
            }
        }
    }

    /// The lock of `app` for `what`, after those queued before (first come, first served),
    /// or [`Busy`] once `queue.limit` has passed.
    pub async fn lock(
        self: &Arc<Self>,
        app: &AppRef,
        what: String,
        queue: Queue,
    ) -> Result<DeployGuard, Busy> {
        let (lock, holder) = self.enter(&app.uid);
        match tokio::time::timeout(queue.limit, lock.lock_owned()).await {
            Ok(g) => Ok(self.granted(app, what, false, g, holder)),
            Err(_) => {
                let busy = Self::busy(app, &holder);
                self.release(&app.uid);
                Err(busy)
            }
        }
    }

    /// Apps with a deploy held or queued (for tests and the dashboard).
    pub fn active(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, uid: &str) -> AppRef {
        AppRef {
            id: 1,
            uid: uid.into(),
            name: name.into(),
            team_id: 1,
            team: "default".into(),
            target_release: None,
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn a_second_deploy_is_refused_with_the_first_named_then_allowed_after() {
        let locks = Arc::new(AppLocks::default());
        let shop = app("shop", "u1");
        let g = locks
            .try_lock(&shop, "git push 1a2b3c4 by alice".into())
            .await
            .unwrap();
        let busy = locks
            .try_lock(&shop, "an image deploy".into())
            .await
            .unwrap_err();
        assert!(
            busy.to_string().contains("git push 1a2b3c4 by alice"),
            "{busy}"
        );
        assert!(busy.to_string().contains("`shop`"), "{busy}");
        // Another app is not held up.
        let other = locks
            .try_lock(&app("blog", "u2"), "x".into())
            .await
            .unwrap();
        drop(other);
        drop(g);
        assert_eq!(locks.active(), 0);
        locks.try_lock(&shop, "again".into()).await.unwrap();
    }

    #[tokio::test]
    async fn queued_deploys_run_in_turn_and_give_up_at_their_limit() {
        let locks = Arc::new(AppLocks::default());
        let shop = app("shop", "u1");
        let first = locks.try_lock(&shop, "first".into()).await.unwrap();
        let l2 = locks.clone();
        let s2 = shop.clone();
        let waiter = tokio::spawn(async move {
            l2.lock(
                &s2,
                "second".into(),
                Queue {
                    limit: Duration::from_secs(60),
                },
            )
            .await
            .map(|_| ())
        });
        // A third with a short limit gives up while the first still holds the lock.
        let third = locks
            .lock(
                &shop,
                "third".into(),
                Queue {
                    limit: Duration::from_millis(100),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(third.holder, "first");
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(locks.active(), 0);
    }

    #[tokio::test]
    async fn a_re_created_app_of_the_same_name_is_another_lock() {
        let locks = Arc::new(AppLocks::default());
        let _g = locks
            .try_lock(&app("shop", "old"), "x".into())
            .await
            .unwrap();
        locks
            .try_lock(&app("shop", "new"), "y".into())
            .await
            .unwrap();
    }

    /// A deploy that finds escale's pruning holding its app waits for it and then runs; one
    /// that finds another deploy is refused at once, naming it.
    #[tokio::test]
    async fn a_deploy_waits_for_background_work_but_not_for_another_deploy() {
        let locks = Arc::new(AppLocks::default());
        let shop = app("shop", "u1");
        let prune = locks
            .try_lock_background(&shop, "pruning images".into())
            .unwrap();
        let l2 = locks.clone();
        let s2 = shop.clone();
        let deploy = tokio::spawn(async move {
            l2.try_lock(&s2, "a git push by alice".into())
                .await
                .map(|_| ())
        });
        // The deploy task runs until it waits on the lock (one thread: it cannot finish first).
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!deploy.is_finished(), "the deploy waits for the pruning");
        drop(prune);
        deploy.await.unwrap().expect("then it runs");

        let first = locks.try_lock(&shop, "first".into()).await.unwrap();
        let busy = locks.try_lock(&shop, "second".into()).await.unwrap_err();
        assert!(busy.to_string().contains("first"), "{busy}");
        drop(first);
        // Background work never waits: it skips a busy app.
        let _d = locks.try_lock(&shop, "deploy".into()).await.unwrap();
        assert!(locks
            .try_lock_background(&shop, "pruning images".into())
            .is_err());
    }
}
