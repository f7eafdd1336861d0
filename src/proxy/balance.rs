//! Backend selection: least outstanding requests with a round-robin tie break, and passive
//! ejection of backends that refused a connection.
//!
//! Per-backend state is keyed by instance id, so it survives routing snapshot swaps. The map
//! is read-mostly (`RwLock`, never held across an await); entries are added the first time an
//! instance is picked and pruned when the map grows well past the routed instances. The state
//! also holds the instance's idle upstream connections, so they go away with it.

//! Ejection fails open: when every backend of a route is ejected, the least loaded one is
//! still tried (the reconciler's health checks, not this hint, decide what is routable).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::upstream::IdlePool;
use crate::routing::{Route, SharedRoutes};

/// Live state of one instance.
#[derive(Debug, Default)]
pub(crate) struct BackendState {
    outstanding: AtomicUsize,
    /// Milliseconds since the balancer's epoch; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    /// Idle keep-alive connections to the instance, closed with it when it leaves the routes.
    pub(crate) idle: IdlePool,
}

/// Decrements the backend's outstanding count on drop.
#[derive(Debug)]
pub(crate) struct Outstanding(Arc<BackendState>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Relaxed);
    }
}

/// A chosen backend: its index in `route.backends` and its state.
#[derive(Debug)]
pub(crate) struct Pick {
    pub(crate) index: usize,
    pub(crate) state: Arc<BackendState>,
}

impl Pick {
    /// Counts a request on this backend until the guard is dropped.
    pub(crate) fn start(&self) -> Outstanding {
        self.state.outstanding.fetch_add(1, Relaxed);
        Outstanding(self.state.clone())
    }
}

#[derive(Debug)]
pub(crate) struct Balancer {
    states: RwLock<HashMap<String, Arc<BackendState>>>,
    prune_at: AtomicUsize,
    rr: AtomicUsize,
    epoch: Instant,
    eject: Duration,
    routes: SharedRoutes,
}

