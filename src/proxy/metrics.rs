//! Proxy metrics in the Prometheus text format.
//!
//! Per app: requests by status class, a latency histogram (time to the response head, default
//! Prometheus buckets), body bytes in and out, requests in flight (including upgraded
//! tunnels) and open client connections (counted for the app of their latest request). Globally: open and accepted client connections, and requests for unknown hosts.
//! The hot path touches only atomics; the per-app entry is found in a read-mostly map
//! (a write lock is taken once per app, the first time it is seen).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds (Prometheus client defaults).
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The same bounds in microseconds, for the hot path.
const BUCKETS_US: [u64; 11] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// An app's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppTotals {
    /// Responses sent.
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// Responses by status class, 1xx..5xx.
    pub status: [u64; 5],
    /// Total time to the response head, in microseconds.
    pub sum_us: u64,
    /// Responses per latency bucket (non-cumulative; bounds in [`BUCKET_BOUNDS_MS`]).
    pub buckets: [u64; 11],
}

/// Upper bounds of the latency buckets, in milliseconds.
pub const BUCKET_BOUNDS_MS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

impl AppTotals {
    /// The bucket bound under which `q` (0..1) of the responses' times fall, in ms; `None`
    /// without responses, `f64::INFINITY` when above the last bound.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let want = (q * self.requests as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(BUCKET_BOUNDS_MS[i]);
            }
        }
        Some(f64::INFINITY)
    }
}

/// All proxy counters. Share one `Arc<ProxyMetrics>` between the proxy and the metrics endpoint.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    apps: RwLock<HashMap<String, Arc<AppMetrics>>>,
    open_connections: AtomicI64,
    connections_total: AtomicU64,
    unknown_host_total: AtomicU64,
    /// Connection caps of the listeners (the proxy's, the API's), rendered with the rest.
    listeners: RwLock<Vec<Arc<crate::listen::ConnLimits>>>,
}

/// Counters of one app.
#[derive(Debug, Default)]
pub(crate) struct AppMetrics {
    /// 1xx..5xx.
    status: [AtomicU64; 5],
    /// Non-cumulative bucket counts; the `+Inf` bucket is `count`.
    buckets: [AtomicU64; 11],
    sum_us: AtomicU64,
    count: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    open_requests: AtomicI64,
    /// Client connections whose latest request went to this app.
    open_connections: AtomicI64,
}

impl AppMetrics {
    /// Records a response head sent to the client.
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.status[class].fetch_add(1, Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub(crate) fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    /// Counts a request (or tunnel) in flight until the guard is dropped.
    pub(crate) fn in_flight(self: &Arc<Self>) -> InFlight {
        self.open_requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

/// Decrements the app's in-flight gauge on drop.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AppMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.open_requests.fetch_sub(1, Relaxed);
    }
}

/// The app a client connection is counted for: the app of its latest routed request (a
/// connection may carry requests for several host names; it counts once, for the last one).
#[derive(Debug, Default)]
pub(crate) struct ConnApp(Mutex<Option<Arc<AppMetrics>>>);

impl ConnApp {
    /// Counts the connection for `app` from now on.
    pub(crate) fn set(&self, app: &Arc<AppMetrics>) {
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, app)) {
            return;
        }
        if let Some(old) = current.take() {
            old.open_connections.fetch_sub(1, Relaxed);
        }
        app.open_connections.fetch_add(1, Relaxed);
        *current = Some(app.clone());
    }
}

impl Drop for ConnApp {
    fn drop(&mut self) {
        let current = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = current.take() {
            old.open_connections.fetch_sub(1, Relaxed);
        }
    }
}

