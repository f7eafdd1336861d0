//! The upstream HTTP/1.1 client: keep-alive connections to backends, driven by the request's
//! own task.
//!
//! A general-purpose client (hyper's) runs every connection as its own task and talks to it
//! through channels, and spawns one more task per request to put the connection back in its
//! pool. A proxy does not need that: the client connection task that asked for the response is
//! the one that will stream it, so here the exchange is plain code in that task. Per request:
//! the head is serialized once into [`RequestHead`] (kept for a retry), one `write` sends it
//! (plus the body, streamed by [`RequestPump`], chunked when its length is unknown), the
//! response head is read and parsed with `httparse`, and the [`ResponseBody`] reads the body
//! straight from the socket (content-length, chunked or until close) as the client consumes
//! it. When the body ends on a reusable connection it goes back to the backend's [`IdlePool`].
//!
//! Framing follows RFC 9112 §6: no body for HEAD, 1xx, 204 and 304; `Transfer-Encoding`
//! (chunked last) wins over `Content-Length`; conflicting lengths are an error; otherwise the
//! body runs until the backend closes. Interim 1xx responses other than 101 are skipped (the
//! client's `Expect: 100-continue` is answered by the proxy's server side). Chunked trailers
//! are read and dropped. A connection is reused only when both messages were complete, the
//! response allowed keep-alive and no byte is left over.
//!
//! Idle connections are checked before reuse without a system call: the runtime has already
//! recorded whether the socket became readable (a FIN, usually the backend's keep-alive
//! timeout) since its last read drained it.
//!
//! Connections to a backend are bounded and kept ([`IdlePool`]): a worker opens at most
//! `upstream_max_connections_per_backend` to one instance, every one of them stays pooled
//! when its exchange ends, and a request that finds them all busy waits for one to come back
//! (up to the connect timeout). HTTP/2 is why: a client connection multiplexes hundreds of
//! streams, and each needs an HTTP/1.1 connection of its own for as long as it runs. A pool
//! that kept fewer idle connections than the streams in flight closed the surplus after
//! every burst and reconnected on the next; each close left a socket in TIME_WAIT for a
//! minute, and once tens of thousands of those hold the ephemeral ports towards the backend's
//! address, every connect searches that port space (and finally fails): throughput fell
//! from round to round of a benchmark while the CPU per request grew tenfold.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use super::headers::{
    has_token, is_hop_by_hop, push_ip, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use super::ProxyError;

/// Headers accepted in a backend's response head.
const MAX_HEADERS: usize = 100;

/// Largest response head accepted from a backend.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Read size for response bodies.
const READ_CHUNK: usize = 16 * 1024;

/// One TCP connection to a backend and the bytes read from it but not consumed yet.
#[derive(Debug)]
pub(crate) struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Taken from a pool (it carried an earlier exchange).
    reused: bool,
    /// Its place among the backend's open connections, given back when it closes.
    slot: Option<Slot>,
}

/// One of a backend's open connections, counted from before the connect until the socket
/// closes (or becomes a tunnel, which the pool no longer counts).
#[derive(Debug)]
pub(crate) struct Slot(Weak<PoolShared>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.open.fetch_sub(1, Relaxed);
            pool.freed.notify_one();
        }
    }
}