impl Balancer {
    pub(crate) fn new(routes: SharedRoutes, eject: Duration) -> Self {
        Balancer {
            states: RwLock::default(),
            prune_at: AtomicUsize::new(256),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            eject,
            routes,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Picks a backend of `route`, skipping `exclude`. `None` when no candidate is left.
    pub(crate) fn pick(&self, route: &Route, exclude: Option<usize>) -> Option<Pick> {
        let n = route.backends.len();
        if n == 0 || (n == 1 && exclude == Some(0)) {
            return None;
        }
        let now = self.now_ms();
        let start = self.rr.fetch_add(1, Relaxed) % n;
        let mut best: Option<(usize, (bool, usize))> = None;
        {
            let states = self.states.read().unwrap_or_else(PoisonError::into_inner);
            for i in 0..n {
                let idx = (start + i) % n;
                if exclude == Some(idx) {
                    continue;
                }
                let key = match states.get(&route.backends[idx].instance) {
                    Some(s) => (
                        s.ejected_until_ms.load(Relaxed) > now,
                        s.outstanding.load(Relaxed),
                    ),
                    None => (false, 0),
                };
                if best.is_none_or(|(_, k)| key < k) {
                    best = Some((idx, key));
                }
            }
        }
        let (index, _) = best?;
        Some(Pick {
            index,
            state: self.state(&route.backends[index].instance),
        })
    }

    /// Skips `pick`'s backend for the ejection duration.
    pub(crate) fn eject(&self, pick: &Pick) {
        let until = self.now_ms().saturating_add(self.eject.as_millis() as u64);
        pick.state.ejected_until_ms.store(until.max(1), Relaxed);
    }

    fn state(&self, instance: &str) -> Arc<BackendState> {
        if let Some(s) = self
            .states
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(instance)
        {
            return s.clone();
        }
        let mut states = self.states.write().unwrap_or_else(PoisonError::into_inner);
        if states.len() >= self.prune_at.load(Relaxed) {
            let table = self.routes.load();
            let live: HashSet<&str> = table
                .iter()
                .flat_map(|(_, r)| r.backends.iter().map(|b| b.instance.as_str()))
                .collect();
            states.retain(|k, s| live.contains(k.as_str()) || s.outstanding.load(Relaxed) > 0);
            self.prune_at.store((states.len() * 2).max(256), Relaxed);
        }
        states.entry(instance.to_owned()).or_default().clone()
    }

    /// Closes idle connections older than `max_age`, and those of instances no longer
    /// routed (their state is dropped at the next prune; their sockets are closed now).
    pub(crate) fn sweep_idle(&self, max_age: Duration) {
        let table = self.routes.load();
        let live: HashSet<&str> = table
            .iter()
            .flat_map(|(_, r)| r.backends.iter().map(|b| b.instance.as_str()))
            .collect();
        let states = self.states.read().unwrap_or_else(PoisonError::into_inner);
        for (instance, state) in states.iter() {
            let age = if live.contains(instance.as_str()) {
                max_age
            } else {
                Duration::ZERO
            };
            state.idle.sweep(age);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.states.read().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{shared, Backend};

    fn route(n: usize) -> Route {
        Route {
            app: "shop".into(),
            backends: (0..n)
                .map(|i| Backend {
                    instance: format!("i{i}"),
                    addr: ([127, 0, 0, 1], 1000 + i as u16).into(),
                })
                .collect(),
            max_body_bytes: 1 << 20,
            redirect_https: false,
        }
    }

    #[test]
    fn round_robin_when_idle_and_least_outstanding_when_busy() {
        let b = Balancer::new(shared(), Duration::from_secs(10));
        let r = route(3);
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&r, None).unwrap().index).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let p0 = b.pick(&r, None).unwrap();
        let _g0 = p0.start();
        let p1 = b.pick(&r, None).unwrap();
        let _g1 = p1.start();
        // Two busy backends: the third is always chosen.
        for _ in 0..3 {
            let p = b.pick(&r, None).unwrap();
            assert_ne!(p.index, p0.index);
            assert_ne!(p.index, p1.index);
        }
    }

    #[test]
    fn ejected_backends_go_last_but_fail_open() {
        let b = Balancer::new(shared(), Duration::from_secs(10));
        let r = route(2);
        let p = b.pick(&r, None).unwrap();
        b.eject(&p);
        for _ in 0..4 {
            assert_ne!(b.pick(&r, None).unwrap().index, p.index);
        }
        assert!(b.pick(&route(1), Some(0)).is_none());
        let only = route(1);
        let p = b.pick(&only, None).unwrap();
        b.eject(&p);
        assert_eq!(b.pick(&only, None).unwrap().index, 0);
    }

    #[tokio::test]
    async fn sweep_closes_idle_connections_of_departed_instances() {
        use crate::proxy::upstream::Conn;
        use crate::routing::RoutingTable;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = shared();
        let b = Balancer::new(routes.clone(), Duration::from_secs(10));
        let both = route(2);
        let kept = Arc::new(Route {
            backends: vec![both.backends[0].clone()],
            ..both.clone()
        });
        routes.store(Arc::new(RoutingTable::new([("shop".to_string(), kept)])));
        let states: Vec<_> = (0..2)
            .map(|i| b.state(&both.backends[i].instance))
            .collect();
        for s in &states {
            let conn = Conn::connect(addr, Duration::from_secs(1)).await.unwrap();
            s.idle.put(conn, 8);
        }
        b.sweep_idle(Duration::from_secs(30));
        assert_eq!(
            states[0].idle.len(),
            1,
            "a routed instance keeps its young connection"
        );
        assert_eq!(
            states[1].idle.len(),
            0,
            "a departed instance's connection is closed"
        );
        b.sweep_idle(Duration::ZERO);
        assert_eq!(
            states[0].idle.len(),
            0,
            "connections older than the idle timeout close"
        );
    }

    #[test]
    fn prunes_unrouted_instances() {
        let b = Balancer::new(shared(), Duration::from_secs(10));
        for i in 0..600 {
            let mut r = route(1);
            r.backends[0].instance = format!("gone-{i}");
            b.pick(&r, None);
        }
        assert!(b.tracked() <= 256, "{}", b.tracked());
    }
}
