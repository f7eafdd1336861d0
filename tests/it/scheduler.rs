//! The scheduler against the real engine: a real `escale serve`, the real CLI, fixture images
//! built from nothing. Each test has its own server, installation and containers.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::fixture_image;
use crate::support::server::{healthy, TestServer};

/// Creates `app` and deploys the fixture image to it; returns the image.
async fn deployed(s: &TestServer, app: &str) -> String {
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", app]);
    s.ok(&["deploy", app, "--image", &image]);
    image
}

/// Asserts that no slot of a process holds two live instances of the same release.
fn assert_no_duplicates(instances: &[Value]) {
    let mut seen = HashSet::new();
    for i in instances
        .iter()
        .filter(|i| i["state"] != "draining" && i["state"] != "exited")
    {
        let key = (
            i["process"].to_string(),
            i["slot"].as_u64(),
            i["release"].as_u64(),
        );
        assert!(
            seen.insert(key.clone()),
            "two live instances in {key:?}: {instances:#?}"
        );
    }
}

#[tokio::test]
async fn deploy_scale_up_down_to_zero_and_destroy_leaves_nothing() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "shop").await;
    let ps = s.instances("shop");
    assert_eq!(
        healthy(&ps, "web", 1),
        1,
        "a new app runs one web instance: {ps:#?}"
    );

    s.ok(&["scale", "shop", "web=7"]);
    let ps = s
        .wait_for("7 healthy instances", Duration::from_secs(60), || {
            let ps = s.instances("shop");
            (healthy(&ps, "web", 1) == 7).then_some(ps)
        })
        .await;
    let slots: HashSet<u64> = ps.iter().filter_map(|i| i["slot"].as_u64()).collect();
    assert_eq!(slots, (1..=7).collect(), "slots 1..=7");
    // Every instance answers at the address escale reports (its bridge address on this host) with its own identity.
    let mut names = HashSet::new();
    for i in &ps {
        let addr: std::net::SocketAddr = i["address"].as_str().unwrap().parse().unwrap();
        let (status, body) = crate::support::http_get(addr, "/")
            .await
            .expect("instance answers");
        assert_eq!(status, 200);
        names.insert(body.lines().next().unwrap_or("").to_string());
    }
    assert_eq!(names.len(), 7, "seven distinct instances answered");

    s.ok(&["scale", "shop", "web=2"]);
    s.wait_for("2 instances left", Duration::from_secs(30), || {
        let c = s.containers();
        (c.len() == 2 && healthy(&s.instances("shop"), "web", 1) == 2).then_some(())
    })
    .await;

    s.ok(&["scale", "shop", "web=0"]);
    s.wait_for("no container left", Duration::from_secs(30), || {
        s.containers().is_empty().then_some(())
    })
    .await;

    s.ok(&["scale", "shop", "web=2"]);
    s.wait_for("2 healthy again", Duration::from_secs(30), || {
        (healthy(&s.instances("shop"), "web", 1) == 2).then_some(())
    })
    .await;
    s.ok(&["apps", "destroy", "shop", "--confirm", "shop"]);
    s.wait_for(
        "destroy removes every container",
        Duration::from_secs(30),
        || s.containers().is_empty().then_some(()),
    )
    .await;
    let out = s.cli(&["ps", "shop"]);
    assert_eq!(out.status.code(), Some(1), "the app is gone");
}

#[tokio::test]
async fn a_killed_instance_is_replaced() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "heal").await;
    s.ok(&["scale", "heal", "web=2"]);
    let before = s
        .wait_for("2 healthy", Duration::from_secs(30), || {
            let ps = s.instances("heal");
            (healthy(&ps, "web", 1) == 2).then_some(ps)
        })
        .await;
    let victim = before[0]["container_id"].as_str().unwrap().to_string();
    crate::support::docker_cli(&["kill", &victim]);
    let after = s
        .wait_for("a replacement", Duration::from_secs(15), || {
            let ps = s.instances("heal");
            let replaced = ps.iter().all(|i| i["container_id"] != victim.as_str());
            (replaced && healthy(&ps, "web", 1) == 2).then_some(ps)
        })
        .await;
    let slot = before[0]["slot"].as_u64();
    let replacement = after
        .iter()
        .find(|i| i["slot"].as_u64() == slot)
        .expect("same slot refilled");
    assert_eq!(replacement["restarts"], 1, "{after:#?}");
    assert_eq!(s.containers().len(), 2, "the dead container was removed");
}

