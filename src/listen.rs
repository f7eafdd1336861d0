//! Listener hygiene shared by the proxy and the API: caps on open connections, per listener
//! and per client address, that shed new connections before the process runs out of file
//! descriptors; and the process's descriptor limit, raised at start.
//!
//! A listener's [`ConnLimits`] is asked once per accepted connection ([`ConnLimits::admit`]);
//! the [`Permit`] it hands out is held by the connection's task and gives the slot back when
//! dropped. A refused connection is closed at once, before a byte is read, so shedding costs
//! one accept and one close. Clients are counted by IPv4 address, or by IPv6 /64 (one host
//! usually holds a whole /64, so counting single IPv6 addresses would cap nothing).
//!
//! The budget ([`Budget::from_limit`]) splits the descriptor limit so that the proxy, however
//! loaded, always leaves descriptors to the API, the registry, the engine connections and
//! the upstream sockets: the proxy's client connections get at most a third of the limit
//! (each proxied request may hold an upstream socket too), the API a sixteenth, and the
//! rest stays free.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The listener holds its maximum of open connections.
    #[error("{listener}: {max} connections open, the listener's maximum")]
    Listener {
        /// The listener's name.
        listener: &'static str,
        /// Its cap.
        max: usize,
    },
    /// This client (address, or IPv6 /64) holds its maximum of open connections.
    #[error("{listener}: the client holds {max} connections, the per-client maximum")]
    Client {
        /// The listener's name.
        listener: &'static str,
        /// The per-client cap.
        max: usize,
    },
}

impl Refused {
    /// The label used in metrics: `listener` or `client`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Listener { .. } => "listener",
            Refused::Client { .. } => "client",
        }
    }
}

/// The key a client is counted under.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// Open-connection caps of one listener (or of several sharing a budget, as the proxy's
/// plain and TLS listeners and all its worker threads do).
#[derive(Debug)]
pub struct ConnLimits {
    name: &'static str,
    max_total: usize,
    max_per_client: usize,
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    shed_listener: AtomicU64,
    shed_client: AtomicU64,
}

impl ConnLimits {
    /// Caps for listener `name`: `max_total` open connections, `max_per_client` per client
    /// (0 means no cap for either).
    pub fn new(name: &'static str, max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(ConnLimits {
            name,
            max_total: if max_total == 0 {
                usize::MAX
            } else {
                max_total
            },
            max_per_client: if max_per_client == 0 {
                usize::MAX
            } else {
                max_per_client
            },
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            shed_listener: AtomicU64::new(0),
            shed_client: AtomicU64::new(0),
        })
    }

    /// No caps (embedding and tests that do not exercise them).
    pub fn unlimited(name: &'static str) -> Arc<Self> {
        Self::new(name, 0, 0)
    }

    /// Takes a slot for a connection from `peer`, or says why not (and counts the refusal).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refused> {
        let total = self.total.fetch_add(1, Relaxed);
        if total >= self.max_total {
            self.total.fetch_sub(1, Relaxed);
            self.shed_listener.fetch_add(1, Relaxed);
            return Err(Refused::Listener {
                listener: self.name,
                max: self.max_total,
            });
        }
        let key = client_key(peer);
        if self.max_per_client != usize::MAX {
            let mut map = self
                .per_client
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = map.entry(key).or_insert(0);
            if *n >= self.max_per_client {
                drop(map);
                self.total.fetch_sub(1, Relaxed);
                self.shed_client.fetch_add(1, Relaxed);
                return Err(Refused::Client {
                    listener: self.name,
                    max: self.max_per_client,
                });
            }
            *n += 1;
        }
        Ok(Permit {
            limits: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Relaxed)
    }

    /// The listener's cap (`usize::MAX`: none).
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Connections refused so far: (listener full, client over its cap).
    pub fn shed(&self) -> (u64, u64) {
        (
            self.shed_listener.load(Relaxed),
            self.shed_client.load(Relaxed),
        )
    }

    /// Appends the gauges and counters in the Prometheus text format, labelled with the
    /// listener's name.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (listener, client) = self.shed();
        let name = self.name;
        let _ = writeln!(
            out,
            "escale_listener_open_connections{{listener=\"{name}\"}} {}\n\
             escale_listener_connections_shed_total{{listener=\"{name}\",reason=\"listener\"}} {listener}\n\
             escale_listener_connections_shed_total{{listener=\"{name}\",reason=\"client\"}} {client}",
            self.open()
        );
    }
}

