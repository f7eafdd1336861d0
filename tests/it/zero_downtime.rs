//! Zero downtime, end to end: a real `escale serve`, the real proxy, the fixture app on the real
//! engine. A load generator keeps several keep-alive connections busy with steady requests to
//! the proxy while the app goes through five health-gated rolling deploys and a scale
//! 7 -> 2 -> 7; not one request may fail. Slow requests in flight when their instance is
//! scaled away must still complete (drain).
//!
//! The load generator runs on its own thread and runtime, so the blocking CLI calls of the test
//! never stall it. It never retries: every non-2xx answer and every connection error is a
//! failed request. It is bounded in time and in requests, and stops by itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::fixture_image;
use crate::support::server::{healthy, TestServer};

/// Concurrent keep-alive connections of the load generator.
const CONNECTIONS: usize = 8;
/// Pause between two requests on one connection.
const PACE: Duration = Duration::from_millis(5);
/// The load generator stops by itself after this long, or this many requests.
const MAX_LOAD_TIME: Duration = Duration::from_secs(300);
const MAX_REQUESTS: u64 = 2_000_000;
/// A request without a complete answer after this long failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `fut` to completion on a thread of its own with a current-thread runtime.
fn on_own_thread<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut)
    })
}

/// What the load generator saw.
#[derive(Debug, Default)]
struct Tally {
    total: u64,
    ok: u64,
    /// Failed requests by kind (status and `x-escale-error`, or the connection error).
    failures: BTreeMap<String, u64>,
    /// The first failures, with when and in which phase they happened.
    first: Vec<String>,
}

/// Shared between the test and the load generator's tasks.
struct LoadState {
    stop: AtomicBool,
    started: Instant,
    sent: AtomicU64,
    phase: Mutex<String>,
    tally: Mutex<Tally>,
}

impl LoadState {
    fn ok(&self) {
        let mut t = self.tally.lock().unwrap();
        t.total += 1;
        t.ok += 1;
    }

    fn failed(&self, kind: String, detail: String) {
        let phase = self.phase.lock().unwrap().clone();
        let at = self.started.elapsed().as_secs_f64();
        let mut t = self.tally.lock().unwrap();
        t.total += 1;
        *t.failures.entry(kind).or_default() += 1;
        if t.first.len() < 20 {
            t.first.push(format!("{at:7.3}s [{phase}] {detail}"));
        }
    }

    fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap() = phase.to_string();
    }
}

