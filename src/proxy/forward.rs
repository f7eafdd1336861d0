//! Per-request forwarding: host lookup, backend choice, the upstream exchange, retries,
//! upgrades, and the proxy's own error pages.
//!
//! Error policy (every proxy-made response carries `x-escale-error: <code>`):
//!
//! | situation                                          | status | code                       |
//! |----------------------------------------------------|--------|----------------------------|
//! | no `Host` / `:authority`                           | 400    | `missing-host`             |
//! | TLS: host differs from the SNI name                | 421    | `misdirected-request`      |
//! | host not routed                                    | 404    | `unknown-host`             |
//! | route has no backend                               | 503    | `no-backend`               |
//! | body over the route limit (declared or streamed)   | 413    | `body-too-large`           |
//! | client body failed while sending it upstream       | 400    | `client-body`              |
//! | connect refused/reset before sending (after retry) | 502    | `upstream-connect`         |
//! | connect timed out (after retry)                    | 504    | `upstream-connect-timeout` |
//! | all connections to the backends busy for the       | 503    | `upstream-busy`            |
//! | connect timeout (after retry)                      |        |                            |
//! | no response head within the response timeout       | 504    | `upstream-timeout`         |
//! | exchange failed after the request was sent (after  | 502    | `upstream-failed`          |
//! | retry, when idempotent)                            |        |                            |
//!
//! A request is retried once, on another backend, when its body can be sent again (it was
//! empty or never polled) and either it was provably not sent (connect error, or a connection
//! closed before the request was written) or it is idempotent (GET, HEAD, OPTIONS, TRACE, PUT,
//! DELETE; not an upgrade) and the exchange failed before any response head arrived (the
//! connection was closed or reset under it). The second case matters for backends reached
//! through a published port on the node's loopback address, which is Docker's userland proxy:
//! it accepts every connection and then closes it when the app behind it stopped listening, so
//! a stopping or crashed instance looks like a connection closed after the request was
//! written, never like a refused connect (an instance reached at its bridge address refuses). The failing backend is passively ejected in both cases. Before that, a failure on
//! a pooled keep-alive connection is retried (under the same conditions) on a new connection
//! to the same backend: the backend may simply have closed the idle connection as it was
//! reused. A backend whose connections were all busy for the connect timeout (see
//! `upstream`: they are bounded per backend) is loaded rather than failing: the request moves
//! to another backend, but the busy one is not ejected.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use super::balance::{Balancer, Outstanding, Pick};
use super::body::{ProxyBody, StreamGuards, UpstreamBody};
use super::headers::{
    is_upgrade_request, prefers_json, request_host, strip_hop_by_hop, RequestIds, X_ESCALE_ERROR,
    X_REQUEST_ID,
};
use super::metrics::{AppMetrics, InFlight, ProxyMetrics};
use super::server::ConnInfo;
use super::upstream::{self, Checkout, Conn, Exchanged, Failed, Forwarding, RequestHead, ReturnTo};
use super::{ProxyConfig, ProxyError};
use crate::routing::{normalize_host, Backend, Route, SharedRoutes};

/// What went wrong, as shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    MissingHost,
    MethodNotSupported,
    Misdirected,
    UnknownHost,
    NoBackend,
    BodyTooLarge,
    ClientBody,
    UpstreamConnect,
    UpstreamConnectTimeout,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamFailed,
}

