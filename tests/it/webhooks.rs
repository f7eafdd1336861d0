//! Push webhooks: signed GitHub, GitLab and Gitea deliveries to a real `escale serve` fetch the
//! source repository (served over `file://`, allowed in this server's env) and deploy the
//! pushed commit; bad signatures, replays, other branches, private URLs and injection attempts
//! are refused or ignored with no effect.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gitpush::{releases, Repo};
use crate::support::fixture_image;
use crate::support::server::TestServer;

/// One HTTP/1.1 request to the API listener; returns status and body.
pub(crate) async fn request(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    let addr = s.api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `PUT /api/v1/apps/{app}/webhook` with the admin token.
async fn put_webhook(s: &TestServer, app: &str, body: &Value) -> (u16, String) {
    request(
        s,
        "PUT",
        &format!("/api/v1/apps/{app}/webhook"),
        &[
            ("authorization", format!("Bearer {}", s.token)),
            ("content-type", "application/json".into()),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Provider {
    GitHub,
    GitLab,
    Gitea,
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Headers of a push delivery as `provider` sends them, signed with `secret`.
pub(crate) fn delivery(
    provider: Provider,
    secret: &str,
    body: &[u8],
    id: &str,
) -> Vec<(&'static str, String)> {
    let sig = hmac_hex(secret, body);
    let mut h = vec![("content-type", "application/json".to_string())];
    match provider {
        Provider::GitHub => {
            h.push(("x-github-event", "push".into()));
            h.push(("x-hub-signature-256", format!("sha256={sig}")));
            h.push(("x-github-delivery", id.into()));
        }
        Provider::GitLab => {
            h.push(("x-gitlab-event", "Push Hook".into()));
            h.push(("x-gitlab-token", secret.into()));
            h.push(("x-gitlab-event-uuid", id.into()));
        }
        Provider::Gitea => {
            h.push(("x-gitea-event", "push".into()));
            h.push(("x-gitea-signature", sig));
            h.push(("x-gitea-delivery", id.into()));
        }
    }
    h
}

pub(crate) fn push_body(branch: &str, sha: &str) -> Vec<u8> {
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "checkout_sha": sha,
        "repository": {"name": "src"},
    })
    .to_string()
    .into_bytes()
}

pub(crate) async fn post_hook(
    s: &TestServer,
    app: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    request(s, "POST", &format!("/hooks/{app}"), headers, body).await
}

#[tokio::test]
async fn signed_push_events_deploy_the_pushed_commit() {
    let image = fixture_image().await;
    let s = TestServer::start(&[("ESCALE_WEBHOOKS_ALLOW_FILE_REPOSITORIES", "true")]).await;
    let source = Repo::new();
    let sha = source.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=from-a-webhook\n"),
        )],
        "hooked",
    );
    let url = format!("file://{}", source.dir.display());
    let mut secrets = Vec::new();
    for (app, provider) in [
        ("hub", Provider::GitHub),
        ("lab", Provider::GitLab),
        ("tea", Provider::Gitea),
    ] {
        s.ok(&["apps", "create", app]);
        let set = s.json(&["webhooks", "set", app, "--repo", &url, "--branch", "main"]);
        let secret = set["secret"]
            .as_str()
            .expect("the secret is shown")
            .to_string();
        assert!(secret.len() >= 32, "{set}");
        assert_eq!(set["path"], format!("/hooks/{app}"));
        let shown = s.json(&["webhooks", "show", app]);
        assert_eq!(shown["repository"], url.as_str());
        assert!(
            !shown.to_string().contains(&secret),
            "never shown again: {shown}"
        );
        secrets.push((app, provider, secret));
    }

    for (app, provider, secret) in &secrets {
        let body = push_body("main", &sha);
        // A bad signature: 401, nothing happens.
        let (status, text) = post_hook(
            &s,
            app,
            &delivery(*provider, "not-the-secret", &body, "bad-1"),
            &body,
        )
        .await;
        assert_eq!(status, 401, "{provider:?}: {text}");
        // Another branch: accepted and ignored.
        let other = push_body("dev", &sha);
        let (status, text) = post_hook(
            &s,
            app,
            &delivery(*provider, secret, &other, "dev-1"),
            &other,
        )
        .await;
        assert_eq!(status, 202, "{provider:?}: {text}");
        assert!(text.contains("ignored"), "{text}");
        // The configured branch: 202 at once, the deploy runs in the background.
        let id = format!("{app}-delivery-1");
        let (status, text) =
            post_hook(&s, app, &delivery(*provider, secret, &body, &id), &body).await;
        assert_eq!(status, 202, "{provider:?}: {text}");
        assert!(text.contains("accepted"), "{text}");
        // The same delivery again is a replay.
        let (status, text) =
            post_hook(&s, app, &delivery(*provider, secret, &body, &id), &body).await;
        assert_eq!(status, 409, "{provider:?}: {text}");
        // So is the same signed body under a new delivery id (the id is not signed).
        let (status, text) = post_hook(
            &s,
            app,
            &delivery(*provider, secret, &body, &format!("{app}-forged")),
            &body,
        )
        .await;
        assert_eq!(status, 409, "{provider:?}: {text}");
    }
    for (app, _, _) in &secrets {
        let rel = s
            .wait_for(
                "the webhook's release is active",
                Duration::from_secs(90),
                || {
                    let rel = releases(&s, app);
                    rel.iter()
                        .any(|r| r["status"] == "active" || r["status"] == "failed")
                        .then_some(rel)
                },
            )
            .await;
        assert_eq!(
            rel.len(),
            1,
            "one release only (the ignored branch made none): {rel:#?}"
        );
        assert_eq!(rel[0]["status"], "active", "{rel:#?}\n{}", s.server_log());
        assert_eq!(rel[0]["source"], format!("git {}", &sha[..7]));
        assert_eq!(rel[0]["image"], format!("{app}:v1-{}", &sha[..7]));
    }
    // The app's repository now has `main` at the pushed commit.
    let bare = crate::gitpush::app_repo(&s, "hub").await;
    let main = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&bare)
        .args(["rev-parse", "refs/heads/main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&main.stdout).trim(), sha);
    // A commit that does not build: no release, a `webhook.deploy_failed` event, and `main`
    // of the app's repository stays where it was.
    let broken = source.commit(
        &[("Dockerfile", "FROM escale-test/does-not-exist:nope\n")],
        "broken",
    );
    let body = push_body("main", &broken);
    let (status, text) = post_hook(
        &s,
        "lab",
        &delivery(Provider::GitLab, &secrets[1].2, &body, "lab-delivery-2"),
        &body,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let events = s
        .wait_for("the failure event", Duration::from_secs(60), || {
            let ev = s.json(&["events", "lab"]);
            ev.to_string()
                .contains("webhook.deploy_failed")
                .then_some(ev)
        })
        .await;
    assert!(events.to_string().contains(&broken[..7]), "{events}");
    assert_eq!(releases(&s, "lab").len(), 1);
    let main = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(crate::gitpush::app_repo(&s, "lab").await)
        .args(["rev-parse", "refs/heads/main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&main.stdout).trim(), sha);

    // After removal, deliveries are refused.
    s.ok(&["webhooks", "remove", "hub"]);
    let body = push_body("main", &sha);
    let (status, _) = post_hook(
        &s,
        "hub",
        &delivery(Provider::GitHub, &secrets[0].2, &body, "after-removal"),
        &body,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn repository_urls_and_branches_are_checked_at_configuration() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop"]);
    let (status, text) = put_webhook(
        &s,
        "shop",
        &json!({"repository": "https://140.82.121.4/acme/shop.git", "branch": "main", "secret": "a-secret-of-enough-length"}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("a-secret-of-enough-length"));
    let before = s.json(&["webhooks", "show", "shop"]);

    // Every non-global address (IPv4, IPv6 and IPv6 forms embedding IPv4), and file://, are
    // refused here.
    for url in [
        "https://[::127.0.0.1]/x.git",
        "https://[::ffff:10.0.0.1]/x.git",
        "https://[64:ff9b::7f00:1]/x.git",
        "https://[2002:7f00:1::1]/x.git",
        "https://[2001:0:7f00:1:8000:63bf:f7f7:f7f7]/x.git",
        "https://[fec0::1]/x.git",
        "https://[ff02::1]/x.git",
        "http://198.18.0.1/x.git",
        "http://224.0.0.251/x.git",
        "http://100.64.0.1/x.git",
        "http://203.0.113.9/x.git",
        "http://127.0.0.1:8080/x.git",
        "https://localhost/x.git",
        "http://10.0.0.5/x.git",
        "http://192.168.1.10/x.git",
        "http://172.16.0.1/x.git",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/x.git",
        "https://[::1]/x.git",
        "https://[fe80::1]/x.git",
        "https://[fd00::1]/x.git",
        "file:///etc",
    ] {
        let (status, text) = put_webhook(&s, "shop", &json!({"repository": url})).await;
        assert_eq!(status, 422, "{url}: {text}");
    }
    // The injection corpus, in URLs and branch names.
    for bad in ["$(id)", "`id`", ";id", "a\nb", "-x", "../x", "a\0b"] {
        let url = format!("https://140.82.121.4/{bad}");
        let (status, text) = put_webhook(&s, "shop", &json!({"repository": url})).await;
        assert_eq!(status, 422, "url {url:?}: {text}");
        let (status, text) = put_webhook(
            &s,
            "shop",
            &json!({"repository": format!("{bad}https://140.82.121.4/x")}),
        )
        .await;
        assert_eq!(status, 422, "url prefix {bad:?}: {text}");
        let (status, text) = put_webhook(
            &s,
            "shop",
            &json!({"repository": "https://140.82.121.4/x.git", "branch": bad}),
        )
        .await;
        assert_eq!(status, 422, "branch {bad:?}: {text}");
    }
    let (status, text) = put_webhook(
        &s,
        "shop",
        &json!({"repository": "https://140.82.121.4/x.git", "secret": "short"}),
    )
    .await;
    assert_eq!(status, 422, "{text}");
    // No effect: the webhook is as it was, nothing was written outside the data dir.
    assert_eq!(s.json(&["webhooks", "show", "shop"]), before);
    assert!(!std::path::Path::new("x").exists());

    // Deliveries without a configured webhook, or unsigned, are refused.
    let body = push_body("main", &"1".repeat(40));
    let (status, _) = post_hook(
        &s,
        "nosuch",
        &delivery(Provider::GitHub, "x", &body, "d1"),
        &body,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post_hook(
        &s,
        "shop",
        &[("content-type", "application/json".into())],
        &body,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post_hook(
        &s,
        "shop",
        &[
            ("x-github-event", "push".into()),
            ("x-github-delivery", "d2".into()),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn private_repositories_can_be_allowed_by_an_admin() {
    let s = TestServer::start(&[("ESCALE_WEBHOOKS_ALLOW_PRIVATE_REPOSITORIES", "true")]).await;
    s.ok(&["apps", "create", "shop"]);
    let (status, text) = put_webhook(
        &s,
        "shop",
        &json!({"repository": "http://127.0.0.1:3000/acme/shop.git"}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Still no file:// without its own setting, and still no injection.
    let (status, _) = put_webhook(&s, "shop", &json!({"repository": "file:///srv/x"})).await;
    assert_eq!(status, 422);
    let (status, _) =
        put_webhook(&s, "shop", &json!({"repository": "http://127.0.0.1/$(id)"})).await;
    assert_eq!(status, 422);
}
