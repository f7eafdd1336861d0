//! The one deploy path: an image deploy (API), a `git push` and a webhook delivery share one
//! per-app lock (a second deploy is refused naming the first, or queued behind it, never run
//! beside it); live events and `logs -f` follow what the scheduler does.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gitpush::{push_url, releases, Repo};
use crate::support::fixture_image;
use crate::support::server::TestServer;
use crate::webhooks::{delivery, post_hook, push_body, request, Provider};

/// A streamed GET on the API listener (SSE or `logs -f`), read as it comes.
struct Stream {
    conn: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// For each event read, how long after its publication (same machine clock), in ms.
    latencies: Vec<i64>,
}

impl Stream {
    async fn open(s: &TestServer, token: &str, path: &str) -> Stream {
        let addr = s.api.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head =
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut st = Stream {
            conn,
            buf: Vec::new(),
            latencies: Vec::new(),
        };
        // The answer's head: the server has subscribed by the time it is sent.
        st.until("the response head", Duration::from_secs(10), |t| {
            t.contains("\r\n\r\n")
        })
        .await;
        let text = String::from_utf8_lossy(&st.buf).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        st
    }

    /// Reads until `done(all text so far)`; the text.
    async fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if done(&text) {
                return text;
            }
            match tokio::time::timeout_at(deadline, self.conn.read(&mut chunk)).await {
                Err(_) => panic!("timed out waiting for {what}; read so far:\n{text}"),
                Ok(Ok(0)) => panic!("stream ended waiting for {what}; read so far:\n{text}"),
                Ok(Ok(n)) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64;
                    for line in String::from_utf8_lossy(&chunk[..n]).lines() {
                        let at = line
                            .strip_prefix("data: ")
                            .and_then(|d| serde_json::from_str::<Value>(d).ok())
                            .and_then(|v| v["at"].as_i64());
                        if let Some(at) = at {
                            self.latencies.push(now - at);
                        }
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Ok(Err(e)) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// The JSON events (`data:` lines) read so far.
    fn events(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.buf)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }
}

async fn api_deploy(s: &TestServer, app: &str, image: &str) -> (u16, String) {
    let body = serde_json::json!({ "image": image }).to_string();
    request(
        s,
        "POST",
        &format!("/api/v1/apps/{app}/releases"),
        &[
            ("authorization", format!("Bearer {}", s.token)),
            ("content-type", "application/json".into()),
        ],
        body.as_bytes(),
    )
    .await
}

#[tokio::test]
async fn api_git_and_webhook_deploys_of_one_app_take_turns() {
    let image = fixture_image().await;
    let s = TestServer::start(&[("ESCALE_WEBHOOKS_ALLOW_FILE_REPOSITORIES", "true")]).await;
    s.ok(&["apps", "create", "turns"]);
    let source = Repo::new();
    let hooked = source.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=hooked\n"),
        )],
        "from the webhook",
    );
    let set = s.json(&[
        "webhooks",
        "set",
        "turns",
        "--repo",
        &format!("file://{}", source.dir.display()),
        "--branch",
        "main",
    ]);
    let secret = set["secret"].as_str().unwrap().to_string();
    let mut live = Stream::open(&s, &s.token, "/api/v1/events/stream?app=turns").await;

    // A push whose instance takes a few seconds to listen: its deploy holds the app's lock
    // through the build and the rollout.
    let pushed = Repo::new();
    pushed.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=pushed\nENV LISTEN_AFTER_MS=6000\n"),
        )],
        "slow to start",
    );
    let url = push_url(&s, "turns");
    let pusher = std::thread::spawn(move || pushed.push(&url, "main"));
    s.wait_for("the push's release", Duration::from_secs(60), || {
        releases(&s, "turns")
            .iter()
            .any(|r| r["version"] == 1)
            .then_some(())
    })
    .await;

    // An image deploy meanwhile is refused, naming the push; nothing is changed.
    let (status, text) = api_deploy(&s, "turns", image).await;
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("another deploy of `turns` is in progress (a git push of"),
        "{text}"
    );
    // A webhook delivery is accepted and waits its turn.
    let body = push_body("main", &hooked);
    let (status, text) = post_hook(
        &s,
        "turns",
        &delivery(Provider::GitHub, &secret, &body, "turns-1"),
        &body,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(
        releases(&s, "turns").len(),
        1,
        "the webhook waits for the push"
    );

    let (ok, out) = pusher.join().unwrap();
    assert!(ok, "{out}");
    // The push's output went out live too, as the pusher saw it (the dashboard shows it).
    live.until("the push's build output", Duration::from_secs(30), |t| {
        t.contains("\"type\":\"build_output\"") && t.contains("build: -----> Building")
    })
    .await;
    // Then the webhook's deploy runs: v2, by the webhook's own identity.
    let rel = s
        .wait_for(
            "the webhook's release is active",
            Duration::from_secs(120),
            || {
                let rel = releases(&s, "turns");
                rel.iter()
                    .any(|r| r["version"] == 2 && r["status"] != "deploying")
                    .then_some(rel)
            },
        )
        .await;
    let v2 = rel.iter().find(|r| r["version"] == 2).unwrap();
    assert_eq!(v2["status"], "active", "{rel:#?}");
    assert_eq!(v2["created_by"], "webhook:github (set up by admin)", "{v2}");
    assert_eq!(
        rel.len(),
        2,
        "the refused image deploy made no release: {rel:#?}"
    );

    // Never both at once: v1 was serving before v2 was created.
    let text = live
        .until("v2's rollout", Duration::from_secs(30), |t| {
            t.contains("\"release.create\"") && t.matches("\"release.create\"").count() >= 2
        })
        .await;
    let events = live.events();
    let position = |pred: &dyn Fn(&Value) -> bool| events.iter().position(pred);
    let v1_live = position(&|e| {
        e["type"] == "changed"
            && e["action"] == "release.active"
            && e["detail"].as_str().is_some_and(|d| d.starts_with("v1"))
    });
    let v2_made = position(&|e| {
        e["type"] == "changed"
            && e["action"] == "release.create"
            && e["detail"].as_str().is_some_and(|d| d.starts_with("v2"))
    });
    assert!(
        matches!((v1_live, v2_made), (Some(a), Some(b)) if a < b),
        "v1 active before v2 was made: {v1_live:?} {v2_made:?}\n{text}"
    );
    assert!(
        events.iter().all(|e| e["summary"].is_string()),
        "every event has a summary line"
    );
}

