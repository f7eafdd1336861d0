//! The REST API through the real `Router`, in process (`oneshot`, no sockets), as tables:
//! authorisation over every route, bad input, setup and login, secrets at rest, release
//! semantics and the OpenAPI document.

use std::collections::BTreeSet;

use axum::http::{header, StatusCode};
use serde_json::{json, Value};

use crate::support::api::{Req, Resp, TestApi, DEFAULT_PEER, PASSWORD};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token needed.
    Public,
    /// Any user; not about one app.
    User,
    /// Admins only.
    Admin,
    /// An app's routes: its team's members and admins.
    App,
}

/// One route: method, path template, sample body (JSON text, "" for none), who may call it.
/// `App` rows are in an order in which the owner can run them one after the other, each
/// succeeding (deploy before rollback, add a domain before removing it, destroy last).
const ROUTES: &[(&str, &str, &str, Access)] = &[
    ("GET", "/api/v1/health", "", Access::Public),
    ("GET", "/api/v1/openapi.json", "", Access::User),
    (
        "POST",
        "/api/v1/setup",
        r#"{"setup_token":"esc_setup_nope","name":"x","password":"long enough"}"#,
        Access::Public,
    ),
    (
        "POST",
        "/api/v1/login",
        r#"{"name":"nobody","password":"wrong password"}"#,
        Access::Public,
    ),
    ("GET", "/api/v1/me", "", Access::User),
    ("GET", "/api/v1/users", "", Access::Admin),
    (
        "POST",
        "/api/v1/users",
        r#"{"name":"newbie","password":"long enough","team":"red"}"#,
        Access::Admin,
    ),
    ("DELETE", "/api/v1/users/{name}", "", Access::Admin),
    ("GET", "/api/v1/teams", "", Access::User),
    (
        "POST",
        "/api/v1/teams",
        r#"{"name":"green"}"#,
        Access::Admin,
    ),
    ("GET", "/api/v1/tokens", "", Access::User),
    ("POST", "/api/v1/tokens", r#"{"name":"ci"}"#, Access::User),
    ("DELETE", "/api/v1/tokens/{name}", "", Access::User),
    ("GET", "/api/v1/apps", "", Access::User),
    (
        "POST",
        "/api/v1/apps",
        r#"{"name":"{newapp}"}"#,
        Access::User,
    ),
    ("GET", "/api/v1/events", "", Access::User),
    ("GET", "/api/v1/events/stream", "", Access::User),
    ("GET", "/api/v1/nodes", "", Access::Admin),
    (
        "POST",
        "/api/v1/nodes",
        r#"{"name":"{node}","address":"127.0.0.9:2376","labels":["disk=ssd"]}"#,
        Access::Admin,
    ),
    ("GET", "/api/v1/nodes/{node}", "", Access::Admin),
    ("POST", "/api/v1/nodes/{node}/renew", "{}", Access::Admin),
    ("POST", "/api/v1/nodes/{node}/cordon", "", Access::Admin),
    ("POST", "/api/v1/nodes/{node}/uncordon", "", Access::Admin),
    ("POST", "/api/v1/nodes/{node}/drain", "", Access::Admin),
    ("DELETE", "/api/v1/nodes/{node}", "", Access::Admin),
    ("GET", "/api/v1/apps/{app}/instances", "", Access::App),
    ("GET", "/api/v1/apps/{app}/logs", "", Access::App),
    ("GET", "/api/v1/apps/{app}", "", Access::App),
    ("GET", "/api/v1/apps/{app}/processes", "", Access::App),
    (
        "PATCH",
        "/api/v1/apps/{app}/processes/{process}",
        r#"{"memory":"256m","cpus":"0.5","command":["run"]}"#,
        Access::App,
    ),
    (
        "PUT",
        "/api/v1/apps/{app}/processes/{process}",
        r#"{"port":8080}"#,
        Access::App,
    ),
    (
        "PATCH",
        "/api/v1/apps/{app}/formation",
        r#"{"web":2}"#,
        Access::App,
    ),
    (
        "PUT",
        "/api/v1/apps/{app}/manifest",
        r#"{"manifest":"[processes.web]\ninstances = 1\nmemory = \"128m\"\n"}"#,
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/manifest", "", Access::App),
    (
        "PUT",
        "/api/v1/apps/{app}/webhook",
        r#"{"repository":"https://140.82.121.4/{app}.git","branch":"main"}"#,
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/webhook", "", Access::App),
    ("DELETE", "/api/v1/apps/{app}/webhook", "", Access::App),
    ("GET", "/api/v1/apps/{app}/config", "", Access::App),
    (
        "POST",
        "/api/v1/apps/{app}/releases",
        r#"{"image":"nginx:1.27"}"#,
        Access::App,
    ),
    (
        "PATCH",
        "/api/v1/apps/{app}/config",
        r#"{"set":{"PROBE":"1"}}"#,
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/releases", "", Access::App),
    (
        "GET",
        "/api/v1/apps/{app}/releases/{version}",
        "",
        Access::App,
    ),
    (
        "POST",
        "/api/v1/apps/{app}/rollback",
        r#"{"version":1}"#,
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/domains", "", Access::App),
    (
        "POST",
        "/api/v1/apps/{app}/domains",
        r#"{"domain":"{app}.example.eu"}"#,
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/certs", "", Access::App),
    (
        "POST",
        "/api/v1/apps/{app}/certs",
        r#"{"domain":"{app}.example.eu","cert_pem":"{cert_pem}","key_pem":"{key_pem}"}"#,
        Access::App,
    ),
    (
        "DELETE",
        "/api/v1/apps/{app}/certs/{domain}",
        "",
        Access::App,
    ),
    (
        "DELETE",
        "/api/v1/apps/{app}/domains/{domain}",
        "",
        Access::App,
    ),
    ("GET", "/api/v1/apps/{app}/events", "", Access::App),
    (
        "DELETE",
        "/api/v1/apps/{app}/processes/{process}",
        "",
        Access::App,
    ),
    ("DELETE", "/api/v1/apps/{app}", "", Access::App),
];

/// Routes that are admin-only through a query, beyond the `Admin` rows of [`ROUTES`].
const ADMIN_VARIANTS: &[(&str, &str)] = &[("GET", "/api/v1/apps/{app}/config?reveal=true")];

/// Fills a path or body template. `{name}` is a user under `/users`, a token under `/tokens`.
fn fill(template: &str, app: &str, newapp: &str) -> String {
    let name = if template.starts_with("/api/v1/users/") {
        "victim"
    } else {
        "ci"
    };
    let (cert_pem, key_pem) = wildcard_cert();
    template
        .replace("{cert_pem}", &cert_pem.replace('\n', "\\n"))
        .replace("{key_pem}", &key_pem.replace('\n', "\\n"))
        .replace("{domain}", &format!("{app}.example.eu"))
        .replace("{newapp}", newapp)
        .replace("{app}", app)
        .replace("{process}", "web")
        .replace("{node}", "n9")
        .replace("{version}", "1")
        .replace("{name}", name)
}

/// A self-signed `*.example.eu` certificate and its key (PEM), made once.
fn wildcard_cert() -> &'static (String, String) {
    static CERT: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        let c = rcgen::generate_simple_self_signed(vec!["*.example.eu".to_string()])
            .expect("rcgen makes a certificate");
        (c.cert.pem(), c.signing_key.serialize_pem())
    })
}

fn body_of(template: &str, app: &str, newapp: &str) -> Option<Value> {
    (!template.is_empty())
        .then(|| serde_json::from_str(&fill(template, app, newapp)).expect("table body is JSON"))
}

/// The status a successful call answers (a POST that creates nothing answers 200).
fn success(method: &str, path: &str) -> StatusCode {
    let acts = ["/renew", "/cordon", "/uncordon", "/drain"];
    match method {
        "POST" if acts.iter().any(|a| path.ends_with(a)) => StatusCode::OK,
        "POST" => StatusCode::CREATED,
        "DELETE" => StatusCode::NO_CONTENT,
        _ => StatusCode::OK,
    }
}

/// Routes whose authorisation is tested in their own module rather than in [`ROUTES`]: the
/// backups (`tests/it/backup.rs`: a member can neither take, list nor fetch one; a download
/// needs a real backup's name).
const TESTED_ELSEWHERE: &[(&str, &str)] = &[
    ("GET", "/api/v1/backups"),
    ("POST", "/api/v1/backups"),
    ("GET", "/api/v1/backups/{name}"),
];

fn table_routes() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .chain(
            TESTED_ELSEWHERE
                .iter()
                .map(|(m, p)| (m.to_string(), p.to_string())),
        )
        .collect()
}

fn openapi_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in item.as_object().expect("path item").keys() {
            if ["get", "post", "patch", "delete", "put"].contains(&m.as_str()) {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[track_caller]
fn assert_unauthorized(r: &Resp, what: &str) {
    r.assert_problem(StatusCode::UNAUTHORIZED, what);
    let www = r
        .headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        www.contains("Bearer"),
        "{what}: WWW-Authenticate is `{www}`"
    );
}

/// An installation with an admin, teams `red` and `blue`, a member of each (`rosa`, `bert`).
struct Teams {
    api: TestApi,
    admin: String,
    rosa: String,
    bert: String,
}

async fn teams() -> Teams {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    api.create_team(&admin, "red").await;
    api.create_team(&admin, "blue").await;
    let rosa = api.create_member(&admin, "rosa", "red").await;
    let bert = api.create_member(&admin, "bert", "blue").await;
    Teams {
        api,
        admin,
        rosa,
        bert,
    }
}

/// What a caller sees of an app: info, config (non-secret), releases, domains, events.
async fn app_view(api: &TestApi, token: &str, app: &str) -> Value {
    let mut out = serde_json::Map::new();
    for part in ["", "/config", "/releases", "/domains", "/events"] {
        let path = format!("/api/v1/apps/{app}{part}");
        out.insert(
            part.to_string(),
            api.expect(StatusCode::OK, "GET", &path, Some(token), None)
                .await,
        );
    }
    Value::Object(out)
}

#[tokio::test]
async fn route_table_matches_router_and_openapi() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    let doc = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/openapi.json",
            Some(&admin),
            None,
        )
        .await;
    let table = table_routes();
    assert_eq!(
        table.len(),
        ROUTES.len() + TESTED_ELSEWHERE.len(),
        "duplicate rows in ROUTES"
    );
    assert_eq!(
        openapi_routes(&doc),
        table,
        "routes in the OpenAPI document (left) vs the ROUTES table (right)"
    );
}

#[tokio::test]
async fn no_token_or_a_bogus_token_is_401_on_every_non_public_route() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    api.create_app(&admin, "shop").await;
    let bogus = [
        "esc_0000000000000000000000000000000000000000",
        "not-a-token",
        &"x".repeat(300),
    ];
    let mut checked = 0;
    for (method, path, body, access) in ROUTES {
        let path = fill(path, "shop", "newapp");
        let body = body_of(body, "shop", "newapp");
        if *access == Access::Public {
            let r = api.call(method, &path, None, body).await;
            assert_ne!(
                r.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{method} {path}"
            );
            if path.ends_with("/health") {
                assert_eq!(r.status, StatusCode::OK);
            }
            continue;
        }
        let r = api.call(method, &path, None, body.clone()).await;
        assert_unauthorized(&r, &format!("{method} {path} without token"));
        for t in bogus {
            let r = api.call(method, &path, Some(t), body.clone()).await;
            assert_unauthorized(&r, &format!("{method} {path} with bogus token"));
        }
        // Basic with a bogus password, and a scheme we do not speak.
        for h in ["Basic Z2l0OmVzY18wMDAw", "Digest x", "Bearer"] {
            let mut req = Req::new(method, &path).header(header::AUTHORIZATION, h);
            if let Some(b) = &body {
                req = req.json(b);
            }
            assert_unauthorized(&api.send(req).await, &format!("{method} {path} with `{h}`"));
        }
        checked += 1;
    }
    assert_eq!(
        checked,
        ROUTES.iter().filter(|r| r.3 != Access::Public).count()
    );
    // Nothing happened.
    let apps = api
        .expect(StatusCode::OK, "GET", "/api/v1/apps", Some(&admin), None)
        .await;
    assert_eq!(apps.as_array().unwrap().len(), 1, "{apps}");
    assert_eq!(apps[0]["release"], Value::Null);
}

