//! Backup and restore drill, end to end: a real `escale serve` with an app serving through the
//! proxy, a domain, an uploaded certificate, a registered node (so the cluster CA and a node
//! certificate), a secret, a pushed branch; a burst of config writes and a deploy in flight
//! while `escale backup create --to DIR` runs; then the server is killed, its containers
//! removed and its data dir wiped, the backup restored into a new data dir, and the server
//! started on it: every write acknowledged before the backup began is back, the registry
//! passes `PRAGMA integrity_check`, the app serves again (the reconciler started its
//! containers again), and the backup file holds none of the canaries in clear. A restore
//! with another master key fails naming it, and a non-empty data dir is refused.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

use crate::gitpush::{app_repo, push_url, Repo};
use crate::support::docker::docker_cli;
use crate::support::fixture_image;
use crate::support::load::get_once;
use crate::support::server::{healthy, read_only_registry, TestServer, ESCALE};

async fn serving(s: &TestServer, host: &str) {
    let proxy = s.proxy.clone().expect("an HTTP proxy");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        match get_once(&proxy, host, "/").await {
            Ok((StatusCode::OK, _)) => return,
            r if std::time::Instant::now() > deadline => panic!(
                "{host} never answered through the proxy: {r:?}\n{}",
                s.server_log()
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn config_keys(s: &TestServer, app: &str) -> Vec<String> {
    let v = s.json(&["config", "get", app]);
    match &v {
        Value::Object(m) if m.contains_key("vars") => v["vars"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["key"].as_str().map(str::to_string))
            .collect(),
        Value::Object(m) => m.keys().cloned().collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|e| e["key"].as_str().map(str::to_string))
            .collect(),
        other => panic!("config get printed {other}"),
    }
}

/// `GET /metrics` with the admin token; the body.
async fn metrics(s: &TestServer) -> String {
    get(s, "/metrics").await
}

/// `GET path` with the admin token; the whole answer (head and body).
async fn get(s: &TestServer, path: &str) -> String {
    s.api_get(path).await
}

fn escale(args: &[&str]) -> std::process::Output {
    Command::new(ESCALE)
        .args(args)
        .env_remove("ESCALE_MASTER_KEY")
        .env_remove("ESCALE_DATA_DIR")
        .output()
        .expect("escale runs")
}

#[tokio::test]
async fn backup_under_writes_and_a_deploy_then_restore_into_a_new_data_dir() {
    let mut s = TestServer::start(&[]).await;
    let image = fixture_image().await.to_string();
    let work = tempfile::tempdir().unwrap();

    // What must come back.
    s.ok(&["apps", "create", "web"]);
    s.ok(&["deploy", "web", "--image", &image]);
    serving(&s, "web.localhost").await;
    let canary_secret = format!("canary-secret-{}", hex::encode(rand::random::<[u8; 8]>()));
    let canary_plain = format!("canary-plain-{}", hex::encode(rand::random::<[u8; 8]>()));
    s.ok(&[
        "config",
        "set",
        "web",
        &format!("CANARY={canary_secret}"),
        "--secret",
    ]);
    s.ok(&["config", "set", "web", &format!("PLAIN={canary_plain}")]);
    s.ok(&["domains", "add", "web", "shop.backup-test.example"]);
    let cert =
        rcgen::generate_simple_self_signed(vec!["shop.backup-test.example".to_string()]).unwrap();
    let key_pem = cert.signing_key.serialize_pem();
    std::fs::write(work.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(work.path().join("key.pem"), &key_pem).unwrap();
    s.ok(&[
        "certs",
        "add",
        "web",
        "shop.backup-test.example",
        "--cert",
        work.path().join("cert.pem").to_str().unwrap(),
        "--key",
        work.path().join("key.pem").to_str().unwrap(),
    ]);
    s.ok(&[
        "nodes",
        "add",
        "n2",
        "--address",
        "127.0.0.9:2376",
        "--out",
        work.path().join("bundle").to_str().unwrap(),
    ]);
    s.ok(&["apps", "create", "burst"]);
    let repo = Repo::new();
    let pushed = repo.commit(&[("README", "kept in the backup\n")], "first");
    let (ok, out) = repo.push(&push_url(&s, "burst"), "HEAD:refs/heads/feature");
    assert!(ok, "push of a stored branch failed: {out}");

    // A burst of writes on its own thread, each recorded once acknowledged.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let (api, token, dir) = (s.api.clone(), s.token.clone(), s.dir.path().to_path_buf());
        let cmd = move |i: usize| {
            s_cli_command(
                &api,
                &token,
                &dir,
                &["config", "set", "burst", &format!("K{i}=v{i}")],
            )
        };
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 400 {
                let out = cmd(i).output().expect("cli");
                if out.status.success() {
                    acked.lock().unwrap().push(format!("K{i}"));
                }
                i += 1;
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never went through"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A deploy in flight: released (acknowledged) now, rolling out during the backup.
    s.ok(&["deploy", "web", "--image", &image, "--no-wait"]);
    let releases_before = s.json(&["releases", "web"]).as_array().unwrap().len();
    let acked_before: Vec<String> = acked.lock().unwrap().clone();
    let created = s.json(&[
        "backup",
        "create",
        "--to",
        work.path().join("offsite").to_str().unwrap(),
    ]);
    // Writes go on after the backup; let a few land, then stop.
    let n_after = acked.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < n_after + 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let file = std::path::PathBuf::from(created["path"].as_str().expect("path"));
    let name = created["name"].as_str().unwrap().to_string();
    assert!(file.is_file(), "{created}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        created["size"].as_u64().unwrap(),
        "the download is the whole file"
    );

    // Listed on the server, counted in /metrics.
    let listed = s.json(&["backup", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == name.as_str()),
        "{listed}"
    );
    let m = metrics(&s).await;
    let last: i64 = m
        .lines()
        .find_map(|l| l.strip_prefix("escale_backup_last_success_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no backup metric in {m}"));
    assert!(last > 0, "{m}");

    // Backups are the admins': a member can neither take, list nor fetch one; only names
    // escale gives backups are served, nothing else of the data dir.
    let out = s.cli_with_token(
        Some(&s.token.clone()),
        &[
            "users",
            "create",
            "bob",
            "--role",
            "member",
            "--password-stdin",
        ],
        Some("bob-password-1"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli_with_token(
        None,
        &["login", "--name", "bob", "--password-stdin"],
        Some("bob-password-1"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [&["backup", "list"][..], &["backup", "create"][..]] {
        let out = s.cli_with_token(None, args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "member ran {args:?}: {err}");
        assert!(err.contains("admin"), "{err}");
    }
    for path in [
        "/api/v1/backups/..%2Fescale.db",
        "/api/v1/backups/escale.db",
        "/api/v1/backups/master.key",
        "/api/v1/backups/..%2F..%2Fdata%2Fmaster.key",
    ] {
        let answer = get(&s, path).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
    }

    // No canary in clear: not the secret, not a plain value, not the private key, not the
    // app names.
    let bytes = std::fs::read(&file).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap().to_string();
    for canary in [
        canary_secret.as_str(),
        canary_plain.as_str(),
        key_body.as_str(),
        "shop.backup-test.example",
        "burst",
    ] {
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "`{canary}` is readable in the backup file"
        );
    }

    // The master key, exported apart.
    let data = s.dir.path().join("data");
    let key_file = work.path().join("master.key");
    let out = escale(&[
        "backup",
        "export-key",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        key_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wipe: the server killed, its containers removed, its data dir gone.
    s.kill9();
    for (id, _, _) in s.containers() {
        docker_cli(&["rm", "-f", &id]);
    }
    std::fs::rename(&data, s.dir.path().join("wiped")).unwrap();

    // Another key: refused, naming it, nothing written.
    let wrong = work.path().join("wrong.key");
    std::fs::write(&wrong, hex::encode(rand::random::<[u8; 32]>())).unwrap();
    let out = escale(&[
        "backup",
        "restore",
        file.to_str().unwrap(),
        "--key-file",
        wrong.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another master key"),
        "{err}"
    );
    assert!(!data.exists(), "a refused restore wrote nothing");

    // Into the new, empty data dir.
    let out = escale(&[
        "backup",
        "restore",
        file.to_str().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 apps") && said.contains("1 nodes"),
        "{said}"
    );
    // Not again over it.
    let out = escale(&[
        "backup",
        "restore",
        file.to_str().unwrap(),
        "--key-file",
        key_file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not empty"), "{err}");

    {
        let mut conn = read_only_registry(&data.join("escale.db")).await;
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(check, "ok");
    }

    eprintln!(
        "backup drill: {} writes acknowledged before the backup, {} in all; backup {} bytes, {} files, {} ms",
        acked_before.len(),
        acked.lock().unwrap().len(),
        created["size"],
        created["files"],
        created["duration_ms"]
    );
    // The server on the restored data dir.
    s.restart();
    let keys = config_keys(&s, "burst");
    let missing: Vec<&String> = acked_before.iter().filter(|k| !keys.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "writes acknowledged before the backup are missing: {missing:?} ({} acknowledged before, {} restored)",
        acked_before.len(),
        keys.len()
    );
    let revealed = s.ok(&["config", "get", "web", "CANARY", "--reveal"]);
    assert!(
        revealed.contains(&canary_secret),
        "the secret opens: {revealed}"
    );
    let releases = s.json(&["releases", "web"]).as_array().unwrap().len();
    assert!(
        releases >= releases_before,
        "{releases} < {releases_before}"
    );
    let domains = s.ok(&["domains", "list", "web"]);
    assert!(domains.contains("shop.backup-test.example"), "{domains}");
    let certs = s.ok(&["certs", "list", "web"]);
    assert!(certs.contains("shop.backup-test.example"), "{certs}");
    let nodes = s.ok(&["nodes", "list"]);
    assert!(nodes.contains("n2"), "{nodes}");
    let bare = app_repo(&s, "burst").await;
    let out = Command::new("git")
        .args([
            "--git-dir",
            bare.to_str().unwrap(),
            "rev-parse",
            "refs/heads/feature",
        ])
        .output()
        .unwrap();
    let restored = String::from_utf8_lossy(&out.stdout);
    assert_eq!(restored.trim(), pushed, "the pushed branch is back");
    let fsck = Command::new("git")
        .args(["--git-dir", bare.to_str().unwrap(), "fsck", "--no-dangling"])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "git fsck: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    // The app serves again: its containers were started anew from the restored registry.
    serving(&s, "web.localhost").await;
    let v = s.json(&["apps", "info", "web"])["release"]
        .as_u64()
        .unwrap();
    s.wait_for(
        "the restored release healthy",
        Duration::from_secs(60),
        || (healthy(&s.instances("web"), "web", v) >= 1).then_some(()),
    )
    .await;
}

/// The CLI as the admin of a server, built from plain values (for another thread).
fn s_cli_command(api: &str, token: &str, dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(ESCALE);
    cmd.args(args)
        .env("ESCALE_URL", api)
        .env("ESCALE_TOKEN", token)
        .env("HOME", dir.join("home"))
        .env_remove("XDG_CONFIG_HOME")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}
