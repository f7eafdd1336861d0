//! Accepting client connections, serving them with hyper (HTTP/1.1 and HTTP/2, with
//! upgrades), idle timeouts, graceful shutdown, and the worker threads `escale serve` runs
//! the proxy on.
//!
//! Workers ([`spawn_workers`]) follow nginx's worker processes: each thread runs its own
//! single-threaded tokio runtime and accepts from the shared listening sockets. A connection
//! stays on the thread that accepted it, and so does everything it touches (its upstream
//! connection pools, timers, tunnels): no task migrates, no wakeup crosses threads, and the
//! scheduler needs no synchronization. Each worker has its own [`Proxy`] (balancer state and
//! idle upstream connections); the routing snapshot, certificates and metrics are shared.
//! [`run`] and [`run_tls`] serve on the caller's runtime instead (embedding, tests).
//!
//! Shutdown has two steps, published on a `watch` channel to every connection task:
//! *draining* stops accepting and asks each connection to finish its in-flight requests and
//! close (hyper's graceful shutdown); after `drain_timeout`, *force close* drops whatever is
//! left, upgraded tunnels included. Completion is tracked mini-redis style: each task holds a
//! clone of an `mpsc::Sender`, and the receiver sees `None` once all are gone.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::ResolvesServerCert;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::forward::Proxy;
use super::metrics::{ConnApp, ProxyMetrics};
use super::{ProxyConfig, ProxyError};
use crate::listen::{ConnLimits, Permit};
use crate::routing::SharedRoutes;

/// Shutdown state: serving.
const RUNNING: u8 = 0;
/// Shutdown state: finish in-flight requests, then close.
pub(crate) const DRAINING: u8 = 1;
/// Shutdown state: drain timeout expired, close now.
pub(crate) const FORCE_CLOSE: u8 = 2;

/// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on `listener` until
/// `shutdown` completes, then drains in-flight requests for up to `config.drain_timeout`.
pub async fn run(
    listener: TcpListener,
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    serve(listener, None, routes, config, metrics, shutdown).await
}

/// Serves HTTPS on `listener` with certificates from `certs` (usually a
/// [`CertStore`](super::CertStore)), ALPN `h2` and `http/1.1`. A request whose host differs
/// from the TLS server name is answered `421`. A connection that negotiates ALPN `acme-tls/1`
/// (an ACME CA validating TLS-ALPN-01) is closed after the handshake. Shutdown as in [`run`].
pub async fn run_tls(
    listener: TcpListener,
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    certs: Arc<dyn ResolvesServerCert>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let tls = crate::tls::server_config(certs)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    serve(listener, Some(acceptor), routes, config, metrics, shutdown).await
}

/// The listening sockets the proxy workers share.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Plain HTTP: HTTP/1.1, and HTTP/2 with prior knowledge.
    pub http: Option<std::net::TcpListener>,
    /// HTTPS, with the resolver that picks each connection's certificate (usually a
    /// [`CertStore`](super::CertStore)). Served as by [`run_tls`].
    pub https: Option<(std::net::TcpListener, Arc<dyn ResolvesServerCert>)>,
}

/// The proxy's worker threads, started by [`spawn_workers`].
#[derive(Debug)]
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<Result<(), ProxyError>>>,
}

