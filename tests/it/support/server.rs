//! A real `escale serve` process per test: its own data dir, ports chosen by the kernel, its
//! own installation id (`t<pid>x<hex>`, so the sweep knows its owner), an admin token from the
//! real setup flow, and the CLI run as a subprocess against it. Dropping it kills the server
//! and removes every container labelled with its installation, also when the test panics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Once;
use std::time::Duration;

use serde_json::Value;

use super::docker::docker_cli;

/// The binary under test.
pub const ESCALE: &str = env!("CARGO_BIN_EXE_escale");

/// A running server and what a test needs to talk to it.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub installation: String,
    pub api: String,
    pub proxy: Option<String>,
    /// The proxy's HTTPS address, when `ESCALE_HTTPS_ADDR` is not `off`.
    pub https: Option<String>,
    pub token: String,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
    /// When set, the server runs from this image (`docker run`, host network, the engine's
    /// socket mounted) instead of the binary under test.
    image: Option<String>,
    /// Lines the server printed on stdout/stderr, for failure messages.
    pub log: PathBuf,
}

static SWEEP: Once = Once::new();

/// Removes containers of test servers whose test process is gone (a crashed earlier run).
pub fn sweep_server_leftovers() {
    SWEEP.call_once(|| {
        let listing = docker_cli(&[
            "ps",
            "-a",
            "--filter",
            "label=escale.installation",
            "--format",
            "{{.ID}} {{.Label \"escale.installation\"}}",
        ]);
        // Servers run from an image (`start_in_image`) carry their own label.
        let servers = docker_cli(&[
            "ps",
            "-a",
            "--filter",
            "label=escale.test-server",
            "--format",
            "{{.ID}} {{.Label \"escale.test-server\"}}",
        ]);
        let listing = format!("{listing}\n{servers}");
        let stale: Vec<&str> = listing
            .lines()
            .filter_map(|l| {
                let (id, inst) = l.split_once(' ')?;
                let pid: u32 = inst.strip_prefix('t')?.split_once('x')?.0.parse().ok()?;
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(id)
            })
            .collect();
        if !stale.is_empty() {
            eprintln!("sweeping {} leftover server container(s)", stale.len());
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(stale);
            docker_cli(&args);
        }
        // App networks of test servers whose test process is gone.
        let networks = docker_cli(&[
            "network",
            "ls",
            "--filter",
            "label=escale.installation",
            "--format",
            "{{.ID}} {{.Label \"escale.installation\"}}",
        ]);
        for line in networks.lines() {
            let Some((id, inst)) = line.split_once(' ') else {
                continue;
            };
            let pid = inst
                .strip_prefix('t')
                .and_then(|i| i.split_once('x'))
                .and_then(|(p, _)| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                docker_cli(&["network", "rm", id]);
            }
        }
    });
}

impl TestServer {
    /// Starts a server with fast test timings (plus `env`), and binds the first admin.
    pub async fn start(env: &[(&str, &str)]) -> TestServer {
        let (mut s, setup) = TestServer::start_unbound(env).await;
        s.bind_admin(&setup);
        s
    }

    /// Starts a server with no admin yet (`token` is empty); returns it and the setup token it
    /// printed.
    pub async fn start_unbound(env: &[(&str, &str)]) -> (TestServer, String) {
        TestServer::start_unbound_from(None, env).await
    }

    /// Starts a server from `image` (its entrypoint is `escale`), and binds the first admin.
    /// The container is named `escale-it-<installation>`, on the host's network, with the
    /// engine's socket and the test's directory mounted at the same path.
    pub async fn start_in_image(image: &str, env: &[(&str, &str)]) -> TestServer {
        let (mut s, setup) = TestServer::start_unbound_from(Some(image), env).await;
        s.bind_admin(&setup);
        s
    }