impl Conn {
    /// Opens a connection to `addr` within `timeout`.
    pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, Failed> {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(io)) => {
                let _ = io.set_nodelay(true);
                Ok(Conn {
                    io,
                    buf: BytesMut::new(),
                    reused: false,
                    slot: None,
                })
            }
            Ok(Err(e)) => Err(Failed::Connect(e)),
            Err(_) => Err(Failed::ConnectTimeout),
        }
    }

    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Counts this connection in its pool's slot until it closes.
    pub(crate) fn hold(&mut self, slot: Slot) {
        self.slot = Some(slot);
    }

    /// The socket and the bytes already read past the response head (an upgraded tunnel
    /// starts with them).
    pub(crate) fn into_parts(self) -> (TcpStream, BytesMut) {
        // A tunnel is no longer one of the pool's connections: its slot is given back.
        (self.io, self.buf)
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// True when nothing arrived on the idle socket since its last read drained it (no FIN,
    /// no stray bytes). Uses the readiness the runtime recorded; reads only if it says
    /// readable, to tell a FIN from a stale flag.
    fn still_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// The connections of one worker to one backend: the idle ones (newest last), how many are
/// open (idle, busy or connecting), and the requests waiting for one.
#[derive(Debug, Default)]
pub(crate) struct IdlePool(Arc<PoolShared>);

#[derive(Debug, Default)]
pub(crate) struct PoolShared {
    conns: Mutex<Vec<(Conn, Instant)>>,
    open: AtomicUsize,
    /// Woken when a connection goes idle or closes.
    freed: tokio::sync::Notify,
}

/// What a request gets from [`IdlePool::checkout`].
#[derive(Debug)]
pub(crate) enum Checkout {
    /// An idle connection, still open.
    Idle(Conn),
    /// Room for a new connection: connect, then [`Conn::hold`] the slot.
    Connect(Slot),
}

impl IdlePool {
    /// An idle connection younger than `max_age`, or room to open one (at most `max_open`
    /// are open), waiting until `deadline` for either. `fresh` wants a new connection (the
    /// retry after a pooled one failed): an idle one is closed to make room if need be.
    /// `None` when the deadline passed with every connection busy.
    pub(crate) async fn checkout(
        &self,
        max_age: Duration,
        max_open: usize,
        fresh: bool,
        deadline: tokio::time::Instant,
    ) -> Option<Checkout> {
        let shared = &self.0;
        if let Some(got) = self.try_checkout(max_age, max_open, fresh) {
            return Some(got);
        }
        loop {
            // Registered before looking again, so a connection freed in between is not missed.
            let freed = shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(got) = self.try_checkout(max_age, max_open, fresh) {
                return Some(got);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// [`IdlePool::checkout`] without waiting.
    fn try_checkout(&self, max_age: Duration, max_open: usize, fresh: bool) -> Option<Checkout> {
        if !fresh {
            if let Some(conn) = self.take(max_age) {
                return Some(Checkout::Idle(conn));
            }
        }
        loop {
            let reserved = self
                .0
                .open
                .fetch_update(Relaxed, Relaxed, |n| (n < max_open.max(1)).then_some(n + 1))
                .is_ok();
            if reserved {
                return Some(Checkout::Connect(Slot(Arc::downgrade(&self.0))));
            }
            if !(fresh && self.close_oldest()) {
                return None;
            }
        }
    }

    /// The most recently used idle connection that is still open and younger than `max_age`.
    pub(crate) fn take(&self, max_age: Duration) -> Option<Conn> {
        let mut conns = self.0.conns.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((conn, since)) = conns.pop() {
            if since.elapsed() > max_age {
                // The newest is too old: so are the others.
                conns.clear();
                return None;
            }
            if conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Closes the idle connection unused the longest; `false` when none is idle.
    fn close_oldest(&self) -> bool {
        let mut conns = self.0.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if conns.is_empty() {
            return false;
        }
        drop(conns.remove(0));
        true
    }

    /// Keeps `conn` for reuse unless `max` connections are already idle.
    pub(crate) fn put(&self, mut conn: Conn, max: usize) {
        conn.reused = true;
        let mut conns = self.0.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if conns.len() < max {
            conns.push((conn, Instant::now()));
            drop(conns);
            self.0.freed.notify_one();
        }
    }

    /// Closes connections idle for longer than `max_age`.
    pub(crate) fn sweep(&self, max_age: Duration) {
        let mut conns = self.0.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|(_, since)| since.elapsed() <= max_age);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.conns.lock().unwrap().len()
    }

    /// Open connections (idle, busy or connecting).
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.0.open.load(Relaxed)
    }
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body.
    Empty,
    /// A body of exactly this many bytes, sent with the proxy's own `Content-Length`.
    Length(u64),
    /// Length unknown: `Transfer-Encoding: chunked`.
    Chunked,
}

/// A serialized request head, ready to be written to any backend (and again for a retry).
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    bytes: Vec<u8>,
    framing: RequestFraming,
    /// HEAD requests get no response body whatever the headers say.
    head_method: bool,
}

/// What the proxy adds to a forwarded request.
#[derive(Debug)]
pub(crate) struct Forwarding<'a> {
    /// The client's address, appended to `X-Forwarded-For`.
    pub(crate) client: IpAddr,
    /// The client connection is TLS (`X-Forwarded-Proto`).
    pub(crate) https: bool,
    /// The host the client addressed: sent as `Host` and `X-Forwarded-Host`.
    pub(crate) host: &'a HeaderValue,
    /// An HTTP/1.1 upgrade: `Upgrade` is kept and `Connection: upgrade` sent.
    pub(crate) upgrading: bool,
}

/// Headers the proxy writes itself, whatever the client sent or its `Connection` names:
/// the framing (`Content-Length`, `Transfer-Encoding`), the connection's fate and `Host`,
/// `X-Forwarded-*`, and `Expect` (the proxy answers `100-continue` itself).
fn written_by_proxy(name: &HeaderName) -> bool {
    *name == header::HOST
        || *name == header::CONTENT_LENGTH
        || *name == header::TRANSFER_ENCODING
        || *name == header::CONNECTION
        || *name == header::EXPECT
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
}

impl RequestHead {
    /// Serializes `method path HTTP/1.1` and the client's `headers` as the backend gets them,
    /// in one pass with no header map edits.
    ///
    /// The message's framing is always the proxy's own, written from `body_len` (what the
    /// client connection's parser established: `Some(0)` no body, `Some(n)` exactly `n`
    /// bytes, `None` unknown and so chunked); the client's `Content-Length` and
    /// `Transfer-Encoding` are never copied, so no header trick (`Connection:
    /// Content-Length`, duplicates, odd spellings) can make the backend frame the body
    /// differently from the proxy. Hop-by-hop headers (RFC 9110 §7.6.1: those the
    /// `Connection` header names, `Connection`, `Keep-Alive`, `Proxy-*`, `TE` but
    /// `trailers`, `Trailer`, `Upgrade` unless upgrading) and `Expect` are left out; `Host`
    /// and `X-Forwarded-For/-Proto/-Host` are written from `fwd`, the client address
    /// appended to any `X-Forwarded-For` it sent.
    pub(crate) fn new(
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        fwd: &Forwarding<'_>,
        body_len: Option<u64>,
    ) -> Self {
        let framing = match body_len {
            Some(0) => RequestFraming::Empty,
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        };
        let has_connection = headers.contains_key(header::CONNECTION);
        let mut te_trailers = false;
        let mut out = Vec::with_capacity(256 + headers.len() * 32);
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(fwd.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            if written_by_proxy(name) {
                continue;
            }
            let keep_upgrade = fwd.upgrading && *name == header::UPGRADE;
            if is_hop_by_hop(name) && !keep_upgrade {
                if *name == header::TE {
                    te_trailers |= has_token(headers, &header::TE, "trailers");
                }
                continue;
            }
            if has_connection
                && !keep_upgrade
                && has_token(headers, &header::CONNECTION, name.as_str())
            {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for v in headers.get_all(&X_FORWARDED_FOR) {
            let v = v.as_bytes().trim_ascii();
            if !v.is_empty() {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        }
        push_ip(&mut out, fwd.client.to_canonical());
        out.extend_from_slice(if fwd.https {
            b"\r\nx-forwarded-proto: https\r\nx-forwarded-host: "
        } else {
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: "
        });
        out.extend_from_slice(fwd.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        if te_trailers {
            out.extend_from_slice(b"te: trailers\r\n");
        }
        if fwd.upgrading {
            out.extend_from_slice(b"connection: upgrade\r\n");
        }
        match framing {
            RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            RequestFraming::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            RequestFraming::Empty
                if headers.contains_key(header::CONTENT_LENGTH)
                    || matches!(*method, Method::POST | Method::PUT | Method::PATCH) =>
            {
                out.extend_from_slice(b"content-length: 0\r\n")
            }
            RequestFraming::Empty => {}
        }
        out.extend_from_slice(b"\r\n");
        RequestHead {
            bytes: out,
            framing,
            head_method: *method == Method::HEAD,
        }
    }

    #[cfg(test)]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Why an exchange failed, with what a retry needs to know.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The TCP connection could not be opened: nothing was sent.
    Connect(io::Error),
    /// The TCP connection was not opened in time: nothing was sent.
    ConnectTimeout,
    /// Writing the request head failed: the backend cannot have acted on it.
    Write(io::Error),
    /// The connection failed or closed before a complete response head arrived.
    NoResponse(io::Error),
    /// The backend's response head is not valid HTTP/1.1.
    Protocol(&'static str),
    /// The client's body failed or exceeded the route limit while being sent.
    ClientBody(ProxyError),
}

/// A backend's response head and the body to stream.
#[derive(Debug)]
pub(crate) struct Exchanged {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: ResponseBody,
}

/// Sends `head` and `body` on `conn` and reads the response head, sending the body meanwhile
/// (a backend may answer before it read everything, or echo as it reads). On failure the
/// client body comes back if it was never polled, so the request can go elsewhere.
pub(crate) async fn exchange(
    mut conn: Conn,
    head: &RequestHead,
    body: UpstreamBody,
) -> Result<Exchanged, (Failed, Option<UpstreamBody>)> {
    if let Err(e) = conn.io.write_all(&head.bytes).await {
        return Err((Failed::Write(e), Some(body)));
    }
    let mut pump = match head.framing {
        RequestFraming::Empty => None,
        framing => Some(RequestPump::new(body, framing)),
    };
    let parsed = std::future::poll_fn(|cx| {
        if let Some(p) = pump.as_mut() {
            match p.poll_send(cx, &mut conn.io) {
                Poll::Ready(Ok(())) => pump = None,
                Poll::Ready(Err(PumpError::Client(e))) => {
                    return Poll::Ready(Err(Failed::ClientBody(e)))
                }
                // The backend stopped reading: it may still answer (413, say).
                Poll::Ready(Err(PumpError::Write)) => p.abandon(),
                Poll::Pending => {}
            }
        }
        poll_head(&mut conn, cx)
    })
    .await;
    let (status, headers, framing, keep_alive) = match parsed {
        Ok(h) => h,
        Err(f) => return Err((f, None)),
    };
    let framing = if head.head_method {
        Framing::Empty
    } else {
        framing
    };
    // A request body the backend stopped reading leaves the connection unusable.
    let abandoned = pump.as_ref().is_some_and(|p| p.abandoned);
    let pump = pump.filter(|p| !p.abandoned);
    Ok(Exchanged {
        status,
        headers,
        body: ResponseBody {
            conn: Some(conn),
            framing,
            reusable: keep_alive && !abandoned,
            pump,
            returned: None,
        },
    })
}

/// Reads and parses the response head, skipping interim (1xx but 101) responses.
fn poll_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
) -> Poll<Result<(StatusCode, HeaderMap, Framing, bool), Failed>> {
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(h)) => return Poll::Ready(Ok(h)),
                None if conn.buf.len() >= MAX_HEAD_BYTES => {
                    return Poll::Ready(Err(Failed::Protocol("response head too large")))
                }
                None => {}
            }
        }
        match ready!(conn.poll_fill(cx)) {
            Ok(0) => {
                return Poll::Ready(Err(Failed::NoResponse(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete response head",
                ))))
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Failed::NoResponse(e))),
        }
    }
}