/// Starts `count` worker threads (at least one), each serving every listener in `listeners`
/// on its own single-threaded runtime until `shutdown` turns `true`; then each drains its
/// connections as [`run`] does. Wait for them with [`Workers::join`].
pub fn spawn_workers(
    count: usize,
    listeners: Listeners,
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<Workers, ProxyError> {
    let tls = match &listeners.https {
        Some((_, certs)) => Some(TlsAcceptor::from(Arc::new(crate::tls::server_config(
            certs.clone(),
        )?))),
        None => None,
    };
    for l in listeners
        .http
        .iter()
        .chain(listeners.https.iter().map(|(l, _)| l))
    {
        l.set_nonblocking(true).map_err(ProxyError::Listener)?;
    }
    // One budget for every worker and both listeners.
    let mut config = config;
    let limits = config
        .connection_limits
        .get_or_insert_with(|| ConnLimits::unlimited("proxy"))
        .clone();
    metrics.watch_listener(limits);
    let mut threads = Vec::new();
    for id in 0..count.max(1) {
        // Each worker registers its own handle of the sockets with its own runtime.
        let http = listeners
            .http
            .as_ref()
            .map(std::net::TcpListener::try_clone)
            .transpose()
            .map_err(ProxyError::Listener)?;
        let https = listeners
            .https
            .as_ref()
            .map(|(l, _)| l.try_clone())
            .transpose()
            .map_err(ProxyError::Listener)?
            .zip(tls.clone());
        let (routes, config, metrics) = (routes.clone(), config.clone(), metrics.clone());
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("escale-proxy-{id}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ProxyError::Worker)?;
                runtime.block_on(worker(http, https, routes, config, metrics, shutdown))
            })
            .map_err(ProxyError::Worker)?;
        threads.push(thread);
    }
    Ok(Workers { threads })
}