#[tokio::test]
async fn a_member_of_another_team_gets_404_on_every_app_route() {
    let Teams {
        api, rosa, bert, ..
    } = teams().await;
    api.create_app(&rosa, "redshop").await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/redshop/releases",
        Some(&rosa),
        Some(json!({"image": "nginx:1.27"})),
    )
    .await;
    api.expect(
        StatusCode::OK,
        "PATCH",
        "/api/v1/apps/redshop/config",
        Some(&rosa),
        Some(json!({"set": {"A": "1"}})),
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/redshop/domains",
        Some(&rosa),
        Some(json!({"domain": "redshop.example.eu"})),
    )
    .await;
    let before = app_view(&api, &rosa, "redshop").await;

    let mut checked = 0;
    for (method, template, body, access) in ROUTES {
        if *access != Access::App {
            continue;
        }
        let path = fill(template, "redshop", "x");
        let r = api
            .call(method, &path, Some(&bert), body_of(body, "redshop", "x"))
            .await;
        r.assert_problem(StatusCode::NOT_FOUND, &format!("bert: {method} {path}"));
        // Indistinguishable from an app that does not exist.
        let missing = api
            .call(
                method,
                &fill(template, "nosuchapp", "x"),
                Some(&bert),
                body_of(body, "nosuchapp", "x"),
            )
            .await;
        missing.assert_problem(
            StatusCode::NOT_FOUND,
            &format!("bert: {method} on a missing app"),
        );
        assert_eq!(
            r.detail().replace("redshop", "nosuchapp"),
            missing.detail(),
            "{method} {path}"
        );
        checked += 1;
    }
    assert_eq!(checked, 27);
    // bert does not see redshop anywhere.
    let apps = api
        .expect(StatusCode::OK, "GET", "/api/v1/apps", Some(&bert), None)
        .await;
    assert_eq!(apps, json!([]));
    let events = api
        .expect(StatusCode::OK, "GET", "/api/v1/events", Some(&bert), None)
        .await;
    assert!(!events.to_string().contains("redshop"), "{events}");
    // bert cannot create an app for team red either.
    let r = api
        .call(
            "POST",
            "/api/v1/apps",
            Some(&bert),
            Some(json!({"name": "sneaky", "team": "red"})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "app for another team");
    assert_eq!(
        app_view(&api, &rosa, "redshop").await,
        before,
        "bert's calls changed redshop"
    );
}

#[tokio::test]
async fn a_member_gets_403_on_admin_routes_and_admins_succeed() {
    let Teams {
        api, admin, rosa, ..
    } = teams().await;
    api.create_app(&rosa, "redshop").await;
    api.expect(
        StatusCode::OK,
        "PATCH",
        "/api/v1/apps/redshop/config",
        Some(&rosa),
        Some(json!({"set": {"S": "hidden"}, "secret": true})),
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/users",
        Some(&admin),
        Some(json!({"name": "victim", "role": "member"})),
    )
    .await;
    let users_before = api
        .expect(StatusCode::OK, "GET", "/api/v1/users", Some(&admin), None)
        .await;
    let teams_before = api
        .expect(StatusCode::OK, "GET", "/api/v1/teams", Some(&admin), None)
        .await;

    let admin_rows: Vec<(&str, String, Option<Value>)> = ROUTES
        .iter()
        .filter(|r| r.3 == Access::Admin)
        .map(|(m, p, b, _)| (*m, fill(p, "redshop", "x"), body_of(b, "redshop", "x")))
        .chain(
            ADMIN_VARIANTS
                .iter()
                .map(|(m, p)| (*m, fill(p, "redshop", "x"), None)),
        )
        .collect();
    assert_eq!(admin_rows.len(), 13);
    for (method, path, body) in &admin_rows {
        let r = api.call(method, path, Some(&rosa), body.clone()).await;
        r.assert_problem(StatusCode::FORBIDDEN, &format!("rosa: {method} {path}"));
        assert!(
            r.detail().contains("admin"),
            "{method} {path}: {}",
            r.detail()
        );
    }
    assert_eq!(
        api.expect(StatusCode::OK, "GET", "/api/v1/users", Some(&admin), None)
            .await,
        users_before
    );
    assert_eq!(
        api.expect(StatusCode::OK, "GET", "/api/v1/teams", Some(&admin), None)
            .await,
        teams_before
    );

    for (method, path, body) in &admin_rows {
        let r = api.call(method, path, Some(&admin), body.clone()).await;
        assert_eq!(
            r.status,
            success(method, path),
            "admin: {method} {path}: {:?}",
            r.body
        );
    }
}

#[tokio::test]
async fn the_owner_succeeds_on_every_route_of_its_own_app() {
    let Teams { api, rosa, .. } = teams().await;
    api.create_app(&rosa, "redapp").await;
    let mut checked = 0;
    for (method, template, body, access) in ROUTES {
        let path = fill(template, "redapp", "redtwo");
        let r = api
            .call(
                method,
                &path,
                Some(&rosa),
                body_of(body, "redapp", "redtwo"),
            )
            .await;
        match access {
            Access::App | Access::User => {
                assert_eq!(
                    r.status,
                    success(method, &path),
                    "rosa: {method} {path}: {:?}",
                    r.body
                );
                if path.ends_with("/events/stream") {
                    assert!(
                        r.content_type().starts_with("text/event-stream"),
                        "{method} {path}: {}",
                        r.content_type()
                    );
                } else if r.status != StatusCode::NO_CONTENT && !path.ends_with("/logs") {
                    assert!(
                        r.content_type().starts_with("application/json"),
                        "{method} {path}: {}",
                        r.content_type()
                    );
                }
                checked += 1;
            }
            Access::Admin => {
                r.assert_problem(StatusCode::FORBIDDEN, &format!("rosa: {method} {path}"))
            }
            Access::Public => {}
        }
    }
    assert_eq!(checked, 37);
    // The last row destroyed the app; the one created through the table remains.
    let apps = api
        .expect(StatusCode::OK, "GET", "/api/v1/apps", Some(&rosa), None)
        .await;
    let names: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["redtwo"]);
}

/// One bad request and what must come back.
struct Bad {
    what: String,
    req: Req,
    status: StatusCode,
    detail: &'static str,
}

fn bad(what: impl Into<String>, req: Req, status: u16, detail: &'static str) -> Bad {
    Bad {
        what: what.into(),
        req,
        status: StatusCode::from_u16(status).unwrap(),
        detail,
    }
}

