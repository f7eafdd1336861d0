//! Connection exhaustion, tried as an attacker would (issue #11): connections that send
//! nothing, an HTTP/2 preface and then silence, and more connections than descriptors.
//! Every listener closes what does not talk, caps what one client and everyone together may
//! hold, and sheds at accept so that the API keeps answering while the proxy is flooded.

use std::net::SocketAddr;
use std::time::Duration;

use escale::listen::ConnLimits;
use escale::proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::proxy::{closed_by_peer, shop_proxy};
use crate::support::server::TestServer;

/// A connection to `to` from the loopback address `from` (127.0.0.0/8 is all local).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Still open: nothing to read and no end of stream within a short look.
async fn still_open(tcp: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut b))
        .await
        .is_err()
}

/// Reads (and drops) whatever comes until the peer closes; false if it has not within 10 s
/// (a guard against a hang, not a timing assertion).
async fn drained_until_closed(tcp: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(until, tcp.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// The HTTP/2 client preface: the magic, then (optionally) an empty SETTINGS frame.
const H2_MAGIC: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[tokio::test]
async fn http2_clients_that_go_silent_are_closed() {
    // Keep-alive: a client that never answers the PING is dropped.
    let config = ProxyConfig {
        h2_keep_alive_interval: Duration::from_millis(300),
        h2_keep_alive_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let (_b, p) = shop_proxy(config).await;
    let mut pinged = TcpStream::connect(p.addr).await.unwrap();
    pinged.write_all(H2_MAGIC).await.unwrap();
    pinged.write_all(H2_SETTINGS).await.unwrap();
    assert!(
        drained_until_closed(&mut pinged).await,
        "PING unanswered: closed"
    );
    p.shutdown().await.unwrap();

    // Idle: the graceful close (GOAWAY and its PING) unanswered, or a preface never
    // finished, is cut after the close grace.
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        close_grace: Duration::from_millis(300),
        h2_keep_alive_interval: Duration::from_secs(3600),
        ..ProxyConfig::default()
    };
    let (_b, p) = shop_proxy(config).await;
    let mut magic_only = TcpStream::connect(p.addr).await.unwrap();
    magic_only.write_all(H2_MAGIC).await.unwrap();
    let mut settings = TcpStream::connect(p.addr).await.unwrap();
    settings.write_all(H2_MAGIC).await.unwrap();
    settings.write_all(H2_SETTINGS).await.unwrap();
    assert!(
        drained_until_closed(&mut magic_only).await,
        "half a preface: closed"
    );
    assert!(
        drained_until_closed(&mut settings).await,
        "GOAWAY's PING unanswered: closed"
    );
    p.shutdown().await.unwrap();
}

/// Idle means no request, not no bytes: an HTTP/2 client that answers every keep-alive PING
/// but sends no request is closed at the idle timeout, while a response streaming for longer
/// than that on another connection is not cut.
#[tokio::test]
async fn idle_is_counted_in_requests_not_pings() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Two proxies with the same mechanism, so that the one holding the download (B) has
    // been past its idle timeout and grace for a while by the time the other closes A.
    let config = |idle_ms: u64| ProxyConfig {
        idle_timeout: Duration::from_millis(idle_ms),
        close_grace: Duration::from_millis(idle_ms),
        h2_keep_alive_interval: Duration::from_millis(100),
        h2_keep_alive_timeout: Duration::from_secs(5),
        ..ProxyConfig::default()
    };
    let (b, p) = shop_proxy(config(300)).await;
    let (_a, slow) = shop_proxy(config(1000)).await;
    let h2 = |tcp: TcpStream| {
        hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
    };
    let get = |path: &str| {
        http::Request::builder()
            .uri(format!("http://shop.example.test{path}"))
            .body(Empty::new())
            .unwrap()
    };
    // B first: a download whose first chunk arrives, then the rest waits for the gate.
    let (mut busy, busy_conn) = h2(TcpStream::connect(p.addr).await.unwrap()).await.unwrap();
    tokio::spawn(busy_conn);
    let mut body = busy
        .send_request(get("/download"))
        .await
        .unwrap()
        .into_body();
    let mut got = 0usize;
    while got == 0 {
        let frame = body.frame().await.unwrap().unwrap();
        got += frame.data_ref().map_or(0, |d| d.len());
    }
    // A after it: one request, then only PING answers (hyper's client answers them).
    let (mut idle, idle_conn) = h2(TcpStream::connect(slow.addr).await.unwrap())
        .await
        .unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    let resp = idle.send_request(get("/")).await.unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "shop");
    // A is closed by the server (its connection future ends) ...
    tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .expect("an idle HTTP/2 connection answering PINGs was kept open")
        .unwrap()
        .unwrap();
    // ... while B, past its idle timeout and grace for over a second, gets its whole body.
    b.state.download_gate.notify_one();
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(got, 50 * 1024 * 1024);
    p.shutdown().await.unwrap();
    slow.shutdown().await.unwrap();
}

