//! The reverse proxy end to end: the real `proxy::run` / `proxy::run_tls` (and
//! `proxy::spawn_workers`) on 127.0.0.1:0,
//! backends are small hyper servers started by each test. No Docker, no timing assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use escale::proxy::{self, CertStore, ProxyConfig, ProxyError, ProxyMetrics};
use escale::routing::{self, Backend, Route, RoutingTable, SharedRoutes};
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = BoxBody<Bytes, BoxError>;

const MIB: usize = 1024 * 1024;
const CHUNK: usize = 64 * 1024;

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Lazily produced body: `total` bytes in 64 KiB chunks; after the first chunk it waits for
/// `gate` (if any), so the receiver must get the first chunk before the body can finish.
fn lazy_body(total: usize, gate: Option<Arc<Notify>>) -> TestBody {
    let s = stream::unfold((0usize, gate), move |(sent, gate)| async move {
        if sent >= total {
            return None;
        }
        if sent > 0 {
            if let Some(g) = &gate {
                g.notified().await;
            }
        }
        let n = CHUNK.min(total - sent);
        let frame = Frame::data(Bytes::from(vec![b'x'; n]));
        Some((Ok::<_, BoxError>(frame), (sent + n, None)))
    });
    StreamBody::new(s).boxed()
}

/// A test backend and what it observed.
pub(crate) struct TestBackend {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<BackendState>,
}

pub(crate) struct BackendState {
    name: &'static str,
    hits: AtomicUsize,
    /// Notified when `/upload` received its first chunk.
    upload_first_chunk: Arc<Notify>,
    /// `/download` waits for this after its first chunk.
    pub(crate) download_gate: Arc<Notify>,
    /// Notified when `/wait` arrives; `/wait` then waits for `release`.
    arrived: Notify,
    release: Notify,
}

async fn backend(name: &'static str) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(BackendState {
        name,
        hits: AtomicUsize::new(0),
        upload_first_chunk: Arc::new(Notify::new()),
        download_gate: Arc::new(Notify::new()),
        arrived: Notify::new(),
        release: Notify::new(),
    });
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(backend_handle(st, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TestBackend { addr, state }
}

async fn backend_handle(st: Arc<BackendState>, mut req: Request<Incoming>) -> Response<TestBody> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let mut resp = if req.headers().contains_key(http::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "echo")
            .header("connection", "upgrade")
            .body(empty())
            .unwrap()
    } else {
        match req.uri().path() {
            "/headers" => {
                let mut lines: Vec<String> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                Response::builder()
                    .header("connection", "x-upstream-private")
                    .header("x-upstream-private", "1")
                    .header("keep-alive", "timeout=5")
                    .body(full(lines.join("\n")))
                    .unwrap()
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Response::new(full("too late"))
            }
            "/wait" => {
                st.arrived.notify_one();
                st.release.notified().await;
                Response::new(full("finished"))
            }
            "/upload" => {
                let mut body = req.into_body();
                let mut n = 0usize;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Some(d) = frame.data_ref() {
                        if n == 0 && !d.is_empty() {
                            st.upload_first_chunk.notify_one();
                        }
                        n += d.len();
                    }
                }
                Response::new(full(format!("received {n}")))
            }
            "/download" => Response::new(lazy_body(50 * MIB, Some(st.download_gate.clone()))),
            _ => Response::new(full(st.name)),
        }
    };
    resp.headers_mut()
        .insert("x-backend", st.name.parse().unwrap());
    resp
}

/// An address nothing listens on (connection refused).
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub(crate) fn route(app: &str, backends: &[(&str, SocketAddr)], max_body_bytes: u64) -> Arc<Route> {
    Arc::new(Route {
        app: app.to_string(),
        backends: backends
            .iter()
            .map(|(i, a)| Backend {
                instance: i.to_string(),
                addr: *a,
            })
            .collect(),
        max_body_bytes,
        redirect_https: false,
    })
}

pub(crate) fn table(entries: Vec<(&str, Arc<Route>)>) -> RoutingTable {
    RoutingTable::new(entries.into_iter().map(|(h, r)| (h.to_string(), r)))
}

/// A running proxy.
pub(crate) struct TestProxy {
    pub(crate) addr: SocketAddr,
    routes: SharedRoutes,
    metrics: Arc<ProxyMetrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ProxyError>>,
}

impl TestProxy {
    pub(crate) async fn shutdown(mut self) -> Result<(), ProxyError> {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

pub(crate) async fn start_proxy(t: RoutingTable, config: ProxyConfig) -> TestProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = routing::shared();
    routes.store(Arc::new(t));
    let metrics = Arc::new(ProxyMetrics::new());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy::run(
        listener,
        routes.clone(),
        config,
        metrics.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    TestProxy {
        addr,
        routes,
        metrics,
        stop: Some(tx),
        task,
    }
}

/// A backend named `shop` and a proxy routing `shop.example.test` to it.
pub(crate) async fn shop_proxy(config: ProxyConfig) -> (TestBackend, TestProxy) {
    let b = backend("shop").await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 1 << 20),
        )]),
        config,
    )
    .await;
    (b, p)
}