enum Parsed {
    Interim,
    Final((StatusCode, HeaderMap, Framing, bool)),
}

/// Parses one response head at the start of `buf` and consumes it; `None` if incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Parsed>, Failed> {
    // Header positions as offsets into `buf`, so the head can be split off without copying.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, http11, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Failed::Protocol("too many response headers"))
            }
            Err(_) => return Err(Failed::Protocol("malformed response head")),
        };
        let base = buf.as_ptr() as usize;
        // Offsets fit: the head is at most MAX_HEAD_BYTES (plus one read) long.
        let offset = |p: *const u8| (p as usize - base) as u32;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let name = offset(h.name.as_ptr());
            let value = offset(h.value.as_ptr());
            *span = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version == Some(1),
            resp.headers.len(),
        )
    };
    let status =
        StatusCode::from_u16(code).map_err(|_| Failed::Protocol("invalid response status"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    // Copied out (one small allocation) so the connection keeps its read buffer for reuse.
    let head = Bytes::copy_from_slice(&buf[..len]);
    buf.advance(len);
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = !http11 || status == StatusCode::SWITCHING_PROTOCOLS;
    for &(n0, n1, v0, v1) in &spans[..count] {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let raw_value = &head[v0..v1];
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| Failed::Protocol("invalid response header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| Failed::Protocol("invalid response header value"))?;
        if name == header::CONTENT_LENGTH {
            // RFC 9112 §6.3: anything but one run of digits (a sign, a list, a second
            // header) makes the framing invalid, and a proxy answers 502.
            if length.is_some() {
                return Err(Failed::Protocol("more than one content-length header"));
            }
            length = Some(
                parse_content_length(raw_value)
                    .ok_or(Failed::Protocol("invalid content-length"))?,
            );
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the last coding matters: `chunked` must be it for chunked framing.
            chunked = raw_value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in raw_value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_encoding {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); the length is dropped,
        // and a connection whose response carried both is never reused (§6.1).
        if length.is_some() {
            close = true;
        }
        headers.remove(header::CONTENT_LENGTH);
        if chunked {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = !close && !matches!(framing, Framing::Close);
    Ok(Some(Parsed::Final((status, headers, framing, keep_alive))))
}

/// A `Content-Length` value: ASCII digits only (optional surrounding white space), no sign,
/// no list, no overflow.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Body data at or below this size is copied out of the read buffer rather than split off
/// it: a small copy is cheaper than giving up the buffer (a split shares its allocation, so
/// the next read needs a new one).
const COPY_BELOW: usize = 4096;

/// The first `n` bytes of `buf`, as `Bytes`.
fn take(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= COPY_BELOW {
        let data = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        data
    } else {
        buf.split_to(n).freeze()
    }
}

/// How much of the response body is left.
#[derive(Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Close,
}

/// Chunked transfer coding decoder (RFC 9112 §7.1), incremental over a buffer.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex chunk size.
    #[default]
    Size,
    /// Skipping a chunk extension up to the line end.
    Extension,
    /// Expecting the LF ending the size line.
    SizeLf,
    /// Inside chunk data: `size` bytes left.
    Data,
    /// Expecting the CR (or LF) after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Skipping a trailer field line.
    TrailerLine,
    /// Expecting the LF of the final empty line.
    EndLf,
    Done,
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Chunked {
    /// Consumes framing bytes from `buf` and returns the next data slice, or what is missing.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            if self.state == ChunkState::Done {
                return Ok(Decoded::Done);
            }
            if self.state == ChunkState::Data {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = ChunkState::DataCr;
                }
                return Ok(Decoded::Data(take(buf, n)));
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.state = match (self.state, b) {
                (ChunkState::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or("chunk size overflow")?;
                    ChunkState::Size
                }
                (ChunkState::Size, b';' | b' ' | b'\t') => ChunkState::Extension,
                (ChunkState::Size | ChunkState::Extension, b'\r') => ChunkState::SizeLf,
                (ChunkState::Size | ChunkState::Extension | ChunkState::SizeLf, b'\n') => {
                    if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    }
                }
                (ChunkState::Extension, _) => ChunkState::Extension,
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataCr | ChunkState::DataLf, b'\n') => ChunkState::Size,
                (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                (ChunkState::TrailerStart | ChunkState::EndLf, b'\n') => ChunkState::Done,
                (ChunkState::TrailerLine, b'\n') => ChunkState::TrailerStart,
                (ChunkState::TrailerStart | ChunkState::TrailerLine, _) => ChunkState::TrailerLine,
                _ => return Err("malformed chunked body"),
            };
        }
    }
}

