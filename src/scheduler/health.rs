//! Health checks of running instances, done by escale itself (images built `FROM scratch` have
//! no shell for a Docker HEALTHCHECK).
//!
//! A new instance is probed every 250 ms until it first passes (fast rollouts), then at its
//! process type's interval. It is `Starting` until its first success, `Unhealthy` if its start
//! grace runs out first or after [`FAILURES_TO_UNHEALTHY`] consecutive failures. Every change of
//! verdict wakes the reconciler, which republishes the routing table.
//!
//! `Unhealthy` only takes an instance out of the routing table. Whether it is replaced is the
//! planner's decision, from the facts kept here ([`HealthTable::facts`]): whether it ever
//! passed, how many probes it failed after its grace, since when it is unhealthy, and whether
//! its port still accepts connections. A failed probe is classified: refused, reset, or closed
//! without an answer means nothing accepts connections; a timeout (connecting or waiting for
//! the answer), a bad or a 4xx/5xx answer means the instance accepts but is busy or failing. An
//! instance that never passed is probed every 250 ms until it does, even once unhealthy, so a
//! rollout whose new instances never pass fails fast.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::registry::HealthKind;

/// Consecutive failures that turn a healthy instance unhealthy.
pub const FAILURES_TO_UNHEALTHY: u32 = 2;
const STARTING_PROBE_EVERY: Duration = Duration::from_millis(250);

/// The verdict on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// How and where to probe an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub addr: SocketAddr,
    pub kind: HealthKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub grace: Duration,
}

#[derive(Debug)]
struct Entry {
    target: ProbeTarget,
    health: Health,
    since: Instant,
    failures: u32,
    next_probe: Instant,
    last_error: Option<String>,
    /// When tracking started (the start grace counts from here).
    tracked: Instant,
    ever_healthy: bool,
    failed_after_grace: u32,
    accepting: bool,
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// What happened, for people.
    pub message: String,
    /// The port accepted the connection (or did not refuse it before the timeout): the
    /// instance is busy or failing, not gone.
    pub accepting: bool,
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ProbeFailure {
    fn busy(message: String) -> ProbeFailure {
        ProbeFailure {
            message,
            accepting: true,
        }
    }

    /// From an I/O error: refused or reset means nothing accepts connections.
    fn io(what: String, e: &std::io::Error) -> ProbeFailure {
        use std::io::ErrorKind::*;
        let not_accepting = matches!(
            e.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | AddrNotAvailable
                | HostUnreachable
                | NetworkUnreachable
        );
        ProbeFailure {
            message: format!("{what}: {e}"),
            accepting: !not_accepting,
        }
    }
}

/// Verdicts by container id. The lock is never held across an await.
#[derive(Debug, Default)]
pub struct HealthTable {
    entries: Mutex<HashMap<String, Entry>>,
}

impl HealthTable {
    /// The verdict on a container, `None` if it is not tracked.
    pub fn get(&self, container_id: &str) -> Option<Health> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(container_id)
            .map(|e| e.health)
    }

