//! Request smuggling through the proxy, tried as an attacker would (issue #11): whatever a
//! client sends, the backend sees exactly the requests the proxy meant to send, and one
//! client's bytes never reach another client's exchange, even on one pooled upstream
//! connection. Every trick runs over each way in: plain HTTP/1.1 (the fast path, which hands
//! bodies to hyper), HTTP/1.1 over TLS, and HTTP/2 (cleartext prior knowledge and TLS ALPN).
//!
//! The backend here is strict, as nginx or Node are: it frames each request by its own
//! `Content-Length` / `Transfer-Encoding` and records what it parsed, so a body the proxy
//! sent without framing shows up as an extra request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::{route, start_proxy, table, tls};
use escale::proxy::ProxyConfig;

const HOST: &str = "shop.example.test";
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: shop.example.test\r\n\r\n";

/// One request as the strict backend parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// Which accepted upstream connection carried it (0, 1, ...).
    conn: usize,
    method: String,
    path: String,
    body: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A strict HTTP/1.1 backend: frames requests by `Content-Length` or chunked coding (both,
/// or two lengths, is a 400 and a close), records each, and answers `METHOD PATH BODYLEN`.
async fn strict_backend() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = log.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let conn = accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_strict(tcp, conn, seen.clone()));
        }
    });
    (addr, log)
}

async fn serve_strict(mut tcp: TcpStream, conn: usize, log: Log) {
    let mut buf = Vec::new();
    loop {
        // The head.
        let (len, method, path, lengths, chunked) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let mut lengths = Vec::new();
                    let mut chunked = false;
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            lengths.push(String::from_utf8_lossy(h.value).into_owned());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = true;
                        }
                    }
                    break (
                        len,
                        req.method.unwrap().to_string(),
                        req.path.unwrap().to_string(),
                        lengths,
                        chunked,
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if !fill(&mut tcp, &mut buf).await {
                        return;
                    }
                }
                Err(_) => return reject(&mut tcp).await,
            }
        };
        buf.drain(..len);
        let body = if chunked {
            if !lengths.is_empty() {
                return reject(&mut tcp).await;
            }
            match read_chunked(&mut tcp, &mut buf).await {
                Some(b) => b,
                None => return,
            }
        } else {
            let n = match lengths.as_slice() {
                [] => 0,
                [one] => match one.trim().parse::<usize>() {
                    Ok(n) if one.trim().bytes().all(|b| b.is_ascii_digit()) => n,
                    _ => return reject(&mut tcp).await,
                },
                _ => return reject(&mut tcp).await,
            };
            while buf.len() < n {
                if !fill(&mut tcp, &mut buf).await {
                    return;
                }
            }
            buf.drain(..n).collect()
        };
        let answer = format!("{method} {path} {}", body.len());
        log.lock().unwrap().push(Seen {
            conn,
            method,
            path,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if tcp.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn reject(tcp: &mut TcpStream) {
    let _ = tcp
        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
}

/// Reads more into `buf`; false at EOF or error.
async fn fill(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match io.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// Reads one line (without CRLF) from the front of `buf`.
async fn line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let l = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Some(l);
        }
        if !fill(tcp, buf).await {
            return None;
        }
    }
}

async fn read_chunked(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size = line(tcp, buf).await?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers up to the empty line.
            while !line(tcp, buf).await?.is_empty() {}
            return Some(body);
        }
        while buf.len() < size + 2 {
            if !fill(tcp, buf).await {
                return None;
            }
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
    }
}

/// Reads one content-length framed response: (status, body).
async fn response(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> (u16, String) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = resp.parse(buf).unwrap() {
            let status = resp.code.unwrap();
            let n: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            while buf.len() < len + n {
                assert!(fill(io, buf).await, "closed in the middle of a response");
            }
            let body = String::from_utf8_lossy(&buf[len..len + n]).into_owned();
            buf.drain(..len + n);
            return (status, body);
        }
        assert!(fill(io, buf).await, "closed before a complete response");
    }
}

