//! A load generator for tests through the proxy: several keep-alive connections sending
//! steady `GET /` with a Host header (or, with [`Load::start_mixed`], half of them `POST /echo`
//! with a small body: the proxy serves those with hyper rather than its fast path), on a thread and runtime of their own (so blocking CLI
//! calls of the test never stall it). It never retries: every non-2xx answer and every
//! connection error is a failed request, tallied by kind and by the phase the test named. It is
//! bounded in time and in requests, and stops by itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Concurrent keep-alive connections of the load generator.
pub const CONNECTIONS: usize = 8;
/// Pause between two requests on one connection.
const PACE: Duration = Duration::from_millis(5);
/// The load generator stops by itself after this long, or this many requests.
const MAX_LOAD_TIME: Duration = Duration::from_secs(300);
const MAX_REQUESTS: u64 = 2_000_000;
/// A request without a complete answer after this long failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `fut` to completion on a thread of its own with a current-thread runtime.
pub fn on_own_thread<T: Send + 'static>(
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
pub struct Tally {
    pub total: u64,
    pub ok: u64,
    /// Failed requests by kind (status and `x-escale-error`, or the connection error).
    pub failures: BTreeMap<String, u64>,
    /// The first failures, with when and in which phase they happened.
    pub first: Vec<String>,
    /// Each successful request: (phase, seconds since the load started, latency in µs).
    pub latencies: Vec<(String, f64, u32)>,
}

impl Tally {
    /// The `q` quantile (0.0 to 1.0) of the latencies of successful requests in phases for
    /// which `phase` is true, in milliseconds; `None` without any.
    pub fn quantile_ms(&self, q: f64, phase: impl Fn(&str) -> bool) -> Option<f64> {
        let mut v: Vec<u32> = self
            .latencies
            .iter()
            .filter(|(p, _, _)| phase(p))
            .map(|(_, _, us)| *us)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        Some(f64::from(v[i]) / 1000.0)
    }
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
    fn ok(&self, took: Duration) {
        let phase = self.phase.lock().unwrap().clone();
        let at = self.started.elapsed().as_secs_f64();
        let mut t = self.tally.lock().unwrap();
        t.total += 1;
        t.ok += 1;
        t.latencies
            .push((phase, at, took.as_micros().min(u128::from(u32::MAX)) as u32));
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
pub struct Load {
    state: Arc<LoadState>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    /// Every connection sends `GET /`.
    pub fn start(proxy: &str, host: &str) -> Load {
        Load::spawn(proxy, host, false)
    }

    /// Half the connections send `GET /`, the other half `POST /echo` with a 64-byte body.
    pub fn start_mixed(proxy: &str, host: &str) -> Load {
        Load::spawn(proxy, host, true)
    }

    fn spawn(proxy: &str, host: &str, mixed: bool) -> Load {
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
                .map(|i| {
                    let post = mixed && i % 2 == 1;
                    tokio::spawn(connection_loop(
                        proxy.clone(),
                        host.clone(),
                        post,
                        st.clone(),
                    ))
                })
                .collect();
            for t in tasks {
                t.await.expect("load task");
            }
        });
        Load { state, thread }
    }

    pub fn phase(&self, phase: &str) {
        self.state.set_phase(phase);
    }

    pub fn stop(self) -> Tally {
        self.state.stop.store(true, Relaxed);
        self.thread.join().expect("load thread");
        std::mem::take(&mut *self.state.tally.lock().unwrap())
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

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

/// One keep-alive connection sending `GET /` (or `POST /echo` with a body) until told to stop;
/// reconnects after an error (the request that met the error has failed; it is not sent
/// again: a POST is not idempotent, and a GET is not retried either).
async fn connection_loop(proxy: String, host: String, post: bool, st: Arc<LoadState>) {
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
        let req = if post {
            Request::post("/echo")
                .header(header::HOST, &host)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from_static(&[b'x'; 64])))
        } else {
            Request::get("/")
                .header(header::HOST, &host)
                .body(Full::new(Bytes::new()))
        }
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
            // The server closes the connection after this answer (`Connection: close`, as
            // when it drains): the next request goes on a new connection, as any client does.
            let closing = resp
                .headers()
                .get(header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
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
            Ok::<_, (String, String)>((status, code, body, closing))
        };
        let t = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
        if matches!(result, Ok(Ok((_, _, _, true)))) {
            sender = None;
        }
        match result {
            Ok(Ok((status, _, _, _))) if status.is_success() => st.ok(t.elapsed()),
            Ok(Ok((status, code, body, _))) => st.failed(
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
pub async fn get_once(proxy: &str, host: &str, path: &str) -> Result<(StatusCode, String), String> {
    let mut s = connect(proxy).await?;
    let req = Request::get(path)
        .header(header::HOST, host)
        .body(Full::new(Bytes::new()))
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
