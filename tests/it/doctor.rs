//! `escale doctor` on real hosts: a broken engine address and a full data dir (a small tmpfs
//! filled up) are both named, with what to fix, and the exit code says so; beside a running
//! `escale serve`, its own ports count as held by escale, the real engine and the registry
//! pass; a port taken by another program fails naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::support::server::{TestServer, ESCALE};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

fn doctor(cwd: &Path, env: &[(&str, &str)], json: bool) -> Output {
    let mut cmd = Command::new(ESCALE);
    cmd.arg("doctor").current_dir(cwd);
    if json {
        cmd.arg("--json");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("ESCALE_MASTER_KEY");
    cmd.output().expect("escale doctor runs")
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check `{name}` in {report:#}"))
}

#[tokio::test]
async fn a_broken_engine_address_and_a_full_disk_are_both_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _fs = Tmpfs::mount(&data, "4m");
    // Fill it up.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(data.join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let env = [
        ("ESCALE_DATA_DIR", data.to_str().unwrap()),
        (
            "ESCALE_DOCKER_HOST",
            "unix:///nonexistent/escale-test/docker.sock",
        ),
        ("ESCALE_API_ADDR", "127.0.0.1:0"),
        ("ESCALE_HTTP_ADDR", "127.0.0.1:0"),
        ("ESCALE_HTTPS_ADDR", "off"),
    ];
    let out = doctor(tmp.path(), &env, true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let engine = check(&report, "engine");
    assert_eq!(engine["status"], "fail", "{engine}");
    assert!(
        engine["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/escale-test/docker.sock"),
        "{engine}"
    );
    assert!(
        engine["fix"].as_str().unwrap().contains("docker_host"),
        "{engine}"
    );
    let disk = check(&report, "disk: data dir");
    assert_eq!(disk["status"], "fail", "{disk}");
    assert!(
        disk["detail"]
            .as_str()
            .unwrap()
            .contains(data.to_str().unwrap()),
        "{disk}"
    );
    assert!(
        disk["fix"].as_str().unwrap().contains("free space"),
        "{disk}"
    );
    // What is fine is said to be fine.
    assert_eq!(check(&report, "port: http_addr")["status"], "ok");

    // The human report names both, with the fixes, and the exit code.
    let out = doctor(tmp.path(), &env, false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("engine"))
            && text
                .lines()
                .any(|l| l.starts_with("FAIL") && l.contains("disk: data dir"))
            && text.contains("To fix:"),
        "{text}"
    );
    assert!(
        err.contains("engine") && err.contains("disk: data dir"),
        "{err}"
    );
}

#[tokio::test]
async fn beside_a_running_escale_its_ports_are_its_own_and_a_foreign_port_fails() {
    let s = TestServer::start(&[]).await;
    let data = s.dir.path().join("data");
    let proxy = s.proxy.clone().unwrap();
    let api = s.api.trim_start_matches("http://").to_string();
    let env = [
        ("ESCALE_DATA_DIR", data.to_str().unwrap()),
        ("ESCALE_API_ADDR", api.as_str()),
        ("ESCALE_HTTP_ADDR", proxy.as_str()),
        ("ESCALE_HTTPS_ADDR", "off"),
    ];
    let out = doctor(s.dir.path(), &env, true);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(out.status.success(), "{report:#}");
    for name in [
        "engine",
        "engine: storage driver",
        "clock: local engine",
        "registry",
    ] {
        assert_eq!(check(&report, name)["status"], "ok", "{report:#}");
    }
    for name in ["port: api_addr", "port: http_addr"] {
        let c = check(&report, name);
        assert_eq!(c["status"], "ok", "{c}");
        assert!(
            c["detail"].as_str().unwrap().contains("held by the escale"),
            "{c}"
        );
    }
    // apps_domain = localhost: a warning, not a failure.
    assert_eq!(check(&report, "dns: apps domain")["status"], "warn");

    // Another program on the HTTPS port.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = other.local_addr().unwrap().to_string();
    let mut env = env.to_vec();
    env.retain(|(k, _)| *k != "ESCALE_HTTPS_ADDR");
    env.push(("ESCALE_HTTPS_ADDR", taken.as_str()));
    let out = doctor(s.dir.path(), &env, true);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = check(&report, "port: https_addr");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains(&taken), "{c}");
    assert!(
        c["detail"].as_str().unwrap().contains("another program"),
        "{c}"
    );
}
