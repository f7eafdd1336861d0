//! The built-in reverse proxy: routes HTTP(S) by host name to healthy instances.
//!
//! The proxy serves clients over HTTP/1.1 and HTTP/2, plain or TLS: HTTP/1.1 requests
//! without a body on its own fast path (`h1`), everything else with hyper 1.x. Behind it is a
//! pooled keep-alive HTTP/1.1 client. `escale serve` runs it on worker threads, each with its
//! own single-threaded runtime ([`spawn_workers`]). Per request it:
//!
//! 1. loads the routing snapshot once ([`SharedRoutes`]) and looks the host up
//!    (`Host` header, or the `:authority` of HTTP/2 and absolute-form requests);
//! 2. picks a backend (least outstanding requests, round-robin tie break, passively ejected
//!    backends last) from per-backend state that survives snapshot swaps;
//! 3. forwards the request with hop-by-hop headers stripped and `X-Forwarded-*` and
//!    `X-Request-Id` set, streaming both bodies and enforcing the route's body limit;
//! 4. retries once on another backend when the connection could not be made (the request
//!    was not sent), or when an idempotent request's connection was closed before any response
//!    head arrived, and answers explicit errors (`x-escale-error`) naming the failing side.
//!
//! Module map: [`server`] runs the workers, accepts connections and drains them on shutdown,
//! `h1` is the client-side HTTP/1.1 fast path, `forward` is
//! the per-request logic, `balance` picks backends, `upstream` is the HTTP/1.1 client that
//! talks to them (run inline by the client connection's task, pooled per backend), `body`
//! holds the streaming body wrappers, `headers` the header rewriting, [`metrics`] the
//! Prometheus counters and [`tls`] the certificate store and rustls configuration.

mod balance;
mod body;
mod forward;
mod h1;
mod headers;
pub mod metrics;
pub mod server;
mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::tls::{certified_key_from_pem, CertStore};
pub use metrics::ProxyMetrics;
pub use server::{run, run_tls, spawn_workers, Listeners, Workers};

#[allow(unused_imports)] // re-exported for the docs above
use crate::routing::SharedRoutes;

/// Limits and timeouts of the proxy. [`Default`] gives values suitable for production.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request head (request line and headers) accepted from a client, in bytes.
    /// HTTP/1: hyper's read buffer (at least 8 KiB); HTTP/2: the header list size.
    pub max_header_bytes: usize,
    /// Time a client has to send a complete HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// A client connection with no traffic and no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for the TLS handshake of a client connection.
    pub tls_handshake_timeout: Duration,
    /// Time allowed to open a TCP connection to a backend.
    pub upstream_connect_timeout: Duration,
    /// Time allowed between sending a request to a backend and receiving its response head.
    pub upstream_response_timeout: Duration,
    /// Idle pooled upstream connections are closed after this long.
    pub upstream_idle_timeout: Duration,
    /// Connections one worker opens to one backend at most (busy and idle; all of them are
    /// kept for reuse until idle for `upstream_idle_timeout`). A request that finds them all
    /// busy waits for one, up to `upstream_connect_timeout`. HTTP/2 clients multiplex many
    /// requests on one connection, each of which needs an upstream connection of its own:
    /// this bounds them, and keeping every one avoids reconnecting after each burst.
    pub upstream_max_connections_per_backend: usize,
    /// How long a backend that refused a connection is skipped (passive ejection).
    pub eject_duration: Duration,
    /// On shutdown, how long in-flight requests (and upgraded tunnels) may take to finish.
    pub drain_timeout: Duration,
    /// Concurrent HTTP/2 streams per client connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive: a PING after this long without traffic...
    pub h2_keep_alive_interval: Duration,
    /// ...and the connection closed if its answer takes longer than this.
    pub h2_keep_alive_timeout: Duration,
    /// Once a connection was asked to close (idle, or shutting down), how long it may take:
    /// an HTTP/2 client that never acknowledges the GOAWAY's PING is dropped after this.
    pub close_grace: Duration,
    /// Caps on open client connections (all listeners and workers together, and per client
    /// address); `None`: no caps. `escale serve` sizes them from the descriptor limit.
    pub connection_limits: Option<std::sync::Arc<crate::listen::ConnLimits>>,
    /// Pending ACME HTTP-01 tokens, answered at `/.well-known/acme-challenge/<token>` for any
    /// host before routing.
    pub acme_challenges: Option<std::sync::Arc<crate::tls::Http01Challenges>>,
    /// Fraction of routed requests written to the access log (target `escale::access`, one
    /// structured event per request at its response head): 0.0 is off, 1.0 every request.
    pub access_log_sample: f64,
    /// The HTTPS listener's port when it is not 443: plain-HTTP requests to a host that has a
    /// certificate are redirected to it (`https://host:PORT/...`).
    pub https_redirect_port: Option<u16>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            tls_handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(3),
            upstream_response_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(30),
            upstream_max_connections_per_backend: 512,
            eject_duration: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            h2_max_concurrent_streams: 256,
            h2_keep_alive_interval: Duration::from_secs(20),
            h2_keep_alive_timeout: Duration::from_secs(20),
            close_grace: Duration::from_secs(10),
            connection_limits: None,
            acme_challenges: None,
            access_log_sample: 0.0,
            https_redirect_port: None,
        }
    }
}

