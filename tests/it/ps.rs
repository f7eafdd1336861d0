//! What a user sees in `escale ps` (issue 13) against a real `escale serve` and the real
//! engine: the container name `docker inspect` accepts, a failed release and why, restarts
//! as a running total per slot (unhealthy replacements included, also in `escale events`),
//! the instances list a page at a time; and `escale serve --help` with serve's options only.

use std::collections::{BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::fixture_image;
use crate::support::server::{healthy, TestServer, ESCALE};

/// Creates `app` and deploys the fixture image to it; returns the image.
async fn deployed(s: &TestServer, app: &str) -> String {
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", app]);
    s.ok(&["deploy", app, "--image", &image]);
    image
}

/// `GET path` on the server's API as the admin: status, `Link` header, JSON body.
async fn get(s: &TestServer, path: &str) -> (u16, Option<String>, Value) {
    let addr = s.api.trim_start_matches("http://").trim_end_matches('/');
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("API");
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        s.token
    );
    c.write_all(req.as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).await.expect("answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let link = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("link").then(|| v.trim().to_string())
    });
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, link, body)
}

/// The instance ids of a page.
fn ids(page: &Value) -> Vec<String> {
    page["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["instance"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test]
async fn ps_names_the_container_docker_inspect_accepts_and_pages_through_instances() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "shop").await;
    s.ok(&["scale", "shop", "web=5"]);
    let ps = s
        .wait_for("5 healthy instances", Duration::from_secs(60), || {
            let ps = s.instances("shop");
            (healthy(&ps, "web", 1) == 5 && ps.len() == 5).then_some(ps)
        })
        .await;

    // The name shown is the one the engine knows the container by.
    let text = s.ok(&["ps", "shop"]);
    assert!(text.contains("CONTAINER"), "{text}");
    for i in &ps {
        let name = i["container"].as_str().expect("container");
        assert!(text.contains(name), "{name} in:\n{text}");
        assert!(
            name.starts_with(&format!("escale-{}-", s.installation)),
            "{name}"
        );
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.Id}}", name])
            .output()
            .expect("docker runs");
        assert!(
            out.status.success(),
            "docker inspect {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            id.starts_with(i["container_id"].as_str().expect("id")),
            "{name} is {id}, ps says {}",
            i["container_id"]
        );
    }
    let help = s.ok(&["ps", "--help"]);
    assert!(
        help.contains("docker inspect"),
        "the mapping is documented: {help}"
    );

    // A page at a time; instances started between pages are not lost, none is repeated.
    let (status, link, first) = get(&s, "/api/v1/apps/shop/instances?limit=2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first).len(), 2, "{first}");
    assert!(
        first["latest_release"]["version"] == 1 && first["crashing"].is_array(),
        "{first}"
    );
    let mut next = escale::cli::next_link(&link.expect("a Link header"));
    s.ok(&["scale", "shop", "web=7"]);
    let now = s
        .wait_for("7 healthy instances", Duration::from_secs(60), || {
            let ps = s.instances("shop");
            (healthy(&ps, "web", 1) == 7 && ps.len() == 7).then_some(ps)
        })
        .await;
    let mut seen = ids(&first);
    let mut pages = 1;
    while let Some(path) = next.take() {
        let (status, link, page) = get(&s, &path).await;
        assert_eq!(status, 200, "{path}: {page}");
        assert!(ids(&page).len() <= 2, "{page}");
        seen.extend(ids(&page));
        next = link.and_then(|l| escale::cli::next_link(&l));
        pages += 1;
        assert!(pages < 10, "pages end");
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "none repeated: {seen:?}");
    for i in ps.iter().chain(&now) {
        let id = i["instance"].as_str().expect("id").to_string();
        assert!(seen.contains(&id), "{id} lost: {seen:?}");
    }
    assert_eq!(seen.len(), 7, "{seen:?}");

    // The CLI follows the pages (its client, with a small page size) to the same list.
    let client = escale::cli::Client::new(&s.api, Some(s.token.clone())).expect("client");
    let all = client
        .list_in("/api/v1/apps/shop/instances?limit=3", "instances")
        .await
        .expect("pages");
    let listed: BTreeSet<String> = ids(&all).into_iter().collect();
    let shown: BTreeSet<String> = ids(&s.json(&["ps", "shop"])).into_iter().collect();
    assert_eq!(listed, shown);
    assert_eq!(listed.len(), 7);

    // Bad page requests say what to fix.
    let (status, _, body) = get(&s, "/api/v1/apps/shop/instances?limit=0").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap_or("").contains("1 to 1000"),
        "{body}"
    );
    let (status, _, body) = get(&s, "/api/v1/apps/shop/instances?after=zzz").await;
    assert_eq!(status, 200, "{body}");
    assert!(ids(&body).is_empty(), "nothing sorts after `zzz`: {body}");
}

