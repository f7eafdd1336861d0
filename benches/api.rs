//! API benchmark: idle RSS of `escale serve`, and p50/p99 latency of app create, app get and
//! app list pages (`?limit=`, at 10, 1,000 and 10,000 apps in the installation, the first page
//! and one deep in the list by its `after` cursor), sequential keep-alive requests on loopback,
//! against the release binary. A list request is timed until its whole answer is received (the
//! client's JSON parsing is not the server's latency); the server's CPU time per request is
//! printed beside it, a figure that other load on the machine disturbs less.
//!
//! ```text
//! cargo bench --bench api
//! ```
//!
//! Targets (issue "Foundation"): idle RSS under 30 MiB; p99 under 5 ms; a page of 1,000 apps
//! under 5 ms p99 (issue 13).

mod common;

use std::time::{Duration, Instant};

use common::{ms, percentile, Server};

const N: usize = 1000;
/// Apps in the installation when the list pages are measured.
const SIZES: [usize; 3] = [10, 1_000, 10_000];
/// Requests per list measurement.
const LIST_REQUESTS: usize = 300;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let s = Server::start(&[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = s.rss_kib();

    let mut create = Vec::with_capacity(N);
    // (apps, page size, deep page, latencies, server CPU ms per request, body bytes)
    #[allow(clippy::type_complexity)]
    let mut lists: Vec<(usize, usize, bool, Vec<Duration>, f64, usize)> = Vec::new();
    let total = SIZES[SIZES.len() - 1];
    for i in 0..total {
        let body = serde_json::json!({"name": format!("bench-{i:05}")});
        let t = Instant::now();
        let (status, _) = s.call("POST", "/api/v1/apps", Some(body)).await;
        if i < N {
            create.push(t.elapsed());
        }
        assert_eq!(status, 201);
        let apps = i + 1;
        if !SIZES.contains(&apps) {
            continue;
        }
        for page in [10, 100, 1000] {
            for deep in [false, true] {
                // A deep page starts after the middle app.
                let after = format!("bench-{:05}", apps / 2);
                let path = if deep {
                    format!("/api/v1/apps?limit={page}&after={after}")
                } else {
                    format!("/api/v1/apps?limit={page}")
                };
                let want = if deep {
                    page.min(apps - apps / 2 - 1)
                } else {
                    page.min(apps)
                };
                let mut list = Vec::with_capacity(LIST_REQUESTS);
                let cpu = s.cpu_seconds();
                let mut bytes = 0;
                for i in 0..LIST_REQUESTS {
                    // Timed until the whole answer is received; parsed (checked) after.
                    let t = Instant::now();
                    let (status, body) = s.call_bytes("GET", &path, None).await;
                    list.push(t.elapsed());
                    assert_eq!(status, 200);
                    bytes = body.len();
                    if i == 0 {
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        assert_eq!(v.as_array().map(Vec::len), Some(want), "{path}");
                    }
                }
                let cpu_ms = (s.cpu_seconds() - cpu) * 1000.0 / LIST_REQUESTS as f64;
                list.sort();
                lists.push((apps, page, deep, list, cpu_ms, bytes));
            }
        }
    }
    let mut get = Vec::with_capacity(N);
    for i in 0..N {
        let t = Instant::now();
        let (status, _) = s
            .call("GET", &format!("/api/v1/apps/bench-{i:05}"), None)
            .await;
        get.push(t.elapsed());
        assert_eq!(status, 200);
    }
    let loaded_rss = s.rss_kib();
    create.sort();
    get.sort();
    println!(
        "escale API benchmark ({N} sequential creates and gets, keep-alive, loopback, release build)"
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
    println!(
        "  GET  /api/v1/apps?limit=L ({LIST_REQUESTS} requests each; deep: after the middle app)"
    );
    for (apps, page, deep, list, cpu_ms, bytes) in &lists {
        println!(
            "    {apps:>6} apps, page of {page:>4}{}  p50 {}  p99 {}  server CPU {cpu_ms:.3} ms/req  {:.0} KiB",
            if *deep { " (deep) " } else { "        " },
            ms(percentile(list, 50.0)),
            ms(percentile(list, 99.0)),
            *bytes as f64 / 1024.0
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
