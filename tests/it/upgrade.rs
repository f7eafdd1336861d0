//! Upgrades and restarts: a new `escale serve` on the same data dir takes the listening
//! sockets over from the running one, which drains and exits (see `escale::handover`);
//! under steady load through the proxy to an app container (GETs, served by the proxy's
//! HTTP/1.1 fast path, and POSTs with a body, served by hyper), five restarts and an upgrade
//! (a copy of the binary at another path) fail no request. An escale older than its database
//! refuses to start, saying why.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::fixture_image;
use crate::support::load::{get_once, Load, CONNECTIONS};
use crate::support::server::{healthy, TestServer, ESCALE};

/// Restarts `restarts` times and upgrades once under load; asserts no request failed and
/// prints the figures.
async fn restarts_under_load(restarts: usize) {
    let app = "steady";
    let host = format!("{app}.localhost");
    let mut s = TestServer::start(&[]).await;
    let proxy = s.proxy.clone().expect("an HTTP proxy");
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", app]);
    s.ok(&["deploy", app, "--image", &image]);
    s.ok(&["scale", app, "web=2"]);
    let v = s.json(&["apps", "info", app])["release"].as_u64().unwrap();
    s.wait_for("2 healthy instances", Duration::from_secs(90), || {
        (healthy(&s.instances(app), "web", v) == 2).then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get_once(&proxy, &host, "/").await {
            Ok((StatusCode::OK, _)) => break,
            r if Instant::now() > deadline => panic!("the app never answered: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // The upgrade: the same build at another path, as a package manager would install it.
    let bin_dir = tempfile::tempdir().unwrap();
    let newer = bin_dir.path().join("escale-newer");
    std::fs::copy(ESCALE, &newer).unwrap();
    let containers_before: Vec<String> = s.containers().into_iter().map(|c| c.0).collect();

    let load = Load::start_mixed(&proxy, &host);
    load.phase("steady");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut took = Vec::new();
    for i in 1..=restarts + 1 {
        let (phase, binary) = if i <= restarts {
            (format!("restart {i}"), Path::new(ESCALE))
        } else {
            ("upgrade".to_string(), newer.as_path())
        };
        load.phase(&phase);
        let t = Instant::now();
        let status = s.take_over(binary);
        took.push(t.elapsed());
        assert!(
            status.success(),
            "the old server exited with {status} after {phase}"
        );
        load.phase(&format!("after {phase}"));
        // The new server answers its API and still sees the app.
        assert_eq!(s.json(&["apps", "info", app])["name"], app);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    load.phase("steady after");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop();

    let failed: u64 = tally.failures.values().sum();
    let p99_restart = tally
        .quantile_ms(0.99, |p| p.starts_with("restart") || p == "upgrade")
        .unwrap_or(f64::NAN);
    let p99_steady = tally
        .quantile_ms(0.99, |p| p.starts_with("steady"))
        .unwrap_or(f64::NAN);
    let p50_restart = tally
        .quantile_ms(0.5, |p| p.starts_with("restart") || p == "upgrade")
        .unwrap_or(f64::NAN);
    let report = format!(
        "{} requests over {CONNECTIONS} connections, {restarts} restarts and 1 upgrade (takeover times {took:?}): {} ok, {failed} failed; during takeovers p50 {p50_restart:.2} ms, p99 {p99_restart:.2} ms; steady p99 {p99_steady:.2} ms; failures by kind: {:?}; first:\n{}",
        tally.total,
        tally.ok,
        tally.failures,
        tally.first.join("\n")
    );
    eprintln!("restart under load: {report}");
    assert_eq!(failed, 0, "requests failed across restarts: {report}");
    assert!(
        tally.total >= 500,
        "too few requests to prove anything: {report}"
    );
    // The containers were adopted, not replaced.
    let containers_after: Vec<String> = s.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(
        containers_before, containers_after,
        "the restarts adopted the running containers"
    );
    // One server left, serving.
    let log = s.server_log();
    assert!(
        log.matches("a newer escale serves: draining and stopping")
            .count()
            == restarts + 1,
        "every old server drained"
    );
}

#[tokio::test]
async fn five_restarts_and_an_upgrade_under_load_fail_no_request() {
    restarts_under_load(5).await;
}

/// `scripts/bench-restart`: more restarts, figures printed.
#[tokio::test]
#[ignore = "benchmark: scripts/bench-restart"]
async fn bench_restart() {
    let n = std::env::var("RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    restarts_under_load(n).await;
}

#[tokio::test]
async fn an_escale_older_than_its_database_refuses_to_start() {
    use sqlx::ConnectOptions;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(data.join("escale.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
             checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99990101, 'from a newer escale', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let out = Command::new(ESCALE)
        .arg("serve")
        .env("ESCALE_DATA_DIR", &data)
        .env("ESCALE_API_ADDR", "127.0.0.1:0")
        .env("ESCALE_HTTP_ADDR", "off")
        .env("ESCALE_HTTPS_ADDR", "off")
        .env("ESCALE_DOCKER_HOST", "off")
        .env("ESCALE_ACME_DIRECTORY_URL", "off")
        .env_remove("ESCALE_MASTER_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {err}");
    assert!(
        err.contains("schema version 99990101") && err.contains("newer escale"),
        "{err}"
    );
}

/// Kills a server process that is not a child of the test (started by `serve --reload`).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// What systemd does on `systemctl reload escale` (`ExecReload=escale serve --reload` with
/// `$MAINPID`), with the test in systemd's place on `NOTIFY_SOCKET`: the first server says
/// READY=1; the reload starts a new server that takes over and says it is the main process
/// (MAINPID=<its pid>, READY=1); the old one exits without STOPPING=1; the API answers
/// throughout at the same address.
#[tokio::test]
async fn systemd_reload_hands_over_and_notifies_the_new_main_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let recv = |what: &str| {
        let mut buf = [0u8; 512];
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({what}): {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let notify_env = notify_path.to_str().unwrap().to_string();
    let s = TestServer::start(&[("NOTIFY_SOCKET", notify_env.as_str())]).await;
    assert_eq!(recv("first start"), "READY=1");
    let old = s.pid().expect("running");

    let data = s.dir.path().join("data");
    let out = Command::new(ESCALE)
        .args(["serve", "--reload"])
        .env("MAINPID", old.to_string())
        .env("NOTIFY_SOCKET", &notify_env)
        .env("ESCALE_DATA_DIR", &data)
        .env("ESCALE_API_ADDR", "127.0.0.1:0")
        .env("ESCALE_HTTP_ADDR", "127.0.0.1:0")
        .env("ESCALE_HTTPS_ADDR", "off")
        .env("ESCALE_ACME_DIRECTORY_URL", "off")
        .env("ESCALE_INSTALLATION_ID", &s.installation)
        .current_dir(s.dir.path())
        // Files, not pipes: the new server inherits them and outlives the reload command.
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("reload.log")).unwrap())
        .status()
        .expect("escale serve --reload runs");
    let out_log = std::fs::read_to_string(tmp.path().join("reload.log")).unwrap_or_default();
    let said = recv("after the reload");
    let new: u32 = said
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in `{said}`"));
    let _guard = KillOnDrop(new);
    assert!(out.success(), "reload failed: {out_log}");
    assert!(said.contains("READY=1"), "{said}");
    assert_ne!(new, old);
    // The old server is gone (exited, not killed by anyone), and sent no STOPPING=1.
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    assert!(
        notify.recv(&mut buf).is_err(),
        "no STOPPING=1 from the old server"
    );
    // The new one answers on the same API address.
    assert_eq!(s.json(&["apps", "list"]), serde_json::json!([]));
    assert!(Path::new(&format!("/proc/{new}")).exists());
}

/// A newer escale that stops the running one's reconciler and then goes away before taking
/// over (it crashed, or was killed) leaves the running one in charge again: it starts its
/// reconciler and background work anew, so a scale asked afterwards is carried out.
#[tokio::test]
async fn a_takeover_that_dies_half_way_gives_the_reconciler_back() {
    let app = "orphan";
    let s = TestServer::start(&[]).await;
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", app]);
    s.ok(&["deploy", app, "--image", &image]);
    let v = s.json(&["apps", "info", app])["release"].as_u64().unwrap();
    s.wait_for("1 healthy instance", Duration::from_secs(90), || {
        (healthy(&s.instances(app), "web", v) == 1).then_some(())
    })
    .await;

    // The newer server's first steps, then it vanishes (its socket closes).
    let data = s.dir.path().join("data");
    let taker = tokio::task::spawn_blocking(move || {
        let mut t = escale::handover::connect(&data)
            .expect("handover socket")
            .expect("a server holds it");
        t.listeners().expect("listeners");
        t.stop_background()
            .expect("the old server stops its reconciler");
        drop(t);
    });
    taker.await.unwrap();
    s.wait_for(
        "the server to say it reconciles again",
        Duration::from_secs(30),
        || {
            s.server_log()
                .contains("this one reconciles again")
                .then_some(())
        },
    )
    .await;

    // Its reconciler works: a scale is carried out.
    s.ok(&["scale", app, "web=2"]);
    s.wait_for("2 healthy instances", Duration::from_secs(90), || {
        (healthy(&s.instances(app), "web", v) == 2).then_some(())
    })
    .await;
    assert!(
        !s.server_log().contains("a newer escale serves: draining"),
        "the server did not drain"
    );
}