fn bad_input_table(token: &str) -> Vec<Bad> {
    let t = Some(token);
    let post = |path: &str, v: Value| Req::new("POST", path).token(t).json(&v);
    let patch = |path: &str, v: Value| Req::new("PATCH", path).token(t).json(&v);
    let get = |path: &str| Req::new("GET", path).token(t);
    let mut rows = Vec::new();

    // App names.
    for name in [
        "Shop",
        "-x",
        &"a".repeat(31),
        "$(id)",
        "../x",
        "",
        "shop-",
        "2shop",
        "sh_op",
    ] {
        rows.push(bad(
            format!("app name {name:?}"),
            post("/api/v1/apps", json!({"name": name})),
            422,
            "app name",
        ));
    }
    rows.push(bad(
        "app name in path",
        get("/api/v1/apps/Shop"),
        404,
        "app name",
    ));
    rows.push(bad(
        "app port 0",
        post("/api/v1/apps", json!({"name": "newapp", "port": 0})),
        422,
        "port 0",
    ));
    rows.push(bad(
        "app for a missing team",
        post("/api/v1/apps", json!({"name": "newapp", "team": "nope"})),
        404,
        "nope",
    ));
    // Body shape.
    rows.push(bad(
        "unknown field",
        post("/api/v1/apps", json!({"name": "a", "bogus": 1})),
        422,
        "bogus",
    ));
    rows.push(bad(
        "name of the wrong type",
        post("/api/v1/apps", json!({"name": 5})),
        422,
        "invalid type",
    ));
    rows.push(bad(
        "port of the wrong type",
        post("/api/v1/apps", json!({"name": "newapp", "port": "80"})),
        422,
        "invalid type",
    ));
    rows.push(bad(
        "missing field",
        post("/api/v1/apps", json!({})),
        422,
        "name",
    ));
    rows.push(bad(
        "body not an object",
        post("/api/v1/apps", json!([1])),
        422,
        "send a JSON object",
    ));
    rows.push(bad(
        "invalid JSON syntax",
        Req::new("POST", "/api/v1/apps")
            .token(t)
            .raw(&b"{\"name\":"[..], Some("application/json")),
        400,
        "not valid JSON",
    ));
    rows.push(bad(
        "missing content-type",
        Req::new("POST", "/api/v1/apps")
            .token(t)
            .raw(&b"{\"name\":\"newapp\"}"[..], None),
        400,
        "Content-Type",
    ));
    rows.push(bad(
        "text/plain content-type",
        Req::new("POST", "/api/v1/apps")
            .token(t)
            .raw(&b"{\"name\":\"newapp\"}"[..], Some("text/plain")),
        400,
        "Content-Type",
    ));
    rows.push(bad(
        "empty body",
        Req::new("POST", "/api/v1/apps")
            .token(t)
            .raw(Vec::new(), Some("application/json")),
        400,
        "JSON",
    ));
    // Config.
    let cfg = "/api/v1/apps/shop/config";
    for key in ["9A", "A-B", "A B", "A=B", ""] {
        rows.push(bad(
            format!("env key {key:?}"),
            patch(cfg, json!({"set": {key: "x"}})),
            422,
            "is invalid",
        ));
    }
    for key in ["PORT", "ESCALE_X"] {
        rows.push(bad(
            format!("env key {key}"),
            patch(cfg, json!({"set": {key: "x"}})),
            422,
            "reserved",
        ));
    }
    rows.push(bad(
        "unset a reserved key",
        patch(cfg, json!({"unset": ["PORT"]})),
        422,
        "reserved",
    ));
    rows.push(bad(
        "value with NUL",
        patch(cfg, json!({"set": {"B": "x\u{0}y"}})),
        422,
        "NUL",
    ));
    rows.push(bad(
        "oversize value",
        patch(cfg, json!({"set": {"B": "x".repeat(32 * 1024 + 1)}})),
        422,
        "limit is 32768",
    ));
    rows.push(bad(
        "nothing to change",
        patch(cfg, json!({})),
        422,
        "nothing to change",
    ));
    rows.push(bad(
        "unset a missing var (and set another)",
        patch(cfg, json!({"set": {"B": "2"}, "unset": ["NOPE"]})),
        404,
        "NOPE",
    ));
    rows.push(bad(
        "value not a string",
        patch(cfg, json!({"set": {"B": 2}})),
        422,
        "invalid type",
    ));
    rows.push(bad(
        "oversize body",
        patch(cfg, json!({"set": {"B": "x".repeat((1 << 20) + 10)}})),
        413,
        "too large",
    ));
    rows.push(bad(
        "reveal not a bool",
        get("/api/v1/apps/shop/config?reveal=maybe"),
        400,
        "reveal",
    ));
    rows.push(bad(
        "unknown query parameter",
        get("/api/v1/apps/shop/config?bogus=1"),
        400,
        "bogus",
    ));
    rows.push(bad(
        "events limit not a number",
        get("/api/v1/apps/shop/events?limit=ten"),
        400,
        "limit",
    ));
    // Domains.
    let dom = "/api/v1/apps/shop/domains";
    for d in ["a..b", "bad_domain.eu", "-a.eu", "a b.eu", "", "x;id.eu"] {
        rows.push(bad(
            format!("domain {d:?}"),
            post(dom, json!({"domain": d})),
            422,
            "domain",
        ));
    }
    rows.push(bad(
        "domain 1.2.3.4",
        post(dom, json!({"domain": "1.2.3.4"})),
        422,
        "the last starting with a letter",
    ));
    rows.push(bad(
        "the apps domain itself",
        post(dom, json!({"domain": "localhost"})),
        422,
        "apps domain",
    ));
    rows.push(bad(
        "domain of another app",
        post(dom, json!({"domain": "other.example.eu"})),
        409,
        "not available",
    ));
    rows.push(bad(
        "domain of another app, other case",
        post(dom, json!({"domain": "Other.Example.EU."})),
        409,
        "not available",
    ));
    rows.push(bad(
        "domain reserved for another app",
        post(dom, json!({"domain": "other.localhost"})),
        409,
        "reserved",
    ));
    rows.push(bad(
        "domain reserved for a future app",
        post(dom, json!({"domain": "future.localhost"})),
        409,
        "reserved",
    ));
    rows.push(bad(
        "remove a domain not attached",
        Req::new("DELETE", "/api/v1/apps/shop/domains/nope.example.eu").token(t),
        404,
        "nope.example.eu",
    ));
    rows.push(bad(
        "remove another app's domain",
        Req::new("DELETE", "/api/v1/apps/shop/domains/other.example.eu").token(t),
        404,
        "other.example.eu",
    ));
    // Images.
    let rel = "/api/v1/apps/shop/releases";
    for image in [
        "Nginx",
        "a b",
        "x:y:z",
        "",
        "nginx:",
        "$(id)",
        "app@sha256:zz",
    ] {
        rows.push(bad(
            format!("image {image:?}"),
            post(rel, json!({"image": image})),
            422,
            "image reference",
        ));
    }
    rows.push(bad(
        "deploy with port 70000",
        post(rel, json!({"image": "nginx", "port": 70000})),
        422,
        "port 70000",
    ));
    rows.push(bad(
        "deploy to a missing app",
        post("/api/v1/apps/nope/releases", json!({"image": "nginx"})),
        404,
        "nope",
    ));
    // Formation.
    let form = "/api/v1/apps/shop/formation";
    rows.push(bad(
        "instances -1",
        patch(form, json!({"web": -1})),
        422,
        "out of range",
    ));
    rows.push(bad(
        "instances 101",
        patch(form, json!({"web": 101})),
        422,
        "0 to 100",
    ));
    rows.push(bad(
        "instances 1.5",
        patch(form, json!({"web": 1.5})),
        422,
        "invalid type",
    ));
    rows.push(bad(
        "instances \"seven\"",
        patch(form, json!({"web": "seven"})),
        422,
        "invalid type",
    ));
    rows.push(bad(
        "empty formation",
        patch(form, json!({})),
        422,
        "at least one",
    ));
    rows.push(bad(
        "unknown process type",
        patch(form, json!({"worker": 1})),
        404,
        "it has: web",
    ));
    rows.push(bad(
        "unknown and known process types",
        patch(form, json!({"web": 3, "worker": 1})),
        404,
        "it has: web",
    ));
    // Changing a process type that does not exist (a typo) creates nothing.
    rows.push(bad(
        "resources of a missing process type",
        patch(
            "/api/v1/apps/shop/processes/wrker",
            json!({"memory": "256m"}),
        ),
        404,
        "has no process type `wrker` (it has: web)",
    ));
    rows.push(bad(
        "removing a missing process type",
        Req::new("DELETE", "/api/v1/apps/shop/processes/wrker").token(t),
        404,
        "has no process type `wrker` (it has: web)",
    ));
    rows.push(bad(
        "process name invalid",
        patch(form, json!({"Web": 1})),
        422,
        "process type",
    ));
    // Process types.
    let proc = "/api/v1/apps/shop/processes/web";
    rows.push(bad(
        "memory 4m",
        patch(proc, json!({"memory": "4m"})),
        422,
        "6m to",
    ));
    rows.push(bad(
        "memory 12x",
        patch(proc, json!({"memory": "12x"})),
        422,
        "is invalid: write",
    ));
    rows.push(bad(
        "cpus 0",
        patch(proc, json!({"cpus": "0"})),
        422,
        "0.01 to 256",
    ));
    rows.push(bad(
        "cpus abc",
        patch(proc, json!({"cpus": "abc"})),
        422,
        "0.01 to 256",
    ));
    rows.push(bad(
        "cpus -1",
        patch(proc, json!({"cpus": "-1"})),
        422,
        "0.01 to 256",
    ));
    rows.push(bad(
        "surge 0",
        patch(proc, json!({"surge": 0})),
        422,
        "surge",
    ));
    rows.push(bad(
        "health path",
        patch(proc, json!({"health": {"path": "no-slash"}})),
        422,
        "health check path",
    ));
    rows.push(bad(
        "health kind",
        patch(proc, json!({"health": {"kind": "udp"}})),
        422,
        "unknown variant",
    ));
    rows.push(bad(
        "health interval",
        patch(proc, json!({"health": {"interval_ms": 1}})),
        422,
        "out of range",
    ));
    rows.push(bad(
        "command with NUL",
        patch(proc, json!({"command": ["a\u{0}"]})),
        422,
        "NUL",
    ));
    rows.push(bad(
        "process name in path",
        patch("/api/v1/apps/shop/processes/Web_1", json!({"port": 80})),
        422,
        "process type",
    ));
    // Releases.
    rows.push(bad(
        "rollback to a missing version",
        post("/api/v1/apps/shop/rollback", json!({"version": 9})),
        404,
        "v9",
    ));
    rows.push(bad(
        "rollback to the current version",
        post("/api/v1/apps/shop/rollback", json!({"version": "v1"})),
        409,
        "already the current",
    ));
    for v in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("abc"),
        json!(null),
        json!([1]),
    ] {
        rows.push(bad(
            format!("rollback version {v}"),
            post("/api/v1/apps/shop/rollback", json!({"version": v})),
            422,
            "version",
        ));
    }
    rows.push(bad(
        "release version abc",
        get("/api/v1/apps/shop/releases/abc"),
        422,
        "not a release version",
    ));
    rows.push(bad(
        "release version 9",
        get("/api/v1/apps/shop/releases/9"),
        404,
        "v9",
    ));
    // Conflicts.
    rows.push(bad(
        "duplicate app",
        post("/api/v1/apps", json!({"name": "shop"})),
        409,
        "already exists",
    ));
    // Accounts.
    rows.push(bad(
        "duplicate team",
        post("/api/v1/teams", json!({"name": "default"})),
        409,
        "already exists",
    ));
    rows.push(bad(
        "team name",
        post("/api/v1/teams", json!({"name": "Red Team"})),
        422,
        "team name",
    ));
    rows.push(bad(
        "user name",
        post("/api/v1/users", json!({"name": "Ann"})),
        422,
        "user name",
    ));
    rows.push(bad(
        "weak password",
        post("/api/v1/users", json!({"name": "ann", "password": "short"})),
        422,
        "password",
    ));
    rows.push(bad(
        "role",
        post("/api/v1/users", json!({"name": "ann", "role": "root"})),
        422,
        "unknown variant",
    ));
    rows.push(bad(
        "duplicate user",
        post("/api/v1/users", json!({"name": "admin"})),
        409,
        "already exists",
    ));
    rows.push(bad(
        "last admin",
        Req::new("DELETE", "/api/v1/users/admin").token(t),
        409,
        "last admin",
    ));
    rows.push(bad(
        "token name",
        post("/api/v1/tokens", json!({"name": "a b"})),
        422,
        "token name",
    ));
    rows.push(bad(
        "duplicate token",
        post("/api/v1/tokens", json!({"name": "setup"})),
        409,
        "exists already",
    ));
    rows.push(bad(
        "revoke a missing token",
        Req::new("DELETE", "/api/v1/tokens/nope").token(t),
        404,
        "nope",
    ));
    // Routing.
    rows.push(bad(
        "unknown route",
        get("/api/v1/nope"),
        404,
        "no such API route",
    ));
    // Under the other machine prefixes too (any other path is the dashboard's: its 404 page
    // is tested in src/web/tests.rs).
    rows.push(bad(
        "unknown route under /git/",
        get("/git/nope"),
        404,
        "no such API route",
    ));
    rows.push(bad(
        "method not allowed",
        Req::new("PUT", "/api/v1/apps").token(t),
        405,
        "method",
    ));
    rows.push(bad(
        "method not allowed on an app",
        Req::new("POST", "/api/v1/apps/shop").token(t),
        405,
        "method",
    ));
    rows.push(bad("path not UTF-8", get("/api/v1/apps/%FF"), 400, "UTF-8"));
    rows.push(bad(
        "domain path not UTF-8",
        Req::new("DELETE", "/api/v1/apps/shop/domains/%C3").token(t),
        400,
        "UTF-8",
    ));

    // Nodes: names, addresses, labels, the local engine, a taken name, unknown nodes.
    let node = |v: Value| post("/api/v1/nodes", v);
    for (what, body, status, detail) in [
        (
            "node name",
            json!({"name": "N2", "address": "127.0.0.9:2376"}),
            422,
            "node name",
        ),
        (
            "node name",
            json!({"name": "n2-", "address": "127.0.0.9:2376"}),
            422,
            "node name",
        ),
        (
            "local node",
            json!({"name": "local", "address": "127.0.0.9:2376"}),
            422,
            "local",
        ),
        (
            "node address",
            json!({"name": "n2", "address": "n2.example:port"}),
            422,
            "HOST:PORT",
        ),
        (
            "unresolvable node",
            json!({"name": "n2", "address": "nope.invalid:2376"}),
            422,
            "--advertise",
        ),
        (
            "node address",
            json!({"name": "n2", "address": "127.0.0.9:0"}),
            422,
            "node address",
        ),
        (
            "node label",
            json!({"name": "n2", "address": "127.0.0.9:2376", "labels": ["disk"]}),
            422,
            "KEY=VALUE",
        ),
        (
            "node label",
            json!({"name": "n2", "address": "127.0.0.9:2376", "labels": ["Disk=ssd"]}),
            422,
            "label",
        ),
        (
            "advertise",
            json!({"name": "n2", "address": "127.0.0.9:2376", "advertise": "x"}),
            422,
            "IP address",
        ),
        (
            "advertise",
            json!({"name": "n2", "address": "127.0.0.9:2376", "advertise": "0.0.0.0"}),
            422,
            "advertise",
        ),
        (
            "taken node name",
            json!({"name": "n8", "address": "127.0.0.8:2376"}),
            409,
            "exists already",
        ),
    ] {
        rows.push(bad(format!("{what} {body}"), node(body), status, detail));
    }
    for (method, path, status, detail) in [
        ("POST", "/api/v1/nodes/local/cordon", 422, "local"),
        ("DELETE", "/api/v1/nodes/local", 422, "local"),
        ("GET", "/api/v1/nodes/n7", 404, "n7"),
        ("POST", "/api/v1/nodes/n7/drain", 404, "n7"),
        ("POST", "/api/v1/nodes/N7/cordon", 404, "N7"),
    ] {
        rows.push(bad(
            format!("{method} {path}"),
            Req::new(method, path).token(t),
            status,
            detail,
        ));
    }
    rows
}