#[tokio::test]
async fn proxy_sheds_over_its_caps_per_client_and_per_listener() {
    let config = ProxyConfig {
        connection_limits: Some(ConnLimits::new("proxy", 6, 3)),
        ..ProxyConfig::default()
    };
    let (_b, p) = shop_proxy(config).await;
    // One client: three connections held, the fourth closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.11", p.addr).await);
    }
    let mut fourth = connect_from("127.0.0.11", p.addr).await;
    assert!(closed_by_peer(&mut fourth).await, "over the per-client cap");
    for c in &mut held {
        assert!(still_open(c).await, "connections within the cap stay open");
    }
    // Others: three more fill the listener; the seventh, from a fresh address, is shed.
    for i in 0..3 {
        held.push(connect_from(&format!("127.0.0.{}", 20 + i), p.addr).await);
    }
    let mut seventh = connect_from("127.0.0.30", p.addr).await;
    assert!(
        closed_by_peer(&mut seventh).await,
        "over the listener's cap"
    );
    // A slot given back is a slot to serve from.
    drop(held.remove(0));
    let mut served = None;
    for _ in 0..50 {
        let mut c = connect_from("127.0.0.31", p.addr).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: shop.example.test\r\n\r\n")
            .await
            .unwrap();
        let mut b = [0u8; 12];
        match c.read_exact(&mut b).await {
            Ok(_) => {
                served = Some(String::from_utf8_lossy(&b).into_owned());
                break;
            }
            // The freed slot is given back when the server notices the close.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(served.as_deref(), Some("HTTP/1.1 200"));
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_api_survives_a_flood_of_silent_connections_to_both_listeners() {
    let server = TestServer::start(&[
        ("ESCALE_PROXY_HEADER_READ_TIMEOUT", "3s"),
        ("ESCALE_PROXY_MAX_CONNECTIONS", "40"),
        ("ESCALE_PROXY_MAX_CONNECTIONS_PER_CLIENT", "0"),
        ("ESCALE_API_MAX_CONNECTIONS_PER_CLIENT", "8"),
    ])
    .await;
    let api: SocketAddr = server
        .api
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy: SocketAddr = server.proxy.as_deref().unwrap().parse().unwrap();

    // The proxy full of silent connections from many addresses; one more is shed.
    let mut flood = Vec::new();
    for i in 0..40 {
        flood.push(connect_from(&format!("127.0.1.{}", i + 1), proxy).await);
    }
    let mut shed = connect_from("127.0.1.200", proxy).await;
    assert!(
        closed_by_peer(&mut shed).await,
        "the proxy sheds past its cap"
    );

    // One API client holds its 8; its ninth is shed, another client is served.
    let mut mine = Vec::new();
    for _ in 0..8 {
        mine.push(connect_from("127.0.2.1", api).await);
    }
    let mut ninth = connect_from("127.0.2.1", api).await;
    assert!(
        closed_by_peer(&mut ninth).await,
        "the API sheds past the per-client cap"
    );
    let mut other = connect_from("127.0.2.2", api).await;
    other
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: escale\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Silence is not kept: the API's silent connections (no byte at all) are closed.
    for c in &mut mine {
        assert!(closed_by_peer(c).await, "a silent API connection is closed");
    }
    for c in &mut flood {
        assert!(
            closed_by_peer(c).await,
            "a silent proxy connection is closed"
        );
    }
    // The refusals are counted.
    let mut c = TcpStream::connect(api).await.unwrap();
    c.write_all(
        format!(
            "GET /metrics HTTP/1.1\r\nHost: escale\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            server.token
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut metrics = String::new();
    c.read_to_string(&mut metrics).await.unwrap();
    assert!(
        metrics.contains(
            "escale_listener_connections_shed_total{listener=\"proxy\",reason=\"listener\"} "
        ),
        "{metrics}"
    );
}