#[tokio::test]
async fn a_failing_health_check_fails_the_deploy_and_the_old_release_keeps_serving() {
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "6s")]).await;
    let image = deployed(&s, "fragile").await;
    s.ok(&[
        "processes",
        "set",
        "fragile",
        "web",
        "--health-path",
        "/health",
    ]);
    s.ok(&["scale", "fragile", "web=2"]);
    s.wait_for("2 healthy", Duration::from_secs(30), || {
        (healthy(&s.instances("fragile"), "web", 1) == 2).then_some(())
    })
    .await;

    // The config change itself makes v2, whose instances never pass their health check.
    s.ok(&["config", "set", "fragile", "FAIL_HEALTH=1"]);
    let out = s.cli(&["deploy", "fragile", "--image", &image]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "deploy fails: {stderr}");
    assert!(
        stderr.contains("rollout of v3 failed") && stderr.contains("healthy"),
        "{stderr}"
    );
    assert!(
        stderr.contains("previous release keeps serving"),
        "{stderr}"
    );

    let releases = s.json(&["releases", "fragile"]);
    let status = |v: u64| {
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == v)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status(3), "failed");
    assert_eq!(status(1), "active");
    let reason = releases[0]["status_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("last health check") && reason.contains("500"),
        "reason names the cause: {reason}"
    );
    assert_eq!(
        s.json(&["apps", "info", "fragile"])["release"],
        1,
        "target back on v1"
    );
    let ps = s
        .wait_for("only v1 left", Duration::from_secs(20), || {
            let ps = s.instances("fragile");
            ps.iter().all(|i| i["release"] == 1).then_some(ps)
        })
        .await;
    assert_eq!(healthy(&ps, "web", 1), 2, "v1 kept serving: {ps:#?}");
}

