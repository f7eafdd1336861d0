//! The fast path for HTTP/1.1 client connections, plain or TLS (when ALPN did not pick `h2`):
//! the common request is parsed with `httparse` and its response written straight to the
//! connection, in the connection's task.
//!
//! hyper's server is general: a dispatcher state machine, a header-read timer per request,
//! per-connection read and write buffers kept for the connection's whole life. Most requests
//! a proxy sees need none of it, so this module serves them itself and leaves everything
//! unusual to hyper. A request is served here when it is HTTP/1.1 with an origin-form target,
//! no body (no `Content-Length` other than 0, no `Transfer-Encoding`), not `HEAD` or
//! `CONNECT`, and with no `Upgrade` or `Expect`. At the first request that is not (a body,
//! an upgrade, HTTP/1.0, an HTTP/2 preface, a malformed or oversized head), the connection is
//! handed over, with the bytes already read, to hyper ([`Ended::Handoff`]), which serves it
//! for the rest of its life: every edge case keeps hyper's behaviour (and its error
//! answers).
//!
//! Per request the fast path costs one read, the header map, one write of the response head
//! together with the first body bytes, and usually no timer update: one `Sleep` per
//! connection is armed no later than the current deadline and, when it fires, re-armed from
//! the recorded times if traffic moved the deadline. The deadlines are hyper's: a head must arrive within
//! `header_read_timeout` of the connection's start or of its first byte, and a keep-alive
//! connection may stay quiet for `idle_timeout` between requests. An idle plain connection
//! holds no buffer: it waits for readiness, then reads ([`Transport`]).
//!
//! Responses: the status line and the headers as [`Proxy::handle`] produced them (hop-by-hop
//! headers are already gone), then the framing: the `Content-Length` given, or the body's
//! exact size, or `chunked`. A `Date` is added when missing (RFC 9110 §6.6.1), and
//! `Connection: close` when the client asked for it or the proxy is shutting down.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::body::ProxyBody;
use super::forward::Proxy;
use super::server::{ConnInfo, DRAINING, FORCE_CLOSE};
use super::ProxyConfig;

/// Headers accepted in a request head on the fast path (hyper's limit is the same).
const MAX_HEADERS: usize = 100;
/// Buffer reserved for reading request heads (grown for larger ones): most heads fit, and
/// the allocator serves this size from its per-thread cache.
const READ_SIZE: usize = 1024;
/// Body data up to this size is copied behind the head into one write.
const COALESCE_BELOW: usize = 16 * 1024;

/// How the fast path ended.
#[derive(Debug)]
pub(crate) enum Ended<T> {
    /// The connection is finished: closed by the client, timed out, shut down, or failed.
    Closed,
    /// A request the fast path does not serve: hyper serves the connection from here, starting
    /// with the bytes already read.
    Handoff(Prefixed<T>),
}

/// A client connection the fast path can read from.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Reads what is available into `buf` (growing it as needed); `Ok(0)` at end of stream.
    /// Cancel-safe: dropped while pending, it has consumed nothing.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

/// Makes room for a read in `buf`.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE.max(buf.len()));
    }
}

impl Transport for TcpStream {
    /// Waits for readiness before it allocates: an idle connection holds no read buffer.
    /// (The `poll_*` forms: they use the socket's one reader slot, where `readable()` would
    /// queue a waiter on a locked list at every wait.)
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        poll_fn(|cx| {
            std::task::ready!(self.poll_read_ready(cx))?;
            reserve(buf);
            tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf)
        })
        .await
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for tokio_rustls::server::TlsStream<T> {
    /// rustls keeps its own buffers whatever this side does: reads right away.
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        reserve(buf);
        self.read_buf(buf).await
    }
}

/// A parsed request head.
#[derive(Debug)]
// `Simple` is the common case: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// A request for the fast path, and whether the client asked to close after it.
    Simple(Request<Option<Incoming>>, bool),
    /// The head is not complete yet.
    Partial,
    /// Anything else, left to hyper; the buffer is untouched.
    Other,
}