/// Everything that can go wrong in the proxy. Each variant names the side that failed:
/// the listener, the client, an upstream backend, or the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listening socket failed.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    /// Reading the request body from the client failed.
    #[error("client: reading the request body failed: {0}")]
    ClientBody(#[source] hyper::Error),
    /// The client's body did not match the length its message declared (the proxy sends
    /// exactly the declared length or fails the exchange, never more or less).
    #[error("client: the request body is {sent} bytes, not the {declared} declared")]
    ClientBodyLength {
        /// The declared length.
        declared: u64,
        /// What the body held (at least).
        sent: u64,
    },
    /// The client sent more body than the route allows.
    #[error("client: request body exceeds the route limit of {limit} bytes")]
    BodyTooLarge {
        /// The route's `max_body_bytes`.
        limit: u64,
    },
    /// No TCP connection could be made to the backend; the request was not sent.
    #[error("upstream {backend}: connect failed: {source}")]
    UpstreamConnect {
        /// The backend's address.
        backend: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Every connection to the backend stayed busy (at the per-backend bound) for the wait.
    #[error("upstream {backend}: all {open} connections busy for {waited:?}")]
    UpstreamBusy {
        /// The backend's address.
        backend: SocketAddr,
        /// The bound on open connections.
        open: usize,
        /// How long the request waited.
        waited: Duration,
    },
    /// The backend did not answer (connect or response head) in time.
    #[error("upstream {backend}: no response within {timeout:?}")]
    UpstreamTimeout {
        /// The backend's address.
        backend: SocketAddr,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The request was (possibly) sent but the exchange with the backend failed before a
    /// complete response head arrived.
    #[error("upstream {backend}: request failed: {source}")]
    Upstream {
        /// The backend's address.
        backend: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The backend's response head is not valid HTTP/1.1.
    #[error("upstream {backend}: invalid response: {reason}")]
    UpstreamProtocol {
        /// The backend's address.
        backend: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend's response body failed after its head was forwarded.
    #[error("upstream: the response body failed: {0}")]
    UpstreamBody(#[source] std::io::Error),
    /// An HTTP upgrade (WebSocket) could not be completed on one side.
    #[error("upgrade ({side}): {source}")]
    Upgrade {
        /// `client` or `upstream`.
        side: &'static str,
        /// The hyper error.
        #[source]
        source: hyper::Error,
    },
    /// A worker thread or its runtime could not be started.
    #[error("worker: could not start: {0}")]
    Worker(#[source] std::io::Error),
    /// A worker thread panicked (a bug); its connections were dropped.
    #[error("worker {0}: panicked")]
    WorkerPanicked(usize),
    /// The TLS configuration could not be built.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// A certificate or key could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsError),
}