#[tokio::test]
async fn a_bad_image_is_refused_and_nothing_changes() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "steady").await;
    let before = s.json(&["releases", "steady"]);
    let out = s.cli(&[
        "deploy",
        "steady",
        "--image",
        "escale-test/does-not-exist:1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("does-not-exist")
            && stderr.contains("could not be pulled")
            && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(
        s.json(&["releases", "steady"]),
        before,
        "no release was created"
    );
    let out = s.cli(&["deploy", "steady", "--image", "Not A Ref"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image reference"));
}

#[tokio::test]
async fn memory_and_cpu_limits_are_enforced_by_the_engine() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "limited").await;
    let first = s.instances("limited")[0]["container_id"]
        .as_str()
        .unwrap()
        .to_string();
    s.ok(&[
        "resources",
        "limited",
        "web",
        "--memory",
        "64m",
        "--cpus",
        "0.5",
    ]);
    // A resource change rolls the running instances (health-gated), as a resize does on Heroku.
    let want = format!("{} 500000000 no", 64 << 20);
    s.wait_for("the instance rolled with its new limits", Duration::from_secs(30), || {
        let ps = s.instances("limited");
        let fresh: Vec<&Value> = ps.iter().filter(|i| i["container_id"] != first.as_str() && i["health"] == "healthy").collect();
        let id = fresh.first()?["container_id"].as_str()?.to_string();
        let inspect = crate::support::docker_cli(&["inspect", "--format", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.RestartPolicy.Name}}", &id]);
        (inspect.trim() == want && ps.len() == 1).then_some(())
    })
    .await;

    // And the engine really enforces memory: an instance that allocates more is OOM-killed.
    s.ok(&["config", "set", "limited", "ALLOC_MB=200"]);
    s.wait_for(
        "the OOM kill to be reported",
        Duration::from_secs(60),
        || {
            let v = s.json(&["ps", "limited"]);
            v["crashing"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["oom"] == true)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_crash_loop_backs_off_and_the_app_shows_crashing() {
    let s = TestServer::start(&[]).await;
    let image = fixture_image().await;
    s.ok(&["apps", "create", "loopy"]);
    s.ok(&["config", "set", "loopy", "CRASH_AFTER_MS=100"]);
    let out = s.cli(&["deploy", "loopy", "--image", image, "--no-wait"]);
    assert!(out.status.success());
    let crash = s
        .wait_for("crashing to show", Duration::from_secs(30), || {
            let v = s.json(&["ps", "loopy"]);
            v["crashing"].as_array().unwrap().first().cloned()
        })
        .await;
    assert!(crash["crashes"].as_u64().unwrap() >= 2);
    assert_eq!(crash["last_exit_code"], 1);
    let human = s.ok(&["ps", "loopy"]);
    assert!(human.contains("loopy is crashing"), "{human}");
    // Exponential backoff: 1 s, 2 s, 4 s, 8 s ... so after ~10 s at most ~5 crashes, where a
    // restart without backoff would have crashed dozens of times.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let v = s.json(&["ps", "loopy"]);
    let crashes = v["crashing"][0]["crashes"].as_u64().unwrap();
    assert!((3..=6).contains(&crashes), "crashes after ~12 s: {crashes}");
    assert!(
        s.containers().len() <= 1,
        "no pile of containers: {:?}",
        s.containers()
    );
}

#[tokio::test]
async fn kill_9_in_the_middle_of_a_rollout_converges_without_duplicates() {
    let s0 = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "8s")]).await;
    let mut s = s0;
    let image = deployed(&s, "phoenix").await;
    s.ok(&[
        "processes",
        "set",
        "phoenix",
        "web",
        "--health-path",
        "/health",
    ]);
    s.ok(&["scale", "phoenix", "web=3"]);
    s.wait_for("3 healthy", Duration::from_secs(30), || {
        (healthy(&s.instances("phoenix"), "web", 1) == 3).then_some(())
    })
    .await;

    // v2 never becomes healthy, so the rollout is surely in flight when escale dies.
    s.ok(&["config", "set", "phoenix", "FAIL_HEALTH=1"]);
    s.wait_for("a v2 instance", Duration::from_secs(10), || {
        s.instances("phoenix")
            .iter()
            .any(|i| i["release"] == 2)
            .then_some(())
    })
    .await;
    s.kill9();
    s.restart();
    // After the restart: the rollout is resumed and fails at its (persisted) deadline, v1 serves.
    let ps = s
        .wait_for(
            "v2 rolled back and v1 serving",
            Duration::from_secs(40),
            || {
                let ps = s.instances("phoenix");
                (ps.iter().all(|i| i["release"] == 1) && healthy(&ps, "web", 1) == 3).then_some(ps)
            },
        )
        .await;
    assert_no_duplicates(&ps);
    assert_eq!(
        s.containers().len(),
        3,
        "no orphan left: {:?}",
        s.containers()
    );

    // A good deploy after that converges to exactly 3 instances of the new release.
    s.ok(&["config", "unset", "phoenix", "FAIL_HEALTH"]);
    let out = s.cli(&["deploy", "phoenix", "--image", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = s.json(&["apps", "info", "phoenix"])["release"]
        .as_u64()
        .unwrap();
    assert_eq!(last, 4, "v2 failed config, v3 config unset, v4 deploy");
    let ps = s
        .wait_for(
            "3 instances of the last release only",
            Duration::from_secs(30),
            || {
                let ps = s.instances("phoenix");
                (ps.len() == 3 && healthy(&ps, "web", last) == 3).then_some(ps)
            },
        )
        .await;
    assert_no_duplicates(&ps);
    s.wait_for("old containers removed", Duration::from_secs(20), || {
        (s.containers().len() == 3).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_escale_gracefully_and_a_restart_adopts_running_instances() {
    let mut s = TestServer::start(&[]).await;
    deployed(&s, "calm").await;
    s.ok(&["scale", "calm", "web=2"]);
    s.wait_for("2 healthy", Duration::from_secs(30), || {
        (healthy(&s.instances("calm"), "web", 1) == 2).then_some(())
    })
    .await;
    let before: HashSet<String> = s.containers().into_iter().map(|c| c.0).collect();
    let status = s.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(s.server_log().contains("escale stopped"));
    let running: HashSet<String> = s
        .containers()
        .into_iter()
        .filter(|c| c.2 == "running")
        .map(|c| c.0)
        .collect();
    assert_eq!(running, before, "apps keep running while escale is down");
    s.restart();
    s.wait_for(
        "the same 2 instances healthy",
        Duration::from_secs(20),
        || (healthy(&s.instances("calm"), "web", 1) == 2).then_some(()),
    )
    .await;
    // Give the reconciler a few passes: nothing is started or stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: HashSet<String> = s.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(after, before, "adopted, not replaced");
}

#[tokio::test]
async fn logs_merge_instances_tagged_with_process_slot_and_release() {
    let s = TestServer::start(&[]).await;
    deployed(&s, "chatty").await;
    s.ok(&[
        "processes",
        "set",
        "chatty",
        "web",
        "--health-path",
        "/health",
        "--health-interval",
        "1s",
        "--health-grace",
        "20s",
    ]);
    let p = s.json(&["processes", "list", "chatty"]);
    assert_eq!(p[0]["health"]["interval_ms"], 1000);
    assert_eq!(p[0]["health"]["grace_ms"], 20000);
    s.ok(&["scale", "chatty", "web=2"]);
    s.wait_for("2 healthy", Duration::from_secs(30), || {
        (healthy(&s.instances("chatty"), "web", 1) == 2).then_some(())
    })
    .await;
    // Requests through the proxy land in the instances' output.
    let proxy: std::net::SocketAddr = s.proxy.as_deref().expect("proxy address").parse().unwrap();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(
                b"GET /hello-logs HTTP/1.1\r\nHost: chatty.localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
    }
    let text = s
        .wait_for("both instances' lines", Duration::from_secs(10), || {
            let t = s.ok(&["logs", "chatty", "--tail", "50"]);
            (t.contains("web.1[v1]") && t.contains("web.2[v1]") && t.contains("/hello-logs"))
                .then_some(t)
        })
        .await;
    for line in text.lines() {
        let mut parts = line.splitn(3, ' ');
        let time = parts.next().unwrap();
        let tag = parts.next().unwrap_or("");
        assert!(
            time.starts_with("20") && time.contains('T'),
            "engine timestamp first: {line}"
        );
        assert!(
            tag.starts_with("web.") && tag.ends_with("[v1]"),
            "instance tag second: {line}"
        );
    }
    let only = s.ok(&["logs", "chatty", "--tail", "50", "--process", "worker"]);
    assert!(only.is_empty(), "no worker instances, no lines: {only}");
}

/// The status and reason of release `v` of `app`, if it exists.
fn release_status(s: &TestServer, app: &str, v: u64) -> Option<(String, String)> {
    let releases = s.json(&["releases", app]);
    let r = releases.as_array()?.iter().find(|r| r["version"] == v)?;
    Some((
        r["status"].as_str().unwrap_or("").to_string(),
        r["status_reason"].as_str().unwrap_or("").to_string(),
    ))
}

/// The current release of `app`.
fn current_release(s: &TestServer, app: &str) -> u64 {
    s.json(&["apps", "info", app])["release"]
        .as_u64()
        .expect("a release")
}

/// Waits until release `v` of `app` failed; returns its reason.
async fn failed_reason(s: &TestServer, app: &str, v: u64, within: Duration) -> String {
    s.wait_for(
        &format!("v{v} of {app} failed"),
        within,
        || match release_status(s, app, v) {
            Some((status, reason)) if status == "failed" => Some(reason),
            _ => None,
        },
    )
    .await
}

#[tokio::test]
async fn a_rollout_whose_instances_exit_at_once_fails_fast_and_says_why() {
    // The product's deploy timeout: the failure must not wait for it.
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "120s")]).await;
    let image = deployed(&s, "crashy").await;
    let v1 = current_release(&s, "crashy");

    // The config change makes v2, whose instances exit at once.
    let t = Instant::now();
    s.ok(&["config", "set", "crashy", "CRASH_AFTER_MS=0"]);
    let v2 = v1 + 1;
    let reason = failed_reason(&s, "crashy", v2, Duration::from_secs(15)).await;
    let took = t.elapsed();
    eprintln!("time to fail, instances exit at once (previous release serving): {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(reason.contains("exited"), "{reason}");
    assert!(reason.contains("last exit code 1"), "{reason}");
    assert!(
        reason.contains("crashing after 0 ms"),
        "the target release's last log lines: {reason}"
    );
    assert!(
        reason.contains(&format!("the previous release keeps serving (v{v1})")),
        "{reason}"
    );
    assert_eq!(current_release(&s, "crashy"), v1, "target back on v1");
    s.wait_for("v1 serving alone", Duration::from_secs(20), || {
        let ps = s.instances("crashy");
        (healthy(&ps, "web", v1) == 1 && ps.iter().all(|i| i["release"] == v1)).then_some(())
    })
    .await;

    // A first deploy that fails says that nothing keeps serving.
    s.ok(&["apps", "create", "fresh"]);
    s.ok(&["config", "set", "fresh", "CRASH_AFTER_MS=0"]);
    let t = Instant::now();
    let out = s.cli(&["deploy", "fresh", "--image", &image]);
    let took = t.elapsed();
    eprintln!("time to fail, instances exit at once (first deploy): {took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "deploy fails: {stderr}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(
        stderr.contains("no earlier release was ever active") && !stderr.contains("keeps serving"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_health_check_that_always_fails_fails_the_rollout_early() {
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "120s")]).await;
    deployed(&s, "sick").await;
    s.ok(&[
        "processes",
        "set",
        "sick",
        "web",
        "--health",
        "http",
        "--health-path",
        "/health",
        "--health-grace",
        "1s",
        "--health-interval",
        "1s",
        "--health-timeout",
        "500ms",
    ]);
    let v1 = current_release(&s, "sick");
    s.wait_for("v1 healthy", Duration::from_secs(30), || {
        (healthy(&s.instances("sick"), "web", v1) == 1).then_some(())
    })
    .await;

    let t = Instant::now();
    s.ok(&["config", "set", "sick", "FAIL_HEALTH=1"]);
    let reason = failed_reason(&s, "sick", v1 + 1, Duration::from_secs(30)).await;
    let took = t.elapsed();
    eprintln!("time to fail, health check always fails (grace 1s, deploy timeout 120s): {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "well before the deploy timeout: {took:?}"
    );
    assert!(
        reason.contains("failed its health check") && reason.contains("500"),
        "{reason}"
    );
    assert!(
        reason.contains("the previous release keeps serving"),
        "{reason}"
    );
    assert_eq!(current_release(&s, "sick"), v1);
}

/// `GET /` through the proxy with `Host: host`: the status, or `None` when no answer.
fn proxy_status(proxy: &str, host: &str) -> Option<u16> {
    let addr: std::net::SocketAddr = proxy.parse().ok()?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    c.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[tokio::test]
async fn a_saturated_single_instance_is_unrouted_but_kept_until_it_answers_again() {
    // Replacement would be due after 1 s of failed checks: only the last-accepting rule keeps
    // the instance.
    let s = TestServer::start(&[("ESCALE_SCHEDULER_UNHEALTHY_REPLACE_AFTER", "1s")]).await;
    let proxy = s.proxy.clone().expect("the server runs an HTTP proxy");
    deployed(&s, "busy").await;
    s.ok(&[
        "processes",
        "set",
        "busy",
        "web",
        "--health",
        "http",
        "--health-path",
        "/health",
        "--health-grace",
        "1s",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "300ms",
    ]);
    let v = current_release(&s, "busy");
    let ps = s
        .wait_for("one healthy instance", Duration::from_secs(30), || {
            let ps = s.instances("busy");
            (ps.len() == 1 && healthy(&ps, "web", v) == 1).then_some(ps)
        })
        .await;
    let id = ps[0]["container_id"].as_str().unwrap().to_string();
    let addr: std::net::SocketAddr = ps[0]["address"].as_str().unwrap().parse().unwrap();
    s.wait_for("routed", Duration::from_secs(10), || {
        (proxy_status(&proxy, "busy.localhost") == Some(200)).then_some(())
    })
    .await;

    // Its only worker is saturated for 6 s: health checks are accepted but time out.
    let stall = Instant::now();
    let (status, _) = crate::support::http_get(addr, "/stall/6000").await.unwrap();
    assert_eq!(status, 200);
    let same = |ps: &[serde_json::Value]| {
        assert!(
            ps.len() == 1 && ps[0]["container_id"] == id.as_str(),
            "the saturated instance must be kept: {ps:#?}"
        );
    };
    s.wait_for("unhealthy", Duration::from_secs(5), || {
        let ps = s.instances("busy");
        same(&ps);
        (ps[0]["health"] == "unhealthy").then_some(())
    })
    .await;
    let status = proxy_status(&proxy, "busy.localhost");
    assert_eq!(status, Some(503), "out of rotation while unhealthy");
    let back = s
        .wait_for("healthy again", Duration::from_secs(20), || {
            let ps = s.instances("busy");
            same(&ps);
            (ps[0]["health"] == "healthy").then(|| stall.elapsed())
        })
        .await;
    eprintln!("unhealthy and kept for about {back:?} (replacement threshold 1s)");
    assert!(
        back > Duration::from_secs(3),
        "the threshold passed meanwhile: {back:?}"
    );
    s.wait_for("routed again", Duration::from_secs(10), || {
        (proxy_status(&proxy, "busy.localhost") == Some(200)).then_some(())
    })
    .await;
    same(&s.instances("busy"));
    let c = s.containers();
    assert_eq!(c.len(), 1, "no replacement was started: {c:?}");
}

#[tokio::test]
async fn an_instance_that_stops_accepting_connections_is_replaced_after_the_threshold() {
    let s = TestServer::start(&[("ESCALE_SCHEDULER_UNHEALTHY_REPLACE_AFTER", "2s")]).await;
    deployed(&s, "deaf").await;
    s.ok(&[
        "processes",
        "set",
        "deaf",
        "web",
        "--health",
        "http",
        "--health-path",
        "/health",
        "--health-grace",
        "1s",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "300ms",
    ]);
    let v = current_release(&s, "deaf");
    let ps = s
        .wait_for("one healthy instance", Duration::from_secs(30), || {
            let ps = s.instances("deaf");
            (ps.len() == 1 && healthy(&ps, "web", v) == 1).then_some(ps)
        })
        .await;
    let id = ps[0]["container_id"].as_str().unwrap().to_string();
    let addr: std::net::SocketAddr = ps[0]["address"].as_str().unwrap().parse().unwrap();

    // The server inside the container goes away; the container keeps running.
    let t = Instant::now();
    let (status, _) = crate::support::http_get(addr, "/deaf").await.unwrap();
    assert_eq!(status, 200);
    s.wait_for("unhealthy", Duration::from_secs(5), || {
        let ps = s.instances("deaf");
        (ps.iter()
            .any(|i| i["container_id"] == id.as_str() && i["health"] == "unhealthy"))
        .then_some(())
    })
    .await;
    s.wait_for("a healthy replacement", Duration::from_secs(30), || {
        let ps = s.instances("deaf");
        let gone = ps.iter().all(|i| i["container_id"] != id.as_str());
        (gone && healthy(&ps, "web", v) == 1).then_some(())
    })
    .await;
    let took = t.elapsed();
    eprintln!("not accepting -> replaced and healthy in {took:?} (threshold 2s)");
    assert!(
        took >= Duration::from_secs(2),
        "not before the threshold: {took:?}"
    );
}

#[tokio::test]
async fn constraints_are_stored_shown_and_refused_when_no_node_has_the_label() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "placed"]);
    s.ok(&["scale", "placed", "web=0"]);
    s.ok(&[
        "processes",
        "set",
        "placed",
        "web",
        "--constraint",
        "disk=ssd",
        "--constraint",
        "zone=a",
    ]);
    let web = &s.json(&["processes", "list", "placed"])[0];
    assert_eq!(
        web["constraints"],
        json!({"disk": "ssd", "zone": "a"}),
        "{web}"
    );
    let list = s.ok(&["processes", "list", "placed"]);
    assert!(
        list.contains("PLACEMENT") && list.contains("disk=ssd,zone=a"),
        "{list}"
    );
    // No node has the label: scaling up fails at once, naming the node, nothing changed.
    let out = s.cli(&["scale", "placed", "web=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no node can run `web` of `placed`")
            && stderr.contains("local: lacks disk=ssd")
            && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert_eq!(s.json(&["processes", "list", "placed"])[0]["instances"], 0);
    // More memory than the node has, at once; then the constraints cleared.
    let out = s.cli(&["processes", "set", "placed", "web", "--constraint", "disk"]);
    assert_eq!(out.status.code(), Some(1));
    s.ok(&["processes", "set", "placed", "web", "--constraint", "-"]);
    let web = &s.json(&["processes", "list", "placed"])[0];
    assert_eq!(web["constraints"], json!({}), "{web}");
    s.ok(&["scale", "placed", "web=1"]);
}
