//! The dashboard's router driven with `oneshot` (the whole API router, as `escale serve`
//! mounts it): login and sessions, CSRF, headers on every answer, escaping, team scoping.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use tower::ServiceExt;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::registry::{Actor, Registry, Role};
use crate::secrets::MasterKey;

const PASSWORD: &str = "correct horse battery";
const XSS: &str = "<script>alert(1)</script>";

struct T {
    _dir: tempfile::TempDir,
    registry: Registry,
    router: Router,
    admin: Actor,
    metrics: Arc<crate::proxy::ProxyMetrics>,
    rates: Arc<super::rates::Rates>,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A logged-in browser: its session cookie and CSRF token.
#[derive(Clone)]
struct Browser {
    cookie: String,
    csrf: String,
}

impl T {
    async fn new() -> T {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(Config::for_data_dir(dir.path()));
        let registry = Registry::open(&config.database_path(), MasterKey::random())
            .await
            .unwrap();
        let state = AppState::new(registry.clone(), config);
        let hash = state.hashing.hash(PASSWORD).await.unwrap();
        let root = registry.host_admin().await.unwrap();
        registry
            .create_user(&root, "alice", Some(&hash), Role::Admin, "default")
            .await
            .unwrap();
        registry.create_team(&root, "red").await.unwrap();
        registry.create_team(&root, "blue").await.unwrap();
        registry
            .create_user(&root, "rita", Some(&hash), Role::Member, "red")
            .await
            .unwrap();
        registry
            .create_user(&root, "bob", Some(&hash), Role::Member, "blue")
            .await
            .unwrap();
        T {
            _dir: dir,
            registry,
            metrics: state.metrics.clone(),
            rates: state.rates.clone(),
            router: router(state),
            admin: root,
        }
    }

    async fn send(&self, mut req: Request<Body>) -> Resp {
        let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 4 << 20)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, b: Option<&Browser>) -> Resp {
        let mut r = Request::get(path).header(header::HOST, "dash.test");
        if let Some(b) = b {
            r = r.header(header::COOKIE, &b.cookie);
        }
        self.send(r.body(Body::empty()).unwrap()).await
    }

    /// A form post from the dashboard's own origin.
    async fn post(&self, path: &str, b: &Browser, fields: &[(&str, &str)]) -> Resp {
        self.post_with(path, Some(b), fields, &[("origin", "http://dash.test")])
            .await
    }

