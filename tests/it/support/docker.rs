//! Real-engine test support: the local [`Node`], one [`TestInstallation`] per test with cleanup
//! by label (also when the test panics), a sweep of leftovers from crashed runs, and a tiny
//! HTTP client for talking to fixture instances.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use escale::node::{InstanceSpec, Node, LABEL_INSTALLATION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Marks containers created by the test harness.
pub const TEST_LABEL: &str = "escale.test";
/// The pid of the test process that owns a container; the sweep removes containers whose
/// owner is gone.
pub const TEST_PID_LABEL: &str = "escale.test.pid";
/// The engine tests use.
pub const LOCAL_SOCKET: &str = "unix:///var/run/docker.sock";

/// A [`Node`] for the local engine, named `local`.
pub async fn local_node() -> Node {
    Node::connect_local("local", LOCAL_SOCKET)
        .await
        .expect("the integration tests need the local Docker engine")
}

/// One test's own installation on the local engine. Dropping it removes every container
/// labelled with its id, through the `docker` CLI (Drop is sync and may run while panicking).
pub struct TestInstallation {
    pub id: String,
    pub node: Node,
}

impl TestInstallation {
    pub async fn new() -> TestInstallation {
        sweep_leftovers();
        let id = format!("t-{}", hex::encode(rand::random::<[u8; 6]>()));
        TestInstallation {
            id,
            node: local_node().await,
        }
    }

    /// A spec for an instance of the fixture app (or any `image`) in this installation:
    /// app `app`, process `web`, release 1, slot 0, port 8080, bound on 127.0.0.1,
    /// `ESCALE_INSTANCE`/`ESCALE_RELEASE` in the env, test labels set.
    pub fn spec(&self, instance: &str, image: &str) -> InstanceSpec {
        InstanceSpec {
            installation: self.id.clone(),
            app: "app".into(),
            process: "web".into(),
            release: 1,
            slot: 0,
            instance: instance.into(),
            image: image.into(),
            env: vec![
                ("ESCALE_INSTANCE".into(), instance.into()),
                ("ESCALE_RELEASE".into(), "1".into()),
            ],
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            log_max_size: "1m".into(),
            log_max_files: 2,
            extra_labels: vec![
                (TEST_LABEL.into(), "1".into()),
                (TEST_PID_LABEL.into(), std::process::id().to_string()),
            ],
            ..InstanceSpec::default()
        }
    }
}

impl Drop for TestInstallation {
    fn drop(&mut self) {
        remove_by_filter(&format!("label={LABEL_INSTALLATION}={}", self.id));
        remove_networks(&self.id);
    }
}

/// Removes the app networks of an installation (after its containers).
pub fn remove_networks(installation: &str) {
    let ids = docker_cli(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label={LABEL_INSTALLATION}={installation}"),
    ]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["network", "rm"];
        args.extend(ids);
        docker_cli(&args);
    }
}

/// Names of the networks a container is attached to, sorted.
pub fn container_networks(container: &str) -> Vec<String> {
    let mut out: Vec<String> = docker_cli(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        container,
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect();
    out.sort();
    out
}

/// The bridge IP addresses of a container (one per attached network).
pub fn container_ips(container: &str) -> Vec<String> {
    docker_cli(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        container,
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

/// Removes (forced) all containers matching a `docker ps --filter`.
fn remove_by_filter(filter: &str) {
    let ids = docker_cli(&["ps", "-aq", "--filter", filter]);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids);
        docker_cli(&args);
    }
}

/// Runs the `docker` CLI with an argv array, returns stdout ("" on failure).
pub fn docker_cli(args: &[&str]) -> String {
    match Command::new("docker").args(args).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            eprintln!("docker {args:?}: {e}");
            String::new()
        }
    }
}

static SWEEP: Once = Once::new();

/// Once per test process: removes containers of test installations whose owning test process
/// no longer exists (left by a run that crashed or was killed before its Drop ran).
pub fn sweep_leftovers() {
    SWEEP.call_once(|| {
        let format = format!("{{{{.ID}}}} {{{{.Label \"{TEST_PID_LABEL}\"}}}}");
        let listing = docker_cli(&[
            "ps",
            "-a",
            "--filter",
            &format!("label={TEST_PID_LABEL}"),
            "--format",
            &format,
        ]);
        let stale: Vec<&str> = listing
            .lines()
            .filter_map(|line| {
                let (id, pid) = line.split_once(' ')?;
                let alive = pid
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                (!alive).then_some(id)
            })
            .collect();
        if !stale.is_empty() {
            eprintln!("sweeping {} leftover test container(s)", stale.len());
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(stale);
            docker_cli(&args);
        }
    });
}

/// A plain HTTP/1.1 GET with `connection: close`; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    Ok((status, body.to_string()))
}

/// Retries [`http_get`] until the instance answers (it needs a moment to bind), up to 10 s.
pub async fn http_get_ready(addr: SocketAddr, path: &str) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(addr, path).await {
            Ok(r) => return r,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("GET http://{addr}{path} never answered: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