/// The help and type lines for [`ConnLimits::render_prometheus`], written once.
pub const PROMETHEUS_HEADER: &str = "\
# HELP escale_listener_open_connections Connections open on a listener.
# TYPE escale_listener_open_connections gauge
# HELP escale_listener_connections_shed_total Connections closed at accept because a cap was reached.
# TYPE escale_listener_connections_shed_total counter
";

/// A connection's slot; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnLimits>,
    key: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let l = &self.limits;
        if l.max_per_client != usize::MAX {
            let mut map = l.per_client.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = map.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.key);
                }
            }
        }
        l.total.fetch_sub(1, Relaxed);
    }
}

/// How many connections each listener may hold, from the process's descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The proxy's client connections, all listeners and workers together.
    pub proxy: usize,
    /// The API's connections.
    pub api: usize,
}

impl Budget {
    /// The proxy gets a third of `nofile` (each client connection may hold an upstream
    /// socket too), the API a sixteenth (at least 16); the rest is left for the registry,
    /// engines, git, builds and upstream sockets.
    pub fn from_limit(nofile: u64) -> Budget {
        let n = usize::try_from(nofile).unwrap_or(usize::MAX);
        Budget {
            proxy: (n / 3).max(16),
            api: (n / 16).max(16),
        }
    }
}

/// Raises the soft limit on open file descriptors to the hard limit (at most 1,048,576) and
/// returns the soft limit in force afterwards. Where raising is not allowed, the current
/// limit is returned.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let want = hard.min(1 << 20);
    if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
        return want;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_client_and_per_listener_and_slots_come_back() {
        let l = ConnLimits::new("test", 3, 2);
        let a1 = l.admit(ip("192.0.2.1")).unwrap();
        let _a2 = l.admit(ip("192.0.2.1")).unwrap();
        assert!(matches!(
            l.admit(ip("192.0.2.1")),
            Err(Refused::Client { max: 2, .. })
        ));
        // The mapped form of the same address is the same client.
        assert!(l.admit(ip("::ffff:192.0.2.1")).is_err());
        let _b = l.admit(ip("192.0.2.2")).unwrap();
        assert!(matches!(
            l.admit(ip("192.0.2.3")),
            Err(Refused::Listener { max: 3, .. })
        ));
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(l.shed(), (1, 2));
        let mut text = String::new();
        l.render_prometheus(&mut text);
        assert!(text.contains("escale_listener_open_connections{listener=\"test\"} 3"));
        assert!(text.contains("reason=\"client\"} 2"), "{text}");
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let l = ConnLimits::new("test", 0, 1);
        let _a = l.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(l.admit(ip("2001:db8:1:2:ffff::9")).is_err(), "same /64");
        let _b = l.admit(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(l.max_total(), usize::MAX);
    }

    #[test]
    fn the_budget_leaves_descriptors_free() {
        let b = Budget::from_limit(1024);
        assert_eq!((b.proxy, b.api), (341, 64));
        assert!(b.proxy + b.api < 1024 / 2);
        let tiny = Budget::from_limit(20);
        assert_eq!((tiny.proxy, tiny.api), (16, 16));
    }

    #[test]
    fn the_descriptor_limit_is_at_least_what_it_was() {
        let (before, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!(raise_nofile_limit() >= before);
    }
}
