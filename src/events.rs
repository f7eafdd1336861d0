//! The event bus: everything a user could watch, published as a typed [`Event`] after it
//! happened (a registry change after its transaction committed, a scheduler observation after
//! it was made).
//!
//! Consumers subscribe and filter: the reconciler wakes on registry changes, `escale deploy`
//! and `git push` follow a rollout, `escale logs -f` picks up instances started after it
//! began, `escale events -f` and the dashboard show them live. The bus is in memory
//! and lossy for slow readers (a [`tokio::sync::broadcast`] channel): a reader that falls
//! behind learns it ([`Subscription::recv`] answers [`Missed`]) and re-reads the state it
//! follows. What must survive a restart is in the registry's audit log, written in the same
//! transaction as the change; the scheduler's own actions (an instance replaced, a rollout
//! failed, a node lost) are recorded there too, with actor `escale`.
//!
//! Invariant: an event is published after the fact it reports is true for every reader
//! (committed, observed), never before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events a slow subscriber may fall behind before it misses some.
const CAPACITY: usize = 4096;

/// An instance's lifecycle, as the scheduler observes it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Being created or started, or running but not yet healthy.
    Starting,
    /// Running (see its health).
    Running,
    /// Out of the routing table, being stopped.
    Draining,
    /// Stopped by itself (crashed or exited).
    Exited,
}

/// What escale's own probes say of a running instance.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Not yet checked or still in its start grace.
    Starting,
    /// The last check passed: routed.
    Healthy,
    /// The last checks failed: out of the routing table.
    Unhealthy,
    /// Not running, so not checked.
    #[serde(rename = "-")]
    None,
}

/// Why an instance was drained.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DrainCause {
    /// Replaced by an instance of a newer release or process definition.
    Rollout,
    /// Scaled down, or its app or process is gone.
    ScaledDown,
    /// Failed its health checks for longer than the replacement threshold.
    Unhealthy,
    /// Its node is being drained or it runs where it should not.
    Moved,
}

/// One instance, as events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct InstanceRef {
    pub app: String,
    /// The engine's container id (empty while it is being created).
    #[serde(default)]
    pub container_id: String,
    pub process: String,
    pub release: u32,
    pub slot: u32,
    pub instance: String,
    pub node: String,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A committed registry change, with its audit record.
    Changed {
        app: Option<String>,
        /// The audit action (`app.create`, `release.create`, `scale`, ...).
        action: String,
        actor: String,
        detail: String,
    },
    /// A container was created and started.
    InstanceStarted { instance: InstanceRef },
    /// An instance passed its health check (now routed).
    InstanceHealthy { instance: InstanceRef },
    /// An instance failed its health checks (out of the routing table, not yet replaced).
    InstanceUnhealthy {
        instance: InstanceRef,
        reason: String,
    },
    /// An instance is being drained (out of the routing table, then stopped).
    InstanceDraining {
        instance: InstanceRef,
        cause: DrainCause,
        reason: String,
    },
    /// An instance was stopped and removed.
    InstanceStopped { instance: InstanceRef },
    /// An instance exited on its own, or could not be started; it will be replaced.
    InstanceCrashed {
        instance: InstanceRef,
        exit_code: Option<i64>,
        oom: bool,
        /// The last lines it wrote (or why it could not start).
        last_logs: Vec<String>,
    },
    /// A rollout moved: `healthy` of `total` new instances healthy, `old` left to replace.
    RolloutProgress {
        app: String,
        release: u32,
        healthy: u32,
        total: u32,
        old: u32,
    },
    /// A rollout finished: the release serves.
    RolloutSucceeded { app: String, release: u32 },
    /// A rollout failed; `reason` says why (with the last log lines when there are some).
    RolloutFailed {
        app: String,
        release: u32,
        reason: String,
    },
    /// No node can take `missing` instances of a process (the reasons, one per node); the
    /// scheduler keeps trying every pass.
    InstancesUnplaced {
        app: String,
        process: String,
        missing: u32,
        reasons: Vec<String>,
    },
    /// Every instance of a process that could not be placed has a node again.
    InstancesPlaced { app: String, process: String },
    /// A node answered again (or for the first time).
    NodeReady { node: String },
    /// A node stopped answering.
    NodeDown { node: String, error: String },
    /// A node's engine disk crossed a threshold (`upkeep.disk_warn_percent`,
    /// `upkeep.disk_refuse_builds_percent`), up or back down.
    NodeDisk {
        node: String,
        used_percent: u8,
        level: DiskLevel,
    },
    /// Images escale built and no longer needs were removed from a node.
    ImagesPruned {
        node: String,
        images: u32,
        bytes: u64,
    },
    /// The certificates the proxy serves changed.
    CertificatesChanged,
}

