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
//! | no response head within the response timeout       | 504    | `upstream-timeout`         |
//! | exchange failed after the request was sent (after  | 502    | `upstream-failed`          |
//! | retry, when idempotent)                            |        |                            |
//!
//! A request is retried once, on another backend, when its body can be sent again (it was
//! empty or never polled) and either it was provably not sent (connect error, or a connection
//! closed before the request was written) or it is idempotent (GET, HEAD, OPTIONS, TRACE, PUT,
//! DELETE; not an upgrade) and the exchange failed before any response head arrived (the
//! connection was closed or reset under it). The second case matters because backends are
//! usually published through Docker's userland proxy, which accepts every connection and then
//! closes it when the app behind it stopped listening: to the proxy a stopping or crashed
//! instance looks like a connection closed after the request was written, never like a refused
//! connect. The failing backend is passively ejected in both cases.

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, warn};

use super::balance::{Balancer, Outstanding, Pick};
use super::body::{ProxyBody, ReturnSlot, StreamGuards, UpstreamBody};
use super::headers::{
    self, is_upgrade_request, prefers_json, request_host, strip_hop_by_hop, RequestIds,
    X_ESCALE_ERROR, X_REQUEST_ID,
};
use super::metrics::{AppMetrics, InFlight, ProxyMetrics};
use super::server::ConnInfo;
use super::{ProxyConfig, ProxyError};
use crate::routing::{normalize_host, Backend, Route, SharedRoutes};

/// What went wrong, as shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    MissingHost,
    Misdirected,
    UnknownHost,
    NoBackend,
    BodyTooLarge,
    ClientBody,
    UpstreamConnect,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UpstreamFailed,
}

impl ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::MissingHost | ErrorKind::ClientBody => StatusCode::BAD_REQUEST,
            ErrorKind::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::UnknownHost => StatusCode::NOT_FOUND,
            ErrorKind::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
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
            ErrorKind::Misdirected => "misdirected-request",
            ErrorKind::UnknownHost => "unknown-host",
            ErrorKind::NoBackend => "no-backend",
            ErrorKind::BodyTooLarge => "body-too-large",
            ErrorKind::ClientBody => "client-body",
            ErrorKind::UpstreamConnect => "upstream-connect",
            ErrorKind::UpstreamConnectTimeout => "upstream-connect-timeout",
            ErrorKind::UpstreamTimeout => "upstream-timeout",
            ErrorKind::UpstreamFailed => "upstream-failed",
        }
    }

    fn message(self) -> &'static str {
        match self {
            ErrorKind::MissingHost => "client: the request has no Host header",
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
}

/// Sorts a client error into what the client is told and whether a retry is safe.
fn classify(e: hyper_util::client::legacy::Error, backend: SocketAddr) -> Failure {
    let mut timed_out = false;
    let mut canceled = false;
    let mut body_kind = None;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(pe) = s.downcast_ref::<ProxyError>() {
            match pe {
                ProxyError::BodyTooLarge { .. } => body_kind = Some(ErrorKind::BodyTooLarge),
                ProxyError::ClientBody(_) => body_kind = Some(ErrorKind::ClientBody),
                _ => {}
            }
        } else if let Some(he) = s.downcast_ref::<hyper::Error>() {
            canceled |= he.is_canceled();
        } else if let Some(io) = s.downcast_ref::<io::Error>() {
            timed_out |= io.kind() == io::ErrorKind::TimedOut;
        }
        src = s.source();
    }
    if let Some(kind) = body_kind {
        return Failure {
            kind,
            error: ProxyError::Upstream { backend, source: e },
            not_sent: false,
            no_response: false,
        };
    }
    if e.is_connect() || canceled {
        let kind = if timed_out {
            ErrorKind::UpstreamConnectTimeout
        } else {
            ErrorKind::UpstreamConnect
        };
        return Failure {
            kind,
            error: ProxyError::UpstreamConnect { backend, source: e },
            not_sent: true,
            no_response: true,
        };
    }
    // The client's request future resolves with the response head, so any other error came
    // before it: the connection was closed or reset, or the head was malformed.
    Failure {
        kind: ErrorKind::UpstreamFailed,
        error: ProxyError::Upstream { backend, source: e },
        not_sent: false,
        no_response: true,
    }
}

