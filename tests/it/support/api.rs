//! In-process API harness: the real [`escale::api::router`] over a registry in a temp data dir,
//! driven with `tower::ServiceExt::oneshot` (no sockets).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use escale::api::{router, AppState};
use escale::auth::token_hash;
use escale::config::Config;
use escale::registry::Registry;
use escale::secrets::MasterKey;

/// The peer address requests come from unless a test says otherwise.
pub const DEFAULT_PEER: &str = "127.0.0.1:40000";

/// The password every harness user gets.
pub const PASSWORD: &str = "correct horse battery";

/// One response, its body parsed as JSON when it is JSON (else a JSON string of the text).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The problem `detail`, or "" when the body is not a problem.
    pub fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or("")
    }

    /// Asserts a problem+json error response with this status.
    #[track_caller]
    pub fn assert_problem(&self, status: StatusCode, what: &str) {
        assert_eq!(self.status, status, "{what}: {self:?}");
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "{what}: {self:?}"
        );
        assert_eq!(
            self.body["status"].as_u64(),
            Some(u64::from(status.as_u16())),
            "{what}: {self:?}"
        );
    }
}

/// A request under construction.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    /// Raw body bytes and the content type to send with them (`None`: no header).
    pub body: Option<(Vec<u8>, Option<&'static str>)>,
    pub peer: SocketAddr,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl Req {
    pub fn new(method: &str, path: impl Into<String>) -> Req {
        Req {
            method: Method::from_bytes(method.as_bytes()).expect("method"),
            path: path.into(),
            token: None,
            body: None,
            peer: DEFAULT_PEER.parse().expect("addr"),
            headers: Vec::new(),
        }
    }

    pub fn token(mut self, token: Option<&str>) -> Req {
        self.token = token.map(str::to_string);
        self
    }

    pub fn json(mut self, v: &Value) -> Req {
        self.body = Some((
            serde_json::to_vec(v).expect("json"),
            Some("application/json"),
        ));
        self
    }

    pub fn raw(mut self, bytes: impl Into<Vec<u8>>, content_type: Option<&'static str>) -> Req {
        self.body = Some((bytes.into(), content_type));
        self
    }

    pub fn peer(mut self, peer: &str) -> Req {
        self.peer = peer.parse().expect("addr");
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: &str) -> Req {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// The API of one fresh installation.
pub struct TestApi {
    pub dir: tempfile::TempDir,
    pub registry: Registry,
    pub config: Arc<Config>,
    pub router: Router,
    /// The router's bound on password hashing (tests saturate it with `hold_all`).
    pub hashing: Arc<escale::auth::Hashing>,
}

impl TestApi {
    pub async fn new() -> TestApi {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Arc::new(Config::for_data_dir(dir.path()));
        let registry = Registry::open(&config.database_path(), MasterKey::random())
            .await
            .expect("registry opens");
        let state = AppState::new(registry.clone(), config.clone());
        let hashing = state.hashing.clone();
        let router = router(state);
        TestApi {
            dir,
            registry,
            config,
            router,
            hashing,
        }
    }

    /// Sends a request through the router.
    pub async fn send(&self, req: Req) -> Resp {
        let mut b = Request::builder().method(req.method.clone()).uri(&req.path);
        if let Some(t) = &req.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        let body = match req.body {
            Some((bytes, ct)) => {
                if let Some(ct) = ct {
                    b = b.header(header::CONTENT_TYPE, ct);
                }
                Body::from(bytes)
            }
            None => Body::empty(),
        };
        let mut request = b.body(body).expect("request builds");
        request.extensions_mut().insert(ConnectInfo(req.peer));
        let resp = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router is infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        assert_documented(&req.method, &req.path, status, &headers);
        let event_stream = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let bytes = if event_stream {
            // A live stream never ends: its first frame (the subscription comment) is enough.
            use http_body_util::BodyExt;
            let mut body = resp.into_body();
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("an event stream starts at once")
                .expect("a first frame")
                .expect("body reads");
            frame.into_data().unwrap_or_default()
        } else {
            axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body reads")
        };
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    /// `method path` with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut r = Req::new(method, path).token(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        self.send(r).await
    }

    /// Like [`TestApi::call`], asserting the status; returns the body.
    #[track_caller]
    pub fn expect<'a>(
        &'a self,
        status: StatusCode,
        method: &'a str,
        path: &'a str,
        token: Option<&'a str>,
        body: Option<Value>,
    ) -> impl std::future::Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let r = self.call(method, path, token, body).await;
            assert_eq!(
                r.status, status,
                "{method} {path} (called at {caller}): {:?}",
                r.body
            );
            r.body
        }
    }

    /// Stores a fresh setup token as `escale serve` does and returns its secret.
    pub async fn new_setup_token(&self) -> String {
        let t = escale::auth::generate_setup_token();
        self.registry
            .store_setup_token(&token_hash(&t.secret))
            .await
            .expect("setup token stored");
        t.secret
    }

    /// Binds the first admin `admin` through `POST /api/v1/setup`; returns its token.
    pub async fn setup_admin(&self) -> String {
        let secret = self.new_setup_token().await;
        let body = self
            .expect(
                StatusCode::CREATED,
                "POST",
                "/api/v1/setup",
                None,
                Some(json!({"setup_token": secret, "name": "admin", "password": PASSWORD})),
            )
            .await;
        let token = body["token"].as_str().expect("token").to_string();
        assert!(token.starts_with("esc_"), "{token}");
        token
    }

    /// Creates a team through the API (as `admin_token`).
    pub async fn create_team(&self, admin_token: &str, team: &str) {
        self.expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/teams",
            Some(admin_token),
            Some(json!({"name": team})),
        )
        .await;
    }

    /// Creates a member of `team` with [`PASSWORD`] and logs it in; returns its token.
    pub async fn create_member(&self, admin_token: &str, name: &str, team: &str) -> String {
        self.expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/users",
            Some(admin_token),
            Some(json!({"name": name, "password": PASSWORD, "role": "member", "team": team})),
        )
        .await;
        self.login(name, PASSWORD, DEFAULT_PEER).await
    }

    /// `POST /api/v1/login`; returns the new token.
    pub async fn login(&self, name: &str, password: &str, peer: &str) -> String {
        let r = self
            .send(
                Req::new("POST", "/api/v1/login")
                    .json(&json!({"name": name, "password": password}))
                    .peer(peer),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "login {name}: {:?}", r.body);
        r.body["token"].as_str().expect("token").to_string()
    }

    /// Creates an app through the API.
    pub async fn create_app(&self, token: &str, name: &str) -> Value {
        self.expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps",
            Some(token),
            Some(json!({"name": name})),
        )
        .await
    }
}