    fn bind_admin(&mut self, setup: &str) {
        let out = self.cli_with_token(
            None,
            &[
                "setup",
                "--setup-token",
                setup,
                "--name",
                "admin",
                "--password-stdin",
                "--json",
            ],
            Some("test-password-1"),
        );
        assert!(
            out.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("setup --json prints JSON");
        self.token = v["token"].as_str().expect("token").to_string();
    }

    /// The name of the server's container, when it runs from an image.
    pub fn container_name(&self) -> String {
        format!("escale-it-{}", self.installation)
    }

    async fn start_unbound_from(image: Option<&str>, env: &[(&str, &str)]) -> (TestServer, String) {
        super::docker::sweep_leftovers();
        sweep_server_leftovers();
        let dir = tempfile::tempdir().expect("temp dir");
        let installation = format!(
            "t{}x{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let mut extra_env: Vec<(String, String)> = vec![
            ("ESCALE_SCHEDULER_RECONCILE_INTERVAL".into(), "1s".into()),
            ("ESCALE_SCHEDULER_DEPLOY_TIMEOUT".into(), "20s".into()),
            ("ESCALE_SCHEDULER_DRAIN_GRACE".into(), "200ms".into()),
            ("ESCALE_SCHEDULER_STOP_TIMEOUT".into(), "5s".into()),
            ("ESCALE_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            ("ESCALE_HTTPS_ADDR".into(), "off".into()),
            ("ESCALE_ACME_DIRECTORY_URL".into(), "off".into()),
        ];
        for (k, v) in env {
            extra_env.retain(|(ek, _)| ek != k);
            extra_env.push((k.to_string(), v.to_string()));
        }
        let log = dir.path().join("server.log");
        let mut s = TestServer {
            dir,
            installation,
            api: String::new(),
            proxy: None,
            https: None,
            token: String::new(),
            child: None,
            extra_env,
            image: image.map(str::to_string),
            log,
        };
        let setup = s.spawn().expect("a new server prints a setup token");
        (s, setup)
    }

    /// Starts the process on the data dir; returns the setup token if it printed one.
    fn spawn(&mut self) -> Option<String> {
        self.spawn_binary(Path::new(ESCALE))
    }

    /// Starts `binary` (another copy of escale: an upgrade) as `escale serve` on the same data
    /// dir while this server runs: the new process takes the listening sockets over and the
    /// old one drains and exits. Waits for that exit and returns its status.
    pub fn take_over(&mut self, binary: &Path) -> std::process::ExitStatus {
        let mut old = self.child.take().expect("a running server");
        let (api, proxy) = (self.api.clone(), self.proxy.clone());
        self.spawn_binary(binary);
        assert_eq!(self.api, api, "the API address is kept");
        assert_eq!(self.proxy, proxy, "the proxy address is kept");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = old.try_wait().expect("wait") {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = old.kill();
                let _ = old.wait();
                panic!(
                    "the old server did not exit after the takeover; log:\n{}",
                    self.server_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_binary(&mut self, binary: &Path) -> Option<String> {
        let data = self.dir.path().join("data");
        let mut env: Vec<(String, String)> = vec![
            (
                "ESCALE_DATA_DIR".into(),
                data.to_string_lossy().into_owned(),
            ),
            ("ESCALE_API_ADDR".into(), "127.0.0.1:0".into()),
            ("ESCALE_INSTALLATION_ID".into(), self.installation.clone()),
            ("ESCALE_LOG_LEVEL".into(), "escale=debug,info".into()),
        ];
        env.extend(self.extra_env.iter().cloned());
        let mut cmd = match &self.image {
            None => {
                let mut cmd = Command::new(binary);
                cmd.arg("serve")
                    .env_remove("ESCALE_URL")
                    .env_remove("ESCALE_TOKEN");
                for (k, v) in &env {
                    cmd.env(k, v);
                }
                cmd
            }
            Some(image) => {
                std::fs::create_dir_all(&data).expect("data dir");
                let _ = docker_cli(&["rm", "-f", &self.container_name()]);
                let dir = self.dir.path().to_string_lossy().into_owned();
                let mut cmd = Command::new("docker");
                cmd.args(["run", "--rm", "--name", &self.container_name()])
                    .args([
                        "--label",
                        &format!("escale.test-server={}", self.installation),
                    ])
                    .args(["--network", "host"])
                    .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
                    .args(["-v", &format!("{dir}:{dir}")]);
                for (k, v) in &env {
                    cmd.args(["-e", &format!("{k}={v}")]);
                }
                cmd.args([image.as_str(), "serve"]);
                cmd
            }
        };
        cmd.current_dir(self.dir.path())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("log file"),
            );
        let mut child = cmd.spawn().expect("escale serve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.child = Some(child);
        let mut setup = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("escale serve did not start; log:\n{}", self.server_log())
            });
            if let Some(i) = line.find("escsetup_") {
                setup = Some(
                    line[i..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
            }
            if let Some(url) = line.strip_prefix("escale: proxy listening on ") {
                if url.starts_with("http://") {
                    self.proxy = Some(url.trim_start_matches("http://").to_string());
                }
                if let Some(addr) = url.strip_prefix("https://") {
                    self.https = Some(addr.to_string());
                }
            }
            if let Some(url) = line.strip_prefix("escale: API listening on ") {
                self.api = url.to_string();
                break;
            }
        }
        setup
    }

    /// A read-only connection to the server's registry file (for what no API shows).
    pub async fn registry(&self) -> sqlx::SqliteConnection {
        read_only_registry(&self.dir.path().join("data").join("escale.db")).await
    }

    /// What the server logged so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` the server (containers keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.image.is_some() {
            let _ = docker_cli(&["rm", "-f", &self.container_name()]);
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal");
        c.wait().expect("wait")
    }

    /// SIGTERM and wait up to `timeout` for the exit; `None` (server then killed) if it did
    /// not exit in time.
    pub fn terminate_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take().expect("server running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return Some(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same data dir (after `kill9` or `terminate`).
    pub fn restart(&mut self) {
        self.kill9();
        assert!(
            self.spawn().is_none(),
            "a restarted server with an admin prints no setup token"
        );
    }

    /// `GET path` on the API with the admin's token, on a connection of its own; the whole
    /// answer (head and body), for what the CLI does not show (`/metrics`, raw statuses).
    pub async fn api_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.api.trim_start_matches("http://").trim_end_matches('/');
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("API");
        tcp.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                self.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Runs the CLI as the admin; returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_token(Some(&self.token.clone()), args, None)
    }

    /// The CLI as the admin, ready to run (from another thread, say).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ESCALE);
        cmd.args(args)
            .env("ESCALE_URL", &self.api)
            .env("HOME", self.dir.path().join("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env("ESCALE_TOKEN", &self.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs the CLI with `token` (or none) and optional standard input.
    pub fn cli_with_token(
        &self,
        token: Option<&str>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        let mut cmd = self.cli_command(args);
        cmd.env_remove("ESCALE_TOKEN");
        if let Some(t) = token {
            cmd.env("ESCALE_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("escale CLI runs");
        {
            use std::io::Write;
            let mut input = child.stdin.take().expect("stdin");
            if let Some(s) = stdin {
                let _ = writeln!(input, "{s}");
            }
        }
        child.wait_with_output().expect("CLI output")
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "escale {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.ok(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("escale {args:?} --json printed no JSON ({e}): {text}"))
    }

    /// Instances of an app as the API shows them.
    pub fn instances(&self, app: &str) -> Vec<Value> {
        self.json(&["ps", app])["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Containers of this installation on the engine, as `(id, app, state)`.
    pub fn containers(&self) -> Vec<(String, String, String)> {
        docker_cli(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=escale.installation={}", self.installation),
            "--format",
            "{{.ID}} {{.Label \"escale.app\"}} {{.State}}",
        ])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_string(),
                it.next()?.to_string(),
                it.next()?.to_string(),
            ))
        })
        .collect()
    }

    /// Polls `check` every 200 ms until it returns `Some`, panicking with `what` and the server
    /// log after `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check() {
                return v;
            }
            if std::time::Instant::now() > deadline {
                let log = self.server_log();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; server log tail:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The whole log, kept as a test artifact.
            let kept = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("server-logs")
                .join(format!("{}.log", self.installation));
            if std::fs::create_dir_all(kept.parent().unwrap()).is_ok()
                && std::fs::copy(&self.log, &kept).is_ok()
            {
                eprintln!("server log kept in {}", kept.display());
            }
            let log = self.server_log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "--- server log tail ({}) ---\n{}\n---",
                self.installation,
                tail.join("\n")
            );
        }
        let ids = docker_cli(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=escale.installation={}", self.installation),
        ]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            docker_cli(&args);
        }
        super::docker::remove_networks(&self.installation);
    }
}

/// Healthy instances of `process` of `app` in release `v`.
pub fn healthy(instances: &[Value], process: &str, v: u64) -> usize {
    instances
        .iter()
        .filter(|i| {
            i["process"] == process && i["release"].as_u64() == Some(v) && i["health"] == "healthy"
        })
        .count()
}

/// A read-only connection to the registry file `db`.
pub async fn read_only_registry(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::ConnectOptions;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("the registry opens read-only")
}