/// The shared state of one running proxy.
#[derive(Debug)]
pub(crate) struct Proxy {
    routes: SharedRoutes,
    config: ProxyConfig,
    metrics: Arc<ProxyMetrics>,
    client: Client<HttpConnector, UpstreamBody>,
    balancer: Balancer,
    ids: RequestIds,
}

/// The parts of a request kept for (re)sending it upstream.
struct Outgoing {
    method: Method,
    path: PathAndQuery,
    headers: HeaderMap,
}

impl Proxy {
    pub(crate) fn new(
        routes: SharedRoutes,
        config: ProxyConfig,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.upstream_connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.upstream_idle_timeout)
            .pool_max_idle_per_host(config.upstream_max_idle_per_backend)
            .build(http);
        Proxy {
            balancer: Balancer::new(routes.clone(), config.eject_duration),
            routes,
            config,
            metrics,
            client,
            ids: RequestIds::new(),
        }
    }

    pub(crate) fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// Serves one client request; never fails (errors become error pages).
    pub(crate) async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let _busy = conn.activity.busy();
        let rid = self.ids.ensure(req.headers_mut());
        let json = prefers_json(req.headers());
        let Some((host, host_str)) =
            request_host(&req).and_then(|h| Some((HeaderValue::from_str(h).ok()?, h.to_owned())))
        else {
            return error_page(ErrorKind::MissingHost, json, &rid);
        };
        if let Some(sni) = &conn.sni {
            if !normalize_host(&host_str).eq_ignore_ascii_case(sni) {
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
        let Some(route) = self.routes.load().lookup(&host_str).cloned() else {
            self.metrics.unknown_host();
            return error_page(ErrorKind::UnknownHost, json, &rid);
        };
        let app = self.metrics.app(&route.app);
        // Decided up front so an unsampled request costs one comparison and no allocation.
        let sample = self.config.access_log_sample;
        let logged = (sample >= 1.0 || (sample > 0.0 && rand::random::<f64>() < sample))
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let resp = if route.redirect_https && !conn.https && !is_acme_challenge(&req) {
            redirect_https(&host_str, req.uri(), &rid)
        } else {
            self.forward(req, host, &host_str, conn, &route, &app, json, &rid)
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
        mut req: Request<Incoming>,
        host: HeaderValue,
        host_str: &str,
        conn: &ConnInfo,
        route: &Arc<Route>,
        app: &Arc<AppMetrics>,
        json: bool,
        rid: &HeaderValue,
    ) -> Response<ProxyBody> {
        if route.backends.is_empty() {
            return error_page(ErrorKind::NoBackend, json, rid);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_body_bytes) {
            return error_page(ErrorKind::BodyTooLarge, json, rid);
        }
        let in_flight = app.in_flight();
        let upgrading = is_upgrade_request(&req);
        let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, upgrading);
        headers::set_forwarded(&mut headers, conn.peer.ip(), conn.https, host_str);
        headers.insert(header::HOST, host);
        let out = Outgoing {
            method: parts.method,
            path: parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers,
        };

        let retry = route.backends.len() > 1;
        let slot: Option<ReturnSlot> = retry.then(Default::default);
        let spare = retry.then(|| Outgoing {
            method: out.method.clone(),
            path: out.path.clone(),
            headers: out.headers.clone(),
        });
        let body_was_empty = body.is_end_stream();
        let Some(pick) = self.balancer.pick(route, None) else {
            return error_page(ErrorKind::NoBackend, json, rid);
        };
        let body = UpstreamBody::new(body, route.max_body_bytes, app.clone(), slot.clone());
        let mut result = self.send(route, &pick, out, body).await;
        let mut pick = pick;
        if let (Err(f), Some(spare)) = (&result, spare) {
            let replayable = is_idempotent(&spare.method) && !upgrading;
            if f.not_sent || (f.no_response && replayable) {
                self.balancer.eject(&pick);
                let body =
                    slot.and_then(|s| s.lock().unwrap_or_else(PoisonError::into_inner).take());
                let body = match body {
                    Some(b) => Some(UpstreamBody::new(
                        b,
                        route.max_body_bytes,
                        app.clone(),
                        None,
                    )),
                    None if body_was_empty => Some(UpstreamBody::empty(app.clone())),
                    None => None,
                };
                if let (Some(body), Some(next)) =
                    (body, self.balancer.pick(route, Some(pick.index)))
                {
                    warn!(
                        app = %route.app,
                        instance = %route.backends[pick.index].instance,
                        error = %f.error,
                        "retrying on another instance"
                    );
                    pick = next;
                    result = self.send(route, &pick, spare, body).await;
                }
            }
        }
        match result {
            Ok((resp, outstanding)) => self.respond(
                resp,
                outstanding,
                in_flight,
                app,
                client_upgrade,
                conn,
                json,
                rid,
            ),
            Err(f) => {
                if f.not_sent || f.no_response {
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

    /// One attempt against one backend, up to the response head.
    async fn send(
        &self,
        route: &Route,
        pick: &Pick,
        out: Outgoing,
        body: UpstreamBody,
    ) -> Result<(Response<Incoming>, Outstanding), Failure> {
        let backend: &Backend = &route.backends[pick.index];
        let addr = backend.addr;
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(addr.to_string())
            .path_and_query(out.path)
            .build()
            .expect("a socket address and a parsed path make a valid URI");
        let mut req = Request::new(body);
        *req.method_mut() = out.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = out.headers;
        *req.version_mut() = Version::HTTP_11;
        let outstanding = pick.start();
        let timeout = self.config.upstream_response_timeout;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok((resp, outstanding)),
            Ok(Err(e)) => Err(classify(e, addr)),
            Err(_) => Err(Failure {
                kind: ErrorKind::UpstreamTimeout,
                error: ProxyError::UpstreamTimeout {
                    backend: addr,
                    timeout,
                },
                not_sent: false,
                // The backend may still be working on it: waiting again elsewhere is no help.
                no_response: false,
            }),
        }
    }

    /// Turns a backend's response into the client's, or starts the upgraded tunnel.
    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        outstanding: Outstanding,
        in_flight: InFlight,
        app: &Arc<AppMetrics>,
        client_upgrade: Option<OnUpgrade>,
        conn: &ConnInfo,
        json: bool,
        rid: &HeaderValue,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return error_page(ErrorKind::UpstreamFailed, json, rid);
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let guards = StreamGuards {
                app: app.clone(),
                _in_flight: in_flight,
                _outstanding: outstanding,
            };
            let mut stop = conn.stop.clone();
            let done = conn.done.clone();
            tokio::spawn(async move {
                tokio::select! {
                    r = tunnel(client_upgrade, upstream_upgrade, &guards.app) => {
                        if let Err(e) = r {
                            debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    _ = stop.wait_for(|s| *s >= super::server::FORCE_CLOSE) => {}
                }
                drop((guards, done));
            });
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            parts.headers.insert(&X_REQUEST_ID, rid.clone());
            return Response::from_parts(parts, ProxyBody::Local(None));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if !parts.headers.contains_key(&X_REQUEST_ID) {
            parts.headers.insert(&X_REQUEST_ID, rid.clone());
        }
        let guards = StreamGuards {
            app: app.clone(),
            _in_flight: in_flight,
            _outstanding: outstanding,
        };
        Response::from_parts(parts, ProxyBody::upstream(body, guards))
    }
}

/// Copies bytes both ways between the upgraded client and backend connections.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    app: &AppMetrics,
) -> Result<(), ProxyError> {
    let upstream = upstream.await.map_err(|source| ProxyError::Upgrade {
        side: "upstream",
        source,
    })?;
    let client = client.await.map_err(|source| ProxyError::Upgrade {
        side: "client",
        source,
    })?;
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
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

/// `308` to the same host and path over HTTPS.
fn redirect_https(host: &str, uri: &Uri, rid: &HeaderValue) -> Response<ProxyBody> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{}{}", normalize_host(host), pq);
    let mut resp = Response::new(ProxyBody::Local(None));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(&X_REQUEST_ID, rid.clone());
    resp
}