/// Everything a rejected request could have changed.
async fn snapshot(api: &TestApi, admin: &str) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/api/v1/apps",
        "/api/v1/apps/shop/config?reveal=true",
        "/api/v1/apps/shop/releases",
        "/api/v1/apps/other/domains",
        "/api/v1/users",
        "/api/v1/teams",
        "/api/v1/tokens",
        "/api/v1/nodes",
    ] {
        out.insert(
            path.into(),
            api.expect(StatusCode::OK, "GET", path, Some(admin), None)
                .await,
        );
    }
    Value::Object(out)
}

#[tokio::test]
async fn bad_input_is_4xx_problem_json_and_changes_nothing() {
    let api = TestApi::new().await;
    assert_eq!(
        api.config.apps_domain, "localhost",
        "the rows about reserved names assume it"
    );
    let admin = api.setup_admin().await;
    api.create_app(&admin, "shop").await;
    api.create_app(&admin, "other").await;
    api.expect(
        StatusCode::OK,
        "PATCH",
        "/api/v1/apps/shop/config",
        Some(&admin),
        Some(json!({"set": {"A": "1"}})),
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/shop/releases",
        Some(&admin),
        Some(json!({"image": "nginx:1.27"})),
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/other/domains",
        Some(&admin),
        Some(json!({"domain": "other.example.eu"})),
    )
    .await;

    // The positive twins of some rows, so that the table does not pass by rejecting everything.
    // The API takes international names in their ASCII form (the CLI converts).
    let r = api
        .call(
            "POST",
            "/api/v1/apps/shop/domains",
            Some(&admin),
            Some(json!({"domain": "Bücher.Example"})),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "a non-ASCII domain");
    assert!(
        r.body["detail"].as_str().unwrap().contains("xn--"),
        "{:?}",
        r.body
    );
    let d = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/shop/domains",
            Some(&admin),
            Some(json!({"domain": "xn--bcher-kva.Example"})),
        )
        .await;
    assert_eq!(d["domain"], "xn--bcher-kva.example");
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/apps/shop/domains/xn--bcher-kva.example",
        Some(&admin),
        None,
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/shop/domains",
        Some(&admin),
        Some(json!({"domain": "shop.localhost"})),
    )
    .await;
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/apps/shop/domains/shop.localhost",
        Some(&admin),
        None,
    )
    .await;

    // A registered node, for the taken-name row.
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/nodes",
        Some(&admin),
        Some(json!({"name": "n8", "address": "127.0.0.8:2376"})),
    )
    .await;
    let before = snapshot(&api, &admin).await;
    let rows = bad_input_table(&admin);
    let n = rows.len();
    let mut failures = Vec::new();
    for row in rows {
        let method = row.req.method.clone();
        let path = row.req.path.chars().take(80).collect::<String>();
        let r = api.send(row.req).await;
        let ok = r.status == row.status
            && r.content_type() == "application/problem+json"
            && r.body["status"].as_u64() == Some(u64::from(r.status.as_u16()))
            && r.detail().contains(row.detail);
        if !ok {
            failures.push(format!(
                "{}: {method} {path}: want {} with detail containing {:?}, got {} {:?} {}",
                row.what,
                row.status,
                row.detail,
                r.status,
                r.content_type(),
                r.body.to_string().chars().take(300).collect::<String>()
            ));
        }
        assert!(
            r.status.is_client_error(),
            "{}: {method} {path}: {} {:?}",
            row.what,
            r.status,
            r.body
        );
        let after = snapshot(&api, &admin).await;
        assert_eq!(after, before, "{}: {method} {path} changed state", row.what);
    }
    assert!(
        failures.is_empty(),
        "{} of {n} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn setup_token_is_single_use_and_login_is_rate_limited() {
    let api = TestApi::new().await;
    // Unknown token.
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": "esc_setup_nope", "name": "admin", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "setup with an unknown token");
    let secret = api.new_setup_token().await;
    // A weak password or a bad name consume nothing.
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": secret, "name": "admin", "password": "short"})),
        )
        .await;
    r.assert_problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "setup with a weak password",
    );
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": secret, "name": "Admin!", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "setup with a bad name");
    let first = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": secret, "name": "admin", "password": PASSWORD})),
        )
        .await;
    assert_eq!(first["role"], "admin");
    let admin = first["token"].as_str().unwrap().to_string();
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": secret, "name": "eve", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "second setup with the same token");
    // A fresh token (as printed at a restart) does not work once a user exists.
    let fresh = api.new_setup_token().await;
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": fresh, "name": "eve", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "setup when users exist");
    let users = api
        .expect(StatusCode::OK, "GET", "/api/v1/users", Some(&admin), None)
        .await;
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");

    // Logins.
    let login = |password: &str, peer: &str| {
        Req::new("POST", "/api/v1/login")
            .json(&json!({"name": "admin", "password": password}))
            .peer(peer)
    };
    let other_peer = "10.0.0.7:5555";
    // An unknown user is 401 like a wrong password.
    let r = api
        .send(
            Req::new("POST", "/api/v1/login").json(&json!({"name": "ghost", "password": PASSWORD})),
        )
        .await;
    assert_unauthorized(&r, "login of an unknown user");
    for i in 1..=5 {
        let r = api.send(login("wrong password", DEFAULT_PEER)).await;
        assert_unauthorized(&r, &format!("failed login {i}"));
        assert_eq!(r.detail(), "wrong user name or password");
    }
    let r = api.send(login("wrong password", DEFAULT_PEER)).await;
    r.assert_problem(StatusCode::TOO_MANY_REQUESTS, "6th failed login");
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&retry), "Retry-After {retry}");
    // The right password does not get through the block either.
    api.send(login(PASSWORD, DEFAULT_PEER))
        .await
        .assert_problem(
            StatusCode::TOO_MANY_REQUESTS,
            "right password while blocked",
        );
    // Another address is not blocked.
    assert_unauthorized(
        &api.send(login("wrong password", other_peer)).await,
        "other address, wrong password",
    );
    let r = api.send(login(PASSWORD, other_peer)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let token = r.body["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("esc_"), "{token}");
    let me = api
        .expect(StatusCode::OK, "GET", "/api/v1/me", Some(&token), None)
        .await;
    assert_eq!(
        me,
        json!({"name": "admin", "role": "admin", "team": "default"})
    );
    // Basic auth with the token as password works too (git clients).
    let basic = base64_encode(&format!("git:{token}"));
    let r = api
        .send(
            Req::new("GET", "/api/v1/me").header(header::AUTHORIZATION, &format!("Basic {basic}")),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    // Tokens are stored hashed only.
    let named = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/tokens",
            Some(&token),
            Some(json!({"name": "ci"})),
        )
        .await;
    let ci = named["token"].as_str().unwrap().to_string();
    let rows: Vec<(i64, String, String, String, i64)> =
        sqlx::query_as("SELECT user_id, name, prefix, hash, created_at FROM api_tokens")
            .fetch_all(api.registry.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 3, "setup, login, ci");
    for secret in [&admin, &token, &ci] {
        for row in &rows {
            let text = format!("{row:?}");
            assert!(
                !text.contains(secret.as_str()),
                "a token secret is stored: {text}"
            );
            assert!(
                !text.contains(&secret[10..]),
                "the secret part of a token is stored: {text}"
            );
        }
    }
    let listed = api
        .expect(StatusCode::OK, "GET", "/api/v1/tokens", Some(&token), None)
        .await;
    for secret in [&admin, &token, &ci] {
        assert!(
            !listed.to_string().contains(&secret[10..]),
            "token list shows a secret: {listed}"
        );
    }

    // Revoking makes a token 401 at once; the others still work.
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/tokens/ci",
        Some(&token),
        None,
    )
    .await;
    assert_unauthorized(
        &api.call("GET", "/api/v1/me", Some(&ci), None).await,
        "revoked token",
    );
    api.expect(StatusCode::OK, "GET", "/api/v1/me", Some(&token), None)
        .await;
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/tokens/setup",
        Some(&token),
        None,
    )
    .await;
    assert_unauthorized(
        &api.call("GET", "/api/v1/me", Some(&admin), None).await,
        "revoked setup token",
    );
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every file of the data dir, as bytes.
fn data_files(api: &TestApi) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(api.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn secret_config_values_are_sealed_at_rest() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    let mia = api.create_member(&admin, "mia", "default").await;
    api.create_app(&admin, "shop").await;
    let canary = format!("canary-{}", escale::auth::random_hex(12));
    let second = format!("canary-{}", escale::auth::random_hex(12));
    let cfg = "/api/v1/apps/shop/config";

    let changed = api
        .expect(
            StatusCode::OK,
            "PATCH",
            cfg,
            Some(&admin),
            Some(json!({"set": {"DATABASE_URL": canary, "PLAIN": "visible"}, "secret": true})),
        )
        .await;
    assert!(!changed.to_string().contains(&canary), "{changed}");
    // Re-setting a secret without `secret` keeps it secret; making it plain takes an unset.
    api.expect(
        StatusCode::OK,
        "PATCH",
        cfg,
        Some(&admin),
        Some(json!({"set": {"PLAIN": "visible"}})),
    )
    .await;
    let still = api
        .expect(StatusCode::OK, "GET", cfg, Some(&admin), None)
        .await;
    assert_eq!(
        still[1],
        json!({"key": "PLAIN", "value": null, "secret": true}),
        "{still}"
    );
    api.expect(
        StatusCode::OK,
        "PATCH",
        cfg,
        Some(&admin),
        Some(json!({"unset": ["PLAIN"]})),
    )
    .await;
    api.expect(
        StatusCode::OK,
        "PATCH",
        cfg,
        Some(&admin),
        Some(json!({"set": {"PLAIN": "visible"}})),
    )
    .await;

    let hidden = json!([
        {"key": "DATABASE_URL", "value": null, "secret": true},
        {"key": "PLAIN", "value": "visible", "secret": false},
    ]);
    assert_eq!(
        api.expect(StatusCode::OK, "GET", cfg, Some(&admin), None)
            .await,
        hidden
    );
    assert_eq!(
        api.expect(StatusCode::OK, "GET", cfg, Some(&mia), None)
            .await,
        hidden
    );
    let revealed = api
        .expect(
            StatusCode::OK,
            "GET",
            &format!("{cfg}?reveal=true"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(revealed[0]["value"], json!(canary), "{revealed}");
    api.call("GET", &format!("{cfg}?reveal=true"), Some(&mia), None)
        .await
        .assert_problem(StatusCode::FORBIDDEN, "member reveal");

    // A deploy freezes the config into the release; a later secret goes into a release too.
    let v1 = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/shop/releases",
            Some(&mia),
            Some(json!({"image": "nginx:1.27"})),
        )
        .await;
    assert_eq!(v1["config_keys"], json!(["DATABASE_URL", "PLAIN"]));
    assert!(!v1.to_string().contains(&canary));
    let c2 = api
        .expect(
            StatusCode::OK,
            "PATCH",
            cfg,
            Some(&admin),
            Some(json!({"set": {"API_KEY": second}, "secret": true})),
        )
        .await;
    assert_eq!(c2["release"], 2);
    // The release environment opens the sealed values.
    let app = api
        .registry
        .all_apps()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == "shop")
        .unwrap();
    let env = api.registry.release_env(&app, 2).await.unwrap();
    assert!(
        env.contains(&("DATABASE_URL".to_string(), canary.clone())),
        "{env:?}"
    );
    assert!(
        env.contains(&("API_KEY".to_string(), second.clone())),
        "{env:?}"
    );
    for path in [
        "/api/v1/apps/shop/releases",
        "/api/v1/apps/shop/releases/2",
        "/api/v1/apps/shop/events",
        "/api/v1/events",
    ] {
        let body = api
            .expect(StatusCode::OK, "GET", path, Some(&admin), None)
            .await
            .to_string();
        assert!(
            !body.contains(&canary) && !body.contains(&second),
            "{path}: {body}"
        );
    }

    // Nothing on disk holds a canary: neither while open (WAL) nor after close (checkpointed).
    let check = |files: Vec<(String, Vec<u8>)>, when: &str| {
        assert!(
            files.iter().any(|(p, _)| p.ends_with("escale.db")),
            "{when}: no escale.db"
        );
        for (path, bytes) in files {
            for c in [&canary, &second] {
                assert!(!contains(&bytes, c.as_bytes()), "{when}: {path} holds {c}");
                assert!(
                    !contains(&bytes, &c.as_bytes()[7..]),
                    "{when}: {path} holds the random part of {c}"
                );
            }
        }
    };
    let open_files = data_files(&api);
    assert!(
        open_files.iter().any(|(p, _)| p.ends_with("escale.db-wal")),
        "WAL mode expected"
    );
    check(open_files, "open");
    api.registry.pool().close().await;
    check(data_files(&api), "closed");
}