/// Sends the client's body to the backend, framed, frame by frame.
#[derive(Debug)]
pub(crate) struct RequestPump {
    body: UpstreamBody,
    /// With length framing, the bytes still owed: the body must hold exactly the declared
    /// length (more would be read by the backend as another request). `None`: chunked.
    remaining: Option<u64>,
    pending: VecDeque<Bytes>,
    ended: bool,
    /// The backend stopped accepting the body; the rest is dropped.
    abandoned: bool,
}

#[derive(Debug)]
enum PumpError {
    /// The client's body failed or went over the limit.
    Client(ProxyError),
    /// Writing to the backend failed.
    Write,
}

impl RequestPump {
    fn new(body: UpstreamBody, framing: RequestFraming) -> Self {
        let remaining = match framing {
            RequestFraming::Chunked => None,
            RequestFraming::Length(n) => Some(n),
            RequestFraming::Empty => Some(0),
        };
        RequestPump {
            body,
            remaining,
            pending: VecDeque::new(),
            ended: false,
            abandoned: false,
        }
    }

    fn abandon(&mut self) {
        self.abandoned = true;
        self.pending.clear();
    }

    /// Writes what can be written now; `Ready(Ok)` once the whole body is sent.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut TcpStream,
    ) -> Poll<Result<(), PumpError>> {
        if self.abandoned {
            return Poll::Pending;
        }
        loop {
            while !self.pending.is_empty() {
                let mut slices = [IoSlice::new(&[]); 3];
                let n = self.pending.len().min(3);
                for (slot, b) in slices.iter_mut().zip(self.pending.iter()) {
                    *slot = IoSlice::new(b);
                }
                let mut written =
                    match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])) {
                        Ok(0) | Err(_) => return Poll::Ready(Err(PumpError::Write)),
                        Ok(w) => w,
                    };
                while written > 0 {
                    let front = self
                        .pending
                        .front_mut()
                        .expect("written bytes were pending");
                    let k = written.min(front.len());
                    front.advance(k);
                    written -= k;
                    if front.is_empty() {
                        self.pending.pop_front();
                    }
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if data.is_empty() {
                            continue;
                        }
                        // The body counted this frame already.
                        let sent = self.body.seen();
                        let chunked = self.remaining.is_none();
                        if let Some(left) = self.remaining.as_mut() {
                            let n = data.len() as u64;
                            if n > *left {
                                let declared = sent - n + *left;
                                return Poll::Ready(Err(PumpError::Client(
                                    ProxyError::ClientBodyLength { declared, sent },
                                )));
                            }
                            *left -= n;
                        }
                        if chunked {
                            self.pending
                                .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                            self.pending.push_back(data);
                            self.pending.push_back(Bytes::from_static(b"\r\n"));
                        } else {
                            self.pending.push_back(data);
                        }
                    }
                    // Request trailers are not forwarded.
                }
                Some(Err(e)) => return Poll::Ready(Err(PumpError::Client(e))),
                None => {
                    if let Some(left) = self.remaining.filter(|&l| l > 0) {
                        return Poll::Ready(Err(PumpError::Client(ProxyError::ClientBodyLength {
                            declared: self.body.seen() + left,
                            sent: self.body.seen(),
                        })));
                    }
                    self.ended = true;
                    if self.remaining.is_none() {
                        self.pending.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
            }
        }
    }
}