/// Sends one request on a fresh HTTP/1.1 connection.
async fn send(addr: SocketAddr, req: Request<TestBody>) -> Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender.send_request(req).await.unwrap()
}

fn request(host: &str, path: &str) -> http::request::Builder {
    Request::builder().uri(path).header("host", host)
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, HeaderMap, String) {
    let resp = send(addr, request(host, path).body(empty()).unwrap()).await;
    read(resp).await
}

async fn read(resp: Response<Incoming>) -> (StatusCode, HeaderMap, String) {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn error_code(h: &HeaderMap) -> &str {
    h.get("x-escale-error")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

#[tokio::test]
async fn routes_by_host_ignoring_case_and_port() {
    let shop = backend("shop").await;
    let blog = backend("blog").await;
    let p = start_proxy(
        table(vec![
            (
                "shop.example.test",
                route("shop", &[("shop-1", shop.addr)], 1 << 20),
            ),
            (
                "blog.example.test",
                route("blog", &[("blog-1", blog.addr)], 1 << 20),
            ),
        ]),
        ProxyConfig::default(),
    )
    .await;
    let (s, h, body) = get(p.addr, "SHOP.Example.test:8080", "/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "shop"));
    assert!(h.contains_key("x-request-id"));
    let (s, _, body) = get(p.addr, "blog.example.test", "/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blog"));
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_host_is_404_and_empty_route_is_503() {
    let p = start_proxy(
        table(vec![("empty.example.test", route("empty", &[], 1 << 20))]),
        ProxyConfig::default(),
    )
    .await;
    let (s, h, body) = get(p.addr, "nowhere.example.test", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&h), "unknown-host");
    assert!(body.starts_with("404"), "{body}");

    let resp = send(
        p.addr,
        request("nowhere.example.test", "/")
            .header("accept", "application/json")
            .body(empty())
            .unwrap(),
    )
    .await;
    let (s, h, body) = read(resp).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(h.get("content-type").unwrap(), "application/json");
    assert!(body.contains("\"error\":\"unknown-host\""), "{body}");

    let (s, h, _) = get(p.addr, "empty.example.test", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&h), "no-backend");
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn refused_backend_is_retried_on_a_healthy_one() {
    let live = backend("live").await;
    let dead = dead_addr().await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("dead-1", dead), ("live-1", live.addr)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    for _ in 0..4 {
        let (s, _, body) = get(p.addr, "shop.example.test", "/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "live"));
    }
    // A body survives the retry too (it was never sent to the dead backend).
    p.routes.store(Arc::new(table(vec![(
        "shop.example.test",
        route("shop", &[("dead-2", dead), ("live-1", live.addr)], 1 << 20),
    )])));
    for _ in 0..2 {
        let resp = send(
            p.addr,
            request("shop.example.test", "/upload")
                .method("POST")
                .body(full(vec![b'y'; 1000]))
                .unwrap(),
        )
        .await;
        let (s, _, body) = read(resp).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "received 1000"));
    }
    assert_eq!(live.state.hits.load(Ordering::SeqCst), 6);
    p.shutdown().await.unwrap();
}

/// A backend that accepts a connection, reads the request head and closes without answering:
/// what Docker's userland proxy does on the published port of a container whose app stopped
/// listening (a stopping or crashed instance). Counts the requests it swallowed.
async fn closing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let swallowed = Arc::new(AtomicUsize::new(0));
    let n = swallowed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let n = n.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                n.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, swallowed)
}