/// Parses the request head at the start of `buf`. On [`Head::Simple`] the head is consumed
/// (its header values share its bytes; nothing is copied).
fn parse(buf: &mut BytesMut, max_head: usize) -> Head {
    // (name start, name end, value start, value end) as offsets into `buf`.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, method, path, count, close) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) if n <= max_head => n,
            Ok(httparse::Status::Partial) if buf.len() <= max_head => return Head::Partial,
            // Too large, too many headers, malformed: hyper answers.
            _ => return Head::Other,
        };
        let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
            return Head::Other;
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Head::Other;
        };
        if method == Method::HEAD || method == Method::CONNECT || !path.starts_with('/') {
            return Head::Other;
        }
        let base = buf.as_ptr() as usize;
        // Offsets fit in u32: the head is at most `max_head` bytes (a `usize` from the config,
        // capped well below 4 GiB by its validation).
        let offset = |p: *const u8| (p as usize - base) as u32;
        let mut close = false;
        for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
                || (name.eq_ignore_ascii_case(b"content-length") && h.value.trim_ascii() != b"0")
            {
                return Head::Other;
            }
            if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        return Head::Other;
                    }
                    close |= token.eq_ignore_ascii_case(b"close");
                }
            }
            let n = offset(h.name.as_ptr());
            let v = offset(h.value.as_ptr());
            *span = (n, n + h.name.len() as u32, v, v + h.value.len() as u32);
        }
        let p = offset(path.as_ptr());
        (
            len,
            method,
            (p as usize, p as usize + path.len()),
            req.headers.len(),
            close,
        )
    };
    let head = buf.split_to(len).freeze();
    match build(&head, method, path, &spans[..count]) {
        Some(request) => Head::Simple(request, close),
        None => {
            // Something `http` rejects that `httparse` accepted (an unusual character in the
            // target, say): put the head back for hyper, which answers 400.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Head::Other
        }
    }
}