    /// The last probe error of a container.
    pub fn last_error(&self, container_id: &str) -> Option<String> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(container_id)
            .and_then(|e| e.last_error.clone())
    }

    /// What the planner needs to know of a container ([`plan::HealthFacts`]), with times as
    /// unix ms relative to `now_ms`. Default facts when it is not tracked.
    pub fn facts(&self, container_id: &str, now_ms: u64) -> super::plan::HealthFacts {
        let map = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(e) = map.get(container_id) else {
            return Default::default();
        };
        super::plan::HealthFacts {
            ever_healthy: e.ever_healthy,
            failed_after_grace: e.failed_after_grace,
            unhealthy_since_ms: (e.health == Health::Unhealthy)
                .then(|| now_ms.saturating_sub(e.since.elapsed().as_millis() as u64)),
            accepting: e.accepting,
        }
    }

    /// Makes the table track exactly these running containers. A new container starts as
    /// `Starting` (or `Healthy` at once when its kind is `None`).
    ///
    /// A changed target (the process's health check was edited) keeps the container's verdict
    /// and probes it again at once: a serving instance stays routed until the new check fails
    /// [`FAILURES_TO_UNHEALTHY`] times, instead of being pulled out of the routing table while it
    /// is re-checked (which, with every instance re-checked at once, left the app with no
    /// backend at all).
    pub fn sync(&self, targets: Vec<(String, ProbeTarget)>) {
        let now = Instant::now();
        let mut map = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keep: std::collections::HashSet<&String> = targets.iter().map(|(id, _)| id).collect();
        map.retain(|id, _| keep.contains(id));
        for (id, target) in targets {
            match map.get_mut(&id) {
                Some(e) if e.target == target => {}
                // No check any more: healthy (as a new instance without a check would be).
                Some(e) if target.kind == HealthKind::None => {
                    e.health = Health::Healthy;
                    e.ever_healthy = true;
                    e.target = target;
                    e.failures = 0;
                    e.failed_after_grace = 0;
                    e.last_error = None;
                }
                Some(e) => {
                    e.target = target;
                    e.failures = 0;
                    e.failed_after_grace = 0;
                    e.last_error = None;
                    e.next_probe = now;
                }
                None => {
                    let health = if target.kind == HealthKind::None {
                        Health::Healthy
                    } else {
                        Health::Starting
                    };
                    map.insert(
                        id,
                        Entry {
                            target,
                            health,
                            since: now,
                            failures: 0,
                            next_probe: now,
                            last_error: None,
                            tracked: now,
                            ever_healthy: health == Health::Healthy,
                            failed_after_grace: 0,
                            accepting: true,
                        },
                    );
                }
            }
        }
    }

    /// Runs the probes that are due, concurrently, and records their results. Returns true when
    /// any verdict changed.
    pub async fn probe_due(&self) -> bool {
        let now = Instant::now();
        let due: Vec<(String, ProbeTarget)> = {
            let map = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.iter()
                .filter(|(_, e)| e.target.kind != HealthKind::None && e.next_probe <= now)
                .map(|(id, e)| (id.clone(), e.target.clone()))
                .collect()
        };
        if due.is_empty() {
            return false;
        }
        let results = join_all(due.into_iter().map(|(id, t)| async move {
            let r = probe(&t).await;
            (id, r)
        }))
        .await;
        let now = Instant::now();
        let mut changed = false;
        let mut map = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, result) in results {
            let Some(e) = map.get_mut(&id) else { continue };
            let before = e.health;
            match result {
                Ok(()) => {
                    e.failures = 0;
                    e.failed_after_grace = 0;
                    e.last_error = None;
                    e.accepting = true;
                    e.ever_healthy = true;
                    e.health = Health::Healthy;
                }
                Err(err) => {
                    e.failures += 1;
                    if !e.ever_healthy && now.duration_since(e.tracked) >= e.target.grace {
                        e.failed_after_grace += 1;
                    }
                    e.accepting = err.accepting;
                    e.last_error = Some(err.message);
                    match e.health {
                        Health::Starting if now.duration_since(e.since) >= e.target.grace => {
                            e.health = Health::Unhealthy
                        }
                        Health::Healthy if e.failures >= FAILURES_TO_UNHEALTHY => {
                            e.health = Health::Unhealthy
                        }
                        _ => {}
                    }
                }
            }
            e.next_probe = now
                + match e.health {
                    Health::Starting => STARTING_PROBE_EVERY,
                    // Never passed: keep looking quickly (a rollout's fast verdict needs it).
                    Health::Unhealthy if !e.ever_healthy => STARTING_PROBE_EVERY,
                    // A failing healthy instance is re-probed quickly, so ejection is fast.
                    Health::Healthy if e.failures > 0 => STARTING_PROBE_EVERY,
                    _ => e.target.interval,
                };
            if e.health != before {
                tracing::debug!(container = %&id[..id.len().min(12)], from = ?before, to = ?e.health, error = ?e.last_error, "health verdict changed");
                e.since = now;
                changed = true;
            }
        }
        changed
    }

    /// Probes forever, waking `changed` whenever a verdict changes.
    pub async fn run(self: Arc<Self>, changed: Arc<Notify>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.probe_due().await {
                changed.notify_one();
            }
        }
    }
}