#[tokio::test]
async fn releases_config_and_rollback_semantics() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    let mia = api.create_member(&admin, "mia", "default").await;
    api.create_app(&admin, "shop").await;
    let cfg = "/api/v1/apps/shop/config";
    let releases = "/api/v1/apps/shop/releases";

    // Config before any deploy creates no release.
    let c = api
        .expect(
            StatusCode::OK,
            "PATCH",
            cfg,
            Some(&admin),
            Some(json!({"set": {"A": "1"}})),
        )
        .await;
    assert_eq!(c["release"], Value::Null);
    api.expect(
        StatusCode::OK,
        "PATCH",
        cfg,
        Some(&admin),
        Some(json!({"set": {"S": "one"}, "secret": true})),
    )
    .await;
    assert_eq!(
        api.expect(StatusCode::OK, "GET", releases, Some(&admin), None)
            .await,
        json!([])
    );
    let app = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(app["release"], Value::Null);

    // Deploy: v1.
    let v1 = api
        .expect(
            StatusCode::CREATED,
            "POST",
            releases,
            Some(&admin),
            Some(json!({"image": "nginx:1.27", "port": 8000})),
        )
        .await;
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["image"], "nginx:1.27");
    assert_eq!(v1["config_keys"], json!(["A", "S"]));
    assert_eq!(v1["created_by"], "admin");
    assert_eq!(v1["status"], "deploying");
    let procs = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/processes",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(procs[0]["port"], 8000);

    // Config after the deploy: v2, same image, by mia.
    let c = api
        .expect(
            StatusCode::OK,
            "PATCH",
            cfg,
            Some(&mia),
            Some(json!({"set": {"B": "2", "S": "two"}, "unset": ["A"], "secret": true})),
        )
        .await;
    assert_eq!(c["release"], 2);
    let v2 = api
        .expect(
            StatusCode::OK,
            "GET",
            &format!("{releases}/v2"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(v2["image"], "nginx:1.27");
    assert_eq!(v2["config_keys"], json!(["B", "S"]));
    assert_eq!(v2["created_by"], "mia");
    assert_eq!(v2["source"], "config");
    assert_eq!(
        api.expect(
            StatusCode::OK,
            "GET",
            &format!("{releases}/1"),
            Some(&admin),
            None
        )
        .await["status"],
        "superseded",
        "a deploying release overtaken by the next is superseded"
    );

    // Rollback to v1: v3 with v1's image and v1's config restored.
    let v3 = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/shop/rollback",
            Some(&mia),
            Some(json!({"version": "v1"})),
        )
        .await;
    assert_eq!(v3["version"], 3);
    assert_eq!(v3["image"], "nginx:1.27");
    assert_eq!(v3["config_keys"], json!(["A", "S"]));
    assert_eq!(v3["created_by"], "mia");
    let config = api
        .expect(
            StatusCode::OK,
            "GET",
            &format!("{cfg}?reveal=true"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        config,
        json!([
            {"key": "A", "value": "1", "secret": false},
            {"key": "S", "value": "one", "secret": true},
        ])
    );
    // A new image after the rollback, then a rollback to v2.
    let v4 = api
        .expect(
            StatusCode::CREATED,
            "POST",
            releases,
            Some(&admin),
            Some(json!({"image": "nginx:1.28"})),
        )
        .await;
    assert_eq!(v4["version"], 4);
    assert_eq!(v4["config_keys"], json!(["A", "S"]));
    let v5 = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/shop/rollback",
            Some(&admin),
            Some(json!({"version": 2})),
        )
        .await;
    assert_eq!(v5["image"], "nginx:1.27");
    let config = api
        .expect(
            StatusCode::OK,
            "GET",
            &format!("{cfg}?reveal=true"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        config,
        json!([
            {"key": "B", "value": "2", "secret": true},
            {"key": "S", "value": "two", "secret": true},
        ])
    );
    let list = api
        .expect(StatusCode::OK, "GET", releases, Some(&admin), None)
        .await;
    let versions: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [5, 4, 3, 2, 1]);
    let app = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(app["release"], 5);

    // The audit log, newest first, with the actor of each change.
    let events = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/events",
            Some(&mia),
            None,
        )
        .await;
    let got: Vec<(String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("admin", "app.create"),
        ("admin", "config.update"),
        ("admin", "config.update"),
        ("admin", "process.update"),
        ("admin", "release.create"),
        ("mia", "config.update"),
        ("mia", "release.create"),
        ("mia", "release.create"),
        ("admin", "release.create"),
        ("admin", "release.create"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "{events}");
    for e in events.as_array().unwrap() {
        assert_eq!(e["app"], "shop");
    }
    let details: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(
        details.iter().any(|d| d.contains("Rollback to v1")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("Set B, S; Unset A")),
        "{details:?}"
    );
    let limited = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/events?limit=2",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(limited.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn openapi_document_is_valid_json_with_every_route_and_requires_auth() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    assert_unauthorized(
        &api.call("GET", "/api/v1/openapi.json", None, None).await,
        "openapi without token",
    );
    let r = api
        .call("GET", "/api/v1/openapi.json", Some(&admin), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type().starts_with("application/json"),
        "{}",
        r.content_type()
    );
    let doc = r.body;
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "escale API");
    assert!(doc["components"]["securitySchemes"]["token"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert_eq!(openapi_routes(&doc), table_routes());
    for (method, path, _, access) in ROUTES {
        let op = &doc["paths"][*path][method.to_lowercase()];
        assert!(op["responses"].is_object(), "{method} {path}: no responses");
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        assert_eq!(
            secured,
            *access != Access::Public,
            "{method} {path}: security in the document"
        );
    }
}

#[tokio::test]
async fn logging_in_twice_in_a_second_gives_two_tokens() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    // Concurrently, so that both land in the same second (the default token name had
    // one-second resolution, and the second login failed with 409).
    let (first, second) = tokio::join!(
        api.login("admin", PASSWORD, DEFAULT_PEER),
        api.login("admin", PASSWORD, "10.0.0.9:1000")
    );
    assert_ne!(first, second);
    for t in [&admin, &first, &second] {
        api.expect(StatusCode::OK, "GET", "/api/v1/me", Some(t), None)
            .await;
    }
    let tokens = api
        .expect(StatusCode::OK, "GET", "/api/v1/tokens", Some(&first), None)
        .await;
    assert_eq!(tokens.as_array().unwrap().len(), 3, "{tokens}");
}