#[tokio::test]
async fn idempotent_request_closed_before_any_answer_is_retried_on_another_backend() {
    let live = backend("live").await;
    let (gone, swallowed) = closing_backend().await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("gone-1", gone), ("live-1", live.addr)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    for _ in 0..6 {
        let (s, h, body) = get(p.addr, "shop.example.test", "/").await;
        assert_eq!(
            (s, body.as_str()),
            (StatusCode::OK, "live"),
            "{}",
            error_code(&h)
        );
    }
    assert!(
        swallowed.load(Ordering::SeqCst) >= 1,
        "the closing backend was tried"
    );

    // Both backends close: one retry, then 502; a POST is never sent twice.
    let (gone_b, swallowed_b) = closing_backend().await;
    p.routes.store(Arc::new(table(vec![(
        "shop.example.test",
        route("shop", &[("gone-a", gone), ("gone-b", gone_b)], 1 << 20),
    )])));
    let before = swallowed.load(Ordering::SeqCst);
    let tries = || swallowed.load(Ordering::SeqCst) - before + swallowed_b.load(Ordering::SeqCst);
    let (s, h, _) = get(p.addr, "shop.example.test", "/").await;
    assert_eq!(
        (s, error_code(&h)),
        (StatusCode::BAD_GATEWAY, "upstream-failed")
    );
    assert_eq!(tries(), 2, "a GET is tried on two backends");
    let resp = send(
        p.addr,
        request("shop.example.test", "/upload")
            .method("POST")
            .body(full(vec![b'y'; 10]))
            .unwrap(),
    )
    .await;
    let (s, h, _) = read(resp).await;
    assert_eq!(
        (s, error_code(&h)),
        (StatusCode::BAD_GATEWAY, "upstream-failed")
    );
    assert_eq!(tries(), 3, "a POST is not replayed");
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn all_backends_down_is_502_upstream_connect() {
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route(
                "shop",
                &[("d1", dead_addr().await), ("d2", dead_addr().await)],
                1 << 20,
            ),
        )]),
        ProxyConfig::default(),
    )
    .await;
    let (s, h, body) = get(p.addr, "shop.example.test", "/").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&h), "upstream-connect");
    assert!(body.contains("upstream:"), "{body}");
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let slow = backend("slow").await;
    let config = ProxyConfig {
        upstream_response_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", slow.addr)], 1 << 20),
        )]),
        config,
    )
    .await;
    let (s, h, _) = get(p.addr, "shop.example.test", "/slow").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_code(&h), "upstream-timeout");
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn body_over_the_route_limit_is_413() {
    let b = backend("shop").await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 1000),
        )]),
        ProxyConfig::default(),
    )
    .await;
    // Declared length.
    let resp = send(
        p.addr,
        request("shop.example.test", "/upload")
            .method("POST")
            .body(full(vec![b'x'; 2000]))
            .unwrap(),
    )
    .await;
    let (s, h, _) = read(resp).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&h), "body-too-large");
    assert_eq!(b.state.hits.load(Ordering::SeqCst), 0);
    // Streamed (chunked, no length): cut off by the limited body.
    let chunks =
        stream::iter((0..3).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 600])))));
    let resp = send(
        p.addr,
        request("shop.example.test", "/upload")
            .method("POST")
            .body(StreamBody::new(chunks).boxed())
            .unwrap(),
    )
    .await;
    let (s, h, _) = read(resp).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&h), "body-too-large");
    // Within the limit is fine.
    let resp = send(
        p.addr,
        request("shop.example.test", "/upload")
            .method("POST")
            .body(full(vec![b'x'; 1000]))
            .unwrap(),
    )
    .await;
    let (s, _, body) = read(resp).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "received 1000"));
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_buffering() {
    let b = backend("shop").await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 100 * MIB as u64),
        )]),
        ProxyConfig::default(),
    )
    .await;
    // Upload: after the first chunk the client body waits until the backend has seen it,
    // which can only happen if the proxy forwards before the body is complete.
    let resp = send(
        p.addr,
        request("shop.example.test", "/upload")
            .method("POST")
            .body(lazy_body(
                50 * MIB,
                Some(b.state.upload_first_chunk.clone()),
            ))
            .unwrap(),
    )
    .await;
    let (s, _, body) = read(resp).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, format!("received {}", 50 * MIB));

    // Download: the backend waits after its first chunk until the client has it.
    let resp = send(
        p.addr,
        request("shop.example.test", "/download")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            if n == 0 {
                b.state.download_gate.notify_one();
            }
            n += d.len();
        }
    }
    assert_eq!(n, 50 * MIB);
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn forwarded_headers_and_request_id_added_hop_by_hop_removed() {
    let (_b, p) = shop_proxy(ProxyConfig::default()).await;
    let resp = send(
        p.addr,
        request("shop.example.test", "/headers")
            .header("x-forwarded-for", "203.0.113.9")
            .header("connection", "x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9v")
            .header("te", "trailers")
            .header("x-request-id", "req-123")
            .body(empty())
            .unwrap(),
    )
    .await;
    let (s, h, body) = read(resp).await;
    assert_eq!(s, StatusCode::OK);
    let lines: Vec<&str> = body.lines().collect();
    for want in [
        "x-forwarded-for: 203.0.113.9, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: shop.example.test",
        "x-request-id: req-123",
        "host: shop.example.test",
        "te: trailers",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in {lines:?}");
    }
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            !lines.iter().any(|l| l.starts_with(&format!("{gone}:"))),
            "{gone} forwarded: {lines:?}"
        );
    }
    // Response side: hop-by-hop from the backend is stripped, the request id echoed.
    assert!(!h.contains_key("x-upstream-private"));
    assert!(!h.contains_key("keep-alive"));
    assert_eq!(h.get("x-request-id").unwrap(), "req-123");

    // No (or an insane) request id: one is generated.
    let resp = send(
        p.addr,
        request("shop.example.test", "/headers")
            .header("x-request-id", "has spaces and \"quotes\"")
            .body(empty())
            .unwrap(),
    )
    .await;
    let (_, h, body) = read(resp).await;
    let rid = h.get("x-request-id").unwrap().to_str().unwrap().to_string();
    assert_eq!(rid.len(), 32);
    assert!(body.contains(&format!("x-request-id: {rid}")), "{body}");
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn upgrade_is_tunnelled_both_ways() {
    let (_b, p) = shop_proxy(ProxyConfig::default()).await;
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: shop.example.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"hello"[..], &b"second message"[..]] {
        tcp.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
    drop(tcp);
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn snapshot_swap_moves_traffic_to_new_backends() {
    let a = backend("a").await;
    let b = backend("b").await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("a1", a.addr)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    assert_eq!(get(p.addr, "shop.example.test", "/").await.2, "a");
    p.routes.store(Arc::new(table(vec![(
        "shop.example.test",
        route("shop", &[("b1", b.addr)], 1 << 20),
    )])));
    for _ in 0..3 {
        assert_eq!(get(p.addr, "shop.example.test", "/").await.2, "b");
    }
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let (b, p) = shop_proxy(ProxyConfig::default()).await;
    let addr = p.addr;
    let in_flight = tokio::spawn(async move { get(addr, "shop.example.test", "/wait").await });
    b.state.arrived.notified().await;
    let shutdown = tokio::spawn(p.shutdown());
    // The listener closes while the request is still in flight.
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    b.state.release.notify_one();
    let (s, _, body) = in_flight.await.unwrap();
    assert_eq!((s, body.as_str()), (StatusCode::OK, "finished"));
    shutdown.await.unwrap().unwrap();
}

#[tokio::test]
async fn drain_timeout_closes_what_is_left() {
    let config = ProxyConfig {
        drain_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let (b, p) = shop_proxy(config).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let in_flight = tokio::spawn(async move {
        sender
            .send_request(request("shop.example.test", "/wait").body(empty()).unwrap())
            .await
    });
    b.state.arrived.notified().await;
    // The backend never answers: shutdown still completes once the drain timeout expires,
    // and the client sees its connection closed rather than a response.
    p.shutdown().await.unwrap();
    assert!(in_flight.await.unwrap().is_err());
}

#[tokio::test]
async fn metrics_count_requests_per_app() {
    let (_b, p) = shop_proxy(ProxyConfig::default()).await;
    get(p.addr, "shop.example.test", "/").await;
    // A kept-alive connection counts for the app of its latest request until it closes.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = kept
        .send_request(request("shop.example.test", "/").body(empty()).unwrap())
        .await
        .unwrap();
    read(resp).await;
    let mut out = String::new();
    p.metrics.render_prometheus(&mut out);
    assert!(
        out.contains("escale_proxy_app_open_connections{app=\"shop\"} 1\n"),
        "{out}"
    );
    drop(kept);
    conn.await.unwrap().unwrap();
    get(p.addr, "unknown.example.test", "/").await;
    let mut out = String::new();
    for _ in 0..100 {
        out.clear();
        p.metrics.render_prometheus(&mut out);
        if out.contains("escale_proxy_app_open_connections{app=\"shop\"} 0\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        out.contains("escale_proxy_app_open_connections{app=\"shop\"} 0\n"),
        "{out}"
    );
    assert!(
        out.contains("escale_proxy_requests_total{app=\"shop\",class=\"2xx\"} 2\n"),
        "{out}"
    );
    assert!(out.contains("escale_proxy_request_duration_seconds_count{app=\"shop\"} 2\n"));
    assert!(out.contains("escale_proxy_unknown_host_requests_total 1\n"));
    assert!(
        out.contains("escale_proxy_response_bytes_total{app=\"shop\"} 8\n"),
        "{out}"
    );
    assert!(out.contains("# TYPE escale_proxy_request_duration_seconds histogram"));
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn http2_prior_knowledge_is_proxied_as_http1() {
    let (_b, p) = shop_proxy(ProxyConfig::default()).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://shop.example.test/headers")
        .body(empty())
        .unwrap();
    let (s, _, body) = read(sender.send_request(req).await.unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body.lines().any(|l| l == "host: shop.example.test"),
        "{body}"
    );
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn redirects_to_https_when_the_route_asks() {
    let b = backend("shop").await;
    let mut r = route("shop", &[("s1", b.addr)], 1 << 20);
    Arc::make_mut(&mut r).redirect_https = true;
    let p = start_proxy(
        table(vec![("shop.example.test", r)]),
        ProxyConfig::default(),
    )
    .await;
    let (s, h, _) = get(p.addr, "shop.example.test:80", "/cart?x=1").await;
    assert_eq!(s, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        h.get("location").unwrap(),
        "https://shop.example.test/cart?x=1"
    );
    assert_eq!(b.state.hits.load(Ordering::SeqCst), 0);
    p.shutdown().await.unwrap();
}

pub(crate) mod tls {
    use super::*;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::TlsConnector;

    pub(crate) struct TlsSetup {
        pub(crate) addr: SocketAddr,
        pub(crate) ca: CertificateDer<'static>,
        pub(crate) stop: oneshot::Sender<()>,
        pub(crate) task: JoinHandle<Result<(), ProxyError>>,
    }

    pub(crate) async fn start(t: RoutingTable) -> TlsSetup {
        let cert = rcgen::generate_simple_self_signed(vec!["secure.test".to_string()]).unwrap();
        let key = proxy::certified_key_from_pem(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let store = Arc::new(CertStore::new());
        store.insert("secure.test", Arc::new(key));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = routing::shared();
        routes.store(Arc::new(t));
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy::run_tls(
            listener,
            routes,
            ProxyConfig::default(),
            Arc::new(ProxyMetrics::new()),
            store,
            async move {
                let _ = rx.await;
            },
        ));
        TlsSetup {
            addr,
            ca: cert.cert.der().clone(),
            stop,
            task,
        }
    }

    pub(crate) async fn connect(
        s: &TlsSetup,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(s.ca.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("secure.test").unwrap(), tcp)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sni_h2_via_alpn_and_421_on_host_mismatch() {
        let b = backend("secure").await;
        let s = start(table(vec![
            ("secure.test", route("secure", &[("s1", b.addr)], 1 << 20)),
            ("other.test", route("other", &[("o1", b.addr)], 1 << 20)),
        ]))
        .await;

        // HTTP/2 negotiated by ALPN.
        let io = connect(&s, &[b"h2", b"http/1.1"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("https://secure.test/headers")
            .body(empty())
            .unwrap();
        let (status, _, body) = read(sender.send_request(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.lines().any(|l| l == "x-forwarded-proto: https"),
            "{body}"
        );
        assert!(body.lines().any(|l| l == "host: secure.test"), "{body}");

        // HTTP/1.1 with a Host that is not the SNI name.
        let io = connect(&s, &[b"http/1.1"]).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (status, h, _) = read(
            sender
                .send_request(request("other.test", "/").body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(error_code(&h), "misdirected-request");
        let (status, _, body) = read(
            sender
                .send_request(request("Secure.Test:443", "/").body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "secure"));
        // The same TLS connection, handed to hyper by a request with a body, keeps working.
        let (status, _, body) = read(
            sender
                .send_request(
                    request("secure.test", "/upload")
                        .method("POST")
                        .body(full("hello"))
                        .unwrap(),
                )
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "received 5"));
        let (status, _, body) = read(
            sender
                .send_request(request("secure.test", "/headers").body(empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.lines().any(|l| l == "x-forwarded-proto: https"),
            "{body}"
        );
        assert_eq!(b.state.hits.load(Ordering::SeqCst), 4);

        let _ = s.stop.send(());
        s.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let (_b, p) = shop_proxy(config).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let (s, _, _) = read(
        sender
            .send_request(request("shop.example.test", "/").body(empty()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // The proxy closes the kept-alive connection once idle; the guard only prevents a hang.
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("idle connection was not closed")
        .unwrap()
        .unwrap();
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn upstream_errors_answer_json_when_preferred() {
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("d1", dead_addr().await)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    let resp = send(
        p.addr,
        request("shop.example.test", "/")
            .header("accept", "application/json, text/plain;q=0.5")
            .header("x-request-id", "abc")
            .body(empty())
            .unwrap(),
    )
    .await;
    let (s, h, body) = read(resp).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(error_code(&h), "upstream-connect");
    assert_eq!(h.get("content-type").unwrap(), "application/json");
    assert!(
        body.starts_with("{\"status\":502,\"error\":\"upstream-connect\",")
            && body.contains("\"request_id\":\"abc\""),
        "{body}"
    );
    p.shutdown().await.unwrap();
}

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// One thread: the proxy's tasks log into this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn access_log_is_off_by_default_and_structured_when_sampled() {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(out.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let b = backend("logged").await;
    let routes = || {
        table(vec![(
            "logged.test",
            route("logged", &[("logged-1", b.addr)], 1 << 20),
        )])
    };

    let p = start_proxy(routes(), ProxyConfig::default()).await;
    assert_eq!(get(p.addr, "logged.test", "/quiet").await.0, StatusCode::OK);
    p.shutdown().await.unwrap();
    assert!(
        !out.text().contains("escale::access"),
        "off by default: {}",
        out.text()
    );

    let config = ProxyConfig {
        access_log_sample: 1.0,
        ..ProxyConfig::default()
    };
    let p = start_proxy(routes(), config).await;
    let req = request("logged.test", "/shop/cart?token=hush")
        .header("x-request-id", "req-42")
        .body(empty())
        .unwrap();
    assert_eq!(send(p.addr, req).await.status(), StatusCode::OK);
    p.shutdown().await.unwrap();
    let text = out.text();
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "escale::access")
        .unwrap_or_else(|| panic!("an access log event: {text}"));
    let f = &line["fields"];
    assert_eq!(f["app"], "logged");
    assert_eq!(f["host"], "logged.test");
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/shop/cart", "the query string is not logged");
    assert_eq!(f["status"], 200);
    assert_eq!(f["request_id"], "req-42");
    assert_eq!(f["client"], "127.0.0.1");
    assert!(f["ms"].as_f64().is_some());
    assert!(!text.contains("hush"), "query values never reach the log");
}

/// A hand-written HTTP/1.1 backend: answers each request head with `answer(method, path)`
/// (raw bytes, `None` closes the connection), closes a connection idle for `idle_close`,
/// and counts the connections it accepted.
async fn raw_backend(
    idle_close: Duration,
    answer: fn(&str, &str) -> Option<Vec<u8>>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request head (these tests send no request bodies).
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tokio::time::timeout(idle_close, tcp.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return, // idle timeout, EOF or error: close
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let mut words = head.split_whitespace();
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    match answer(method, path) {
                        Some(bytes) => {
                            if tcp.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A proxy routing `raw.test` to `backend`, and one keep-alive client connection to it.
async fn raw_proxy(
    backend: SocketAddr,
) -> (TestProxy, hyper::client::conn::http1::SendRequest<TestBody>) {
    let p = start_proxy(
        table(vec![(
            "raw.test",
            route("raw", &[("raw-1", backend)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    (p, client)
}

fn raw_answers(method: &str, path: &str) -> Option<Vec<u8>> {
    let ok = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let text = match (method, path) {
        ("HEAD", _) => "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n".to_string(),
        (_, "/chunked") => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
             5;ext\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n"
            .to_string(),
        (_, "/no-content") => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
        (_, "/continue") => format!("HTTP/1.1 100 Continue\r\n\r\n{}", ok("after 100")),
        (_, "/conn-close") => {
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nclose".to_string()
        }
        (_, "/bad") => {
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n".to_string()
        }
        (_, "/plus") => "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello".to_string(),
        (_, "/twice") => {
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello".to_string()
        }
        (_, "/list") => "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello".to_string(),
        _ => ok("ok"),
    };
    Some(text.into_bytes())
}

#[tokio::test]
async fn upstream_connections_are_reused_and_stale_ones_replaced() {
    // The backend closes keep-alive connections idle for 100 ms (like Node's 5 s default).
    let (addr, accepted) = raw_backend(Duration::from_millis(100), raw_answers).await;
    let (p, mut client) = raw_proxy(addr).await;
    for _ in 0..20 {
        let resp = client
            .send_request(request("raw.test", "/").body(empty()).unwrap())
            .await
            .unwrap();
        let (status, _, body) = read(resp).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection, reused"
    );

    // After the backend closed the idle connection, even a POST (never retried once sent)
    // goes through: the closed connection is not reused.
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = client
            .send_request(
                request("raw.test", "/")
                    .method("POST")
                    .body(full("x"))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (status, headers, body) = read(resp).await;
        assert_eq!(
            (status, body.as_str(), error_code(&headers)),
            (StatusCode::OK, "ok", ""),
            "round {round}"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn upstream_response_framings_are_relayed() {
    let (addr, accepted) = raw_backend(Duration::from_secs(30), raw_answers).await;
    let (p, mut client) = raw_proxy(addr).await;
    let mut call = |method: &'static str, path: &'static str| {
        let req = request("raw.test", path)
            .method(method)
            .body(empty())
            .unwrap();
        let fut = client.send_request(req);
        async move { read(fut.await.unwrap()).await }
    };
    // Chunked (with an extension and a trailer), decoded and re-framed for the client.
    let (status, _, body) = call("GET", "/chunked").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello, world"));
    // HEAD: the content-length describes a body that is not sent.
    let (status, headers, body) = call("HEAD", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers.get("content-length").unwrap(), "10");
    let (status, _, body) = call("GET", "/no-content").await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    // Interim 100 skipped.
    let (status, _, body) = call("GET", "/continue").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "after 100"));
    // All of the above on one upstream connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // `Connection: close` is honoured: the next request needs a new connection.
    let (status, headers, body) = call("GET", "/conn-close").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "close"));
    assert!(headers.get("connection").is_none(), "hop-by-hop removed");
    let (status, _, body) = call("GET", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // An invalid response head is a 502 naming the upstream: conflicting, signed, repeated
    // or listed lengths alike (RFC 9112 §6.3).
    for path in ["/bad", "/plus", "/twice", "/list"] {
        for method in ["GET", "POST"] {
            let (status, headers, _) = call(method, path).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{method} {path}");
            assert_eq!(error_code(&headers), "upstream-failed", "{method} {path}");
        }
    }
    p.shutdown().await.unwrap();
}

// --- The client-side HTTP/1 fast path, its handover to hyper, and the worker threads ---

/// One response read from a raw client connection: status, head (lowercase) and body.
/// Bodies are `content-length` framed (what the test backend sends).
async fn raw_response(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8(buf[..end].to_vec())
                .unwrap()
                .to_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + length {
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed in the middle of a body: {head}");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8(buf[end..end + length].to_vec()).unwrap();
            buf.drain(..end + length);
            return (status, head, body);
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a complete response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits (at most 10 s, a guard against a hang) for the peer to close `tcp`.
pub(crate) async fn closed_by_peer(tcp: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn http1_pipelining_and_handover_to_hyper_on_one_connection() {
    let (b, p) = shop_proxy(ProxyConfig::default()).await;
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    // Two requests in one write: answered in order.
    tcp.write_all(
        b"GET /a HTTP/1.1\r\nHost: shop.example.test\r\n\r\n\
          GET /headers HTTP/1.1\r\nHost: shop.example.test\r\nX-Mine: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let (status, head, body) = raw_response(&mut tcp, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "shop"));
    assert!(head.contains("\r\ncontent-length: 4\r\n"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(head.contains("\r\nx-request-id: "), "{head}");
    assert!(!head.contains("connection:"), "{head}");
    let (status, head, body) = raw_response(&mut tcp, &mut buf).await;
    assert_eq!(status, 200);
    assert!(body.contains("x-mine: 1"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    // Hop-by-hop headers of the backend's response are not relayed.
    assert!(
        !head.contains("keep-alive") && !head.contains("x-upstream-private"),
        "{head}"
    );
    // A request with a body: hyper serves the connection from here on, same socket.
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: shop.example.test\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let (status, _, body) = raw_response(&mut tcp, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "received 5"));
    tcp.write_all(b"GET /c HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = raw_response(&mut tcp, &mut buf).await;
    assert_eq!((status, body.as_str()), (200, "shop"));
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(closed_by_peer(&mut tcp).await);
    assert_eq!(b.state.hits.load(Ordering::SeqCst), 4);
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn http1_close_requests_slow_heads_and_shutdown_close_connections() {
    let config = ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let (_b, p) = shop_proxy(config).await;
    // `Connection: close` from the client: answered with it, then closed.
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = raw_response(&mut tcp, &mut buf).await;
    assert_eq!(status, 200);
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(closed_by_peer(&mut tcp).await);
    // Slowloris: part of a head, then nothing; and a connection that never sends a byte.
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: shop.exa")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    assert!(closed_by_peer(&mut slow).await, "a slow head is cut");
    assert!(
        closed_by_peer(&mut silent).await,
        "a silent connection is cut"
    );
    // A kept-alive connection between requests: shutdown closes it at once rather than
    // waiting for the drain timeout (30 s by default, over the 10 s guard).
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = raw_response(&mut idle, &mut buf).await;
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(10), p.shutdown())
        .await
        .expect("shutdown waited for an idle connection")
        .unwrap();
    assert!(closed_by_peer(&mut idle).await);
}

#[tokio::test]
async fn workers_share_the_listeners_and_drain_on_shutdown() {
    let b = backend("shop").await;
    let routes = routing::shared();
    routes.store(Arc::new(table(vec![(
        "shop.example.test",
        route("shop", &[("s1", b.addr)], 1 << 20),
    )])));
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = proxy::spawn_workers(
        2,
        proxy::Listeners {
            http: Some(http),
            https: None,
        },
        routes,
        ProxyConfig::default(),
        Arc::new(ProxyMetrics::new()),
        stopped,
    )
    .unwrap();
    let answers = futures_util::future::join_all(
        (0..20).map(|i| async move { get(addr, "shop.example.test", &format!("/{i}")).await }),
    )
    .await;
    for (s, _, body) in answers {
        assert_eq!((s, body.as_str()), (StatusCode::OK, "shop"));
    }
    // A request in flight when shutdown starts still completes; then the workers stop.
    let in_flight = tokio::spawn(async move { get(addr, "shop.example.test", "/wait").await });
    b.state.arrived.notified().await;
    stop.send(true).unwrap();
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.state.release.notify_one();
    let (s, _, body) = in_flight.await.unwrap();
    assert_eq!((s, body.as_str()), (StatusCode::OK, "finished"));
    workers.join().await.unwrap();
}

/// A backend that counts the connections it accepts and answers requests in batches: each
/// request waits until `batch` requests (of its batch) have arrived, so a batch is in flight
/// at once. `most` is the largest number of requests it saw in flight together.
struct BatchBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

async fn batch_backend(batch: usize) -> BatchBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (arrived_tx, arrived) = tokio::sync::watch::channel(0usize);
    let arrived_tx = Arc::new(arrived_tx);
    let (acc, top) = (accepted.clone(), most.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            acc.fetch_add(1, Ordering::SeqCst);
            let (tx, rx, flight, top) = (
                arrived_tx.clone(),
                arrived.clone(),
                in_flight.clone(),
                top.clone(),
            );
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (tx, mut rx, flight, top) =
                        (tx.clone(), rx.clone(), flight.clone(), top.clone());
                    async move {
                        let now = flight.fetch_add(1, Ordering::SeqCst) + 1;
                        top.fetch_max(now, Ordering::SeqCst);
                        let mut mine = 0;
                        tx.send_modify(|n| {
                            mine = *n;
                            *n += 1;
                        });
                        let release = (mine / batch + 1) * batch;
                        let _ = rx.wait_for(|n| *n >= release).await;
                        flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(full("ok")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    BatchBackend {
        addr,
        accepted,
        most,
    }
}

/// `n` concurrent GETs as streams of one HTTP/2 (prior knowledge) connection; their statuses.
async fn h2_burst(proxy: SocketAddr, n: usize) -> Vec<StatusCode> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    futures_util::future::join_all((0..n).map(|i| {
        let mut sender = sender.clone();
        async move {
            let req = Request::builder()
                .uri(format!("http://shop.example.test/{i}"))
                .body(empty())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            read(resp).await.0
        }
    }))
    .await
}

/// Issue #16: HTTP/2 multiplexes many requests on one client connection, each needing an
/// upstream connection while it runs. The proxy keeps every connection it opened for reuse:
/// bursts after the first open none (the pool used to keep 64 and close the rest, so each
/// burst reconnected, piling up TIME_WAIT sockets until connects slowed to a crawl).
#[tokio::test]
async fn h2_bursts_reuse_upstream_connections() {
    let streams = 100;
    let b = batch_backend(streams).await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 1 << 20),
        )]),
        ProxyConfig::default(),
    )
    .await;
    for burst in 0..3 {
        let statuses = h2_burst(p.addr, streams).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "burst {burst}: {statuses:?}"
        );
        assert_eq!(b.most.load(Ordering::SeqCst), streams, "burst {burst}");
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            streams,
            "burst {burst}: upstream connections opened so far"
        );
    }
    p.shutdown().await.unwrap();
}

/// However many streams arrive at once, a worker opens at most
/// `upstream_max_connections_per_backend` connections to one backend; the other requests
/// wait for one of them and are served in turn.
#[tokio::test]
async fn upstream_connections_stay_bounded_under_many_h2_streams() {
    let cap = 8;
    let b = batch_backend(cap).await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 1 << 20),
        )]),
        ProxyConfig {
            upstream_max_connections_per_backend: cap,
            ..ProxyConfig::default()
        },
    )
    .await;
    let statuses = h2_burst(p.addr, 200).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(b.accepted.load(Ordering::SeqCst), cap);
    assert_eq!(b.most.load(Ordering::SeqCst), cap);
    p.shutdown().await.unwrap();
}

/// With every connection busy past the connect timeout, the request is answered 503
/// `upstream-busy` (the backend is loaded, not broken).
#[tokio::test]
async fn busy_upstream_is_503_after_the_connect_timeout() {
    let b = backend("shop").await;
    let p = start_proxy(
        table(vec![(
            "shop.example.test",
            route("shop", &[("s1", b.addr)], 1 << 20),
        )]),
        ProxyConfig {
            upstream_max_connections_per_backend: 1,
            upstream_connect_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        },
    )
    .await;
    let (addr, state) = (p.addr, b.state.clone());
    let held = tokio::spawn(async move { get(addr, "shop.example.test", "/wait").await });
    state.arrived.notified().await;
    let (s, h, _) = get(p.addr, "shop.example.test", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&h), "upstream-busy");
    b.state.release.notify_one();
    let (s, _, body) = held.await.unwrap();
    assert_eq!((s, body.as_str()), (StatusCode::OK, "finished"));
    // The connection is back: the next request is served.
    let (s, _, body) = get(p.addr, "shop.example.test", "/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "shop"));
    p.shutdown().await.unwrap();
}