    async fn post_with(
        &self,
        path: &str,
        b: Option<&Browser>,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Resp {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut r = Request::post(path)
            .header(header::HOST, "dash.test")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(b) = b {
            r = r.header(header::COOKIE, &b.cookie);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        self.send(r.body(Body::from(body)).unwrap()).await
    }

    /// Logs in through the login form; the session cookie and the CSRF token of its pages.
    async fn login(&self, name: &str) -> Browser {
        let (status, cookie) = self.try_login(name, PASSWORD).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{name} logs in");
        let mut b = Browser {
            cookie: cookie.expect("a session cookie"),
            csrf: String::new(),
        };
        let page = self.get("/account", Some(&b)).await;
        assert_eq!(page.status, StatusCode::OK);
        b.csrf = between(&page.body, "name=\"csrf\" value=\"", "\"").to_string();
        assert_eq!(b.csrf.len(), 32, "the page carries the CSRF token");
        b
    }

    /// The login form, then its post: the status and the session cookie set, if any.
    async fn try_login(&self, name: &str, password: &str) -> (StatusCode, Option<String>) {
        let form = self.get("/login", None).await;
        let login_cookie = set_cookie(&form.headers, "escale_login").unwrap();
        let token = between(&form.body, "name=\"login_token\" value=\"", "\"").to_string();
        let pre = Browser {
            cookie: format!("escale_login={login_cookie}"),
            csrf: String::new(),
        };
        let r = self
            .post_with(
                "/login",
                Some(&pre),
                &[
                    ("login_token", &token),
                    ("name", name),
                    ("password", password),
                ],
                &[("origin", "http://dash.test")],
            )
            .await;
        let session = set_cookie(&r.headers, "escale_session")
            .filter(|v| !v.is_empty())
            .map(|v| format!("escale_session={v}"));
        (r.status, session)
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let i = s.find(start).unwrap_or_else(|| panic!("{start} in {s}")) + start.len();
    let j = s[i..].find(end).unwrap() + i;
    &s[i..j]
}

/// The value a `Set-Cookie` header gives cookie `name`.
fn set_cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
}

fn set_cookie_line(h: &HeaderMap, name: &str) -> String {
    h.get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or("")
        .to_string()
}

#[track_caller]
fn assert_security_headers(r: &Resp, what: &str) {
    let csp = r
        .headers
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{what}: no CSP"));
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(csp.contains("script-src 'self'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-eval"), "{what}: {csp}");
    assert_eq!(
        r.headers.get(header::X_CONTENT_TYPE_OPTIONS).unwrap(),
        "nosniff",
        "{what}"
    );
    assert_eq!(
        r.headers.get(header::REFERRER_POLICY).unwrap(),
        "same-origin",
        "{what}"
    );
}

#[tokio::test]
async fn pages_need_a_session_and_redirect_to_the_login() {
    let t = T::new().await;
    for path in [
        "/",
        "/apps/shop",
        "/apps/shop/instances",
        "/apps/shop/logs/live",
        "/live",
        "/nodes",
        "/events",
        "/account",
        "/overview/apps",
    ] {
        let r = t.get(path, None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.location(), "/login", "{path}");
        assert_security_headers(&r, path);
    }
    // A forged or unknown cookie is no session.
    let fake = Browser {
        cookie: format!("escale_session={}", "ab".repeat(32)),
        csrf: String::new(),
    };
    assert_eq!(t.get("/", Some(&fake)).await.location(), "/login");
    // Nor is an API token in the cookie.
    let r = t.post("/apps", &fake, &[("name", "x")]).await;
    assert_eq!(r.location(), "/login");
    assert!(t.registry.all_apps().await.unwrap().is_empty());
    // The API keeps answering problem+json under its prefix.
    let r = t.get("/api/v1/nothing", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.headers.get(header::CONTENT_TYPE).unwrap(),
        "application/problem+json"
    );
    let r = t.get("/no/such/page", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.contains("<html"), "{}", r.body);
    assert_security_headers(&r, "404 page");
}

#[tokio::test]
async fn login_sets_a_strict_session_cookie_rotated_at_each_login() {
    let t = T::new().await;
    let login_page = t.get("/login", None).await;
    assert_security_headers(&login_page, "login page");
    let line = set_cookie_line(&login_page.headers, "escale_login");
    assert!(
        line.contains("HttpOnly") && line.contains("SameSite=Strict"),
        "{line}"
    );

    let (status, cookie) = t.try_login("alice", "wrong password").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(cookie.is_none());

    let form = t.get("/login", None).await;
    let token = between(&form.body, "name=\"login_token\" value=\"", "\"").to_string();
    let pre = Browser {
        cookie: format!(
            "escale_login={}",
            set_cookie(&form.headers, "escale_login").unwrap()
        ),
        csrf: String::new(),
    };
    let r = t
        .post_with(
            "/login",
            Some(&pre),
            &[
                ("login_token", &token),
                ("name", "alice"),
                ("password", PASSWORD),
            ],
            &[
                ("origin", "http://dash.test"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let line = set_cookie_line(&r.headers, "escale_session");
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(line.contains(part), "{line} lacks {part}");
    }
    let first = t.login("alice").await;
    let second = t.login("alice").await;
    assert_ne!(
        first.cookie, second.cookie,
        "a new session id at each login"
    );
    assert_ne!(
        first.csrf, second.csrf,
        "the CSRF token follows the session"
    );
    // The session id is stored hashed only.
    let id = first.cookie.trim_start_matches("escale_session=");
    let stored: Vec<String> = sqlx::query_scalar("SELECT hash FROM web_sessions")
        .fetch_all(t.registry.pool())
        .await
        .unwrap();
    assert!(!stored.iter().any(|h| h == id));
    assert!(stored.contains(&crate::auth::token_hash(id)));
}

#[tokio::test]
async fn the_login_form_is_rate_limited_like_the_api() {
    let t = T::new().await;
    for _ in 0..5 {
        assert_eq!(
            t.try_login("rita", "nope").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, cookie) = t.try_login("rita", PASSWORD).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password"
    );
    assert!(cookie.is_none());
    // The API's login shares the limiter: rita is locked out there too.
    let r = t
        .send(
            Request::post("/api/v1/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    "{{\"name\":\"rita\",\"password\":\"{PASSWORD}\"}}"
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "one limiter for both"
    );
}

#[tokio::test]
async fn logout_revokes_the_session_server_side() {
    let t = T::new().await;
    let b = t.login("rita").await;
    assert_eq!(t.get("/", Some(&b)).await.status, StatusCode::OK);
    // Logout is a state change: without the token it is refused and the session lives.
    let r = t.post("/logout", &b, &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(t.get("/", Some(&b)).await.status, StatusCode::OK);
    let r = t.post("/logout", &b, &[("csrf", &b.csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/login");
    assert!(set_cookie_line(&r.headers, "escale_session").contains("Max-Age=0"));
    // The old cookie, replayed, is nobody.
    let r = t.get("/", Some(&b)).await;
    assert_eq!(r.location(), "/login");
    let r = t
        .post("/apps", &b, &[("csrf", &b.csrf), ("name", "late")])
        .await;
    assert_eq!(r.location(), "/login");
    assert!(t.registry.all_apps().await.unwrap().is_empty());
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM web_sessions")
        .fetch_one(t.registry.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn an_expired_session_is_no_session() {
    let t = T::new().await;
    let b = t.login("rita").await;
    sqlx::query("UPDATE web_sessions SET expires_at = 1")
        .execute(t.registry.pool())
        .await
        .unwrap();
    assert_eq!(t.get("/", Some(&b)).await.location(), "/login");
}

#[tokio::test]
async fn state_changes_need_the_sessions_csrf_token_and_a_same_site_origin() {
    let t = T::new().await;
    let b = t.login("alice").await;
    let other = t.login("rita").await;
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(&str, Fields, Fields)> = vec![
        ("no token", vec![], vec![("origin", "http://dash.test")]),
        (
            "empty token",
            vec![("csrf", "")],
            vec![("origin", "http://dash.test")],
        ),
        (
            "wrong token",
            vec![("csrf", "0123456789abcdef0123456789abcdef")],
            vec![],
        ),
        (
            "another session's token",
            vec![("csrf", &other.csrf)],
            vec![],
        ),
        (
            "cross-site origin",
            vec![("csrf", &b.csrf)],
            vec![("origin", "https://evil.example")],
        ),
        (
            "lookalike origin",
            vec![("csrf", &b.csrf)],
            vec![("origin", "http://dash.test.evil.example")],
        ),
        (
            "null origin",
            vec![("csrf", &b.csrf)],
            vec![("origin", "null")],
        ),
        (
            "cross-site fetch",
            vec![("csrf", &b.csrf)],
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            "same-site fetch",
            vec![("csrf", &b.csrf)],
            vec![("sec-fetch-site", "same-site")],
        ),
    ];
    for (what, mut fields, headers) in cases {
        fields.push(("name", "evil"));
        let r = t.post_with("/apps", Some(&b), &fields, &headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{what}: {}", r.body);
        assert_security_headers(&r, what);
        // The same refusal on the other forms: config, scale, tokens, logout, nodes.
        for path in [
            "/apps/evil/config",
            "/account/tokens",
            "/logout",
            "/nodes/n1/drain",
        ] {
            let r = t.post_with(path, Some(&b), &fields, &headers).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{what} on {path}");
        }
    }
    assert!(t.registry.all_apps().await.unwrap().is_empty());
    assert!(t.registry.list_tokens(&t.admin).await.unwrap().is_empty());
    // The login form: its double-submit token, and the origin.
    let r = t
        .post_with(
            "/login",
            None,
            &[("name", "alice"), ("password", PASSWORD)],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(set_cookie(&r.headers, "escale_session").is_none());
    // The same post with the token and the page's origin works.
    let r = t
        .post("/apps", &b, &[("csrf", &b.csrf), ("name", "good")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/apps/good");
    // A GET never changes anything (no route takes a state change by GET).
    let r = t
        .get("/apps/good/scale?process=web&instances=3", Some(&b))
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn every_page_carries_the_security_headers() {
    let t = T::new().await;
    let b = t.login("alice").await;
    t.post("/apps", &b, &[("csrf", &b.csrf), ("name", "shop")])
        .await;
    for path in [
        "/",
        "/login",
        "/apps/shop",
        "/apps/shop/instances",
        "/overview/apps",
        "/nodes",
        "/events",
        "/account",
        "/apps/missing",
    ] {
        let r = t.get(path, Some(&b)).await;
        assert!(
            r.status != StatusCode::INTERNAL_SERVER_ERROR,
            "{path}: {}",
            r.body
        );
        assert_security_headers(&r, path);
        assert_eq!(
            r.headers.get(header::CACHE_CONTROL).unwrap(),
            "no-store",
            "{path}"
        );
        // No inline script or style: everything the CSP allows comes from /assets/.
        assert!(!r.body.contains("<script>"), "{path}");
        assert!(!r.body.contains("style="), "{path}");
        assert!(!r.body.contains(" onclick="), "{path}");
    }
}

#[tokio::test]
async fn assets_are_served_by_content_hash_and_cached() {
    let t = T::new().await;
    let b = t.login("alice").await;
    let page = t.get("/", Some(&b)).await;
    for a in super::assets::all() {
        let url = super::assets::url(a.name);
        assert!(page.body.contains(&url), "the page links {url}");
        let r = t.get(&url, None).await;
        assert_eq!(r.status, StatusCode::OK, "{url}");
        assert_eq!(r.body.as_bytes(), &a.data[..]);
        assert!(r.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("immutable"));
        assert_security_headers(&r, &url);
        let etag = r.headers[header::ETAG].to_str().unwrap().to_string();
        let again = t
            .send(
                Request::get(&url)
                    .header(header::IF_NONE_MATCH, etag)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED);
        // The plain name is not served (it would be cached as if it never changed).
        let plain = t.get(&format!("/assets/{}", a.name), None).await;
        assert_eq!(plain.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        t.get("/assets/README.md", None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn what_users_and_apps_wrote_is_rendered_as_text() {
    let t = T::new().await;
    let b = t.login("alice").await;
    // An app name is never markup: refused, and the refusal page escapes what was sent.
    let r = t
        .post("/apps", &b, &[("csrf", &b.csrf), ("name", XSS)])
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!r.body.contains(XSS), "{}", r.body);
    t.post("/apps", &b, &[("csrf", &b.csrf), ("name", "shop")])
        .await;
    // A config value, plain and secret (revealed by an admin who asks).
    let r = t
        .post(
            "/apps/shop/config",
            &b,
            &[("csrf", &b.csrf), ("key", "GREETING"), ("value", XSS)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    t.post(
        "/apps/shop/config",
        &b,
        &[
            ("csrf", &b.csrf),
            ("key", "TOKEN"),
            ("value", "s3cr\"et<b>"),
            ("secret", "1"),
        ],
    )
    .await;
    // A release whose description (a commit message) and source carry markup.
    let app = t.registry.app(&t.admin, "shop").await.unwrap();
    t.registry
        .deploy_image(
            &t.admin,
            &app,
            "example/shop:1",
            &format!("fix {XSS} \"quotes\" & more"),
            None,
        )
        .await
        .unwrap();
    let page = t.get("/apps/shop", Some(&b)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains(XSS), "no raw payload on the page");
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.body.contains("&quot;quotes&quot; &amp; more"));
    // The secret is masked...
    assert!(!page.body.contains("s3cr"), "secret masked");
    assert!(page.body.contains("Reveal secrets"));
    // ...and revealed, escaped, to an admin who asks.
    let revealed = t.get("/apps/shop?reveal=1", Some(&b)).await;
    assert!(
        revealed.body.contains("s3cr&quot;et&lt;b&gt;"),
        "{}",
        revealed.body
    );
    // A pushed release's build output, as text, on its own page (another team: 404).
    t.registry
        .release_push(
            &t.admin,
            &app,
            None,
            "example/shop:2",
            "git 1a2b3c4",
            &format!("commit {XSS}"),
            &format!("Step 1/2 : RUN echo {XSS}"),
        )
        .await
        .unwrap();
    let page = t.get("/apps/shop", Some(&b)).await;
    assert!(
        page.body.contains("/apps/shop/releases/2/build-log"),
        "{}",
        page.body
    );
    assert!(!page.body.contains(XSS));
    let log = t.get("/apps/shop/releases/2/build-log", Some(&b)).await;
    let bob = t.login("bob").await;
    assert_eq!(
        t.get("/apps/shop/releases/2/build-log", Some(&bob))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(log.status, StatusCode::OK);
    assert!(log.body.contains("RUN echo &lt;script&gt;"), "{}", log.body);
    assert!(!log.body.contains(XSS));
    // The events page shows the audit details as text too.
    let events = t.get("/events", Some(&b)).await;
    assert!(!events.body.contains(XSS));
    assert!(events.body.contains("&lt;script&gt;"));
    // Filtered by action text: only config changes.
    let filtered = t.get("/events?app=shop&text=config.update", Some(&b)).await;
    assert!(filtered.body.contains("config.update"), "{}", filtered.body);
    assert!(
        !filtered.body.contains("release.create"),
        "{}",
        filtered.body
    );
}

#[tokio::test]
async fn a_member_sees_another_teams_app_as_a_plain_404() {
    let t = T::new().await;
    let admin = t.login("alice").await;
    t.post(
        "/apps",
        &admin,
        &[("csrf", &admin.csrf), ("name", "red-shop"), ("team", "red")],
    )
    .await;
    t.post(
        "/apps/red-shop/config",
        &admin,
        &[
            ("csrf", &admin.csrf),
            ("key", "SECRET_THING"),
            ("value", "red-only"),
        ],
    )
    .await;
    t.post(
        "/apps/red-shop/config",
        &admin,
        &[
            ("csrf", &admin.csrf),
            ("key", "API_KEY"),
            ("value", "hidden-from-members"),
            ("secret", "1"),
        ],
    )
    .await;
    let rita = t.login("rita").await;
    let bob = t.login("bob").await;
    // A member of the team does not get secrets by asking (as with the API's `reveal`).
    let r = t.get("/apps/red-shop?reveal=1", Some(&rita)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.body.contains("hidden-from-members"));
    assert!(!r.body.contains("Reveal secrets"));
    // Rita (team red) sees it.
    let r = t.get("/apps/red-shop", Some(&rita)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("red-only"));
    assert!(t.get("/", Some(&rita)).await.body.contains("red-shop"));
    // Bob (team blue): the same page as an app that does not exist.
    let other = t.get("/apps/red-shop", Some(&bob)).await;
    let missing = t.get("/apps/blue-nothing", Some(&bob)).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        other.body.replace("red-shop", "NAME"),
        missing.body.replace("blue-nothing", "NAME"),
        "no hint that it exists"
    );
    assert!(!other.body.contains("red-only"));
    assert!(!t.get("/", Some(&bob)).await.body.contains("red-shop"));
    for path in [
        "/apps/red-shop/instances",
        "/apps/red-shop/logs/live",
        "/live?app=red-shop",
    ] {
        assert_eq!(
            t.get(path, Some(&bob)).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // Nor can he change it.
    for (path, fields) in [
        ("/apps/red-shop/config", vec![("key", "X"), ("value", "1")]),
        ("/apps/red-shop/config/unset", vec![("key", "SECRET_THING")]),
        (
            "/apps/red-shop/scale",
            vec![("process", "web"), ("instances", "3")],
        ),
        ("/apps/red-shop/rollback", vec![("version", "1")]),
        (
            "/apps/red-shop/domains",
            vec![("domain", "red.example.com")],
        ),
        ("/apps/red-shop/deploy", vec![("image", "example/x:1")]),
    ] {
        let mut f = fields.clone();
        f.push(("csrf", &bob.csrf));
        let r = t.post(path, &bob, &f).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
    }
    let cfg = t.registry.config(&t.admin, "red-shop", true).await.unwrap();
    assert_eq!(cfg.len(), 2, "unchanged: {cfg:?}");
    // Admin pages are an admin's: a member gets 403 for nodes, and no node actions.
    assert_eq!(
        t.get("/nodes", Some(&bob)).await.status,
        StatusCode::FORBIDDEN
    );
    let r = t
        .post("/nodes/n1/drain", &bob, &[("csrf", &bob.csrf)])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .post(
            "/account/users",
            &bob,
            &[("csrf", &bob.csrf), ("name", "mallory"), ("role", "admin")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_token_is_shown_once_and_can_be_revoked() {
    let t = T::new().await;
    let b = t.login("rita").await;
    let r = t
        .post("/account/tokens", &b, &[("csrf", &b.csrf), ("name", "ci")])
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let secret = between(&r.body, "<code id=\"new-token\">", "<").to_string();
    assert!(secret.starts_with("esc_"), "{secret}");
    // It works against the API, and is not on the account page any more.
    let me = t
        .send(
            Request::get("/api/v1/me")
                .header(header::AUTHORIZATION, format!("Bearer {secret}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(me.status, StatusCode::OK);
    assert!(!t.get("/account", Some(&b)).await.body.contains(&secret));
    let r = t
        .post(
            "/account/tokens/revoke",
            &b,
            &[("csrf", &b.csrf), ("name", "ci")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let me = t
        .send(
            Request::get("/api/v1/me")
                .header(header::AUTHORIZATION, format!("Bearer {secret}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_overview_says_what_to_do_and_renders_many_apps() {
    let t = T::new().await;
    let b = t.login("alice").await;
    let empty = t.get("/", Some(&b)).await;
    assert!(empty.body.contains("No apps yet"));
    t.post("/apps", &b, &[("csrf", &b.csrf), ("name", "shop")])
        .await;
    let app = t.get("/apps/shop", Some(&b)).await;
    assert!(
        app.body
            .contains("git remote add escale http://dash.test/git/shop.git"),
        "{}",
        app.body
    );
    let overview = t.get("/", Some(&b)).await;
    assert!(overview.body.contains("never deployed"));
    assert!(overview.body.contains("href=\"/apps/shop\""));
}

#[tokio::test]
async fn traffic_shows_as_rates_and_sparklines_from_the_proxys_counters() {
    let t = T::new().await;
    let b = t.login("alice").await;
    t.post("/apps", &b, &[("csrf", &b.csrf), ("name", "shop")])
        .await;
    let before = t.get("/apps/shop", Some(&b)).await;
    assert!(before.body.contains("No request reached this app"));
    let m = t.metrics.app("shop");
    for status in [200, 200, 404, 503] {
        m.record(status, std::time::Duration::from_millis(4));
    }
    t.rates
        .sample("shop", t.metrics.app_totals("shop").unwrap());
    for _ in 0..60 {
        m.record(200, std::time::Duration::from_millis(4));
    }
    t.rates
        .sample("shop", t.metrics.app_totals("shop").unwrap());
    let overview = t.get("/", Some(&b)).await;
    assert!(overview.body.contains("2.0 req/s"), "{}", overview.body);
    assert!(
        overview.body.contains("64 total, 1 5xx"),
        "{}",
        overview.body
    );
    assert!(overview.body.contains("<svg class=\"spark\""));
    let page = t.get("/apps/shop", Some(&b)).await;
    assert!(page.body.contains("2xx 62"), "{}", page.body);
    assert!(
        page.body
            .contains("Last hour, time to response head: p50 ≤ 5 ms"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("polyline class=\"lat\""),
        "the p95 line is drawn"
    );
    assert!(page.body.contains("5xx 1"));
    assert!(
        page.body.contains("polyline class=\"err\""),
        "the 5xx line is drawn"
    );
}

/// For `scripts/bench-dashboard`: server time to render the overview (`GET /` through the
/// router, session lookup included) with 10 and 1,000 apps, and the embedded assets' sizes.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by scripts/bench-dashboard"]
async fn bench_overview_render() {
    let t = T::new().await;
    let b = t.login("alice").await;
    for a in super::assets::all() {
        println!("asset {}: {} bytes", a.hashed, a.data.len());
    }
    println!(
        "assets total: {} bytes",
        super::assets::all()
            .iter()
            .map(|a| a.data.len())
            .sum::<usize>()
    );
    let mut made = 0;
    for n in [10usize, 1000] {
        while made < n {
            let name = format!("app{made:04}");
            t.registry
                .create_app(&t.admin, &name, None, 8080)
                .await
                .unwrap();
            let app = t.registry.app(&t.admin, &name).await.unwrap();
            t.registry
                .deploy_image(&t.admin, &app, "example/app:1", "Deploy", None)
                .await
                .unwrap();
            made += 1;
        }
        // Warm up, then time.
        let r = t.get("/", Some(&b)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.matches("<tr>").count(), n + 1, "one row per app");
        let rounds = 20;
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = std::time::Instant::now();
            let r = t.get("/", Some(&b)).await;
            times.push(start.elapsed());
            assert_eq!(r.status, StatusCode::OK);
        }
        times.sort();
        println!(
            "overview with {n} apps: median {:?}, p90 {:?}, page {} bytes",
            times[rounds / 2],
            times[rounds * 9 / 10],
            r.body.len()
        );
    }
}

/// Reads an SSE body until a `data:` line containing `needle` (or panics after `limit`,
/// listing what came).
async fn read_until(body: &mut Body, needle: &str, limit: std::time::Duration) -> String {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut text = String::new();
    loop {
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("data: ") && l.contains(needle))
        {
            return line.trim_start_matches("data: ").to_string();
        }
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(&String::from_utf8_lossy(&d));
                }
            }
            other => panic!("no `{needle}` in the stream ({other:?}); read:\n{text}"),
        }
    }
}

#[tokio::test]
async fn the_live_stream_is_the_actors_events_as_json() {
    let t = T::new().await;
    let admin = t.login("alice").await;
    let bob = t.login("bob").await;
    t.post(
        "/apps",
        &admin,
        &[("csrf", &admin.csrf), ("name", "red-shop"), ("team", "red")],
    )
    .await;
    t.post(
        "/apps",
        &admin,
        &[
            ("csrf", &admin.csrf),
            ("name", "blue-shop"),
            ("team", "blue"),
        ],
    )
    .await;
    let open = |b: &Browser| {
        Request::get("/live")
            .header(header::HOST, "dash.test")
            .header(header::COOKIE, &b.cookie)
            .body(Body::empty())
            .unwrap()
    };
    let resp = t.router.clone().oneshot(open(&bob)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut bob_stream = resp.into_body();
    let mut admin_stream = t
        .router
        .clone()
        .oneshot(open(&admin))
        .await
        .unwrap()
        .into_body();
    // A change to red-shop (not bob's), then one to blue-shop (bob's).
    t.post(
        "/apps/red-shop/config",
        &admin,
        &[("csrf", &admin.csrf), ("key", "RED"), ("value", XSS)],
    )
    .await;
    t.post(
        "/apps/blue-shop/config",
        &admin,
        &[("csrf", &admin.csrf), ("key", "BLUE"), ("value", "1")],
    )
    .await;
    let limit = std::time::Duration::from_secs(10);
    let seen = read_until(&mut admin_stream, "RED", limit).await;
    let v: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(v["app"], "red-shop");
    assert_eq!(v["type"], "changed");
    // Bob's stream: blue-shop's change arrives, red-shop's never did (it came first).
    let first = read_until(&mut bob_stream, "\"app\"", limit).await;
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["app"], "blue-shop", "{first}");
    // Another team's app cannot be followed by name.
    let r = t.get("/live?app=red-shop", Some(&bob)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