/// Decrements the open-connections gauge on drop.
#[derive(Debug)]
pub(crate) struct OpenConnection(Arc<ProxyMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

impl ProxyMetrics {
    /// Fresh, zeroed metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters of `app`, created on first use.
    pub(crate) fn app(&self, app: &str) -> Arc<AppMetrics> {
        if let Some(m) = self
            .apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
        {
            return m.clone();
        }
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(app.to_owned())
            .or_default()
            .clone()
    }

    /// The apps counted so far.
    pub fn app_names(&self) -> Vec<String> {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// What the proxy counted for `app` since it started (`None`: no request yet), for the
    /// dashboard; reads atomics only.
    pub fn app_totals(&self, app: &str) -> Option<AppTotals> {
        let apps = self.apps.read().unwrap_or_else(PoisonError::into_inner);
        let m = apps.get(app)?;
        let status: [u64; 5] = std::array::from_fn(|i| m.status[i].load(Relaxed));
        Some(AppTotals {
            requests: m.count.load(Relaxed),
            errors: status[4],
            status,
            sum_us: m.sum_us.load(Relaxed),
            buckets: std::array::from_fn(|i| m.buckets[i].load(Relaxed)),
        })
    }

    /// Counts an accepted client connection until the guard is dropped.
    pub(crate) fn connection(self: &Arc<Self>) -> OpenConnection {
        self.connections_total.fetch_add(1, Relaxed);
        self.open_connections.fetch_add(1, Relaxed);
        OpenConnection(self.clone())
    }

    /// Client connections currently open.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.load(Relaxed)
    }

    /// Renders `limits` (a listener's connection caps) with these metrics from now on.
    pub fn watch_listener(&self, limits: Arc<crate::listen::ConnLimits>) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(limits);
    }

    pub(crate) fn unknown_host(&self) {
        self.unknown_host_total.fetch_add(1, Relaxed);
    }

    /// Appends all metrics to `out` in the Prometheus text exposition format (0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        let mut apps: Vec<(String, Arc<AppMetrics>)> = self
            .apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (escape_label(k), v.clone()))
            .collect();
        apps.sort_by(|a, b| a.0.cmp(&b.0));

        let _ = writeln!(
            out,
            "# HELP escale_proxy_open_connections Client connections currently open.\n\
             # TYPE escale_proxy_open_connections gauge\n\
             escale_proxy_open_connections {}",
            self.open_connections.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP escale_proxy_connections_total Client connections accepted.\n\
             # TYPE escale_proxy_connections_total counter\n\
             escale_proxy_connections_total {}",
            self.connections_total.load(Relaxed)
        );
        {
            let listeners = self
                .listeners
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if !listeners.is_empty() {
                out.push_str(crate::listen::PROMETHEUS_HEADER);
                for l in listeners.iter() {
                    l.render_prometheus(out);
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP escale_proxy_unknown_host_requests_total Requests for a host with no route.\n\
             # TYPE escale_proxy_unknown_host_requests_total counter\n\
             escale_proxy_unknown_host_requests_total {}",
            self.unknown_host_total.load(Relaxed)
        );

        out.push_str(
            "# HELP escale_proxy_requests_total Responses sent, by app and status class.\n\
             # TYPE escale_proxy_requests_total counter\n",
        );
        for (app, m) in &apps {
            for (i, c) in m.status.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "escale_proxy_requests_total{{app=\"{app}\",class=\"{}xx\"}} {}",
                    i + 1,
                    c.load(Relaxed)
                );
            }
        }

        out.push_str(
            "# HELP escale_proxy_request_duration_seconds Time to the response head.\n\
             # TYPE escale_proxy_request_duration_seconds histogram\n",
        );
        for (app, m) in &apps {
            let mut cumulative = 0;
            for (bound, c) in BUCKETS.iter().zip(&m.buckets) {
                cumulative += c.load(Relaxed);
                let _ = writeln!(
                    out,
                    "escale_proxy_request_duration_seconds_bucket{{app=\"{app}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = m.count.load(Relaxed);
            let _ = writeln!(
                out,
                "escale_proxy_request_duration_seconds_bucket{{app=\"{app}\",le=\"+Inf\"}} {count}\n\
                 escale_proxy_request_duration_seconds_sum{{app=\"{app}\"}} {}\n\
                 escale_proxy_request_duration_seconds_count{{app=\"{app}\"}} {count}",
                m.sum_us.load(Relaxed) as f64 / 1e6
            );
        }

        for (name, help, get) in [
            (
                "escale_proxy_request_bytes_total",
                "Request body bytes received from clients.",
                (|m: &AppMetrics| m.bytes_in.load(Relaxed)) as fn(&AppMetrics) -> u64,
            ),
            (
                "escale_proxy_response_bytes_total",
                "Response body bytes sent to clients.",
                |m: &AppMetrics| m.bytes_out.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (app, m) in &apps {
                let _ = writeln!(out, "{name}{{app=\"{app}\"}} {}", get(m));
            }
        }

        for (name, help, get) in [
            (
                "escale_proxy_open_requests",
                "Requests and upgraded tunnels in flight.",
                (|m: &AppMetrics| m.open_requests.load(Relaxed)) as fn(&AppMetrics) -> i64,
            ),
            (
                "escale_proxy_app_open_connections",
                "Open client connections whose latest request went to the app.",
                |m: &AppMetrics| m.open_connections.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (app, m) in &apps {
                let _ = writeln!(out, "{name}{{app=\"{app}\"}} {}", get(m));
            }
        }
    }
}

/// Escapes a label value (`\`, `"` and newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {

    #[test]
    fn quantiles_are_bucket_bounds() {
        let m = ProxyMetrics::new();
        let a = m.app("q");
        for ms in [1u64, 2, 3, 4, 30, 30, 30, 30, 400, 20_000] {
            a.record(200, Duration::from_millis(ms));
        }
        let t = m.app_totals("q").unwrap();
        assert_eq!(t.quantile_ms(0.4), Some(5.0));
        assert_eq!(t.quantile_ms(0.5), Some(50.0));
        assert_eq!(t.quantile_ms(0.9), Some(500.0));
        assert_eq!(t.quantile_ms(0.99), Some(f64::INFINITY));
        assert_eq!(m.app_totals("none"), None);
        assert_eq!(m.app_names(), vec!["q".to_string()]);
    }
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = ProxyMetrics::new();
        let a = m.app("shop");
        a.record(200, Duration::from_millis(3));
        a.record(204, Duration::from_millis(30));
        a.record(502, Duration::from_secs(20));
        a.add_bytes_out(10);
        let mut s = String::new();
        m.render_prometheus(&mut s);
        assert!(s.contains("escale_proxy_requests_total{app=\"shop\",class=\"2xx\"} 2\n"));
        assert!(s.contains("escale_proxy_requests_total{app=\"shop\",class=\"5xx\"} 1\n"));
        assert!(s.contains(
            "escale_proxy_request_duration_seconds_bucket{app=\"shop\",le=\"0.005\"} 1\n"
        ));
        assert!(
            s.contains("escale_proxy_request_duration_seconds_bucket{app=\"shop\",le=\"10\"} 2\n")
        );
        assert!(s.contains(
            "escale_proxy_request_duration_seconds_bucket{app=\"shop\",le=\"+Inf\"} 3\n"
        ));
        assert!(s.contains("escale_proxy_response_bytes_total{app=\"shop\"} 10\n"));
    }
}
