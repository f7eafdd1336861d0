//! The escale proxy as a standalone server for `scripts/bench-proxy`, which compares it with
//! nginx and HAProxy under wrk. Not a self-timing benchmark: it serves until killed.
//!
//! It runs the same code as `escale serve` (`escale::proxy::spawn_workers`, default
//! `ProxyConfig`, access log off, metrics on) with `ESCALE_BENCH_THREADS` worker threads (the
//! `proxy.workers` setting), one route for `ESCALE_BENCH_HOST` to the comma-separated
//! `ESCALE_BENCH_BACKENDS`. With `ESCALE_BENCH_TLS_LISTEN`, `ESCALE_BENCH_CERT` and
//! `ESCALE_BENCH_KEY` (PEM files) it also serves HTTPS with that certificate.
//!
//! ```text
//! ESCALE_BENCH_LISTEN=127.0.0.1:18003 ESCALE_BENCH_BACKENDS=127.0.0.1:18000 \
//!     cargo bench --bench proxy
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use escale::proxy::{self, CertStore, Listeners, ProxyConfig, ProxyMetrics};
use escale::routing::{self, Backend, Route, RoutingTable};

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    if std::env::args().skip(1).any(|a| a != "--bench") {
        eprintln!("usage: ESCALE_BENCH_LISTEN=ADDR ESCALE_BENCH_BACKENDS=ADDR[,ADDR] proxy");
        std::process::exit(2);
    }
    let listen: SocketAddr = env("ESCALE_BENCH_LISTEN", "127.0.0.1:18003")
        .parse()
        .expect("ESCALE_BENCH_LISTEN is an address");
    let backends: Vec<Backend> = env("ESCALE_BENCH_BACKENDS", "127.0.0.1:18000")
        .split(',')
        .enumerate()
        .map(|(i, a)| Backend {
            instance: format!("bench-{i}"),
            addr: a
                .trim()
                .parse()
                .expect("ESCALE_BENCH_BACKENDS are addresses"),
        })
        .collect();
    let host = env("ESCALE_BENCH_HOST", "bench.test");
    let threads: usize = env("ESCALE_BENCH_THREADS", "1")
        .parse()
        .expect("ESCALE_BENCH_THREADS is a number");
    let tls_listen = std::env::var("ESCALE_BENCH_TLS_LISTEN").ok();

    let routes = routing::shared();
    let route = Arc::new(Route {
        app: "bench".into(),
        backends,
        max_body_bytes: 1 << 30,
        redirect_https: false,
    });
    routes.store(Arc::new(RoutingTable::new([(host.clone(), route)])));
    let mut listeners = Listeners {
        http: Some(std::net::TcpListener::bind(listen).expect("bind")),
        https: None,
    };
    if let Some(tls_listen) = tls_listen {
        let cert = std::fs::read(env("ESCALE_BENCH_CERT", "")).expect("ESCALE_BENCH_CERT");
        let key = std::fs::read(env("ESCALE_BENCH_KEY", "")).expect("ESCALE_BENCH_KEY");
        let certs = CertStore::new();
        certs.insert(
            &host,
            Arc::new(proxy::certified_key_from_pem(&cert, &key).expect("certificate")),
        );
        let tls = std::net::TcpListener::bind(&tls_listen).expect("bind TLS");
        listeners.https = Some((tls, Arc::new(certs)));
    }
    // Never turns true: the bench server runs until killed.
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let workers = proxy::spawn_workers(
        threads,
        listeners,
        routes,
        ProxyConfig::default(),
        Arc::new(ProxyMetrics::new()),
        stopped,
    )
    .expect("proxy workers");
    eprintln!("escale bench proxy on {listen} for {host} ({threads} workers)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(workers.join())
        .expect("proxy workers stopped");
}