impl ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::MissingHost | ErrorKind::ClientBody => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotSupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::UnknownHost => StatusCode::NOT_FOUND,
            ErrorKind::NoBackend | ErrorKind::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UpstreamConnect | ErrorKind::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamConnectTimeout | ErrorKind::UpstreamTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    fn code(self) -> &'static str {
        match self {
            ErrorKind::MissingHost => "missing-host",
            ErrorKind::MethodNotSupported => "method-not-supported",
            ErrorKind::Misdirected => "misdirected-request",
            ErrorKind::UnknownHost => "unknown-host",
            ErrorKind::NoBackend => "no-backend",
            ErrorKind::BodyTooLarge => "body-too-large",
            ErrorKind::ClientBody => "client-body",
            ErrorKind::UpstreamConnect => "upstream-connect",
            ErrorKind::UpstreamConnectTimeout => "upstream-connect-timeout",
            ErrorKind::UpstreamBusy => "upstream-busy",
            ErrorKind::UpstreamTimeout => "upstream-timeout",
            ErrorKind::UpstreamFailed => "upstream-failed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            ErrorKind::MissingHost => "client: the request has no Host header",
            ErrorKind::MethodNotSupported => {
                "client: CONNECT is not supported: escale is a reverse proxy, not a tunnel"
            }
            ErrorKind::Misdirected => {
                "client: the Host header does not match the TLS server name (SNI)"
            }
            ErrorKind::UnknownHost => "client: no app is served at this host name",
            ErrorKind::NoBackend => "upstream: the app has no healthy instance",
            ErrorKind::BodyTooLarge => "client: the request body exceeds the app's limit",
            ErrorKind::ClientBody => "client: the request body could not be read",
            ErrorKind::UpstreamConnect => "upstream: no instance of the app accepted a connection",
            ErrorKind::UpstreamConnectTimeout => {
                "upstream: connecting to an instance of the app timed out"
            }
            ErrorKind::UpstreamBusy => "upstream: every connection to the app's instances is busy",
            ErrorKind::UpstreamTimeout => "upstream: the app did not answer in time",
            ErrorKind::UpstreamFailed => "upstream: the app's response failed",
        }
    }
}