/// The hop-by-hop tricks with framing headers, each as the extra header lines of a POST whose
/// body is a complete second request.
fn tricks() -> Vec<(&'static str, String)> {
    let body = SMUGGLED;
    let sized = |extra: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: {HOST}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let chunked = |extra: &str| {
        format!(
            "POST / HTTP/1.1\r\nHost: {HOST}\r\n{extra}Transfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    vec![
        ("(none: a plain POST, the control)", sized("")),
        (
            "keep-alive, Content-Length",
            sized("Connection: keep-alive, Content-Length\r\n"),
        ),
        ("Content-Length", sized("Connection: Content-Length\r\n")),
        (
            "Transfer-Encoding (length)",
            sized("Connection: Transfer-Encoding\r\n"),
        ),
        ("Host", sized("Connection: Host\r\n")),
        (
            "two Connection headers",
            sized("Connection: keep-alive\r\nConnection: content-length\r\n"),
        ),
        (
            "Transfer-Encoding (chunked)",
            chunked("Connection: Transfer-Encoding\r\n"),
        ),
        (
            "Content-Length (chunked)",
            chunked("Connection: Content-Length\r\n"),
        ),
        ("X-Forwarded-For", sized("Connection: X-Forwarded-For\r\n")),
    ]
}

/// What the backend must have seen for one attack and the victim's request after it: the
/// attacker's POST with its whole body, then the victim's GET, on one upstream connection.
fn assert_exact(log: &Log, what: &str) {
    let seen = std::mem::take(&mut *log.lock().unwrap());
    let summary: Vec<(String, String)> = seen
        .iter()
        .map(|s| (s.method.clone(), s.path.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("POST".to_string(), "/".to_string()),
            ("GET".to_string(), "/victim".to_string())
        ],
        "{what}: the backend saw {seen:#?}"
    );
    assert_eq!(seen[0].body, SMUGGLED, "{what}: the body arrived whole");
    assert_eq!(
        seen[0].conn, seen[1].conn,
        "{what}: both requests shared one pooled upstream connection"
    );
}

/// Runs every trick over raw HTTP/1.1 connections made by `connect`, addressed to `host`, each
/// attack followed by a victim's request on another client connection.
async fn attack_http1<S, F, Fut>(what: &str, log: &Log, host: &str, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    for (name, raw) in tricks() {
        let what = format!("{what}, Connection: {name}");
        // Only the head's Host: the smuggled request in the body stays as it is.
        let raw = raw.replacen(
            &format!("Host: {HOST}\r\n"),
            &format!("Host: {host}\r\n"),
            1,
        );
        let mut attacker = connect().await;
        let mut buf = Vec::new();
        attacker.write_all(raw.as_bytes()).await.unwrap();
        let (status, body) = response(&mut attacker, &mut buf).await;
        assert_eq!(status, 200, "{what}: {body}");
        assert_eq!(body, format!("POST / {}", SMUGGLED.len()), "{what}");

        let mut victim = connect().await;
        let mut vbuf = Vec::new();
        victim
            .write_all(
                format!("GET /victim HTTP/1.1\r\nHost: {host}\r\nAuthorization: secret\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let (status, body) = response(&mut victim, &mut vbuf).await;
        assert_eq!((status, body.as_str()), (200, "GET /victim 0"), "{what}");
        // Nothing else is waiting for the attacker: no second response.
        assert!(
            buf.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert_exact(log, &what);
    }
}

#[tokio::test]
async fn framing_tricks_never_smuggle_over_plain_http1() {
    let (backend, log) = strict_backend().await;
    let p = start_proxy(
        table(vec![(HOST, route("shop", &[("s1", backend)], 1 << 20))]),
        ProxyConfig::default(),
    )
    .await;
    let addr = p.addr;
    attack_http1("plain HTTP/1.1", &log, HOST, || async move {
        TcpStream::connect(addr).await.unwrap()
    })
    .await;
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn framing_tricks_never_smuggle_over_tls_http1() {
    let (backend, log) = strict_backend().await;
    let s = tls::start(table(vec![(
        "secure.test",
        route("shop", &[("s1", backend)], 1 << 20),
    )]))
    .await;
    // The TLS listener checks Host against SNI: the same tricks, addressed to secure.test.
    let setup = &s;
    attack_http1("TLS HTTP/1.1", &log, "secure.test", || async move {
        tls::connect(setup, &[b"http/1.1"]).await
    })
    .await;
    let _ = s.stop.send(());
    s.task.await.unwrap().unwrap();
}

/// HTTP/2 has no `Connection` header (the proxy's hyper server refuses one): the class there
/// is a body whose length is declared, or not, ending up framed exactly once upstream.
async fn attack_http2<S>(io: S, authority: &str, log: &Log, what: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    for declared in [true, false] {
        let what = format!("{what}, content-length declared: {declared}");
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("http://{authority}/"));
        if declared {
            req = req.header("content-length", SMUGGLED.len());
        }
        let body = Full::new(Bytes::from_static(SMUGGLED.as_bytes()));
        let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, format!("POST / {}", SMUGGLED.len()), "{what}");
        let req = Request::builder()
            .uri(format!("http://{authority}/victim"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, "GET /victim 0", "{what}");
        assert_exact(log, &what);
    }
}

#[tokio::test]
async fn request_bodies_never_smuggle_over_http2() {
    let (backend, log) = strict_backend().await;
    let p = start_proxy(
        table(vec![(HOST, route("shop", &[("s1", backend)], 1 << 20))]),
        ProxyConfig::default(),
    )
    .await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    attack_http2(tcp, HOST, &log, "h2c prior knowledge").await;
    p.shutdown().await.unwrap();

    let (backend, log) = strict_backend().await;
    let s = tls::start(table(vec![(
        "secure.test",
        route("shop", &[("s1", backend)], 1 << 20),
    )]))
    .await;
    let io = tls::connect(&s, &[b"h2"]).await;
    attack_http2(io, "secure.test", &log, "TLS h2").await;
    let _ = s.stop.send(());
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn connect_is_refused_not_forwarded() {
    let (backend, log) = strict_backend().await;
    let p = start_proxy(
        table(vec![(HOST, route("shop", &[("s1", backend)], 1 << 20))]),
        ProxyConfig::default(),
    )
    .await;
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, body) = response(&mut tcp, &mut buf).await;
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("CONNECT"), "{body}");
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing reached the backend"
    );
    p.shutdown().await.unwrap();
}