/// One probe: HTTP `GET path` must answer 2xx or 3xx, or TCP must connect, within the timeout.
/// A failure says whether the port accepted the connection (see the module docs).
pub async fn probe(t: &ProbeTarget) -> Result<(), ProbeFailure> {
    let work = async {
        let mut stream = TcpStream::connect(t.addr)
            .await
            .map_err(|e| ProbeFailure::io(format!("connect {}", t.addr), &e))?;
        if t.kind == HealthKind::Tcp {
            return Ok(());
        }
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: escale-health\r\nConnection: close\r\n\r\n",
            t.path, t.addr
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| ProbeFailure::io("send".into(), &e))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = stream
                .read(&mut buf[n..])
                .await
                .map_err(|e| ProbeFailure::io("read".into(), &e))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            // Nothing answered and the connection closed: what a published port does when no
            // process listens behind it.
            return Err(ProbeFailure {
                message: format!("GET {}: connection closed without an answer", t.path),
                accepting: false,
            });
        }
        let head = std::str::from_utf8(&buf[..n]).unwrap_or("");
        let code: u16 = head
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ProbeFailure::busy("no HTTP status line in the answer".into()))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(ProbeFailure::busy(format!(
                "GET {} answered {code}",
                t.path
            )))
        }
    };
    match tokio::time::timeout(t.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ProbeFailure::busy(format!(
            "no answer within {} ms",
            t.timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        addr
    }

    fn target(addr: SocketAddr, kind: HealthKind, grace_ms: u64) -> ProbeTarget {
        ProbeTarget {
            addr,
            kind,
            path: "/health".into(),
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(500),
            grace: Duration::from_millis(grace_ms),
        }
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_3xx_only() {
        assert!(probe(&target(server("200 OK").await, HealthKind::Http, 0))
            .await
            .is_ok());
        assert!(
            probe(&target(server("302 Found").await, HealthKind::Http, 0))
                .await
                .is_ok()
        );
        let e = probe(&target(server("500 Oops").await, HealthKind::Http, 0))
            .await
            .unwrap_err();
        assert!(e.message.contains("500"), "{e}");
        assert!(e.accepting, "a 5xx answer is busy, not gone");
    }

    #[tokio::test]
    async fn tcp_probe_and_refused_connection() {
        let addr = server("200 OK").await;
        assert!(probe(&target(addr, HealthKind::Tcp, 0)).await.is_ok());
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = probe(&target(closed, HealthKind::Tcp, 0))
            .await
            .unwrap_err();
        assert!(!e.accepting, "refused: not accepting ({e})");
    }

    #[tokio::test]
    async fn verdicts_follow_probes_and_grace() {
        let table = HealthTable::default();
        let good = server("200 OK").await;
        let bad = server("503 No").await;
        table.sync(vec![
            ("good".into(), target(good, HealthKind::Http, 10_000)),
            ("bad-in-grace".into(), target(bad, HealthKind::Http, 10_000)),
            ("bad".into(), target(bad, HealthKind::Http, 0)),
            ("none".into(), target(bad, HealthKind::None, 0)),
        ]);
        assert_eq!(
            table.get("none"),
            Some(Health::Healthy),
            "no check: healthy at once"
        );
        assert!(table.probe_due().await);
        assert_eq!(table.get("good"), Some(Health::Healthy));
        assert_eq!(table.get("bad-in-grace"), Some(Health::Starting));
        assert_eq!(table.get("bad"), Some(Health::Unhealthy));
        assert!(table.last_error("bad").unwrap().contains("503"));
        table.sync(vec![(
            "good".into(),
            target(good, HealthKind::Http, 10_000),
        )]);
        assert_eq!(table.get("bad"), None, "untracked after sync");
        assert_eq!(table.get("good"), Some(Health::Healthy), "kept across sync");
    }

    #[tokio::test]
    async fn a_changed_check_keeps_the_verdict_until_the_new_check_fails() {
        let table = HealthTable::default();
        let good = server("200 OK").await;
        table.sync(vec![("a".into(), target(good, HealthKind::Http, 10_000))]);
        assert!(table.probe_due().await);
        assert_eq!(table.get("a"), Some(Health::Healthy));

        // The check moves to another path: still routable while it is re-probed.
        let mut moved = target(good, HealthKind::Http, 10_000);
        moved.path = "/ready".into();
        table.sync(vec![("a".into(), moved.clone())]);
        assert_eq!(
            table.get("a"),
            Some(Health::Healthy),
            "not reset to starting"
        );

        // A new check that fails turns it unhealthy after the usual consecutive failures.
        let bad = server("503 No").await;
        moved.addr = bad;
        table.sync(vec![("a".into(), moved)]);
        for _ in 0..FAILURES_TO_UNHEALTHY {
            assert_eq!(table.get("a"), Some(Health::Healthy));
            tokio::time::sleep(STARTING_PROBE_EVERY).await;
            table.probe_due().await;
        }
        assert_eq!(table.get("a"), Some(Health::Unhealthy));
    }

    /// Accepts connections and never answers: a saturated app.
    async fn silent() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn facts_tell_busy_from_gone_and_count_failures_after_grace() {
        let table = HealthTable::default();
        let busy = silent().await;
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut t_busy = target(busy, HealthKind::Http, 0);
        t_busy.timeout = Duration::from_millis(50);
        table.sync(vec![
            ("busy".into(), t_busy),
            ("gone".into(), target(gone, HealthKind::Http, 0)),
            ("graced".into(), target(gone, HealthKind::Http, 60_000)),
        ]);
        for _ in 0..3 {
            table.probe_due().await;
            tokio::time::sleep(STARTING_PROBE_EVERY).await;
        }
        let busy = table.facts("busy", 1_000_000);
        assert!(busy.accepting && !busy.ever_healthy, "{busy:?}");
        assert!(
            busy.failed_after_grace >= 3,
            "never passed: probed quickly: {busy:?}"
        );
        assert!(busy.unhealthy_since_ms.is_some_and(|t| t <= 1_000_000));
        let gone = table.facts("gone", 1_000_000);
        assert!(!gone.accepting, "{gone:?}");
        let graced = table.facts("graced", 1_000_000);
        assert_eq!(
            graced.failed_after_grace, 0,
            "failures in the grace do not count"
        );
        assert_eq!(graced.unhealthy_since_ms, None, "still starting");
        assert_eq!(table.facts("unknown", 5), Default::default());
    }
}