/// The proxy's own small error page: text, or JSON if the client prefers it.
pub(crate) fn error_page(
    kind: ErrorKind,
    json: bool,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let status = kind.status();
    let rid = request_id.to_str().unwrap_or("");
    let (body, ctype) = if json {
        (
            format!(
                "{{\"status\":{},\"error\":\"{}\",\"message\":\"{}\",\"request_id\":\"{}\"}}\n",
                status.as_u16(),
                kind.code(),
                kind.message(),
                rid
            ),
            "application/json",
        )
    } else {
        (
            format!(
                "{} {}\n{}\nerror: {}\nrequest id: {}\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                kind.message(),
                kind.code(),
                rid
            ),
            "text/plain; charset=utf-8",
        )
    };
    let mut resp = Response::new(ProxyBody::local(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(&X_ESCALE_ERROR, HeaderValue::from_static(kind.code()));
    h.insert(&X_REQUEST_ID, request_id.clone());
    resp
}

/// A failed upstream attempt.
#[derive(Debug)]
struct Failure {
    kind: ErrorKind,
    error: ProxyError,
    /// The request was not sent: it may go to another backend.
    not_sent: bool,
    /// No response head arrived (the request may have reached the backend): an idempotent
    /// request may go to another backend.
    no_response: bool,
    /// The attempt used a pooled connection (which the backend may have just closed).
    reused: bool,
    /// Every connection to the backend was busy: it is loaded, not failing (no ejection).
    busy: bool,
    /// The client's body, back unpolled, for another attempt.
    body: Option<UpstreamBody>,
}

/// Sorts an upstream failure into what the client is told and whether a retry is safe.
fn classify(
    failed: Failed,
    backend: SocketAddr,
    connect_timeout: Duration,
    reused: bool,
    body: Option<UpstreamBody>,
) -> Failure {
    let (kind, error, not_sent, no_response) = match failed {
        Failed::Connect(source) => {
            let kind = if source.kind() == io::ErrorKind::TimedOut {
                ErrorKind::UpstreamConnectTimeout
            } else {
                ErrorKind::UpstreamConnect
            };
            (
                kind,
                ProxyError::UpstreamConnect { backend, source },
                true,
                true,
            )
        }
        Failed::ConnectTimeout => (
            ErrorKind::UpstreamConnectTimeout,
            ProxyError::UpstreamTimeout {
                backend,
                timeout: connect_timeout,
            },
            true,
            true,
        ),
        // The backend closed before the head was written: it cannot have acted on it.
        Failed::Write(source) => (
            ErrorKind::UpstreamFailed,
            ProxyError::Upstream { backend, source },
            true,
            true,
        ),
        Failed::NoResponse(source) => (
            ErrorKind::UpstreamFailed,
            ProxyError::Upstream { backend, source },
            false,
            true,
        ),
        Failed::Protocol(reason) => (
            ErrorKind::UpstreamFailed,
            ProxyError::UpstreamProtocol { backend, reason },
            false,
            true,
        ),
        Failed::ClientBody(e) => {
            let kind = match e {
                ProxyError::BodyTooLarge { .. } => ErrorKind::BodyTooLarge,
                _ => ErrorKind::ClientBody,
            };
            (kind, e, false, false)
        }
    };
    Failure {
        kind,
        error,
        not_sent,
        no_response,
        reused,
        busy: false,
        body,
    }
}

/// The shared state of one running proxy.
#[derive(Debug)]
pub(crate) struct Proxy {
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    balancer: Balancer,
    ids: RequestIds,
}

impl Proxy {
    pub(crate) fn new(
        routes: SharedRoutes,
        config: ProxyConfig,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Proxy {
            balancer: Balancer::new(routes.clone(), config.eject_duration),
            routes,
            config,
            metrics,
            ids: RequestIds::new(),
        }
    }

    pub(crate) fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// Closes idle upstream connections past the idle timeout or to departed instances.
    pub(crate) fn sweep_idle(&self) {
        self.balancer.sweep_idle(self.config.upstream_idle_timeout);
    }

    /// Serves one client request (its body, if it may have one, from hyper); never fails
    /// (errors become error pages).
    pub(crate) async fn handle(
        &self,
        mut req: Request<Option<Incoming>>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let _busy = conn.activity.busy();
        let rid = self.ids.ensure(req.headers_mut());
        let json = prefers_json(req.headers());
        // CONNECT asks for a tunnel to the authority it names (HTTP/1.1, or HTTP/2 and its
        // extended form): never forwarded, whatever the host.
        if req.method() == Method::CONNECT {
            return error_page(ErrorKind::MethodNotSupported, json, &rid);
        }
        let Some(host) = request_host(&req) else {
            return error_page(ErrorKind::MissingHost, json, &rid);
        };
        let host_str = host.to_str().unwrap_or("");
        if let Some(sni) = &conn.sni {
            if !normalize_host(host_str).eq_ignore_ascii_case(sni) {
                return error_page(ErrorKind::Misdirected, json, &rid);
            }
        }
        if let Some(answer) = self
            .config
            .acme_challenges
            .as_ref()
            .and_then(|c| c.answer(req.uri().path()))
        {
            return acme_answer(answer, &rid);
        }
        let Some(route) = self.routes.load().lookup(host_str).cloned() else {
            self.metrics.unknown_host();
            return error_page(ErrorKind::UnknownHost, json, &rid);
        };
        let app = self.metrics.app(&route.app);
        conn.app.set(&app);
        // Decided up front so an unsampled request costs one comparison and no allocation.
        let sample = self.config.access_log_sample;
        let logged = (sample >= 1.0 || (sample > 0.0 && rand::random::<f64>() < sample))
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let resp = if route.redirect_https && !conn.https && !is_acme_challenge(&req) {
            redirect_https(host_str, self.config.https_redirect_port, req.uri(), &rid)
        } else {
            self.forward(req, &host, conn, &route, &app, json, &rid)
                .await
        };
        app.record(resp.status().as_u16(), start.elapsed());
        if let Some((method, path)) = logged {
            tracing::info!(
                target: "escale::access",
                app = %route.app,
                host = %host_str,
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                ms = start.elapsed().as_secs_f64() * 1e3,
                client = %conn.peer.ip(),
                request_id = rid.to_str().unwrap_or(""),
                "request"
            );
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut req: Request<Option<Incoming>>,
        host: &HeaderValue,
        conn: &ConnInfo,
        route: &Arc<Route>,
        app: &Arc<AppMetrics>,
        json: bool,
        rid: &HeaderValue,
    ) -> Response<ProxyBody> {
        if route.backends.is_empty() {
            return error_page(ErrorKind::NoBackend, json, rid);
        }
        // The body's length as the client connection's parser framed it (hyper checks the
        // client's `Content-Length`): the only length the upstream request is framed with.
        let body_len = match req.body() {
            None => Some(0),
            Some(b) if b.is_end_stream() => Some(0),
            Some(b) => b.size_hint().exact(),
        };
        if body_len.is_some_and(|n| n > route.max_body_bytes) {
            return error_page(ErrorKind::BodyTooLarge, json, rid);
        }
        let in_flight = app.in_flight();
        let upgrading = is_upgrade_request(&req);
        let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body_empty = body_len == Some(0);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let forwarding = Forwarding {
            client: conn.peer.ip(),
            https: conn.https,
            host,
            upgrading,
        };
        let head = RequestHead::new(&parts.method, path, &parts.headers, &forwarding, body_len);
        let replayable = is_idempotent(&parts.method) && !upgrading;
        drop(parts);

        let Some(mut pick) = self.balancer.pick(route, None) else {
            return error_page(ErrorKind::NoBackend, json, rid);
        };
        let mut body = UpstreamBody::new(body, route.max_body_bytes, app.clone());
        let mut fresh = false;
        let mut moved = false;
        let result = loop {
            let mut f = match self.send(route, &pick, &head, body, fresh).await {
                Ok(ok) => break Ok(ok),
                Err(f) => f,
            };
            let retry_body = if f.not_sent || (f.no_response && replayable) {
                f.body
                    .take()
                    .or_else(|| body_empty.then(|| UpstreamBody::empty(app.clone())))
            } else {
                None
            };
            let Some(retry_body) = retry_body else {
                break Err(f);
            };
            body = retry_body;
            if f.reused && !fresh {
                // Most likely a keep-alive connection the backend closed as it was reused.
                debug!(app = %route.app, error = %f.error, "retrying on a new connection");
                fresh = true;
                continue;
            }
            if !f.busy {
                self.balancer.eject(&pick);
            }
            if moved {
                break Err(f);
            }
            let Some(next) = self.balancer.pick(route, Some(pick.index)) else {
                f.body = None;
                break Err(f);
            };
            warn!(
                app = %route.app,
                instance = %route.backends[pick.index].instance,
                error = %f.error,
                "retrying on another instance"
            );
            pick = next;
            fresh = false;
            moved = true;
        };
        match result {
            Ok((exchanged, outstanding)) => self.respond(
                exchanged,
                outstanding,
                in_flight,
                app,
                client_upgrade,
                conn,
                json,
                rid,
            ),
            Err(f) => {
                if (f.not_sent || f.no_response) && !f.busy {
                    self.balancer.eject(&pick);
                }
                warn!(
                    app = %route.app,
                    instance = %route.backends[pick.index].instance,
                    error = %f.error,
                    code = f.kind.code(),
                    "upstream request failed"
                );
                error_page(f.kind, json, rid)
            }
        }
    }

    /// One attempt against one backend, up to the response head. `fresh` skips the pool.
    async fn send(
        &self,
        route: &Route,
        pick: &Pick,
        head: &RequestHead,
        body: UpstreamBody,
        fresh: bool,
    ) -> Result<(Exchanged, Outstanding), Failure> {
        let backend: &Backend = &route.backends[pick.index];
        let addr = backend.addr;
        let connect_timeout = self.config.upstream_connect_timeout;
        let outstanding = pick.start();
        // A connection within the connect timeout: an idle one, a new one, or (all of this
        // backend's busy) the first one to come back.
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let checkout = pick.state.idle.checkout(
            self.config.upstream_idle_timeout,
            self.config.upstream_max_connections_per_backend,
            fresh,
            deadline,
        );
        let conn = match checkout.await {
            Some(Checkout::Idle(c)) => c,
            Some(Checkout::Connect(slot)) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match Conn::connect(addr, left).await {
                    Ok(mut c) => {
                        c.hold(slot);
                        c
                    }
                    Err(e) => return Err(classify(e, addr, connect_timeout, false, Some(body))),
                }
            }
            None => {
                return Err(Failure {
                    kind: ErrorKind::UpstreamBusy,
                    error: ProxyError::UpstreamBusy {
                        backend: addr,
                        open: self.config.upstream_max_connections_per_backend,
                        waited: connect_timeout,
                    },
                    not_sent: true,
                    no_response: true,
                    reused: false,
                    busy: true,
                    body: Some(body),
                })
            }
        };
        let reused = conn.reused();
        let timeout = self.config.upstream_response_timeout;
        match tokio::time::timeout(timeout, upstream::exchange(conn, head, body)).await {
            Ok(Ok(mut exchanged)) => {
                if exchanged.status != StatusCode::SWITCHING_PROTOCOLS {
                    exchanged.body.return_to(ReturnTo {
                        pool: pick.state.clone(),
                        max_idle: self.config.upstream_max_connections_per_backend,
                    });
                }
                Ok((exchanged, outstanding))
            }
            Ok(Err((failed, body))) => Err(classify(failed, addr, connect_timeout, reused, body)),
            Err(_) => Err(Failure {
                kind: ErrorKind::UpstreamTimeout,
                error: ProxyError::UpstreamTimeout {
                    backend: addr,
                    timeout,
                },
                not_sent: false,
                // The backend may still be working on it: waiting again elsewhere is no help.
                no_response: false,
                reused,
                busy: false,
                body: None,
            }),
        }
    }

    /// Turns a backend's response into the client's, or starts the upgraded tunnel.
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        exchanged: Exchanged,
        outstanding: Outstanding,
        in_flight: InFlight,
        app: &Arc<AppMetrics>,
        client_upgrade: Option<OnUpgrade>,
        conn: &ConnInfo,
        json: bool,
        rid: &HeaderValue,
    ) -> Response<ProxyBody> {
        let Exchanged {
            status,
            mut headers,
            body,
        } = exchanged;
        let guards = StreamGuards {
            app: app.clone(),
            _in_flight: in_flight,
            _outstanding: outstanding,
            _streaming: conn.activity.streaming(),
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_upgrade), Some(upstream)) = (client_upgrade, body.into_conn()) else {
                return error_page(ErrorKind::UpstreamFailed, json, rid);
            };
            let mut stop = conn.stop.clone();
            let done = conn.done.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = tunnel(client_upgrade, upstream, &guards.app) => {
                        if let Err(e) = r {
                            debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    _ = stop.wait_for(|s| *s >= super::server::FORCE_CLOSE) => {}
                }
                drop((guards, done));
            });
            strip_hop_by_hop(&mut headers, true);
            headers.insert(&X_REQUEST_ID, rid.clone());
            let mut resp = Response::new(ProxyBody::Local(None));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            return resp;
        }
        strip_hop_by_hop(&mut headers, false);
        if !headers.contains_key(&X_REQUEST_ID) {
            headers.insert(&X_REQUEST_ID, rid.clone());
        }
        let mut resp = Response::new(ProxyBody::upstream(body, guards));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// Copies bytes both ways between the upgraded client connection and the backend's socket
