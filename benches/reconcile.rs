//! Reconcile pass time against the local Docker engine: one app with N running instances
//! (N = 10, 100, 300 by default; `RECONCILE_SIZES=10,100` to choose), steady state, the time of
//! one whole `Scheduler::pass()` (registry reads, one labelled list call, plan, routing
//! publication), median and p90 of 30 passes. The same source runs against an older build for
//! a before/after comparison (see `scripts/bench-reconcile`).
//!
//! ```text
//! cargo bench --bench reconcile
//! ```

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fixture_image, ms, percentile};
use escale::config::Config;
use escale::registry::{HealthKind, ProcessPatch, Registry};
use escale::scheduler::Scheduler;

fn remove_installation(installation: &str) {
    let ids = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=escale.installation={installation}"),
        ])
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&ids.stdout);
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        let _ = Command::new("docker").args(&args).output();
    }
    let nets = Command::new("docker")
        .args([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=escale.installation={installation}"),
        ])
        .output()
        .unwrap();
    for n in String::from_utf8_lossy(&nets.stdout).split_whitespace() {
        let _ = Command::new("docker").args(["network", "rm", n]).output();
    }
}

/// Instances the scheduler last saw running (read as JSON: the same on every build).
fn running(sched: &Scheduler) -> usize {
    let v = serde_json::to_value(&sched.view.load().instances).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "healthy")
        .count()
}

async fn measure(image: &str, n: u32) -> (Duration, Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(
        &dir.path().join("escale.db"),
        escale::secrets::MasterKey::random(),
    )
    .await
    .unwrap();
    let installation = registry.installation_id().to_string();
    let actor = registry.host_admin().await.unwrap();
    let mut config = Config::for_data_dir(dir.path());
    config.scheduler.reconcile_interval = Duration::from_secs(3600);
    config.scheduler.drain_grace = Duration::ZERO;
    config.scheduler.stop_timeout = Duration::from_millis(100);
    let config = Arc::new(config);
    let node = escale::node::Node::connect_local("local", &config.docker_host)
        .await
        .unwrap();
    let sched = new_scheduler(registry.clone(), config.clone(), node);
    registry
        .create_app(&actor, "bench", None, 8080)
        .await
        .unwrap();
    let patch = ProcessPatch {
        health_kind: Some(HealthKind::None),
        ..Default::default()
    };
    registry
        .upsert_process(&actor, "bench", "web", &patch, 8080, true)
        .await
        .unwrap();
    registry
        .set_formation(
            &actor,
            "bench",
            &std::collections::BTreeMap::from([("web".to_string(), n)]),
        )
        .await
        .unwrap();
    registry
        .create_release(&actor, "bench", image, "image", "bench")
        .await
        .unwrap();
    let started = Instant::now();
    while running(&sched) < n as usize {
        sched.pass().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{n} instances did not start"
        );
    }
    // Steady state: the rollout is recorded, nothing left to do.
    for _ in 0..5 {
        sched.pass().await.unwrap();
    }
    let calls_before = sched
        .engine_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut times = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        sched.pass().await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    let calls = sched
        .engine_calls
        .load(std::sync::atomic::Ordering::Relaxed)
        - calls_before;
    remove_installation(&installation);
    (
        percentile(&times, 50.0),
        percentile(&times, 90.0),
        calls as f64 / 30.0,
    )
}

#[tokio::main]
async fn main() {
    // `BENCH_LOG=escale=debug` shows what the passes do.
    if let Ok(level) = std::env::var("BENCH_LOG") {
        escale::server::init_logging(escale::config::LogFormat::Human, &level);
    }
    let image = fixture_image();
    let sizes: Vec<u32> = std::env::var("RECONCILE_SIZES")
        .unwrap_or_else(|_| "10,100,300".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        let (p50, p90, calls) = measure(&image, n).await;
        println!(
            "reconcile pass, {n} running instances: median {}, p90 {}, {calls:.1} engine calls per pass",
            ms(p50),
            ms(p90)
        );
    }
}

// BUILD-COMPAT: the one call that differs between builds (see scripts/bench-reconcile).
fn new_scheduler(
    registry: Registry,
    config: Arc<Config>,
    node: escale::node::Node,
) -> Arc<Scheduler> {
    Scheduler::new(
        registry,
        config,
        vec![Arc::new(node)],
        escale::routing::shared(),
    )
}