#[tokio::test]
async fn a_new_app_does_not_inherit_the_events_of_a_destroyed_app_of_the_same_name() {
    let Teams {
        api,
        admin,
        rosa,
        bert,
    } = teams().await;
    api.create_app(&rosa, "shared").await;
    api.expect(
        StatusCode::OK,
        "PATCH",
        "/api/v1/apps/shared/config",
        Some(&rosa),
        Some(json!({"set": {"RED_INTERNAL_KEY": "x"}})),
    )
    .await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/shared/releases",
        Some(&rosa),
        Some(json!({"image": "registry.example.eu/red/private:1"})),
    )
    .await;
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/apps/shared",
        Some(&rosa),
        None,
    )
    .await;
    // Team blue takes the free name.
    api.create_app(&bert, "shared").await;
    for path in ["/api/v1/apps/shared/events", "/api/v1/events"] {
        let events = api
            .expect(StatusCode::OK, "GET", path, Some(&bert), None)
            .await;
        let text = events.to_string();
        assert!(
            !text.contains("RED_INTERNAL_KEY")
                && !text.contains("red/private")
                && !text.contains("rosa"),
            "{path}: bert sees team red's history of `shared`: {events:#}"
        );
        let actions: Vec<&str> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["app.create"], "{path}");
    }
    // The new app's own history starts at its creation; an admin still sees everything in /events.
    let all = api
        .expect(StatusCode::OK, "GET", "/api/v1/events", Some(&admin), None)
        .await;
    assert!(all.to_string().contains("red/private"), "{all}");
    let app_events = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shared/events",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(app_events.as_array().unwrap().len(), 1, "{app_events:#}");
}