/// How full a node's engine disk is, against the `[upkeep]` thresholds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DiskLevel {
    /// Below `disk_warn_percent`.
    Ok,
    /// At or above `disk_warn_percent`: announced.
    Warning,
    /// At or above `disk_refuse_builds_percent`: builds there are refused.
    Full,
}

impl Event {
    /// The app this event is about; `None` for installation-wide events.
    pub fn app(&self) -> Option<&str> {
        match self {
            Event::Changed { app, .. } => app.as_deref(),
            Event::InstanceStarted { instance }
            | Event::InstanceHealthy { instance }
            | Event::InstanceUnhealthy { instance, .. }
            | Event::InstanceDraining { instance, .. }
            | Event::InstanceStopped { instance }
            | Event::InstanceCrashed { instance, .. } => Some(&instance.app),
            Event::RolloutProgress { app, .. }
            | Event::InstancesUnplaced { app, .. }
            | Event::InstancesPlaced { app, .. }
            | Event::RolloutSucceeded { app, .. }
            | Event::RolloutFailed { app, .. } => Some(app),
            Event::NodeReady { .. }
            | Event::NodeDown { .. }
            | Event::NodeDisk { .. }
            | Event::ImagesPruned { .. }
            | Event::CertificatesChanged => None,
        }
    }

    /// Whether the desired state may have changed (the reconciler should look again).
    pub fn changes_desired_state(&self) -> bool {
        matches!(self, Event::Changed { .. } | Event::CertificatesChanged)
    }

    /// A short line for people (`escale events -f`, logs).
    pub fn summary(&self) -> String {
        let who =
            |i: &InstanceRef| format!("{}.{} v{} ({})", i.process, i.slot, i.release, i.instance);
        match self {
            Event::Changed {
                action,
                actor,
                detail,
                ..
            } => {
                if detail.is_empty() {
                    format!("{action} by {actor}")
                } else {
                    format!("{action} by {actor}: {detail}")
                }
            }
            Event::InstanceStarted { instance } => {
                format!("instance {} started on {}", who(instance), instance.node)
            }
            Event::InstanceHealthy { instance } => format!("instance {} healthy", who(instance)),
            Event::InstanceUnhealthy { instance, reason } => {
                format!(
                    "instance {} unhealthy, out of rotation: {reason}",
                    who(instance)
                )
            }
            Event::InstanceDraining {
                instance, reason, ..
            } => {
                format!("instance {} draining: {reason}", who(instance))
            }
            Event::InstanceStopped { instance } => format!("instance {} stopped", who(instance)),
            Event::InstanceCrashed {
                instance,
                exit_code,
                oom,
                ..
            } => {
                let how = match (exit_code, oom) {
                    (_, true) => "was killed for using too much memory".to_string(),
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, _) => "could not be started".to_string(),
                };
                format!("instance {} {how}; it will be replaced", who(instance))
            }
            Event::RolloutProgress {
                release,
                healthy,
                total,
                old,
                ..
            } => {
                format!("v{release}: {healthy}/{total} healthy, {old} old instance(s) left")
            }
            Event::RolloutSucceeded { release, .. } => format!("v{release} is serving"),
            Event::RolloutFailed {
                release, reason, ..
            } => {
                format!("rollout of v{release} failed: {reason}")
            }
            Event::InstancesUnplaced {
                process,
                missing,
                reasons,
                ..
            } => {
                let why = if reasons.is_empty() {
                    "no node is ready".to_string()
                } else {
                    reasons.join("; ")
                };
                format!("{missing} instance(s) of {process} cannot be placed: {why}")
            }
            Event::InstancesPlaced { process, .. } => {
                format!("every instance of {process} has a node again")
            }
            Event::NodeReady { node } => format!("node {node} ready"),
            Event::NodeDown { node, error } => format!("node {node} unreachable: {error}"),
            Event::NodeDisk {
                node,
                used_percent,
                level,
            } => match level {
                DiskLevel::Ok => format!("node {node} disk back to {used_percent}% used"),
                DiskLevel::Warning => format!("node {node} disk {used_percent}% used"),
                DiskLevel::Full => {
                    format!("node {node} disk {used_percent}% used: builds there are refused")
                }
            },
            Event::ImagesPruned {
                node,
                images,
                bytes,
            } => format!(
                "node {node}: {images} unused image(s) removed, {} MiB freed",
                bytes / (1 << 20)
            ),
            Event::CertificatesChanged => "certificates changed".to_string(),
        }
    }
}

