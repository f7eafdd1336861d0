//! `escale.toml` manifests end to end: `escale apply` and `escale export` against a real
//! `escale serve`, and `PUT/GET /api/v1/apps/{app}/manifest` through the in-process router for
//! release semantics.

use axum::http::StatusCode;
use serde_json::{json, Value};

use escale::manifest::Manifest;

use crate::support::api::TestApi;
use crate::support::server::TestServer;

/// A manifest with every kind of field, all explicit (so that export gives the same content).
const FULL: &str = r#"
app = "shop"
domains = ["shop.example.eu", "www.shop.example.eu"]

[env]
LOG_LEVEL = "info"
GREETING = "hello world"

[processes.web]
command = ["/webapp", "--listen", "0.0.0.0"]
port = 5000
instances = 2
memory = "256m"
cpus = 0.5
surge = 2

[processes.web.health]
kind = "http"
path = "/healthz"
interval = "10s"
timeout = "1s"
grace = "1m"

[processes.worker]
command = ["/webapp", "--worker"]
port = 6000
instances = 1

[processes.worker.health]
kind = "none"
"#;

/// Writes `text` into the server's temp dir and returns the path.
fn write(s: &TestServer, name: &str, text: &str) -> String {
    let p = s.dir.path().join(name);
    std::fs::write(&p, text).expect("write manifest");
    p.display().to_string()
}

fn export(s: &TestServer, app: &str) -> String {
    s.ok(&["export", app])
}

/// Everything a manifest could have changed, plus the audit log and releases.
fn snapshot(s: &TestServer, app: &str) -> Value {
    json!({
        "info": s.json(&["apps", "info", app]),
        "config": s.json(&["config", "get", app]),
        "domains": s.json(&["domains", "list", app]),
        "releases": s.json(&["releases", app]),
        "events": s.json(&["events", app]),
    })
}

#[tokio::test]
async fn apply_then_export_round_trips() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop", "--port", "5000"]);
    let file = write(&s, "escale.toml", FULL);

    let out = s.json(&["apply", "-f", &file]);
    assert_eq!(out["processes_created"], json!(["worker"]), "{out}");
    assert_eq!(out["processes_updated"], json!(["web"]), "{out}");
    assert_eq!(
        out["domains_added"],
        json!(["shop.example.eu", "www.shop.example.eu"])
    );
    assert_eq!(out["env_set"], json!(["GREETING", "LOG_LEVEL"]));
    assert_eq!(out["release"], Value::Null, "not deployed: no release");

    // export(apply(m)) has m's content.
    let exported = export(&s, "shop");
    assert_eq!(
        Manifest::parse(&exported).expect("export parses"),
        Manifest::parse(FULL).unwrap(),
        "{exported}"
    );
    let info = s.json(&["apps", "info", "shop"]);
    let web = &info["processes"][0];
    assert_eq!(
        (web["name"].as_str(), web["instances"].as_u64()),
        (Some("web"), Some(2))
    );
    assert_eq!(web["memory_bytes"], 256 << 20);
    assert_eq!(web["health"]["interval_ms"], 10_000);

    // apply(export(app)) is a no-op: nothing written, not even an event.
    let before = snapshot(&s, "shop");
    let again = write(&s, "exported.toml", &exported);
    let human = s.ok(&["apply", "-f", &again]);
    assert!(human.contains("nothing changed"), "{human}");
    let out = s.json(&["apply", "-f", &again]);
    assert_eq!(out["changes"], json!([]), "{out}");
    assert_eq!(snapshot(&s, "shop"), before);
}

#[tokio::test]
async fn export_of_an_app_built_by_commands_applies_as_a_no_op_and_leaves_secrets_out() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "blog", "--port", "8080"]);
    s.ok(&["config", "set", "blog", "MODE=fast", "QUOTE=a \"b\" c"]);
    s.ok(&["config", "set", "blog", "TOKEN=hunter2", "--secret"]);
    s.ok(&["domains", "add", "blog", "blog.example.eu"]);
    s.ok(&[
        "processes",
        "set",
        "blog",
        "worker",
        "--health",
        "tcp",
        "--health-interval",
        "3s",
        "--",
        "/bin/work",
        "--queue",
        "a b",
    ]);
    s.ok(&["scale", "blog", "web=3", "worker=1"]);
    s.ok(&[
        "resources",
        "blog",
        "worker",
        "--memory",
        "1g",
        "--cpus",
        "1.25",
    ]);

    let exported = export(&s, "blog");
    assert!(!exported.contains("hunter2"), "{exported}");
    assert!(
        exported.contains("not exported") && exported.contains("TOKEN"),
        "the export says which secrets it left out: {exported}"
    );
    let m = Manifest::parse(&exported).expect("export parses");
    assert_eq!(m.processes["worker"].nano_cpus, Some(1_250_000_000));
    assert_eq!(
        m.processes["worker"].command.as_deref().unwrap(),
        ["/bin/work", "--queue", "a b"]
    );

    let before = snapshot(&s, "blog");
    let file = write(&s, "blog.toml", &exported);
    let out = s.json(&["apply", "-f", &file]);
    assert_eq!(out["changes"], json!([]), "{out}");
    assert_eq!(snapshot(&s, "blog"), before);
    // The secret is still there (and still secret).
    let config = s.json(&["config", "get", "blog"]);
    assert!(
        config
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["key"] == "TOKEN" && v["secret"] == true),
        "{config}"
    );
}