/// Where a finished connection goes: the backend's idle pool and its size limit.
#[derive(Debug)]
pub(crate) struct ReturnTo {
    pub(crate) pool: std::sync::Arc<super::balance::BackendState>,
    pub(crate) max_idle: usize,
}

/// One step of reading the response body.
enum Step {
    Data(Bytes),
    /// The last bytes of the body.
    Last(Bytes),
    End,
    Fail(io::Error),
    Read,
}

/// A backend's response body, read from the connection as the client consumes it.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    /// The rest of the request body, still being sent.
    pump: Option<RequestPump>,
    returned: Option<ReturnTo>,
}

impl ResponseBody {
    /// Returns the connection to `to` when the exchange ends cleanly.
    pub(crate) fn return_to(&mut self, to: ReturnTo) {
        self.returned = Some(to);
        if matches!(self.framing, Framing::Empty) {
            self.finish();
        }
    }

    /// The connection, for an upgraded tunnel (after a `101`).
    pub(crate) fn into_conn(mut self) -> Option<Conn> {
        self.conn.take()
    }

    /// The body ended: pool the connection if both messages completed cleanly.
    fn finish(&mut self) {
        self.framing = Framing::Empty;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable && self.pump.is_none() && conn.buf.is_empty() {
            if let Some(to) = &self.returned {
                to.pool.idle.put(conn, to.max_idle);
            }
        }
    }