/// An event with its place in the stream.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Envelope {
    /// Increases by one per event published by this process (restarts begin again at 1).
    pub seq: u64,
    /// Unix milliseconds.
    pub at: i64,
    #[serde(flatten)]
    pub event: Event,
}

/// The bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Envelope>>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("published", &self.inner.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for Bus {
    fn default() -> Self {
        Bus::new()
    }
}

/// A subscriber fell behind and some events are gone; re-read what you follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} event(s) missed")]
pub struct Missed(pub u64);

/// A subscriber's end of the bus.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<Envelope>>,
}

impl Subscription {
    /// The next event; `Err(Missed)` once after falling behind (then the stream goes on);
    /// pending forever once the bus is gone.
    pub async fn recv(&mut self) -> Result<Arc<Envelope>, Missed> {
        match self.rx.recv().await {
            Ok(e) => Ok(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(Missed(n)),
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    /// The next event already published, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Arc<Envelope>, Missed>> {
        match self.rx.try_recv() {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(Missed(n))),
            Err(_) => None,
        }
    }
}

impl Bus {
    pub fn new() -> Bus {
        let (tx, _) = broadcast::channel(CAPACITY);
        Bus {
            inner: Arc::new(Inner {
                tx,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// Publishes `event` to every current subscriber.
    pub fn publish(&self, event: Event) {
        // The sequence is taken under the channel's own ordering: two publishers may interleave
        // their numbers, so readers rely on order of arrival, and on `seq` only to tell events apart.
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::trace!(seq, event = ?event, "event");
        let _ = self.inner.tx.send(Arc::new(Envelope {
            seq,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            event,
        }));
    }

    /// Events published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.inner.tx.subscribe(),
        }
    }

    /// How many events were published so far.
    pub fn published(&self) -> u64 {
        self.inner.seq.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_events_published_after_they_subscribed_in_order() {
        let bus = Bus::new();
        bus.publish(Event::CertificatesChanged);
        let mut sub = bus.subscribe();
        bus.publish(Event::NodeReady { node: "a".into() });
        bus.publish(Event::NodeDown {
            node: "a".into(),
            error: "gone".into(),
        });
        let first = sub.recv().await.unwrap();
        let second = sub.recv().await.unwrap();
        assert_eq!(first.event, Event::NodeReady { node: "a".into() });
        assert!(matches!(second.event, Event::NodeDown { .. }));
        assert!(second.seq > first.seq);
        assert!(sub.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_slow_subscriber_learns_it_missed_events_and_goes_on() {
        let bus = Bus::new();
        let mut sub = bus.subscribe();
        for i in 0..(CAPACITY + 10) {
            bus.publish(Event::NodeReady {
                node: format!("n{i}"),
            });
        }
        assert_eq!(sub.recv().await.unwrap_err(), Missed(10));
        let next = sub.recv().await.unwrap();
        assert_eq!(next.event, Event::NodeReady { node: "n10".into() });
    }

    #[test]
    fn events_serialise_with_their_type_and_states_as_words() {
        let e = Envelope {
            seq: 3,
            at: 5,
            event: Event::InstanceDraining {
                instance: InstanceRef {
                    app: "shop".into(),
                    container_id: "c0ffee".into(),
                    process: "web".into(),
                    release: 2,
                    slot: 0,
                    instance: "shop-web-0-v2-ab12".into(),
                    node: "local".into(),
                },
                cause: DrainCause::Unhealthy,
                reason: "health check failed for 60s".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "instance_draining");
        assert_eq!(v["cause"], "unhealthy");
        assert_eq!(v["instance"]["app"], "shop");
        let back: Envelope = serde_json::from_value(v).unwrap();
        assert_eq!(back.event, e.event);
        assert_eq!(serde_json::to_value(HealthStatus::None).unwrap(), "-");
        assert_eq!(e.event.app(), Some("shop"));
    }
}
