//! Zero downtime, end to end: a real `escale serve`, the real proxy, the fixture app on the real
//! engine. A load generator keeps several keep-alive connections busy with steady requests to
//! the proxy while the app goes through five health-gated rolling deploys and a scale
//! 7 -> 2 -> 7; not one request may fail. Slow requests in flight when their instance is
//! scaled away must still complete (drain).
//!
//! The load generator runs on its own thread and runtime, so the blocking CLI calls of the test
//! never stall it. It never retries: every non-2xx answer and every connection error is a
//! failed request. It is bounded in time and in requests, and stops by itself.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::fixture_image;
use crate::support::load::{get_once, on_own_thread, Load, CONNECTIONS};
use crate::support::server::{healthy, TestServer};

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