/// The `http` request for a parsed head; `None` if `http` rejects a part of it.
fn build(
    head: &Bytes,
    method: Method,
    (p0, p1): (usize, usize),
    spans: &[(u32, u32, u32, u32)],
) -> Option<Request<Option<Incoming>>> {
    let uri = Uri::from_maybe_shared(head.slice(p0..p1)).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(n0, n1, v0, v1) in spans {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let name = HeaderName::from_bytes(&head[n0..n1]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(None);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How long a connection between requests waits, once the server drains, for a request its
/// client may already have sent.
pub(crate) const DRAIN_LINGER: Duration = Duration::from_millis(500);

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Serves `io` until it closes or a request needs hyper. `stop` is the server's shutdown
/// state: once draining, an idle connection closes and a busy one closes after its response;
/// on force close, whatever is in flight is dropped.
pub(crate) async fn serve<T: Transport>(
    mut io: T,
    conn: &ConnInfo,
    proxy: &Proxy,
    config: &ProxyConfig,
    stop: &watch::Receiver<u8>,
) -> Ended<T> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut drain_rx = stop.clone();
    // Completing with `()`: a `watch::Ref` (a lock guard) must not be held across an await.
    let draining = async {
        let _ = drain_rx.wait_for(|s| *s >= DRAINING).await;
    };
    tokio::pin!(draining);
    let mut force_rx = stop.clone();
    let forced = async {
        let _ = force_rx.wait_for(|s| *s >= FORCE_CLOSE).await;
    };
    tokio::pin!(forced);
    // When the current wait began: the connection's start, the end of the last response
    // (idle), or the first byte of a head.
    let mut since = Instant::now();
    let mut idle = false;
    // Set once draining found the connection between requests.
    let mut linger: Option<tokio::time::Instant> = None;
    let timer = tokio::time::sleep_until((since + config.header_read_timeout).into());
    tokio::pin!(timer);
    loop {
        // Wait for a complete request head.
        let (request, client_close) = loop {
            if !buf.is_empty() {
                match parse(&mut buf, config.max_header_bytes) {
                    Head::Simple(request, close) => break (request, close),
                    Head::Partial => {}
                    Head::Other => return Ended::Handoff(Prefixed { prefix: buf, io }),
                }
            }
            let empty = buf.is_empty();
            tokio::select! {
                biased;
                r = io.read_into(&mut buf) => match r {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {
                        if idle {
                            // The first byte of a new head: its read deadline starts now.
                            idle = false;
                            since = Instant::now();
                            arm(timer.as_mut(), since + config.header_read_timeout);
                        }
                    }
                },
                () = &mut timer => {
                    let limit = if idle { config.idle_timeout } else { config.header_read_timeout };
                    let deadline = since + limit;
                    if Instant::now() >= deadline {
                        return Ended::Closed;
                    }
                    timer.as_mut().reset(deadline.into());
                }
                // Shutting down: a connection between requests lingers a moment for a
                // request already on its way (answered with `Connection: close`), then
                // closes: closing at once would fail a request the client sent meanwhile.
                () = &mut draining, if empty && linger.is_none() => {
                    linger = Some(tokio::time::Instant::now() + DRAIN_LINGER);
                }
                () = sleep_until_opt(linger), if empty && linger.is_some() => return Ended::Closed,
            }
        };
        let close = client_close || *stop.borrow() >= DRAINING;
        let written = {
            let served = async {
                let response = proxy.handle(request, conn).await;
                write_response(&mut io, &mut out, response, close).await
            };
            // Pinned in place: the future is large, and moving it into `select!` copies it.
            tokio::pin!(served);
            tokio::select! {
                biased;
                r = &mut served => r,
                () = &mut forced => return Ended::Closed,
            }
        };
        if written.is_err() || close {
            // Bounded: a TLS close_notify waits on a client that may have stopped reading.
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return Ended::Closed;
        }
        // Keep-alive. Between requests the connection holds no read buffer unless it
        // already has the next request's bytes.
        if buf.is_empty() {
            buf = BytesMut::new();
        }
        idle = buf.is_empty();
        since = Instant::now();
        if idle {
            arm(timer.as_mut(), since + config.idle_timeout);
        }
    }
}

/// Makes sure `timer` fires no later than `deadline`. It may fire earlier: the wait then
/// re-arms it from the recorded times, so traffic costs no timer update as long as
/// deadlines only move later.
fn arm(timer: Pin<&mut tokio::time::Sleep>, deadline: Instant) {
    let deadline = tokio::time::Instant::from_std(deadline);
    if deadline < timer.deadline() {
        timer.reset(deadline);
    }
}

/// Writes `response` to `io`: the head, then the body as it comes, the head and the first
/// body bytes in one write when the body has them ready.
async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    response: Response<ProxyBody>,
    close: bool,
) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH
            || *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
        {
            // The framing and the connection's fate are this side's: written below from
            // the body this side sends, never copied from the backend.
            continue;
        } else if *name == header::DATE {
            has_date = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut chunked = false;
    if !bodiless {
        match body.size_hint().exact() {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    if !has_date {
        push_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        return send(io, out).await;
    }
    loop {
        // While the head is unwritten, look at the body without waiting: whatever it has
        // ready goes out with the head.
        let frame = if out.is_empty() {
            poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        } else {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    send(io, out).await?;
                    out.clear();
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            // Trailers are dropped.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if out.len() + data.len() <= COALESCE_BELOW {
            out.extend_from_slice(&data);
        } else {
            write_two(io, out, &data).await?;
            out.clear();
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if !body.is_end_stream() && !out.is_empty() {
            // More is coming, maybe later: what the client has so far goes out now.
            send(io, out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        send(io, out).await?;
        out.clear();
    }
    Ok(())
}

/// Writes `bytes` and flushes them (a TLS stream may hold records back until flushed).
async fn send<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Writes `a` then `b` with as few system calls as the socket allows, and flushes.
async fn write_two<W: AsyncWrite + Unpin>(io: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.write_all(b).await?;
    io.flush().await
}

thread_local! {
    /// `date: <IMF-fixdate>\r\n` and the second it was formatted for.
    static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

/// Appends a `Date` header for now, formatted at most once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            cached.1.clear();
            cached.1.extend_from_slice(b"date: ");
            cached
                .1
                .extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            cached.1.extend_from_slice(b"\r\n");
            cached.0 = secs;
        }
        out.extend_from_slice(&cached.1);
    });
}

/// A client socket and bytes already read from it, read again first: how a connection
/// reaches hyper after the fast path read part of it.
#[derive(Debug)]
pub(crate) struct Prefixed<T> {
    prefix: BytesMut,
    io: T,
}

impl<T> Prefixed<T> {
    /// Whether the client opened with HTTP/2's connection preface (h2c, prior knowledge).
    pub(crate) fn is_http2(&self) -> bool {
        self.prefix.starts_with(b"PRI * HTTP/2")
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            self.prefix = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(raw);
        (parse(&mut buf, 64 * 1024), buf)
    }

    #[test]
    fn simple_requests_are_served_here_and_consume_only_their_head() {
        let raw =
            "GET /a?b=1 HTTP/1.1\r\nHost: shop.test\r\nX-Custom: v\r\nAccept: */*\r\n\r\nGET /next";
        let (head, rest) = parsed(raw);
        let Head::Simple(req, close) = head else {
            panic!("not simple: {head:?}")
        };
        assert!(!close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/a?b=1");
        assert_eq!(req.headers()["host"], "shop.test");
        assert_eq!(req.headers()["x-custom"], "v");
        assert_eq!(req.headers().len(), 3);
        assert_eq!(
            &rest[..],
            b"GET /next",
            "pipelined bytes stay in the buffer"
        );

        let (head, _) = parsed("DELETE /x HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n");
        assert!(matches!(head, Head::Simple(_, true)), "{head:?}");
    }

    #[test]
    fn everything_else_goes_to_hyper_untouched() {
        for raw in [
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            "HEAD / HTTP/1.1\r\nhost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nhost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n",
            "GET / HTTP/1.0\r\nhost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            let (head, rest) = parsed(raw);
            assert!(matches!(head, Head::Other), "{raw:?} gave {head:?}");
            assert_eq!(&rest[..], raw.as_bytes(), "{raw:?}: the buffer is intact");
        }
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_go_to_hyper() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nhost: a\r\n").0,
            Head::Partial
        ));
        let mut big = BytesMut::from("GET / HTTP/1.1\r\nx-big: ");
        big.extend_from_slice(&[b'a'; 200]);
        assert!(matches!(parse(&mut big.clone(), 100), Head::Other));
        big.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&mut big, 100), Head::Other));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parsed(&many).0, Head::Other));
    }

    async fn written(response: Response<ProxyBody>, close: bool) -> String {
        let mut wire = Vec::new();
        write_response(&mut wire, &mut Vec::new(), response, close)
            .await
            .unwrap();
        String::from_utf8(wire).unwrap()
    }

    #[tokio::test]
    async fn responses_are_framed_by_length_and_keep_their_headers() {
        let mut resp = Response::new(ProxyBody::local("hello"));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r1"));
        resp.headers_mut().insert(
            "date",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        // Framing headers are this side's, whatever the response carried.
        resp.headers_mut()
            .insert("transfer-encoding", HeaderValue::from_static("chunked"));
        resp.headers_mut()
            .insert("connection", HeaderValue::from_static("keep-alive"));
        assert_eq!(
            written(resp, false).await,
            "HTTP/1.1 404 Not Found\r\nx-request-id: r1\r\n\
             date: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 5\r\n\r\nhello"
        );
    }

    #[tokio::test]
    async fn bodiless_statuses_get_no_body_and_close_is_announced() {
        let mut resp = Response::new(ProxyBody::Local(None));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp.headers_mut()
            .insert("content-length", HeaderValue::from_static("0"));
        let text = written(resp, true).await;
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.contains("\r\ndate: "), "a date is added: {text}");
        assert!(text.ends_with("\r\nconnection: close\r\n\r\n"), "{text}");

        let mut resp = Response::new(ProxyBody::Local(None));
        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
        let text = written(resp, false).await;
        assert!(text.contains("\r\ncontent-length: 0\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn dates_are_imf_fixdate_headers() {
        let mut out = Vec::new();
        push_date(&mut out);
        push_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2);
        let value = lines[0].strip_prefix("date: ").unwrap();
        assert!(httpdate::parse_http_date(value).is_ok(), "{value}");
        assert!(value.ends_with(" GMT"), "{value}");
    }
}
