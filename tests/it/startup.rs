//! Time to serving (`scripts/bench-restore`, ignored benchmarks): `APPS` apps (default 20,
//! about what an engine's default address pools allow: each app has its own bridge network)
//! deployed from the fixture image and serving through the proxy; then
//!
//! - **start**: the server stopped (SIGTERM; the containers keep running, as under
//!   `systemctl stop`) and started again on the same data dir: time from the process start
//!   (what `systemctl start` does, without systemd's own share) to every app answering
//!   through the proxy;
//! - **restore**: a backup taken, the server killed, its containers removed and its data dir
//!   wiped (a new host), the backup restored into a new data dir and the server started on
//!   it: time of the restore, and from the start to every app answering (its containers
//!   created anew by the reconciler).
//!
//! Both assert that every app serves again; the times are printed, never asserted.

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::docker::docker_cli;
use crate::support::fixture_image;
use crate::support::load::get_once;
use crate::support::server::{TestServer, ESCALE};

fn apps() -> usize {
    std::env::var("APPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Deploys `n` apps and waits until each answers through the proxy.
async fn deploy_apps(s: &TestServer, n: usize) -> Vec<String> {
    let image = fixture_image().await.to_string();
    let names: Vec<String> = (0..n).map(|i| format!("app{i:03}")).collect();
    for name in &names {
        s.ok(&["apps", "create", name]);
        s.ok(&["deploy", name, "--image", &image, "--detach"]);
    }
    let took = all_serving(s, &names, Duration::from_secs(300)).await;
    eprintln!("{n} apps deployed and serving in {took:?}");
    names
}

/// Waits until every app answers 200 through the proxy; the time it took.
async fn all_serving(s: &TestServer, names: &[String], within: Duration) -> Duration {
    let proxy = s.proxy.clone().expect("an HTTP proxy");
    let t = Instant::now();
    let mut waiting: Vec<&String> = names.iter().collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for name in waiting {
            let host = format!("{name}.localhost");
            if !matches!(get_once(&proxy, &host, "/").await, Ok((StatusCode::OK, _))) {
                still.push(name);
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < within,
            "{} apps not serving after {within:?}: {waiting:?}\n{}",
            waiting.len(),
            s.server_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

#[tokio::test]
#[ignore = "benchmark: scripts/bench-restore"]
async fn bench_start_to_serving() {
    let mut s = TestServer::start(&[]).await;
    let names = deploy_apps(&s, apps()).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        assert!(s.terminate().success(), "a clean stop");
        let t = Instant::now();
        s.restart();
        let api = t.elapsed();
        let serving = all_serving(&s, &names, Duration::from_secs(120)).await + api;
        times.push((api, serving));
    }
    eprintln!(
        "start to serving, {} apps with running containers, 5 starts: (API up, all apps serving) {times:?}",
        names.len()
    );
}

#[tokio::test]
#[ignore = "benchmark: scripts/bench-restore"]
async fn bench_restore_to_serving() {
    let mut s = TestServer::start(&[]).await;
    let names = deploy_apps(&s, apps()).await;
    let work = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let created = s.json(&["backup", "create", "--to", work.path().to_str().unwrap()]);
    let backup_took = t.elapsed();
    let file = work.path().join(created["name"].as_str().unwrap());
    let data = s.dir.path().join("data");
    let key_file = work.path().join("master.key");
    let out = Command::new(ESCALE)
        .args(["backup", "export-key", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&key_file)
        .env_remove("ESCALE_MASTER_KEY")
        .env_remove("ESCALE_DATA_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A new host: no server, no containers, no data dir.
    s.kill9();
    for (id, _, _) in s.containers() {
        docker_cli(&["rm", "-f", &id]);
    }
    std::fs::rename(&data, s.dir.path().join("wiped")).unwrap();

    let t = Instant::now();
    let out = Command::new(ESCALE)
        .args(["backup", "restore"])
        .arg(&file)
        .arg("--key-file")
        .arg(&key_file)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("ESCALE_MASTER_KEY")
        .env_remove("ESCALE_DATA_DIR")
        .output()
        .unwrap();
    let restore_took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    s.restart();
    let serving = all_serving(&s, &names, Duration::from_secs(300)).await + t.elapsed();
    eprintln!(
        "restore, {} apps: backup {backup_took:?} ({} bytes), restore {restore_took:?}, start to all apps serving {serving:?} (containers created anew)",
        names.len(),
        created["size"]
    );
}
