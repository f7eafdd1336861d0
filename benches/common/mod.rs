//! Shared by the benchmarks: a real `escale serve` process on a temp data dir, its admin token,
//! a keep-alive HTTP client, percentiles, and /proc readings (RSS, CPU time).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const ESCALE: &str = env!("CARGO_BIN_EXE_escale");

pub struct Server {
    pub dir: tempfile::TempDir,
    pub installation: String,
    pub api: String,
    pub token: String,
    pub child: Child,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

impl Server {
    pub async fn start(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let installation = format!(
            "b{}x{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 3]>())
        );
        let mut cmd = Command::new(ESCALE);
        cmd.arg("serve")
            .env("ESCALE_DATA_DIR", dir.path().join("data"))
            .env("ESCALE_API_ADDR", "127.0.0.1:0")
            .env("ESCALE_HTTP_ADDR", "127.0.0.1:0")
            .env("ESCALE_HTTPS_ADDR", "off")
            .env("ESCALE_LOG_LEVEL", "warn")
            .env("ESCALE_INSTALLATION_ID", &installation)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("escale serve starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut setup, mut api) = (String::new(), String::new());
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(i) = line.find("escsetup_") {
                setup = line[i..].split_whitespace().next().unwrap().to_string();
            }
            if let Some(u) = line.strip_prefix("escale: API listening on ") {
                api = u.to_string();
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut s = Server {
            dir,
            installation,
            api,
            token: String::new(),
            child,
            client,
        };
        let (status, body) = s
            .call("POST", "/api/v1/setup", Some(serde_json::json!({"setup_token": setup, "name": "admin", "password": "bench-password"})))
            .await;
        assert_eq!(status, 201, "setup: {body}");
        s.token = body["token"].as_str().unwrap().to_string();
        s
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (status, bytes) = self.call_bytes(method, path, body).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// [`Server::call`] without parsing the answer: the status and the body's bytes, once
    /// all received (what a latency measurement of the server should stop at).
    pub async fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, Bytes) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api));
        if !self.token.is_empty() {
            req = req.header("authorization", format!("Bearer {}", self.token));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(serde_json::to_vec(&b).unwrap()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self
            .client
            .request(req.body(body).unwrap())
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, bytes)
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// User + system CPU time of the server so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(ESCALE)
            .args(args)
            .env("ESCALE_URL", &self.api)
            .env("ESCALE_TOKEN", &self.token)
            .output()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The benchmark's containers, by installation label (argv only).
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=escale.installation={}", self.installation),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .output();
        }
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// The p-th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Builds the fixture app image from nothing (rustc + `FROM scratch`), returns its tag.
pub fn fixture_image() -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webapp.rs");
    let out = dir.path().join("webapp");
    let st = Command::new("rustc")
        .args([
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "--edition",
            "2021",
            src,
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "rustc fixture");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY webapp /webapp\nENTRYPOINT [\"/webapp\"]\n",
    )
    .unwrap();
    let tag = "escale-bench/webapp:1";
    let st = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "docker build fixture");
    tag.to_string()
}