#[tokio::test]
async fn ps_after_a_failed_first_deploy_says_the_release_failed_and_why() {
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "120s")]).await;
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", "fresh"]);
    let out = s.cli(&["ps", "fresh"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing was deployed yet"), "{text}");

    s.ok(&["config", "set", "fresh", "CRASH_AFTER_MS=0"]);
    let out = s.cli(&["deploy", "fresh", "--image", &image]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["ps", "fresh"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("Release v1 of fresh failed: "), "{text}");
    assert!(
        text.contains("exited") && text.contains("last exit code 1"),
        "why: {text}"
    );
    assert!(
        text.contains("no earlier release was ever active"),
        "{text}"
    );
    assert!(
        text.contains("crashing after 0 ms"),
        "its last log lines: {text}"
    );
    assert!(!text.contains("scale it"), "{text}");
    let json = s.json(&["ps", "fresh"]);
    assert_eq!(json["latest_release"]["status"], "failed", "{json}");
    assert!(
        json["latest_release"]["status_reason"]
            .as_str()
            .unwrap_or("")
            .contains("last exit code 1"),
        "{json}"
    );
}

#[tokio::test]
async fn an_unhealthy_replacement_is_an_event_and_a_restart_and_the_crash_note_ends_once_healthy() {
    let s = TestServer::start(&[("ESCALE_SCHEDULER_UNHEALTHY_REPLACE_AFTER", "2s")]).await;
    deployed(&s, "deaf").await;
    s.ok(&[
        "processes",
        "set",
        "deaf",
        "web",
        "--health",
        "http",
        "--health-path",
        "/health",
        "--health-grace",
        "1s",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "300ms",
    ]);
    let ps = s
        .wait_for("one healthy instance", Duration::from_secs(30), || {
            let ps = s.instances("deaf");
            (ps.len() == 1 && healthy(&ps, "web", 1) == 1).then_some(ps)
        })
        .await;
    assert_eq!(ps[0]["restarts"], 0, "{ps:#?}");
    let id = ps[0]["container_id"].as_str().unwrap().to_string();
    let addr: std::net::SocketAddr = ps[0]["address"].as_str().unwrap().parse().unwrap();

    // Its server goes away inside a running container: replaced once past the threshold.
    let (status, _) = crate::support::http_get(addr, "/deaf").await.unwrap();
    assert_eq!(status, 200);
    let ps = s
        .wait_for("a healthy replacement", Duration::from_secs(30), || {
            let ps = s.instances("deaf");
            let gone = ps.iter().all(|i| i["container_id"] != id.as_str());
            (gone && ps.len() == 1 && healthy(&ps, "web", 1) == 1).then_some(ps)
        })
        .await;
    assert_eq!(ps[0]["restarts"], 1, "the replacement counts: {ps:#?}");

    // In `escale events`, read back from the registry (not only the live stream).
    let events = s.json(&["events", "deaf"]);
    let replaced = events
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["action"] == "instance.replaced")
        .unwrap_or_else(|| panic!("no instance.replaced event: {events:#}"));
    assert!(
        replaced["detail"]
            .as_str()
            .unwrap_or("")
            .contains("failing its health check"),
        "{replaced}"
    );
    assert_eq!(replaced["actor"], "escale");
    let text = s.ok(&["events", "deaf"]);
    assert!(text.contains("instance.replaced"), "{text}");

    // A crash of the same slot adds to the total: two replacements in a row (a crash loop
    // while it lasts), no crash note once the slot is healthy again.
    let victim = ps[0]["container_id"].as_str().unwrap().to_string();
    crate::support::docker_cli(&["kill", &victim]);
    let ps = s
        .wait_for("healthy after the crash", Duration::from_secs(30), || {
            let ps = s.instances("deaf");
            let gone = ps.iter().all(|i| i["container_id"] != victim.as_str());
            (gone && ps.len() == 1 && healthy(&ps, "web", 1) == 1).then_some(ps)
        })
        .await;
    assert_eq!(ps[0]["restarts"], 2, "a running total: {ps:#?}");
    let json = s.json(&["ps", "deaf"]);
    assert_eq!(json["crashing"], serde_json::json!([]), "{json}");
    let text = s.ok(&["ps", "deaf"]);
    assert!(!text.contains("is crashing"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("web.1"))
        .unwrap_or_else(|| panic!("{text}"));
    let restarts_col = text
        .lines()
        .next()
        .and_then(|h| h.find("RESTARTS"))
        .expect("a RESTARTS column");
    assert!(
        row[restarts_col..].trim_start().starts_with('2'),
        "restarts 2 in: {text}"
    );
}

/// The binary's `--help` output for `args`, with `ESCALE_URL` set or not.
fn help(args: &[&str], url: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(ESCALE);
    cmd.args(args)
        .env_remove("ESCALE_URL")
        .env_remove("ESCALE_TOKEN")
        .stdin(Stdio::null());
    if let Some(u) = url {
        cmd.env("ESCALE_URL", u);
    }
    let out = cmd.output().expect("escale runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_help_lists_only_serve_options_and_an_env_url_is_not_asked_for() {
    for url in [None, Some("http://127.0.0.1:7399")] {
        let (code, out, _) = help(&["serve", "--help"], url);
        assert_eq!(code, 0);
        for absent in ["--url", "--token", "--json", "Global options", "ESCALE_URL"] {
            assert!(!out.contains(absent), "{absent} in serve --help:\n{out}");
        }
        assert!(
            out.contains("--config") && out.contains("--reload") && out.contains("Examples"),
            "{out}"
        );

        // A client command: the global options apart, the URL from the environment shown as
        // such, and the usage line not asking for --url.
        let (code, out, _) = help(&["ps", "--help"], url);
        assert_eq!(code, 0);
        assert!(
            out.contains("Global options") && out.contains("--url"),
            "{out}"
        );
        let usage = out
            .lines()
            .find(|l| l.starts_with("Usage:"))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(!usage.contains("--url"), "{usage}");
        if let Some(u) = url {
            assert!(out.contains(&format!("ESCALE_URL={u}")), "{out}");
        }
    }
    // Given to serve, a client option is a usage error saying so (exit 2); in the environment
    // it is not an error (the help above, and servers started by the tests, have it).
    let (code, _, err) = help(&["serve", "--url", "http://x"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--url does not apply to `escale serve`"),
        "{err}"
    );
    let (code, _, err) = help(&["serve", "--json"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--json does not apply"), "{err}");
}