#[tokio::test]
async fn deleting_a_user_revokes_its_tokens_and_passwordless_users_cannot_log_in() {
    let Teams {
        api, admin, rosa, ..
    } = teams().await;
    api.expect(StatusCode::OK, "GET", "/api/v1/me", Some(&rosa), None)
        .await;
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/users/rosa",
        Some(&admin),
        None,
    )
    .await;
    assert_unauthorized(
        &api.call("GET", "/api/v1/me", Some(&rosa), None).await,
        "deleted user's token",
    );
    api.call("DELETE", "/api/v1/users/rosa", Some(&admin), None)
        .await
        .assert_problem(StatusCode::NOT_FOUND, "delete twice");
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/users",
        Some(&admin),
        Some(json!({"name": "robot", "team": "red"})),
    )
    .await;
    for password in ["", "anything at all", PASSWORD] {
        let r = api
            .send(
                Req::new("POST", "/api/v1/login")
                    .json(&json!({"name": "robot", "password": password})),
            )
            .await;
        assert_unauthorized(&r, &format!("password-less user with {password:?}"));
    }
}

/// Asserts the answer to a request refused because password hashing is saturated: 503
/// problem+json with `Retry-After` and a message saying to retry.
#[track_caller]
fn assert_busy(r: &Resp, what: &str) {
    r.assert_problem(StatusCode::SERVICE_UNAVAILABLE, what);
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{what}: {r:?}");
    assert!(r.detail().contains("try again"), "{what}: {r:?}");
}