/// One worker: serves its listeners concurrently on the current (single-threaded) runtime.
async fn worker(
    http: Option<std::net::TcpListener>,
    https: Option<(std::net::TcpListener, TlsAcceptor)>,
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    let stopped = || {
        let mut rx = shutdown.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let plain = async {
        match http {
            Some(l) => {
                let l = TcpListener::from_std(l).map_err(ProxyError::Listener)?;
                let (routes, config, metrics) = (routes.clone(), config.clone(), metrics.clone());
                serve(l, None, routes, config, metrics, stopped()).await
            }
            None => Ok(()),
        }
    };
    let secure = async {
        match https {
            Some((l, acceptor)) => {
                let l = TcpListener::from_std(l).map_err(ProxyError::Listener)?;
                let (routes, config, metrics) = (routes.clone(), config.clone(), metrics.clone());
                serve(l, Some(acceptor), routes, config, metrics, stopped()).await
            }
            None => Ok(()),
        }
    };
    let (a, b) = tokio::join!(plain, secure);
    a.and(b)
}

impl Workers {
    /// Waits until every worker has drained and stopped; the first error, if any.
    pub async fn join(self) -> Result<(), ProxyError> {
        let threads = self.threads;
        tokio::task::spawn_blocking(move || {
            let mut result = Ok(());
            for (id, t) in threads.into_iter().enumerate() {
                let r = t.join().unwrap_or(Err(ProxyError::WorkerPanicked(id)));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
        .await
        .unwrap_or(Err(ProxyError::WorkerPanicked(usize::MAX)))
    }
}

/// The next connection on `listener`. Accept errors (usually EMFILE/ENFILE, or a connection
/// aborted before it was accepted) are logged under `what` and retried after a short pause.
/// Cancel-safe: no connection is lost when the future is dropped.
pub(crate) async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// When a client connection last finished a request, and how many requests (and response
/// bodies) are in flight on it, for the idle timeout. Requests, not bytes: keep-alive PING
/// answers (HTTP/2) do not make an idle connection busy.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

/// Marks a request in flight on its connection until dropped.
#[derive(Debug)]
pub(crate) struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// Marks a response body streaming to the client until dropped (held by the body).
#[derive(Debug)]
pub(crate) struct Streaming(Arc<Activity>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Relaxed);
    }

    pub(crate) fn busy(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Relaxed);
        Busy(self)
    }

    pub(crate) fn streaming(self: &Arc<Self>) -> Streaming {
        self.busy.fetch_add(1, Relaxed);
        Streaming(self.clone())
    }

    /// Whether no request is in flight (nor a response body streaming).
    fn is_idle(&self) -> bool {
        self.busy.load(Relaxed) == 0
    }

    /// Time since the last request ended, or zero while one is in flight.
    fn idle_for(&self) -> Duration {
        if self.busy.load(Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// What the request handler knows about the client connection.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    /// The TLS server name, lowercase.
    pub(crate) sni: Option<Box<str>>,
    pub(crate) activity: Arc<Activity>,
    /// Shutdown state, for upgraded tunnels.
    pub(crate) stop: watch::Receiver<u8>,
    /// Held while the connection (or a tunnel spawned from it) lives.
    pub(crate) done: mpsc::Sender<()>,
    /// The app this connection is counted for in the per-app connection gauge.
    pub(crate) app: ConnApp,
}

fn conn_builder(config: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .keep_alive_interval(config.h2_keep_alive_interval)
        .keep_alive_timeout(config.h2_keep_alive_timeout);
    builder
}

/// Logs shedding at most once every 10 s per listener (an attack must not flood the log);
/// the counters in `/metrics` have every refusal.
#[derive(Debug, Default)]
pub(crate) struct ShedLog {
    last: std::sync::Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl ShedLog {
    pub(crate) fn note(&self, refused: &crate::listen::Refused, peer: SocketAddr) {
        let n = self.since.fetch_add(1, Relaxed) + 1;
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            self.since.store(0, Relaxed);
            warn!(%peer, refused = n, "connection refused: {refused}");
        }
    }
}

/// Everything a connection task needs.
struct Shared {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    config: ProxyConfig,
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let limits = config
        .connection_limits
        .clone()
        .unwrap_or_else(|| ConnLimits::unlimited("proxy"));
    let shed_log = ShedLog::default();
    let shared = Arc::new(Shared {
        proxy: Arc::new(Proxy::new(routes, config.clone(), metrics)),
        builder: conn_builder(&config),
        tls,
        config: config.clone(),
    });
    let sweeper = {
        let proxy = Arc::downgrade(&shared.proxy);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match proxy.upgrade() {
                    Some(p) => p.sweep_idle(),
                    None => return,
                }
            }
        })
    };
    let (stop_tx, stop_rx) = watch::channel(RUNNING);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            conn = accept(&listener, "proxy") => conn,
        };
        // Over a cap: closed before a byte is read, so descriptors stay for everyone else
        // (the API, the engines, the upstream sockets).
        let permit = match limits.admit(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                shed_log.note(&refused, peer);
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            tcp,
            peer,
            shared.clone(),
            stop_rx.clone(),
            done_tx.clone(),
            permit,
        ));
    }
    drop(listener);
    drop(done_tx);
    sweeper.abort();

    info!("proxy: shutting down, draining connections");
    let _ = stop_tx.send(DRAINING);
    if tokio::time::timeout(config.drain_timeout, done_rx.recv())
        .await
        .is_err()
    {
        warn!(
            open = shared.proxy.metrics().open_connections(),
            "proxy: drain timeout, closing remaining connections"
        );
        let _ = stop_tx.send(FORCE_CLOSE);
        let _ = tokio::time::timeout(Duration::from_secs(1), done_rx.recv()).await;
    }
    Ok(())
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<u8>,
    done: mpsc::Sender<()>,
    _permit: Permit,
) {
    let _open = shared.proxy.metrics().connection();
    let activity = Arc::new(Activity::new());
    let Some(acceptor) = shared.tls.clone() else {
        let info = ConnInfo {
            peer,
            https: false,
            sni: None,
            activity,
            stop: stop.clone(),
            done,
            app: ConnApp::default(),
        };
        let config = &shared.config;
        let rest = match super::h1::serve(tcp, &info, &shared.proxy, config, &stop).await {
            super::h1::Ended::Closed => return,
            super::h1::Ended::Handoff(rest) => rest,
        };
        info.activity.touch();
        let version = if rest.is_http2() {
            Version::Http2
        } else {
            Version::Http1
        };
        // Boxed, here and for TLS: hyper's connection state is large, and unboxed it would
        // size every connection's task, fast-path ones included.
        return Box::pin(serve_connection(rest, info, &shared, stop, version)).await;
    };
    Box::pin(tls_connection(
        tcp, peer, acceptor, activity, &shared, stop, done,
    ))
    .await
}

