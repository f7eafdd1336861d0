//! The routing snapshot: which host names go to which healthy backends.
//!
//! The reconciler builds a fresh, immutable [`RoutingTable`] whenever the set of healthy
//! instances changes and publishes it through [`SharedRoutes`] (an `ArcSwap`). The proxy loads
//! the current snapshot once per request: it never reads the database and never holds a lock
//! across an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// One healthy, routable instance of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The instance id (also the container's `escale.instance` label), e.g. `shop-web-3-v7-ab12`.
    pub instance: String,
    /// Where the instance answers: node address and published port.
    pub addr: SocketAddr,
}

/// Everything the proxy needs to serve one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The app name, used for metrics and access logs.
    pub app: String,
    /// Healthy instances of the app's `web` process. Empty means "503: no healthy instance".
    pub backends: Vec<Backend>,
    /// Largest request body accepted for this app, in bytes.
    pub max_body_bytes: u64,
    /// Redirect plain HTTP to HTTPS (set once the app has a certificate for the host).
    pub redirect_https: bool,
}

/// An immutable host -> route map. Host names are stored lowercase, without port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    hosts: HashMap<String, Arc<Route>>,
}

/// The snapshot shared between the reconciler (writer) and the proxy (readers).
pub type SharedRoutes = Arc<ArcSwap<RoutingTable>>;

/// A fresh, empty shared snapshot.
pub fn shared() -> SharedRoutes {
    Arc::new(ArcSwap::from_pointee(RoutingTable::default()))
}

impl RoutingTable {
    /// Builds a table from `(host, route)` pairs; later pairs win for the same host.
    pub fn new(entries: impl IntoIterator<Item = (String, Arc<Route>)>) -> Self {
        let hosts = entries
            .into_iter()
            .map(|(h, r)| (normalize_host(&h).to_ascii_lowercase(), r))
            .collect();
        RoutingTable { hosts }
    }

    /// The route for a `Host` header or SNI value (case-insensitive, port ignored).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        let h = normalize_host(host);
        if h.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&h.to_ascii_lowercase())
        } else {
            self.hosts.get(h)
        }
    }

    /// Number of host names in the table.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True when no host is routed.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// All `(host, route)` pairs, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Route>)> {
        self.hosts.iter().map(|(h, r)| (h.as_str(), r))
    }
}

/// Strips a trailing `:port` and a trailing dot from a host name. IPv6 literals keep brackets.
pub fn normalize_host(host: &str) -> &str {
    let h = if host.starts_with('[') {
        match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
            _ => host,
        }
    };
    h.strip_suffix('.').unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(app: &str) -> Arc<Route> {
        Arc::new(Route {
            app: app.into(),
            backends: vec![],
            max_body_bytes: 1 << 20,
            redirect_https: false,
        })
    }

    #[test]
    fn lookup_ignores_case_port_and_trailing_dot() {
        let t = RoutingTable::new([("Shop.Example.eu".to_string(), route("shop"))]);
        assert_eq!(t.lookup("shop.example.eu").unwrap().app, "shop");
        assert_eq!(t.lookup("SHOP.example.EU:8080").unwrap().app, "shop");
        assert_eq!(t.lookup("shop.example.eu.").unwrap().app, "shop");
        assert!(t.lookup("other.example.eu").is_none());
    }

    #[test]
    fn normalize_keeps_ipv6_literal() {
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("a.b:notaport"), "a.b:notaport");
    }
}