/// (starting with what the backend sent right after its `101`).
async fn tunnel(client: OnUpgrade, upstream: Conn, app: &AppMetrics) -> Result<(), ProxyError> {
    let client = client.await.map_err(|source| ProxyError::Upgrade {
        side: "client",
        source,
    })?;
    let mut client = TokioIo::new(client);
    let (mut upstream, early) = upstream.into_parts();
    if !early.is_empty() {
        if let Err(e) = client.write_all(&early).await {
            debug!(error = %e, "upgraded tunnel closed");
            return Ok(());
        }
        app.add_bytes_out(early.len() as u64);
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_upstream, to_client)) => {
            app.add_bytes_in(to_upstream);
            app.add_bytes_out(to_client);
        }
        Err(e) => debug!(error = %e, "upgraded tunnel closed"),
    }
    Ok(())
}

/// Methods whose requests may be sent twice (RFC 9110, 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_acme_challenge<B>(req: &Request<B>) -> bool {
    req.uri().path().starts_with("/.well-known/acme-challenge/")
}

/// `200` with an ACME HTTP-01 key authorization.
fn acme_answer(key_authorization: String, rid: &HeaderValue) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(key_authorization));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(&X_REQUEST_ID, rid.clone());
    resp
}

/// `308` to the same host and path over HTTPS, on the HTTPS listener's port when it is not
/// 443 (`port`).
fn redirect_https(
    host: &str,
    port: Option<u16>,
    uri: &Uri,
    rid: &HeaderValue,
) -> Response<ProxyBody> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = match port {
        Some(port) if port != 443 => format!("https://{}:{port}{}", normalize_host(host), pq),
        _ => format!("https://{}{}", normalize_host(host), pq),
    };
    let mut resp = Response::new(ProxyBody::Local(None));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(&X_REQUEST_ID, rid.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: &str, port: Option<u16>, uri: &str) -> String {
        let rid = HeaderValue::from_static("r1");
        let resp = redirect_https(host, port, &uri.parse().unwrap(), &rid);
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_https_redirect_keeps_a_port_that_is_not_443() {
        assert_eq!(
            location("shop.example.eu", None, "/a?b=1"),
            "https://shop.example.eu/a?b=1"
        );
        assert_eq!(
            location("shop.example.eu:8080", Some(443), "/"),
            "https://shop.example.eu/"
        );
        assert_eq!(
            location("shop.example.eu:8080", Some(8443), "/x"),
            "https://shop.example.eu:8443/x"
        );
        assert_eq!(
            location("[2001:db8::1]:80", Some(8443), "/"),
            "https://[2001:db8::1]:8443/"
        );
    }
}