/// The TLS handshake, then hyper serves the connection.
async fn tls_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    activity: Arc<Activity>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<u8>,
    done: mpsc::Sender<()>,
) {
    let handshake = tokio::select! {
        r = tokio::time::timeout(shared.config.tls_handshake_timeout, acceptor.accept(tcp)) => r,
        _ = stop.wait_for(|s| *s >= DRAINING) => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "client: TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "client: TLS handshake timed out");
            return;
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) {
        // An ACME TLS-ALPN-01 validation: the handshake was the answer; no HTTP (RFC 8737).
        debug!(%peer, "client: acme-tls/1 validation handshake done, closing");
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        return;
    }
    let sni = stream
        .get_ref()
        .1
        .server_name()
        .map(|s| s.to_ascii_lowercase().into_boxed_str());
    let info = ConnInfo {
        peer,
        https: true,
        sni,
        activity,
        stop: stop.clone(),
        done,
        app: ConnApp::default(),
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        return serve_connection(stream, info, shared, stop, Version::Http2).await;
    }
    let rest = match super::h1::serve(stream, &info, &shared.proxy, &shared.config, &stop).await {
        super::h1::Ended::Closed => return,
        super::h1::Ended::Handoff(rest) => rest,
    };
    info.activity.touch();
    let version = if rest.is_http2() {
        Version::Http2
    } else {
        Version::Http1
    };
    serve_connection(rest, info, shared, stop, version).await
}

/// The HTTP version a connection served by hyper speaks, as far as shutdown cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// Serves a connection with hyper until it ends, the server force-closes, or it is idle too
/// long. When the server drains, an HTTP/2 connection gets its GOAWAY at once (clients retry
/// what it did not take); an HTTP/1.1 connection busy with a request finishes it and closes,
/// and one between requests lingers a moment ([`super::h1::DRAIN_LINGER`]) for a request
/// already on its way, answered with `Connection: close`, as on the fast path.
async fn serve_connection<I>(
    io: I,
    info: ConnInfo,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<u8>,
    version: Version,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let activity = info.activity.clone();
    let service = {
        let proxy = shared.proxy.clone();
        let info = info.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            let info = info.clone();
            async move {
                let mut response = proxy.handle(req.map(Some), &info).await;
                // Draining: an HTTP/1.1 client learns from the answer that the connection
                // closes after it, and sends its next request on a new one.
                if version == Version::Http1 && *info.stop.borrow() >= DRAINING {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    drop(info);
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle_timeout = shared.config.idle_timeout;
    // Set once the connection was asked to close: past it, the connection is dropped (an
    // HTTP/2 client that never answers the GOAWAY's PING would otherwise hold it forever).
    // While shutting down, requests in flight are bounded by the drain timeout instead.
    let mut closing_by: Option<tokio::time::Instant> = None;
    let mut shutting_down = false;
    // Draining found this HTTP/1.1 connection between requests: it closes at this instant
    // unless a request arrived meanwhile (answered with `Connection: close`).
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        let idle_check = idle_timeout
            .saturating_sub(activity.idle_for())
            .max(Duration::from_millis(50));
        let deadline = closing_by.filter(|_| !shutting_down);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "client: connection ended with an error");
                }
                return;
            }
            r = stop.changed() => {
                let state = if r.is_ok() { *stop.borrow_and_update() } else { FORCE_CLOSE };
                if state >= FORCE_CLOSE {
                    return;
                }
                if state >= DRAINING && !shutting_down {
                    let idle = activity.is_idle();
                    if version == Version::Http1 && idle && closing_by.is_none() {
                        linger = Some(tokio::time::Instant::now() + super::h1::DRAIN_LINGER);
                    } else if closing_by.is_none() {
                        conn.as_mut().graceful_shutdown();
                    }
                    shutting_down = true;
                    closing_by.get_or_insert_with(tokio::time::Instant::now);
                }
            }
            () = sleep_until_opt(linger) => {
                linger = None;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(idle_check), if closing_by.is_none() => {
                if activity.idle_for() >= idle_timeout {
                    debug!("client: idle timeout, closing connection");
                    conn.as_mut().graceful_shutdown();
                    closing_by = Some(tokio::time::Instant::now() + shared.config.close_grace);
                }
            }
            () = sleep_until_opt(deadline) => {
                if activity.idle_for() >= shared.config.close_grace {
                    debug!("client: did not close within the grace, dropping the connection");
                    return;
                }
                // Still busy with a request: give it another grace.
                closing_by = Some(tokio::time::Instant::now() + shared.config.close_grace);
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