    fn error(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        self.conn = None;
        self.framing = Framing::Empty;
        Poll::Ready(Some(Err(ProxyError::UpstreamBody(e))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(p) = this.pump.as_mut() {
            match p.poll_send(cx, &mut conn.io) {
                Poll::Ready(Ok(())) => this.pump = None,
                Poll::Ready(Err(PumpError::Client(e))) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Err(PumpError::Write)) => {
                    p.abandon();
                    this.reusable = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            let conn = this.conn.as_mut().expect("checked above");
            let step = match &mut this.framing {
                Framing::Empty => Step::End,
                Framing::Length(_) if conn.buf.is_empty() => Step::Read,
                Framing::Length(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    *left -= n as u64;
                    let data = take(&mut conn.buf, n);
                    if *left == 0 {
                        Step::Last(data)
                    } else {
                        Step::Data(data)
                    }
                }
                Framing::Chunked(dec) => match dec.decode(&mut conn.buf) {
                    Ok(Decoded::Data(d)) => Step::Data(d),
                    Ok(Decoded::NeedMore) => Step::Read,
                    Ok(Decoded::Done) => Step::End,
                    Err(e) => Step::Fail(io::Error::new(io::ErrorKind::InvalidData, e)),
                },
                Framing::Close if conn.buf.is_empty() => Step::Read,
                Framing::Close => {
                    let n = conn.buf.len();
                    Step::Data(take(&mut conn.buf, n))
                }
            };
            match step {
                Step::Data(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Step::Last(d) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::Fail(e) => return this.error(e),
                Step::Read => {}
            }
            let conn = this.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.error(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection before the body ended",
                    ))
                }
                Ok(_) => {}
                Err(e) => return this.error(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn checkout_bounds_open_connections_and_waits_for_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = IdlePool::default();
        let age = Duration::from_secs(30);
        let far = tokio::time::Instant::now() + age;
        let mut busy = Vec::new();
        for _ in 0..2 {
            let Some(Checkout::Connect(slot)) = pool.checkout(age, 2, false, far).await else {
                panic!("room for two connections");
            };
            let mut c = Conn::connect(addr, Duration::from_secs(1)).await.unwrap();
            c.hold(slot);
            busy.push(c);
        }
        assert_eq!(pool.open(), 2);
        // Both busy: nothing by the deadline, and no third connection.
        let now = tokio::time::Instant::now();
        assert!(pool.checkout(age, 2, false, now).await.is_none());
        assert_eq!(pool.open(), 2);

        // A waiting request gets the first connection that comes back.
        let waiting = pool.checkout(age, 2, false, far);
        tokio::pin!(waiting);
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "all busy: it waits"
        );
        pool.put(busy.pop().unwrap(), 2);
        let Some(Checkout::Idle(reused)) = waiting.await else {
            panic!("the returned connection");
        };
        assert!(reused.reused());
        assert_eq!(pool.open(), 2);

        // A retry that wants a new connection closes an idle one to make room.
        pool.put(reused, 2);
        assert_eq!(pool.len(), 1);
        let fresh = pool.checkout(age, 2, true, far).await;
        assert!(matches!(fresh, Some(Checkout::Connect(_))), "{fresh:?}");
        assert_eq!((pool.len(), pool.open()), (0, 2));
        drop(fresh);

        // A closed connection gives its slot back.
        drop(busy);
        assert_eq!(pool.open(), 0);
    }

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, bool), &'static str> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_decodes_whatever_the_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-sum: 1\r\n\r\n";
        for split in 1..wire.len() {
            let (data, done) = decode_all(wire, split).unwrap();
            assert_eq!(data, b"hello, world", "split {split}");
            assert!(done, "split {split}");
        }
    }

    #[test]
    fn chunked_accepts_bare_lf_and_rejects_garbage() {
        assert_eq!(
            decode_all(b"3\nabc\n0\n\n", 100).unwrap(),
            (b"abc".to_vec(), true)
        );
        assert!(decode_all(b"zz\r\n", 100).is_err());
        assert!(decode_all(b"3\r\nabcX\r\n", 100).is_err());
        assert!(decode_all(b"ffffffffffffffffff\r\n", 100).is_err());
    }

    #[test]
    fn chunked_stops_at_the_end_and_leaves_the_rest() {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nHTTP/1.1"[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(dec.decode(&mut buf), Ok(Decoded::Done));
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    fn parse(raw: &[u8]) -> Result<Option<Parsed>, Failed> {
        parse_head(&mut BytesMut::from(raw))
    }

    fn final_head(raw: &[u8]) -> (StatusCode, HeaderMap, Framing, bool) {
        match parse(raw) {
            Ok(Some(Parsed::Final(h))) => h,
            other => panic!("not a final head: {:?}", other.map(|o| o.is_some())),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (s, h, f, ka) = final_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\n");
        assert_eq!(s, 200);
        assert_eq!(h.get("x-a").unwrap(), "b");
        assert!(matches!(f, Framing::Length(5)) && ka);
        let (_, h, f, ka) = final_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
        );
        // Both framings: Transfer-Encoding wins and the connection is not reused.
        assert!(matches!(f, Framing::Chunked(_)) && !ka);
        assert!(h.get("content-length").is_none());
        let (_, _, f, ka) = final_head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(f, Framing::Close) && !ka);
        let (_, _, f, ka) = final_head(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(f, Framing::Empty) && ka);
        let (_, _, f, _) = final_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert!(matches!(f, Framing::Empty));
        let (_, _, _, ka) =
            final_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!ka);
        let (_, _, _, ka) = final_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!ka);
        let (_, _, _, ka) =
            final_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(ka);
    }

    #[test]
    fn bad_response_heads_are_protocol_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Err(Failed::Protocol(_))), "{raw:?}");
        }
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nX-A"), Ok(None)));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n"[..]);
        assert!(matches!(parse_head(&mut buf), Ok(Some(Parsed::Interim))));
        assert!(matches!(parse_head(&mut buf), Ok(Some(Parsed::Final((s, ..)))) if s == 201));
    }

    fn head(method: Method, headers: &[(&str, &str)], upgrading: bool, empty: bool) -> String {
        head_len(
            method,
            headers,
            upgrading,
            if empty { Some(0) } else { None },
        )
    }

    fn head_len(
        method: Method,
        headers: &[(&str, &str)],
        upgrading: bool,
        body_len: Option<u64>,
    ) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let host = HeaderValue::from_static("shop.example.eu");
        let fwd = Forwarding {
            client: "192.0.2.7".parse().unwrap(),
            https: true,
            host: &host,
            upgrading,
        };
        let head = RequestHead::new(&method, "/a?b=1", &h, &fwd, body_len);
        String::from_utf8(head.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn request_head_framing() {
        let get = head(Method::GET, &[("host", "ignored")], false, true);
        assert_eq!(
            get,
            "GET /a?b=1 HTTP/1.1\r\nhost: shop.example.eu\r\nx-forwarded-for: 192.0.2.7\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: shop.example.eu\r\n\r\n"
        );
        assert!(head(Method::POST, &[], false, true).ends_with("content-length: 0\r\n\r\n"));
        let chunked = head(Method::POST, &[], false, false);
        assert!(chunked.ends_with("transfer-encoding: chunked\r\n\r\n"));
        let sized = head_len(Method::PUT, &[("content-length", "3")], false, Some(3));
        assert!(sized.contains("content-length: 3\r\n") && !sized.contains("transfer"));
        let empty = head(Method::PUT, &[("content-length", "0")], false, true);
        assert_eq!(empty.matches("content-length").count(), 1);
    }

    /// Issue #11's smuggling class: whatever the client's `Connection` names, or however it
    /// spells its framing, the backend gets exactly one framing header, the proxy's.
    #[test]
    fn request_framing_is_the_proxys_whatever_connection_names() {
        let tricks: &[&[(&str, &str)]] = &[
            &[
                ("connection", "keep-alive, Content-Length"),
                ("content-length", "20"),
            ],
            &[("connection", "content-length"), ("content-length", "20")],
            &[
                ("connection", "Transfer-Encoding"),
                ("content-length", "20"),
            ],
            &[
                ("connection", "host, content-length"),
                ("content-length", "20"),
            ],
            &[
                ("connection", "x-forwarded-for, x-forwarded-host"),
                ("content-length", "20"),
            ],
            &[("connection", "close"), ("content-length", "20")],
            &[("content-length", "20"), ("content-length", "20")],
            &[("content-length", "+20")],
            &[("transfer-encoding", "chunked"), ("content-length", "20")],
        ];
        for (i, trick) in tricks.iter().enumerate() {
            for body_len in [Some(20), None] {
                let h = head_len(Method::POST, trick, false, body_len);
                let lower = h.to_ascii_lowercase();
                let lengths = lower.matches("\r\ncontent-length:").count();
                let chunked = lower.matches("\r\ntransfer-encoding:").count();
                match body_len {
                    Some(_) => assert_eq!((lengths, chunked), (1, 0), "trick {i}: {h}"),
                    None => assert_eq!((lengths, chunked), (0, 1), "trick {i}: {h}"),
                }
                if body_len.is_some() {
                    assert!(
                        lower.contains("\r\ncontent-length: 20\r\n"),
                        "trick {i}: {h}"
                    );
                }
                assert_eq!(lower.matches("\r\nhost:").count(), 1, "trick {i}: {h}");
                assert!(lower.contains("\r\nx-forwarded-host: shop.example.eu\r\n"));
                assert!(!lower.contains("\r\nconnection:"), "trick {i}: {h}");
            }
        }
    }

    #[test]
    fn content_length_values_are_digits_only() {
        for ok in ["0", "5", " 12 ", "18446744073709551615"] {
            assert!(parse_content_length(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "",
            "+5",
            "-5",
            "5,5",
            "5 5",
            "0x5",
            "18446744073709551616",
            "1e3",
        ] {
            assert_eq!(parse_content_length(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn invalid_response_lengths_are_protocol_errors_and_both_framings_close() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        ] {
            assert!(
                matches!(parse(bad), Err(Failed::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let (_, h, framing, keep_alive) = final_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        assert!(matches!(framing, Framing::Chunked(_)));
        assert!(h.get("content-length").is_none());
        assert!(!keep_alive, "a response with both framings is never reused");
    }

    #[test]
    fn request_head_drops_hop_by_hop_and_appends_forwarded_for() {
        let h = head(
            Method::GET,
            &[
                ("connection", "keep-alive, x-secret"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("proxy-authorization", "basic x"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers, deflate"),
                ("trailer", "x-sum"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("expect", "100-continue"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "spoofed"),
                ("x-kept", "yes"),
            ],
            false,
            true,
        );
        let lines: Vec<&str> = h.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines,
            [
                "GET /a?b=1 HTTP/1.1",
                "host: shop.example.eu",
                "x-kept: yes",
                "x-forwarded-for: 10.0.0.1, 192.0.2.7",
                "x-forwarded-proto: https",
                "x-forwarded-host: shop.example.eu",
                "te: trailers",
            ]
        );
    }

    #[test]
    fn request_head_keeps_upgrade_when_upgrading() {
        let h = head(
            Method::GET,
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
            true,
            true,
        );
        assert!(h.contains("upgrade: websocket\r\n"), "{h}");
        assert!(h.contains("connection: upgrade\r\n"), "{h}");
        assert_eq!(h.matches("onnection").count(), 1, "{h}");
    }

    /// Differential tests: the request writer against a strict parser's view of its output,
    /// and the response parser against RFC 9112 §6.3 written out plainly.
    mod differential {
        use super::*;
        use proptest::prelude::*;

        const NAMES: &[&str] = &[
            "connection",
            "content-length",
            "transfer-encoding",
            "host",
            "te",
            "upgrade",
            "keep-alive",
            "trailer",
            "expect",
            "x-forwarded-for",
            "x-forwarded-host",
            "proxy-authorization",
            "authorization",
            "cookie",
            "x-a",
        ];

        fn header() -> impl Strategy<Value = (String, String)> {
            let name = proptest::sample::select(NAMES).prop_map(str::to_string);
            let value = prop_oneof![
                // A list of header names, as a `Connection` header would carry.
                proptest::collection::vec(proptest::sample::select(NAMES), 1..4)
                    .prop_map(|v| v.join(", ")),
                "[0-9+ ,-]{1,6}",
                Just("chunked".to_string()),
                Just("gzip, chunked".to_string()),
                Just("keep-alive".to_string()),
                Just("close".to_string()),
                "[a-z0-9=/]{0,12}",
            ];
            (name, value)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever headers the client sent, the head the backend gets is one complete
            /// message head with one Host and exactly one framing: `body_len` bytes or
            /// chunked, so the backend reads exactly the body the proxy sends.
            #[test]
            fn request_heads_frame_exactly_what_the_proxy_sends(
                headers in proptest::collection::vec(header(), 0..8),
                body_len in prop_oneof![Just(Some(0u64)), (1u64..1_000_000).prop_map(Some), Just(None)],
                method in proptest::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH"][..]),
                upgrading in any::<bool>(),
            ) {
                let pairs: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let text = head_len(method, &pairs, upgrading, body_len);
                let bytes = text.as_bytes();
                let mut slots = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut slots);
                let parsed = req.parse(bytes);
                prop_assert!(
                    matches!(parsed, Ok(httparse::Status::Complete(n)) if n == bytes.len()),
                    "not exactly one head: {text}"
                );
                let count = |name: &str| {
                    req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count()
                };
                let value = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                prop_assert_eq!(count("host"), 1, "{}", text);
                match body_len {
                    None => {
                        prop_assert_eq!(count("content-length"), 0, "{}", text);
                        let te = value("transfer-encoding");
                        prop_assert_eq!(te.as_deref(), Some("chunked"));
                        prop_assert_eq!(count("transfer-encoding"), 1, "{}", text);
                    }
                    Some(n) => {
                        prop_assert_eq!(count("transfer-encoding"), 0, "{}", text);
                        prop_assert!(count("content-length") <= 1, "{}", text);
                        let sent = value("content-length").map(|v| v.parse::<u64>().unwrap());
                        prop_assert_eq!(sent.unwrap_or(0), n, "{}", text);
                    }
                }
                prop_assert!(count("connection") <= 1, "{}", text);
                if count("connection") == 1 {
                    prop_assert!(upgrading, "{}", text);
                }
            }

            /// The response parser agrees with RFC 9112 §6.3 on every combination of length
            /// and transfer-coding headers: the same framing, or a 502 where the framing is
            /// invalid; never a length the backend did not mean.
            #[test]
            fn response_framing_matches_rfc_9112(
                lengths in proptest::collection::vec(
                    prop_oneof![
                        (0u64..100_000).prop_map(|n| n.to_string()),
                        Just("+5".to_string()),
                        Just("5, 5".to_string()),
                        Just(" 7 ".to_string()),
                        Just("-1".to_string()),
                        Just("99999999999999999999999".to_string()),
                    ],
                    0..3,
                ),
                coding in proptest::option::of(proptest::sample::select(
                    &["chunked", "gzip, chunked", "gzip", "chunked, gzip"][..],
                )),
                status in proptest::sample::select(&[200u16, 204, 304, 404][..]),
            ) {
                let mut raw = format!("HTTP/1.1 {status} X\r\n");
                for l in &lengths {
                    raw.push_str(&format!("content-length: {l}\r\n"));
                }
                if let Some(c) = coding {
                    raw.push_str(&format!("transfer-encoding: {c}\r\n"));
                }
                raw.push_str("\r\n");
                // The reference.
                let valid_digits = |v: &str| {
                    let t = v.trim();
                    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && t.parse::<u64>().is_ok()
                };
                let invalid_length = lengths.len() > 1 || lengths.iter().any(|l| !valid_digits(l));
                let got = parse(raw.as_bytes());
                if invalid_length {
                    prop_assert!(matches!(got, Err(Failed::Protocol(_))), "{}", raw);
                    return Ok(());
                }
                let Ok(Some(Parsed::Final((_, headers, framing, keep_alive)))) = got else {
                    return Err(TestCaseError::fail(format!("refused a valid head: {raw}")));
                };
                let bodiless = status == 204 || status == 304;
                match (bodiless, coding, lengths.first()) {
                    (true, _, _) => prop_assert!(matches!(framing, Framing::Empty)),
                    (false, Some(c), _) => {
                        prop_assert!(headers.get("content-length").is_none(), "{}", raw);
                        if c.ends_with("chunked") {
                            prop_assert!(matches!(framing, Framing::Chunked(_)), "{}", raw);
                        } else {
                            prop_assert!(matches!(framing, Framing::Close), "{}", raw);
                        }
                        if !lengths.is_empty() {
                            prop_assert!(!keep_alive, "both framings: never reused: {}", raw);
                        }
                    }
                    (false, None, Some(l)) => {
                        let n: u64 = l.trim().parse().unwrap();
                        if n == 0 {
                            prop_assert!(matches!(framing, Framing::Empty), "{}", raw);
                        } else {
                            prop_assert!(matches!(framing, Framing::Length(m) if m == n), "{}", raw);
                        }
                    }
                    (false, None, None) => prop_assert!(matches!(framing, Framing::Close) && !keep_alive),
                }
            }
        }
    }
}
