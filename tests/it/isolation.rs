//! What one team does never reaches another (issue #11): images escale built for an app are
//! that app's alone (no deploy by id or id prefix, by another app's tag, no build `FROM` or
//! `COPY --from` them, no shared layer cache); a destroyed app leaves nothing a later app of
//! the same name inherits (repository, images); a push cannot make the server read what its
//! small pack inflates to.

use std::process::Output;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::gitpush::{releases, Repo};
use crate::support::docker_cli;
use crate::support::fixture_image;
use crate::support::server::TestServer;

const PASSWORD: &str = "long enough password";

/// A member of `team` (created if needed); returns its token.
pub(crate) fn member(s: &TestServer, name: &str, team: &str) -> String {
    let _ = s.cli(&["teams", "create", team]);
    let out = s.cli_with_token(
        Some(&s.token),
        &[
            "users",
            "create",
            name,
            "--role",
            "member",
            "--team",
            team,
            "--password-stdin",
        ],
        Some(PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli_with_token(
        None,
        &["login", "--name", name, "--password-stdin", "--json"],
        Some(PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_string()
}

pub(crate) fn as_user(s: &TestServer, token: &str, args: &[&str]) -> Output {
    s.cli_with_token(Some(token), args, None)
}

fn ok_as(s: &TestServer, token: &str, args: &[&str]) -> String {
    let out = as_user(s, token, args);
    assert!(
        out.status.success(),
        "escale {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn url(s: &TestServer, token: &str, app: &str) -> String {
    let host = s.api.trim_start_matches("http://");
    format!("http://git:{token}@{host}/git/{app}.git")
}

/// Image ids of what this server built for `app` (by the app-name label).
fn built(s: &TestServer, app: &str) -> Vec<String> {
    docker_cli(&[
        "images",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=escale.installation={}", s.installation),
        "--filter",
        &format!("label=escale.app={app}"),
    ])
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect()
}

/// `escale deploy APP --image IMAGE` as `token`: (exit code, stderr).
fn deploy(s: &TestServer, token: &str, app: &str, image: &str) -> (Option<i32>, String) {
    let out = as_user(s, token, &["deploy", app, "--image", image]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Team red builds `shop`; team blue cannot run that image by id, id prefix, `sha256:` id,
/// digest-that-is-an-id or tag (the tag answered exactly like a missing image), nor build on
/// it (`FROM`, `FROM $ARG` with a build arg, `COPY --from`, `FROM <id prefix>`); red can.
#[tokio::test]
async fn another_apps_built_image_cannot_be_run_or_built_on() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let rosa = member(&s, "rosa", "red");
    let bert = member(&s, "bert", "blue");
    ok_as(&s, &rosa, &["apps", "create", "shop"]);
    ok_as(&s, &bert, &["apps", "create", "thief"]);
    let red = Repo::new();
    let sha = red.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=red-only\n"),
        )],
        "red",
    );
    let (ok, out) = red.push(&url(&s, &rosa, "shop"), "main");
    assert!(ok, "{out}");
    let tag = format!("shop:v1-{}", &sha[..7]);
    let ids = built(&s, "shop");
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0].trim_start_matches("sha256:").to_string();

    // By id, id prefix, `sha256:` id: refused as ids, whatever they resolve to.
    for by_id in [&id[..4], &id[..12], &id[..], &format!("sha256:{id}")] {
        let (code, err) = deploy(&s, &bert, "thief", by_id);
        assert_eq!(code, Some(1), "{by_id}: {err}");
        assert!(
            err.contains("image id") && err.contains("nothing was changed"),
            "{by_id}: {err}"
        );
    }
    // By tag or by a digest that is its id: exactly what a missing image gets.
    let missing = format!("shop:v1-{}", "0".repeat(7));
    let (_, want) = deploy(&s, &bert, "thief", &missing);
    assert!(want.contains("could not be pulled"), "{want}");
    for other in [tag.clone(), format!("thief@sha256:{id}")] {
        let (code, err) = deploy(&s, &bert, "thief", &other);
        assert_eq!(code, Some(1), "{other}: {err}");
        assert_eq!(
            err.replace(&other, "X"),
            want.replace(&missing, "X"),
            "{other}"
        );
    }
    // An admin cannot move it to another app either.
    let (code, err) = deploy(&s, &s.token, "thief", &tag);
    assert_eq!(code, Some(1), "{err}");
    assert!(releases(&s, "thief").is_empty());

    // Builds on it are refused before they start; a missing base gets the same answer.
    ok_as(
        &s,
        &bert,
        &["config", "set", "thief", &format!("BASE={tag}")],
    );
    let blue = Repo::new();
    for (n, dockerfile) in [
        format!("FROM {tag}\n"),
        format!("FROM {missing}\n"),
        "ARG BASE=scratch\nFROM ${BASE}\n".to_string(),
        format!("FROM {image}\nCOPY \\\n  --from={tag} /webapp /stolen\n"),
        format!("FROM {}\n", &id[..6]),
    ]
    .iter()
    .enumerate()
    {
        blue.commit(&[("Dockerfile", dockerfile)], &format!("try {n}"));
        let (ok, out) = blue.push(&url(&s, &bert, "thief"), "main");
        assert!(!ok, "{dockerfile}: {out}");
        assert!(
            out.contains("could not be pulled") || out.contains("image id"),
            "{dockerfile}: {out}"
        );
        assert!(!out.contains("Step 1/"), "refused before the build: {out}");
    }
    assert!(built(&s, "thief").is_empty());
    assert!(releases(&s, "thief").is_empty());

    // Red may deploy its own image, and build on it.
    let (code, err) = deploy(&s, &rosa, "shop", &tag);
    assert_eq!(code, Some(0), "{err}");
    red.commit(
        &[("Dockerfile", &format!("FROM {tag}\nENV MORE=1\n"))],
        "on top",
    );
    let (ok, out) = red.push(&url(&s, &rosa, "shop"), "main");
    assert!(ok, "{out}");
}

/// The classic builder's cache is per app: an identical Dockerfile of another team reuses
/// none of the first team's layers; the same app's next build does.
#[tokio::test]
async fn the_layer_cache_is_not_shared_between_apps() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let rosa = member(&s, "rosa", "red");
    let bert = member(&s, "bert", "blue");
    ok_as(&s, &rosa, &["apps", "create", "first"]);
    ok_as(&s, &bert, &["apps", "create", "second"]);
    // Unique per run, so no earlier test's layers match either.
    let mark = format!("{}-{}", s.installation, std::process::id());
    let dockerfile = format!("FROM {image}\nENV MARK={mark}\nENV GREETING=cached\n");
    let red = Repo::new();
    red.commit(&[("Dockerfile", &dockerfile)], "one");
    let (ok, out) = red.push(&url(&s, &rosa, "first"), "main");
    assert!(ok && !out.contains("Using cache"), "{out}");
    let blue = Repo::new();
    blue.commit(&[("Dockerfile", &dockerfile)], "same");
    let (ok, out) = blue.push(&url(&s, &bert, "second"), "main");
    assert!(ok, "{out}");
    assert!(
        !out.contains("Using cache"),
        "another app's layers were reused: {out}"
    );
    red.commit(&[("Dockerfile", &dockerfile), ("x", "1")], "two");
    let (ok, out) = red.push(&url(&s, &rosa, "first"), "main");
    assert!(
        ok && out.contains("Using cache"),
        "own layers are reused: {out}"
    );
}

/// `GET /git/APP.git/info/refs` as `token`: the advertisement.
async fn advertised(s: &TestServer, token: &str, app: &str) -> String {
    let addr = s.api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("git:{token}"));
    let req = format!(
        "GET /git/{app}.git/info/refs?service=git-receive-pack HTTP/1.1\r\nhost: {addr}\r\nauthorization: Basic {auth}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A push of `sha` to `main` carrying no objects (the pusher does not have them): a raw
/// receive-pack request with an empty pack. Returns the response.
async fn push_without_objects(s: &TestServer, token: &str, app: &str, sha: &str) -> String {
    let empty_pack = std::process::Command::new("git")
        .args(["pack-objects", "--stdout"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
        .stdout;
    let line = format!("{} {sha} refs/heads/main\0report-status\n", "0".repeat(40));
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    body.extend_from_slice(&empty_pack);
    let addr = s.api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("git:{token}"));
    let head = format!(
        "POST /git/{app}.git/git-receive-pack HTTP/1.1\r\nhost: {addr}\r\nauthorization: Basic {auth}\r\ncontent-type: application/x-git-receive-pack-request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Bare repositories (directories holding a `HEAD`) up to two levels under `dir`.
fn repositories(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.join("HEAD").exists() {
            n += 1;
        } else if p.is_dir() {
            n += repositories(&p);
        }
    }
    n
}

/// Red destroys `shop`; its repository and built image go. Blue creates a new `shop`: it sees
/// no ref of red's, and cannot deploy red's commit by pushing its id without the objects.
#[tokio::test]
async fn a_destroyed_apps_repository_and_images_are_not_inherited() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    let rosa = member(&s, "rosa", "red");
    let bert = member(&s, "bert", "blue");
    ok_as(&s, &rosa, &["apps", "create", "shop"]);
    let red = Repo::new();
    let sha = red.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=red-secret\n"),
        )],
        "red's code",
    );
    let (ok, out) = red.push(&url(&s, &rosa, "shop"), "main");
    assert!(ok, "{out}");
    assert!(advertised(&s, &rosa, "shop").await.contains(&sha));
    assert_eq!(built(&s, "shop").len(), 1);
    let git_dir = s.dir.path().join("data/git");
    assert_eq!(repositories(&git_dir), 1);

    ok_as(&s, &rosa, &["apps", "destroy", "shop", "--confirm", "shop"]);
    // The repository at once; the image once its containers are gone.
    assert_eq!(repositories(&git_dir), 0);
    s.wait_for("the built image removed", Duration::from_secs(60), || {
        built(&s, "shop").is_empty().then_some(())
    })
    .await;

    ok_as(&s, &bert, &["apps", "create", "shop"]);
    let ad = advertised(&s, &bert, "shop").await;
    assert!(ad.contains("200 OK") && !ad.contains(&sha), "{ad}");
    let out = push_without_objects(&s, &bert, "shop", &sha).await;
    assert!(!out.contains("is serving"), "{out}");
    assert!(releases(&s, "shop").is_empty(), "{out}");
    assert!(built(&s, "shop").is_empty());
    let (code, err) = deploy(&s, &bert, "shop", &format!("shop:v1-{}", &sha[..7]));
    assert_eq!(code, Some(1), "{err}");
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A small pack that inflates to a 256 MiB `escale.toml` or source file is refused from the
/// sizes alone: the server's memory does not grow by what the objects inflate to. The build
/// context limit is `git.max_context_size`, named in the `remote:` message.
#[tokio::test]
async fn a_push_that_inflates_is_refused_by_size_without_reading_it() {
    let image = fixture_image().await;
    let s = TestServer::start(&[("ESCALE_GIT_MAX_CONTEXT_SIZE", "1m")]).await;
    s.ok(&["apps", "create", "bomb"]);
    let pid = s.pid().unwrap();
    let repo = Repo::new();
    let big = vec![b'#'; 256 << 20];
    std::fs::write(repo.dir.join("escale.toml"), &big).unwrap();
    repo.commit(
        &[("Dockerfile", &format!("FROM {image}\n"))],
        "manifest bomb",
    );
    let before = peak_rss(pid);
    let (ok, out) = repo.push(&url(&s, &s.token, "bomb"), "main");
    assert!(!ok, "{out}");
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
    assert!(out.contains("escale.toml is 262144 KiB"), "{out}");

    std::fs::remove_file(repo.dir.join("escale.toml")).unwrap();
    std::fs::write(repo.dir.join("data.bin"), &big).unwrap();
    drop(big);
    repo.commit(&[], "context bomb");
    let (ok, out) = repo.push(&url(&s, &s.token, "bomb"), "main");
    assert!(!ok, "{out}");
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
    assert!(
        out.contains("git.max_context_size") && out.contains("at most 1 MiB"),
        "{out}"
    );
    assert!(releases(&s, "bomb").is_empty());

    // Under the limit, the context streams to the builder and deploys.
    repo.ok(&["rm", "--quiet", "data.bin"]);
    repo.commit(&[("small.txt", "small")], "fits");
    let (ok, out) = repo.push(&url(&s, &s.token, "bomb"), "main");
    assert!(ok, "{out}");
}