#[tokio::test]
async fn an_invalid_manifest_changes_nothing() {
    // Overcommit: 5 instances of 0.5 CPU are more than a 2-core machine has free, and this
    // test is about what else the server refuses (placement has its own tests).
    let s = TestServer::start(&[
        ("ESCALE_MAX_INSTANCES", "20"),
        ("ESCALE_SCHEDULER_OVERCOMMIT", "true"),
    ])
    .await;
    s.ok(&["apps", "create", "shop", "--port", "5000"]);
    s.ok(&["apps", "create", "other"]);
    s.ok(&["domains", "add", "other", "taken.example.eu"]);
    s.ok(&["config", "set", "shop", "SECRET_KEY=x", "--secret"]);
    s.ok(&["apply", "-f", &write(&s, "escale.toml", FULL)]);
    let before = snapshot(&s, "shop");

    // Caught by the CLI before anything is sent: every problem, with file:line:col field.
    let bad = FULL
        .replace("memory = \"256m\"", "memory = \"lots\"")
        .replace(
            "command = [\"/webapp\", \"--worker\"]",
            "command = \"/webapp --worker\"",
        )
        .replace("[env]", "[env]\nPORT = \"1\"");
    let file = write(&s, "bad.toml", &bad);
    let out = s.cli(&["apply", "-f", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        format!("{file}:6:1 env.PORT: config var `PORT` is set by escale itself"),
        format!("{file}:14:10 processes.web.memory: `lots` is not a size"),
        format!("{file}:26:11 processes.worker.command: a command is an array"),
    ] {
        assert!(stderr.contains(&want), "`{want}` not in:\n{stderr}");
    }
    let out = s.cli(&["apply", "-f", &file, "--app", "other"]);
    assert_eq!(out.status.code(), Some(1));

    // Unknown keys too.
    let typo = write(
        &s,
        "typo.toml",
        "[processes.web]\ninstances = 3\nmemroy = \"1g\"\n",
    );
    let out = s.cli(&["apply", "-f", &typo, "--app", "shop"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":3:1 processes.web.memroy: unknown key `memroy`"),
        "{stderr}"
    );

    // Valid as a file but refused by the server, each after other parts would have changed:
    // nothing of the manifest is applied.
    let refused = [
        (
            FULL.replace("instances = 2", "instances = 5")
                .replace("\"www.shop.example.eu\"", "\"taken.example.eu\""),
            "not available",
        ),
        (
            FULL.replace("instances = 2", "instances = 5")
                .replace("[env]", "[env]\nSECRET_KEY = \"plain\""),
            "secret config var",
        ),
        (
            FULL.replace("instances = 2", "instances = 21"),
            "12:13 processes.web.instances: instance count 21",
        ),
        (
            FULL.replace("\"shop.example.eu\"", "\"other.localhost\""),
            "reserved",
        ),
    ];
    for (text, why) in refused {
        let file = write(&s, "refused.toml", &text);
        let out = s.cli(&["apply", "-f", &file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
        assert!(stderr.contains(why), "`{why}` not in: {stderr}");
        assert_eq!(snapshot(&s, "shop"), before, "{why}: something changed");
    }
    // The app named in the file and --app must agree.
    let out = s.cli(&[
        "apply",
        "-f",
        &write(&s, "shop.toml", FULL),
        "--app",
        "other",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":2:7 app: this manifest is for app `shop`, not `other`"),
        "{stderr}"
    );
    // No app at all is a usage error.
    let out = s.cli(&["apply", "-f", &write(&s, "anon.toml", "[env]\n")]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(snapshot(&s, "shop"), before);
}

#[tokio::test]
async fn domains_removed_from_the_file_are_removed() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop", "--port", "5000"]);
    let both = "app = \"shop\"\ndomains = [\"a.example.eu\", \"b.example.eu\"]\n";
    s.ok(&["apply", "-f", &write(&s, "1.toml", both)]);
    let domains = |s: &TestServer| -> Vec<String> {
        s.json(&["domains", "list", "shop"])
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["domain"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(domains(&s), ["a.example.eu", "b.example.eu"]);

    let one = "app = \"shop\"\ndomains = [\"b.example.eu\", \"c.example.eu\"]\n";
    let human = s.ok(&["apply", "-f", &write(&s, "2.toml", one)]);
    assert!(human.contains("domain a.example.eu removed"), "{human}");
    assert!(human.contains("domain c.example.eu added"), "{human}");
    assert_eq!(domains(&s), ["b.example.eu", "c.example.eu"]);

    // Without a `domains` key they are left alone; with an empty list all go.
    s.ok(&["apply", "-f", &write(&s, "3.toml", "app = \"shop\"\n")]);
    assert_eq!(domains(&s), ["b.example.eu", "c.example.eu"]);
    let out = s.json(&[
        "apply",
        "-f",
        &write(&s, "4.toml", "app = \"shop\"\ndomains = []\n"),
    ]);
    assert_eq!(
        out["domains_removed"],
        json!(["b.example.eu", "c.example.eu"])
    );
    assert!(domains(&s).is_empty());
    // The freed name can be used by another app.
    s.ok(&["apps", "create", "next"]);
    s.ok(&["domains", "add", "next", "b.example.eu"]);
}

#[tokio::test]
async fn env_changes_on_a_deployed_app_make_one_release_and_nothing_else_does() {
    let api = TestApi::new().await;
    let admin = api.setup_admin().await;
    api.create_app(&admin, "shop").await;
    let put = |text: &str| {
        api.call(
            "PUT",
            "/api/v1/apps/shop/manifest",
            Some(&admin),
            Some(json!({ "manifest": text })),
        )
    };
    // Before the first deploy, config changes make no release.
    let r = put("[env]\nA = \"1\"\n").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["release"], Value::Null);
    api.expect(
        StatusCode::CREATED,
        "POST",
        "/api/v1/apps/shop/releases",
        Some(&admin),
        Some(json!({"image": "nginx:1.27"})),
    )
    .await;
    let releases = || {
        api.expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/releases",
            Some(&admin),
            None,
        )
    };
    assert_eq!(releases().await.as_array().unwrap().len(), 1);

    // Formation and domains only: no release.
    let r =
        put("domains = [\"shop.example.eu\"]\n[processes.web]\ninstances = 3\n[env]\nA = \"1\"\n")
            .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["release"], Value::Null, "{:?}", r.body);
    assert_eq!(releases().await.as_array().unwrap().len(), 1);

    // Config changed: exactly one release, v2, with the new config.
    let r = put("[env]\nA = \"2\"\nB = \"x\"\n").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["release"], 2, "{:?}", r.body);
    assert_eq!(r.body["env_set"], json!(["A", "B"]));
    let list = releases().await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["config_keys"], json!(["A", "B"]));
    assert_eq!(list[0]["image"], "nginx:1.27");
    assert_eq!(list[0]["source"], "config");

    // Unsetting is a change too; the same again is not.
    let r = put("[env]\nB = \"x\"\n").await;
    assert_eq!(r.body["env_unset"], json!(["A"]));
    assert_eq!(r.body["release"], 3);
    let events = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/events",
            Some(&admin),
            None,
        )
        .await;
    let r = put("[env]\nB = \"x\"\n").await;
    assert_eq!(r.body["changes"], json!([]));
    assert_eq!(r.body["release"], Value::Null);
    assert_eq!(releases().await.as_array().unwrap().len(), 3);
    assert_eq!(
        api.expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/events",
            Some(&admin),
            None
        )
        .await,
        events,
        "a no-op apply writes no event"
    );

    // The server checks the text too, naming line and field.
    let r = put("[processes.web]\n\nport = 99999\n").await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "bad port");
    assert!(
        r.detail().contains("3:8 processes.web.port: port 99999"),
        "{}",
        r.detail()
    );
    let r = api
        .call(
            "PUT",
            "/api/v1/apps/shop/manifest",
            Some(&admin),
            Some(json!({ "manifest": "", "extra": 1 })),
        )
        .await;
    r.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "unknown body field");

    // GET gives the TOML, which reads back.
    let doc = api
        .expect(
            StatusCode::OK,
            "GET",
            "/api/v1/apps/shop/manifest",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(doc["app"], "shop");
    let m = Manifest::parse(doc["manifest"].as_str().unwrap()).unwrap();
    assert_eq!(m.processes["web"].instances, Some(3));
    assert_eq!(m.domains, Some(vec!["shop.example.eu".to_string()]));
}

#[tokio::test]
async fn a_manifest_asking_for_more_than_any_node_has_changes_nothing() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop"]);
    let before = snapshot(&s, "shop");
    let too_many = std::thread::available_parallelism().unwrap().get() * 32;
    let file = write(
        &s,
        "big.toml",
        &format!("app = \"shop\"\n\n[processes.web]\ninstances = 1\ncpus = {too_many}\n"),
    );
    let out = s.cli(&["apply", "-f", &file]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no node can run `web`") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(snapshot(&s, "shop"), before, "nothing changed");
}