#[tokio::test]
async fn logs_follow_picks_up_instances_started_after_it_began() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "tail"]);
    s.ok(&["deploy", "tail", "--image", image]);
    let mut logs = Stream::open(&s, &s.token, "/api/v1/apps/tail/logs?follow=true&tail=5").await;
    logs.until("the first instance's lines", Duration::from_secs(20), |t| {
        t.contains("web.1[v1]")
    })
    .await;
    s.ok(&["scale", "tail", "web=2"]);
    let text = logs
        .until(
            "a line of the instance started after logs -f began",
            Duration::from_secs(60),
            |t| t.contains("web.2[v1]") && t.contains("listening on"),
        )
        .await;
    assert!(text.contains("web.2[v1]"), "{text}");
}

#[tokio::test]
async fn live_events_are_scoped_to_the_team() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let member = crate::isolation::member(&s, "bob", "blue");
    s.ok(&["apps", "create", "red-app"]);
    // Another team's app: not found, as on every other route.
    let (status, _) = request(
        &s,
        "GET",
        "/api/v1/events/stream?app=red-app",
        &[("authorization", format!("Bearer {member}"))],
        b"",
    )
    .await;
    assert_eq!(status, 404);
    let mut theirs = Stream::open(&s, &member, "/api/v1/events/stream").await;
    let mut admin = Stream::open(&s, &s.token, "/api/v1/events/stream").await;
    // Deployed from another thread while this one reads the stream as events come.
    let mut cli = s.cli_command(&["deploy", "red-app", "--image", image]);
    let deploy = tokio::task::spawn_blocking(move || cli.output().unwrap());
    let text = admin
        .until("the rollout's events", Duration::from_secs(60), |t| {
            t.contains("\"release.active\"")
        })
        .await;
    let events = admin.events();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "changed" && e["action"] == "release.create"),
        "{text}"
    );
    // Event-to-reader latency, the delay `escale deploy` adds to a progress line (printed
    // for the record, not asserted: speed is for benchmarks).
    let mut lat = admin.latencies.clone();
    lat.sort();
    if !lat.is_empty() {
        eprintln!(
            "event to reader: {} events, median {} ms, max {} ms",
            lat.len(),
            lat[lat.len() / 2],
            lat[lat.len() - 1]
        );
    }
    let out = deploy.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("healthy"),
        "escale deploy shows progress: {progress}"
    );
    // The member's own change comes after all of those on the bus: once it has it, it has
    // been shown (or not) everything before.
    let out = crate::isolation::as_user(&s, &member, &["apps", "create", "blue-app"]);
    assert!(out.status.success(), "{out:?}");
    theirs
        .until("the member's own event", Duration::from_secs(10), |t| {
            t.contains("blue-app")
        })
        .await;
    let seen = theirs.events();
    assert!(
        seen.iter().all(|e| !e.to_string().contains("red-app")),
        "another team's events leaked: {seen:#?}"
    );
    assert!(
        seen.iter()
            .all(|e| e["type"] != "node_ready" && e["type"] != "certificates_changed"),
        "installation-wide events are an admin's: {seen:#?}"
    );
    // The admin sees the member's app too.
    admin
        .until("the member's app", Duration::from_secs(10), |t| {
            t.contains("blue-app")
        })
        .await;
}

#[tokio::test]
async fn rollback_follows_its_rollout_as_deploy_does_unless_detached() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "back"]);
    s.ok(&["deploy", "back", "--image", image]);
    // A config change of a deployed app is release v2.
    s.ok(&["config", "set", "back", "A=1"]);
    let out = s.ok(&["rollback", "back", "v1"]);
    assert!(
        out.contains("new release v3; rolling out...") && out.contains("v3 of back is serving"),
        "{out}"
    );
    let out = s.ok(&["rollback", "back", "v2", "--detach"]);
    assert!(
        out.contains("new release v4; rolling out.") && !out.contains("serving"),
        "{out}"
    );
    // A version that does not exist: exit 1, said.
    let out = s.cli(&["rollback", "back", "v99"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("v99"),
        "{out:?}"
    );
}