/// Asserts that the OpenAPI document lists `status` for the operation `method path` answered,
/// with the content type it answered: every test through this harness is thereby a check that
/// the document is exact. Paths outside the document (unknown routes, git, hooks, metrics)
/// are not checked.
#[track_caller]
fn assert_documented(
    method: &axum::http::Method,
    path: &str,
    status: StatusCode,
    headers: &axum::http::HeaderMap,
) {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(escale::api::openapi);
    let path = path.split('?').next().unwrap_or(path);
    let Some(op) = operation(doc, method.as_str(), path) else {
        return;
    };
    let (template, op) = op;
    let code = status.as_u16().to_string();
    let Some(resp) = op["responses"].get(&code) else {
        let msg = format!(
            "{method} {path} answered {status}, which the OpenAPI document does not list for {method} {template} (it lists {:?})",
            op["responses"].as_object().map(|r| r.keys().collect::<Vec<_>>())
        );
        // To list every gap in one run while working on the document.
        if std::env::var_os("ESCALE_DOC_CHECK_WARN").is_some() {
            eprintln!("UNDOCUMENTED: {msg}");
            return;
        }
        panic!("{msg}");
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
    match (resp.get("content").and_then(Value::as_object), ct) {
        (Some(content), Some(ct)) if !content.is_empty() => assert!(
            content.contains_key(&ct),
            "{method} {path} answered {status} as `{ct}`; the document says {:?}",
            content.keys().collect::<Vec<_>>()
        ),
        _ => {}
    }
}

/// The document's operation (path template and object) that `method path` reaches: a
/// template's `{param}` segment matches any one segment; literal segments win.
fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> Option<(&'a str, &'a Value)> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, &str, &Value)> = None;
    for (template, item) in doc["paths"].as_object()? {
        let t: Vec<&str> = template.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut literal = 0;
        let fits = t.iter().zip(&segs).all(|(t, s)| {
            if t.starts_with('{') {
                !s.is_empty()
            } else {
                literal += 1;
                t == s
            }
        });
        if fits && best.is_none_or(|(l, _, _)| literal > l) {
            best = Some((literal, template, item));
        }
    }
    let (_, template, item) = best?;
    item.get(method.to_ascii_lowercase())
        .map(|op| (template, op))
}