/// Issue #11 finding 5: every route that hashes a password goes through one bound; when it is
/// saturated the caller is answered 503 with `Retry-After` and nothing is changed, and a setup
/// with a wrong token is refused before any hashing.
#[tokio::test]
async fn password_hashing_is_bounded_on_every_path() {
    let api = TestApi::new().await;
    let runs = api.hashing.runs();
    // Setup with a wrong token: refused without hashing, also when hashing is saturated.
    let held = api.hashing.hold_all().await;
    let r = api
        .call(
            "POST",
            "/api/v1/setup",
            None,
            Some(json!({"setup_token": "escsetup_nope", "name": "admin", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "setup with a wrong token");
    assert_eq!(
        api.hashing.runs(),
        runs,
        "a wrong setup token hashes nothing"
    );
    // Setup with the right token while saturated: busy, and the token stays usable.
    let secret = api.new_setup_token().await;
    let body = json!({"setup_token": secret, "name": "admin", "password": PASSWORD});
    let r = api
        .call("POST", "/api/v1/setup", None, Some(body.clone()))
        .await;
    assert_busy(&r, "setup while hashing is saturated");
    assert_eq!(
        api.registry.user_count().await.unwrap(),
        0,
        "nothing changed"
    );
    drop(held);
    let admin = api
        .expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/setup",
            None,
            Some(body),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_string();

    // Known user, unknown user and wrong password all wait for the same bound.
    let held = api.hashing.hold_all().await;
    let runs = api.hashing.runs();
    for (name, password, what) in [
        ("admin", PASSWORD, "known user, right password"),
        ("admin", "wrong password", "known user, wrong password"),
        ("nobody", "wrong password", "unknown user"),
    ]
    .repeat(3)
    {
        let r = api
            .send(
                Req::new("POST", "/api/v1/login")
                    .json(&json!({"name": name, "password": password}))
                    .peer("127.0.0.9:1"),
            )
            .await;
        assert_busy(&r, what);
    }
    // Creating a user with a password: busy, and no user was created.
    let r = api
        .call(
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(json!({"name": "ann", "password": PASSWORD})),
        )
        .await;
    assert_busy(&r, "user creation while hashing is saturated");
    assert_eq!(
        api.registry.user_count().await.unwrap(),
        1,
        "nothing changed"
    );
    assert_eq!(api.hashing.runs(), runs, "nothing hashed while saturated");
    // Busy answers are not failed attempts: the limiter did not count them.
    drop(held);
    api.login("admin", PASSWORD, "127.0.0.9:1").await;
    // An unknown user's login costs a hash like a known user's (checked against a dummy).
    let runs = api.hashing.runs();
    let r = api
        .call(
            "POST",
            "/api/v1/login",
            None,
            Some(json!({"name": "nobody", "password": "wrong password"})),
        )
        .await;
    r.assert_problem(StatusCode::UNAUTHORIZED, "unknown user");
    assert_eq!(
        api.hashing.runs(),
        runs + 1,
        "the unknown user was hashed too"
    );
    // A member may not create users: refused before hashing.
    api.create_team(&admin, "red").await;
    let member = api.create_member(&admin, "bob", "red").await;
    let runs = api.hashing.runs();
    let r = api
        .call(
            "POST",
            "/api/v1/users",
            Some(&member),
            Some(json!({"name": "eve", "password": PASSWORD})),
        )
        .await;
    r.assert_problem(StatusCode::FORBIDDEN, "member creating a user");
    assert_eq!(api.hashing.runs(), runs, "refused before hashing");
}

/// Issue #11 finding 9: `/metrics` names every team's apps, so only admins may read it.
#[tokio::test]
async fn metrics_are_for_admins_only() {
    let t = teams().await;
    let r = t.api.call("GET", "/metrics", None, None).await;
    assert_unauthorized(&r, "metrics without a token");
    let r = t.api.call("GET", "/metrics", Some("esc_bogus"), None).await;
    assert_unauthorized(&r, "metrics with a bogus token");
    for (who, token) in [("rosa (red)", &t.rosa), ("bert (blue)", &t.bert)] {
        let r = t.api.call("GET", "/metrics", Some(token), None).await;
        r.assert_problem(StatusCode::FORBIDDEN, who);
        assert!(r.detail().contains("admin"), "{who}: {r:?}");
    }
    let r = t.api.call("GET", "/metrics", Some(&t.admin), None).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert!(r.content_type().starts_with("text/plain"), "{r:?}");
    assert!(r.body.as_str().unwrap_or("").contains("# TYPE"), "{r:?}");
}

/// Issue #11 finding 7: a domain under or above a name another team holds (an app's host
/// under the apps domain, or a custom domain) is refused through `domains add` and manifest
/// `apply`, for members and admins alike, with one answer that never names the other team
/// or app; nothing changes. Within a team, nesting is free.
#[tokio::test]
async fn domains_under_or_above_another_teams_names_are_refused() {
    let t = teams().await;
    let api = &t.api;
    let apps = api.config.apps_domain.clone();
    let above_apps = apps.split_once('.').map(|(_, p)| p.to_string());
    api.create_app(&t.rosa, "aapp").await; // team red
    api.create_app(&t.bert, "bapp").await; // team blue
    let add = |token: &str, app: &str, domain: &str| {
        let (token, path, domain) = (
            token.to_string(),
            format!("/api/v1/apps/{app}/domains"),
            domain.to_string(),
        );
        async move {
            api.call("POST", &path, Some(&token), Some(json!({"domain": domain})))
                .await
        }
    };
    let apply = |token: &str, app: &str, domain: &str| {
        let (token, path, doc) = (
            token.to_string(),
            format!("/api/v1/apps/{app}/manifest"),
            format!("domains = [\"{domain}\"]\n"),
        );
        async move {
            api.call("PUT", &path, Some(&token), Some(json!({"manifest": doc})))
                .await
        }
    };
    let r = add(&t.rosa, "aapp", "shop.example.eu").await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let domains_of = |app: &str| {
        let path = format!("/api/v1/apps/{app}/domains");
        let admin = t.admin.clone();
        async move {
            api.expect(StatusCode::OK, "GET", &path, Some(&admin), None)
                .await
        }
    };
    let (red_before, blue_before) = (domains_of("aapp").await, domains_of("bapp").await);

    // (domain, status from `domains add`, status from manifest `apply`).
    let mut cases: Vec<(String, StatusCode, StatusCode)> = vec![
        // Another team's app host and every name below it (the manifest refuses it at parse).
        (
            format!("aapp.{apps}"),
            StatusCode::CONFLICT,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!("login.aapp.{apps}"),
            StatusCode::CONFLICT,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!("a.b.aapp.{apps}"),
            StatusCode::CONFLICT,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        // Another team's custom domain, names below it and names above it.
        (
            "shop.example.eu".into(),
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
        ),
        (
            "www.shop.example.eu".into(),
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
        ),
        (
            "a.b.shop.example.eu".into(),
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
        ),
        (
            "example.eu".into(),
            StatusCode::CONFLICT,
            StatusCode::CONFLICT,
        ),
        // The apps domain and names above it: over every app's host, nobody's.
        (
            apps.clone(),
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    if let Some(p) = above_apps.filter(|p| p.contains('.')) {
        cases.push((
            p,
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::UNPROCESSABLE_ENTITY,
        ));
    }
    let mut custom_answers = BTreeSet::new();
    for (domain, add_status, apply_status) in &cases {
        for (who, token) in [("bert", &t.bert), ("admin", &t.admin)] {
            let r = add(token, "bapp", domain).await;
            r.assert_problem(*add_status, &format!("{who} adds {domain}"));
            let a = apply(token, "bapp", domain).await;
            a.assert_problem(*apply_status, &format!("{who} applies {domain}"));
            for (what, resp) in [("add", &r), ("apply", &a)] {
                let detail = resp.detail().replace(domain.as_str(), "DOMAIN");
                // Under the apps domain the answer names the app label the domain itself
                // has, the same whether such an app exists (checked below).
                let detail = detail
                    .replace("`aapp`", "`LABEL`")
                    .replace("aapp.", "LABEL.");
                assert!(
                    !detail.contains("rosa")
                        && !detail.contains("`red`")
                        && !detail.contains(" red ")
                        && !detail.contains("aapp")
                        && !detail.contains("shop.example.eu"),
                    "{who} {what} {domain}: the answer names who holds it: {detail}"
                );
                assert!(detail.contains("DOMAIN"), "{who} {what}: {detail}");
            }
            if !domain.ends_with(&apps) && *add_status == StatusCode::CONFLICT {
                custom_answers.insert(r.detail().replace(domain.as_str(), "DOMAIN"));
            }
        }
    }
    // Under the apps domain, an existing app's names get the answer a missing app's get.
    let held = add(&t.bert, "bapp", &format!("login.aapp.{apps}")).await;
    let free = add(&t.bert, "bapp", &format!("login.nosuchapp.{apps}")).await;
    assert_eq!(held.status, free.status);
    assert_eq!(held.detail(), free.detail().replace("nosuchapp", "aapp"));
    assert_eq!(
        custom_answers.len(),
        1,
        "one answer whether the name is held, above or below: {custom_answers:#?}"
    );
    assert_eq!(domains_of("aapp").await, red_before, "nothing changed");
    assert_eq!(domains_of("bapp").await, blue_before, "nothing changed");

    // Siblings and unrelated names are free; so is nesting within a team, on any of its apps.
    let r = add(&t.bert, "bapp", "blue.example.eu").await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    api.create_app(&t.rosa, "aapp2").await;
    for (app, domain) in [
        ("aapp", "www.shop.example.eu"),
        ("aapp2", "api.shop.example.eu"),
        ("aapp", &format!("login.aapp.{apps}")),
    ] {
        let r = add(&t.rosa, app, domain).await;
        assert_eq!(r.status, StatusCode::CREATED, "{app} {domain}: {r:?}");
    }
    // The other way round: blue's name blocks red from names above and below it.
    for domain in ["example.eu", "x.blue.example.eu", "blue.example.eu"] {
        add(&t.rosa, "aapp", domain)
            .await
            .assert_problem(StatusCode::CONFLICT, domain);
        apply(&t.rosa, "aapp", domain)
            .await
            .assert_problem(StatusCode::CONFLICT, domain);
    }
    // Once red lets its names go, blue may take them.
    for (app, domain) in [
        ("aapp", "shop.example.eu"),
        ("aapp", "www.shop.example.eu"),
        ("aapp2", "api.shop.example.eu"),
    ] {
        let path = format!("/api/v1/apps/{app}/domains/{domain}");
        api.expect(StatusCode::NO_CONTENT, "DELETE", &path, Some(&t.rosa), None)
            .await;
    }
    let r = apply(&t.bert, "bapp", "www.shop.example.eu").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
}

/// Follows `Link: rel="next"` from `first`, calling `between` before each next page; answers
/// every page's items.
async fn pages(
    api: &TestApi,
    token: &str,
    first: &str,
    mut between: impl AsyncFnMut(usize),
) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        let r = api.call("GET", &path, Some(token), None).await;
        assert_eq!(r.status, StatusCode::OK, "GET {path}: {:?}", r.body);
        let items = r.body.as_array().expect("a page is an array").clone();
        next = r
            .headers
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(|l| escale::cli::next_link(l).expect("a rel=next link"));
        if next.is_some() {
            assert!(!items.is_empty(), "a page before another is not empty");
        }
        out.push(items);
        assert!(out.len() < 100, "pagination does not end");
        if next.is_some() {
            between(out.len()).await;
        }
    }
    out
}

#[tokio::test]
async fn lists_page_with_a_stable_cursor_while_items_are_added() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    let originals: Vec<String> = (0..23).map(|i| format!("p{i:02}")).collect();
    for a in &originals {
        api.create_app(&admin, a).await;
    }
    // Apps: between pages, one app sorts before the cursor and one after it.
    let pages_of_apps = pages(&api, &admin, "/api/v1/apps?limit=5", async |n| {
        api.create_app(&admin, &format!("a-new-{n}")).await;
        api.create_app(&admin, &format!("z-new-{n}")).await;
    })
    .await;
    assert_eq!(pages_of_apps[0].len(), 5);
    let seen: Vec<String> = pages_of_apps
        .iter()
        .flatten()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an app repeated: {seen:?}");
    for a in &originals {
        assert!(seen.contains(a), "{a} lost: {seen:?}");
    }
    assert!(
        seen.iter().all(|a| !a.starts_with("a-new")),
        "apps before the cursor are not in later pages: {seen:?}"
    );
    let late = seen.iter().filter(|a| a.starts_with("z-new")).count();
    assert!(late >= 4, "apps after the cursor show: {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "by name");

    // Events, newest first: the events written between pages are newer than the cursor.
    let before = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/events?limit=1000",
            Some(&admin),
            None,
        )
        .await;
    let ids_before: Vec<i64> = before
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    let pages_of_events = pages(&api, &admin, "/api/v1/events?limit=7", async |n| {
        api.create_app(&admin, &format!("e-new-{n}")).await;
    })
    .await;
    let ids: Vec<i64> = pages_of_events
        .iter()
        .flatten()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "strictly newest first, no repeat: {ids:?}"
    );
    assert_eq!(ids, ids_before, "every event once, none lost");

    // Releases of one app, newest first, with deploys between pages.
    for _ in 0..8 {
        api.expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/p00/releases",
            Some(&admin),
            Some(json!({"image": "nginx:1.27"})),
        )
        .await;
    }
    let pages_of_releases = pages(
        &api,
        &admin,
        "/api/v1/apps/p00/releases?limit=3",
        async |_| {
            api.expect(
                StatusCode::CREATED,
                "POST",
                "/api/v1/apps/p00/releases",
                Some(&admin),
                Some(json!({"image": "nginx:1.27"})),
            )
            .await;
        },
    )
    .await;
    let versions: Vec<i64> = pages_of_releases
        .iter()
        .flatten()
        .map(|r| r["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, (1..=8).rev().collect::<Vec<_>>(), "{versions:?}");

    // A config var both unset and set in one change ends set (unset applies first).
    let out = api
        .expect(
            StatusCode::OK,
            "PATCH",
            "/api/v1/apps/p01/config",
            Some(&admin),
            Some(json!({"set": {"A": "2"}, "unset": ["A"]})),
        )
        .await;
    assert_eq!(out["vars"][0]["key"], "A", "{out}");
    assert_eq!(out["vars"][0]["value"], "2", "{out}");

    // Bad page requests say what to fix.
    for q in [
        "/api/v1/apps?limit=0",
        "/api/v1/apps?limit=1001",
        "/api/v1/events?limit=1.5",
        "/api/v1/events?after=0",
        "/api/v1/events?after=x",
        "/api/v1/apps/p00/releases?limit=-1",
        "/api/v1/apps?page=2",
    ] {
        let r = api.call("GET", q, Some(&admin), None).await;
        assert!(r.status.is_client_error(), "{q}: {}", r.status);
        r.assert_problem(r.status, q);
    }
}

#[tokio::test]
async fn a_deploy_with_an_unchanged_port_writes_no_process_update() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    api.create_app(&admin, "shop").await;
    let port = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/processes",
            Some(&admin),
            None,
        )
        .await[0]["port"]
        .as_i64()
        .unwrap();
    let updates = async || {
        api.expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/events",
            Some(&admin),
            None,
        )
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "process.update")
        .count()
    };
    for p in [port, port] {
        api.expect(
            StatusCode::CREATED,
            "POST",
            "/api/v1/apps/shop/releases",
            Some(&admin),
            Some(json!({"image": "nginx:1.27", "port": p})),
        )
        .await;
    }
    assert_eq!(updates().await, 0, "the port did not change");
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/shop/releases",
        Some(&admin),
        Some(json!({"image": "nginx:1.27", "port": port + 1})),
    )
    .await;
    assert_eq!(updates().await, 1, "the port changed once");
    let web = &api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/processes",
            Some(&admin),
            None,
        )
        .await[0];
    assert_eq!(web["port"], port + 1);
}

/// An admin cannot remove its own account (another admin can): removing oneself would end
/// the caller's own session half-way through what it was doing.
#[tokio::test]
async fn an_admin_cannot_remove_itself_another_admin_can() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/users",
        Some(&admin),
        Some(json!({"name": "ada", "password": PASSWORD, "role": "admin"})),
    )
    .await;
    let ada = api.login("ada", PASSWORD, DEFAULT_PEER).await;
    api.call("DELETE", "/api/v1/users/ada", Some(&ada), None)
        .await
        .assert_problem(StatusCode::CONFLICT, "your own account");
    api.expect(StatusCode::OK, "GET", "/api/v1/me", Some(&ada), None)
        .await;
    api.expect(
        StatusCode::NO_CONTENT,
        "DELETE",
        "/api/v1/users/ada",
        Some(&admin),
        None,
    )
    .await;
    assert_unauthorized(
        &api.call("GET", "/api/v1/me", Some(&ada), None).await,
        "removed admin's token",
    );
}