/// A running load generator.
struct Load {
    state: Arc<LoadState>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(proxy: &str, host: &str) -> Load {
        let state = Arc::new(LoadState {
            stop: AtomicBool::new(false),
            started: Instant::now(),
            sent: AtomicU64::new(0),
            phase: Mutex::new("start".into()),
            tally: Mutex::default(),
        });
        let (proxy, host) = (proxy.to_string(), host.to_string());
        let st = state.clone();
        let thread = on_own_thread(async move {
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|_| tokio::spawn(connection_loop(proxy.clone(), host.clone(), st.clone())))
                .collect();
            for t in tasks {
                t.await.expect("load task");
            }
        });
        Load { state, thread }
    }

    fn phase(&self, phase: &str) {
        self.state.set_phase(phase);
    }

    fn stop(self) -> Tally {
        self.state.stop.store(true, Relaxed);
        self.thread.join().expect("load thread");
        std::mem::take(&mut *self.state.tally.lock().unwrap())
    }
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(proxy: &str) -> Result<Sender, String> {
    let tcp = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One keep-alive connection sending `GET /` until told to stop; reconnects after an error
/// (the request that met the error has failed; it is not sent again).
async fn connection_loop(proxy: String, host: String, st: Arc<LoadState>) {
    let mut sender: Option<Sender> = None;
    loop {
        if st.stop.load(Relaxed)
            || st.started.elapsed() > MAX_LOAD_TIME
            || st.sent.fetch_add(1, Relaxed) >= MAX_REQUESTS
        {
            return;
        }
        if sender.is_none() {
            match connect(&proxy).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    st.failed("connect".into(), e);
                    tokio::time::sleep(PACE).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected");
        let req = Request::get("/")
            .header(header::HOST, &host)
            .body(Empty::new())
            .expect("request");
        let exchange = async {
            s.ready()
                .await
                .map_err(|e| ("connection".to_string(), format!("not ready: {e}")))?;
            let resp = s
                .send_request(req)
                .await
                .map_err(|e| ("request".to_string(), format!("request: {e}")))?;
            let status = resp.status();
            let code = resp
                .headers()
                .get("x-escale-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ("body".to_string(), format!("body: {e}")))?
                .to_bytes();
            Ok::<_, (String, String)>((status, code, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok((status, _, _))) if status.is_success() => st.ok(),
            Ok(Ok((status, code, body))) => st.failed(
                format!("{} {code}", status.as_u16()),
                format!(
                    "{status} {code}: {}",
                    String::from_utf8_lossy(&body).lines().next().unwrap_or("")
                ),
            ),
            Ok(Err((kind, detail))) => {
                st.failed(kind, detail);
                sender = None;
            }
            Err(_) => {
                st.failed(
                    "timeout".into(),
                    format!("no answer in {REQUEST_TIMEOUT:?}"),
                );
                sender = None;
            }
        }
        tokio::time::sleep(PACE).await;
    }
}

/// `GET path` with `Host: host` on a fresh connection to the proxy: status and body.
async fn get_once(proxy: &str, host: &str, path: &str) -> Result<(StatusCode, String), String> {
    let mut s = connect(proxy).await?;
    let req = Request::get(path)
        .header(header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let resp = s
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits until `n` web instances of release `v` are healthy and nothing else is left.
async fn settled(s: &TestServer, app: &str, n: usize, v: u64) {
    s.wait_for(
        &format!("{n} healthy instances of v{v} and nothing else"),
        Duration::from_secs(90),
        || {
            let ps = s.instances(app);
            (ps.len() == n && healthy(&ps, "web", v) == n && s.containers().len() == n)
                .then_some(())
        },
    )
    .await;
}

fn release(s: &TestServer, app: &str) -> u64 {
    s.json(&["apps", "info", app])["release"]
        .as_u64()
        .expect("a release")
}

#[tokio::test]
async fn deploys_and_scaling_under_load_fail_no_request() {
    let app = "steady";
    let host = format!("{app}.localhost");
    // Seven instances rolled one at a time, five times, on a shared two-core machine.
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "120s")]).await;
    let proxy = s.proxy.clone().expect("the server runs an HTTP proxy");
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", app]);
    s.ok(&["deploy", app, "--image", &image]);
    s.ok(&["scale", app, "web=7"]);
    settled(&s, app, 7, release(&s, app)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get_once(&proxy, &host, "/").await {
            Ok((StatusCode::OK, _)) => break,
            r if Instant::now() > deadline => panic!("the app never answered via the proxy: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }

    let load = Load::start(&proxy, &host);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The health check moves to /health under load: running instances are re-probed, not
    // taken out of routing.
    load.phase("health path");
    s.ok(&["processes", "set", app, "web", "--health-path", "/health"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Five health-gated rolling deploys: new images, and config changes (new releases too).
    for i in 1..=5 {
        load.phase(&format!("deploy {i}"));
        if i % 2 == 0 {
            s.ok(&["config", "set", app, &format!("GREETING=hello-{i}")]);
            let v = release(&s, app);
            settled(&s, app, 7, v).await;
        } else {
            s.ok(&["deploy", app, "--image", &image]);
        }
    }
    load.phase("settle after deploys");
    settled(&s, app, 7, release(&s, app)).await;

    // Slow requests in flight on every instance, then a scale-down under them.
    load.phase("scale 7 -> 2");
    let slow: Vec<_> = (0..7)
        .map(|_| {
            let (proxy, host) = (proxy.clone(), host.clone());
            on_own_thread(async move {
                let t = Instant::now();
                (get_once(&proxy, &host, "/sleep/1500").await, t.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.ok(&["scale", app, "web=2"]);
    let v = release(&s, app);
    settled(&s, app, 2, v).await;
    let slow: Vec<_> = slow
        .into_iter()
        .map(|t| t.join().expect("slow request thread"))
        .collect();

    load.phase("scale 2 -> 7");
    s.ok(&["scale", app, "web=7"]);
    settled(&s, app, 7, v).await;
    load.phase("after scale up");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop();

    for (r, took) in &slow {
        assert!(
            matches!(r, Ok((StatusCode::OK, body)) if body == "slept 1500 ms\n"),
            "a slow request in flight during the scale-down did not complete: {r:?} after {took:?}"
        );
    }
    let failed: u64 = tally.failures.values().sum();
    // What the proxy logged about upstream trouble (near misses show up as retries).
    let log = s.server_log();
    let proxy_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream request failed") || l.contains("retrying on another"))
        .collect();
    let report = format!(
        "{} requests over {CONNECTIONS} connections ({} instances started, {} drained, last \
         release v{}), {} ok, {failed} failed; failures by kind: {:?}; first failures:\n{}\n\
         proxy upstream warnings ({}):\n{}",
        tally.total,
        log.matches("starting instance").count(),
        log.matches("draining instance").count(),
        release(&s, app),
        tally.ok,
        tally.failures,
        tally.first.join("\n"),
        proxy_lines.len(),
        proxy_lines
            .iter()
            .take(20)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("zero downtime load: {report}");
    assert_eq!(
        failed, 0,
        "requests failed during deploys and scaling: {report}"
    );
    assert!(
        tally.total >= 1_000,
        "the load generator sent too few requests to prove anything: {report}"
    );
}
