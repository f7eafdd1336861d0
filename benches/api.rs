//! API benchmark: idle RSS of `escale serve`, and p50/p99 latency of app create and app list
//! over 1,000 sequential keep-alive requests each, on loopback, against the release binary.
//!
//! ```text
//! cargo bench --bench api
//! ```
//!
//! Targets (issue "Foundation"): idle RSS under 30 MiB; p99 under 5 ms.

mod common;

use std::time::{Duration, Instant};

use common::{ms, percentile, Server};

const N: usize = 1000;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let s = Server::start(&[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = s.rss_kib();

    let mut create = Vec::with_capacity(N);
    let mut lists: Vec<(usize, Vec<Duration>)> = Vec::new();
    for i in 0..N {
        let body = serde_json::json!({"name": format!("bench-{i}")});
        let t = Instant::now();
        let (status, _) = s.call("POST", "/api/v1/apps", Some(body)).await;
        create.push(t.elapsed());
        assert_eq!(status, 201);
        // List latency at 10, 100 and 1,000 apps: 1,000 requests each.
        if [10, 100, N].contains(&(i + 1)) {
            let mut list = Vec::with_capacity(N);
            for _ in 0..N {
                let t = Instant::now();
                let (status, v) = s.call("GET", "/api/v1/apps", None).await;
                list.push(t.elapsed());
                assert_eq!(status, 200);
                assert_eq!(v.as_array().map(Vec::len), Some(i + 1));
            }
            list.sort();
            lists.push((i + 1, list));
        }
    }
    let mut get = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        let (status, _) = s
            .call("GET", &format!("/api/v1/apps/bench-{i}"), None)
            .await;
        get.push(t.elapsed());
        assert_eq!(status, 200);
    }
    let loaded_rss = s.rss_kib();
    create.sort();
    get.sort();
    println!(
        "escale API benchmark ({N} sequential requests each, keep-alive, loopback, release build)"
    );
    println!(
        "  idle RSS after start:        {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  RSS after the run:           {:.1} MiB",
        loaded_rss as f64 / 1024.0
    );
    println!(
        "  POST /api/v1/apps            p50 {}  p99 {}",
        ms(percentile(&create, 50.0)),
        ms(percentile(&create, 99.0))
    );
    println!(
        "  GET  /api/v1/apps/{{app}}      p50 {}  p99 {}",
        ms(percentile(&get, 50.0)),
        ms(percentile(&get, 99.0))
    );
    for (n, list) in &lists {
        println!(
            "  GET  /api/v1/apps ({n:>4} apps) p50 {}  p99 {}",
            ms(percentile(list, 50.0)),
            ms(percentile(list, 99.0))
        );
    }

    let size = std::fs::metadata(common::ESCALE)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "  binary size:                 {:.1} MiB ({})",
        size as f64 / (1 << 20) as f64,
        common::ESCALE
    );
}
