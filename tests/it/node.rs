//! Node layer against the real local Docker engine, with the fixture app image.
//!
//! Each test has its own [`TestInstallation`] (own label, own cleanup).

use std::time::{Duration, SystemTime};

use escale::node::{
    InstanceState, LogStream, NodeError, Reach, LABEL_APP, LABEL_INSTALLATION, LABEL_INSTANCE,
    LABEL_PROCESS, LABEL_RELEASE, LABEL_SLOT,
};
use futures_util::StreamExt;

use crate::support::docker::container_ips;
use crate::support::{
    docker_cli, fixture_image, http_get, http_get_ready, wait_for, TestInstallation,
};

const WAIT: Duration = Duration::from_secs(20);

/// Waits until the instance's container has exited and returns it as listed.
async fn wait_exited(t: &TestInstallation, instance: &str) -> escale::node::ContainerInstance {
    wait_for(&format!("{instance} to exit"), WAIT, || async {
        t.node
            .list_instances(&t.id)
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.instance == instance && c.state == InstanceState::Exited)
    })
    .await
}

/// Where `docker port` says the container's `port` is published (IPv4).
fn published_addr(container: &str, port: u16) -> std::net::SocketAddr {
    docker_cli(&["port", container, &format!("{port}/tcp")])
        .lines()
        .find_map(|l| l.trim().parse::<std::net::SocketAddrV4>().ok())
        .map(std::net::SocketAddr::V4)
        .unwrap_or_else(|| panic!("{container}: port {port} is not published"))
}

#[tokio::test]
async fn instance_is_reachable_with_env_limits_and_labels() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    let mut spec = t.spec("web-a", image);
    spec.env
        .push(("GREETING".into(), "hello from escale".into()));
    spec.env.push(("PORT".into(), "1".into())); // replaced by the spec's port
    spec.port = 5000;
    spec.memory_bytes = Some(64 * 1024 * 1024);
    spec.nano_cpus = Some(500_000_000);
    let started = t.node.start_instance(&spec).await.unwrap();
    // The local engine is on this host: the instance is reached at its own address on its
    // app's bridge network and the app's port, not through the published port.
    let ips = container_ips(&started.container_id);
    assert_eq!(ips.len(), 1, "{ips:?}");
    assert_eq!(started.addr, format!("{}:5000", ips[0]).parse().unwrap());
    assert!(!started.addr.ip().is_loopback());
    // The port is still published (on 127.0.0.1, an engine-chosen port): the fallback, and
    // how another host reaches it.
    let published = published_addr(&started.container_id, 5000);
    assert!(published.ip().is_loopback());
    assert_ne!(published.port(), 5000, "host port is engine-chosen");
    assert_eq!(http_get_ready(published, "/health").await.0, 200);

    let (status, body) = http_get_ready(started.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("instance=web-a"), "{body}");
    assert!(body.contains("release=1"), "{body}");
    assert!(body.contains("hello from escale"), "{body}");
    assert_eq!(
        http_get(started.addr, "/env/PORT").await.unwrap(),
        (200, "5000".into())
    );
    assert_eq!(http_get(started.addr, "/health").await.unwrap().0, 200);
    assert_eq!(http_get(started.addr, "/env/NOPE").await.unwrap().0, 404);

    let inspect: serde_json::Value =
        serde_json::from_str(&docker_cli(&["inspect", &started.container_id]))
            .expect("docker inspect answers JSON");
    let inspect = &inspect[0];
    assert_eq!(
        inspect["Name"].as_str(),
        Some(format!("/escale-{}-web-a", t.id).as_str())
    );
    let host = &inspect["HostConfig"];
    assert_eq!(host["Memory"].as_i64(), Some(64 * 1024 * 1024));
    assert_eq!(host["MemorySwap"].as_i64(), Some(64 * 1024 * 1024));
    assert_eq!(host["NanoCpus"].as_i64(), Some(500_000_000));
    assert_eq!(host["Init"].as_bool(), Some(true));
    let log = &host["LogConfig"];
    assert_eq!(log["Type"].as_str(), Some("json-file"));
    assert_eq!(log["Config"]["max-size"].as_str(), Some("1m"));
    assert_eq!(log["Config"]["max-file"].as_str(), Some("2"));
    let labels = &inspect["Config"]["Labels"];
    for (k, v) in [
        (LABEL_INSTALLATION, t.id.as_str()),
        (LABEL_APP, "app"),
        (LABEL_PROCESS, "web"),
        (LABEL_RELEASE, "1"),
        (LABEL_SLOT, "0"),
        (LABEL_INSTANCE, "web-a"),
    ] {
        assert_eq!(labels[k].as_str(), Some(v), "label {k}");
    }
}

#[tokio::test]
async fn list_instances_parses_labels_and_addresses() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    let mut a = t.spec("web-0", image);
    a.release = 7;
    let mut b = t.spec("web-1", image);
    b.release = 7;
    b.slot = 1;
    b.process = "worker".into();
    let sa = t.node.start_instance(&a).await.unwrap();
    let sb = t.node.start_instance(&b).await.unwrap();

    let mut list = t.node.list_instances(&t.id).await.unwrap();
    list.sort_by(|x, y| x.instance.cmp(&y.instance));
    assert_eq!(list.len(), 2, "{list:?}");
    let (la, lb) = (&list[0], &list[1]);
    assert_eq!(la.container_id, sa.container_id);
    assert_eq!(
        (la.app.as_str(), la.process.as_str(), la.release, la.slot),
        ("app", "web", 7, 0)
    );
    assert_eq!(lb.container_id, sb.container_id);
    assert_eq!((lb.process.as_str(), lb.slot), ("worker", 1));
    assert_eq!(la.state, InstanceState::Running);
    assert_eq!(la.exit_code, None);
    assert!(!la.oom_killed);
    assert_eq!(la.addr, Some(sa.addr));
    assert_eq!(lb.addr, Some(sb.addr));
    assert_eq!(la.image, image);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - la.created).abs() < 120, "created {}", la.created);

    // Another installation sees none of them.
    let other = TestInstallation::new().await;
    assert!(t.node.list_instances(&other.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn addresses_follow_the_nodes_reach_and_answer() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    let bridged = t.node.clone();
    assert_eq!(
        bridged.reach,
        Reach::Bridge,
        "a unix socket is this host's engine"
    );
    let published = t.node.clone().with_reach(Reach::Published);

    let started = bridged
        .start_instance(&t.spec("web-b", image))
        .await
        .unwrap();
    let bridge_addr = format!("{}:8080", container_ips(&started.container_id)[0])
        .parse()
        .unwrap();
    let port_addr = published_addr(&started.container_id, 8080);
    assert_eq!(started.addr, bridge_addr);
    // Listed back (what a restarted escale routes by): the same address, per reach.
    let listed = |n: escale::node::Node| {
        let id = t.id.clone();
        async move { n.list_instances(&id).await.unwrap()[0].addr }
    };
    assert_eq!(listed(bridged.clone()).await, Some(bridge_addr));
    assert_eq!(listed(published.clone()).await, Some(port_addr));
    // Both answer, as the same instance.
    for addr in [bridge_addr, port_addr] {
        let (status, body) = http_get_ready(addr, "/").await;
        assert_eq!(status, 200, "{addr}");
        assert!(body.contains("instance=web-b"), "{addr}: {body}");
    }

    // A node on another host publishes and is reached at its advertise address.
    let mut spec = t.spec("web-p", image);
    spec.slot = 1;
    let on_port = published.start_instance(&spec).await.unwrap();
    assert_eq!(on_port.addr, published_addr(&on_port.container_id, 8080));
    assert!(on_port.addr.ip().is_loopback());
    assert_eq!(http_get_ready(on_port.addr, "/health").await.0, 200);
}

#[tokio::test]
async fn malformed_labels_are_skipped() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    let good = t.node.start_instance(&t.spec("good", image)).await.unwrap();
    // Same installation, but a release label that is not a number (made with the CLI, as
    // escale itself always writes numbers).
    let created = docker_cli(&[
        "create",
        "--label",
        &format!("{LABEL_INSTALLATION}={}", t.id),
        "--label",
        &format!("{LABEL_APP}=app"),
        "--label",
        &format!("{LABEL_PROCESS}=web"),
        "--label",
        &format!("{LABEL_SLOT}=0"),
        "--label",
        &format!("{LABEL_INSTANCE}=bad"),
        "--label",
        &format!("{LABEL_RELEASE}=not-a-number"),
        image,
    ]);
    assert!(!created.trim().is_empty(), "docker create failed");
    let list = t.node.list_instances(&t.id).await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].container_id, good.container_id);
}

#[tokio::test]
async fn stop_drains_in_flight_requests_and_exits_zero() {
    for init in [true, false] {
        let t = TestInstallation::new().await;
        let mut spec = t.spec("drain", fixture_image().await);
        spec.init = init;
        let started = t.node.start_instance(&spec).await.unwrap();
        http_get_ready(started.addr, "/health").await;

        let slow = tokio::spawn(http_get(started.addr, "/sleep/1500"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = std::time::Instant::now();
        t.node
            .stop_instance(&started.container_id, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "SIGTERM did not reach the app (init={init}): stop took {:?}",
            t0.elapsed()
        );
        let (status, body) = slow.await.unwrap().unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "slept 1500 ms\n"),
            "init={init}"
        );

        let gone = wait_exited(&t, "drain").await;
        assert_eq!(gone.exit_code, Some(0), "init={init}");
        assert!(!gone.oom_killed);
        assert_eq!(gone.addr, None);

        t.node.remove_instance(&started.container_id).await.unwrap();
        // Removing twice and stopping a removed container are fine.
        t.node.remove_instance(&started.container_id).await.unwrap();
        t.node
            .stop_instance(&started.container_id, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(t.node.list_instances(&t.id).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn exited_instance_reports_exit_code() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    let started = t
        .node
        .start_instance(&t.spec("crashy", image))
        .await
        .unwrap();
    http_get_ready(started.addr, "/health").await;
    let _ = http_get(started.addr, "/crash").await; // connection drops
    let gone = wait_exited(&t, "crashy").await;
    assert_eq!(gone.exit_code, Some(3));
    assert!(!gone.oom_killed);

    // Dying at once (no such command in a scratch image is a start error; an app that
    // exits immediately is ExitedAtStart or, if slower, an exited instance in the list).
    let mut spec = t.spec("instant", image);
    spec.env.push(("CRASH_AFTER_MS".into(), "0".into()));
    match t.node.start_instance(&spec).await {
        Err(NodeError::ExitedAtStart { exit_code, .. }) => assert_eq!(exit_code, 1),
        Ok(_) => assert_eq!(wait_exited(&t, "instant").await.exit_code, Some(1)),
        Err(e) => panic!("unexpected {e:?}"),
    }
    let mut spec = t.spec("timed", image);
    spec.env.push(("CRASH_AFTER_MS".into(), "200".into()));
    t.node.start_instance(&spec).await.unwrap();
    let gone = wait_exited(&t, "timed").await;
    assert_eq!(gone.exit_code, Some(1));
}

#[tokio::test]
async fn oom_kill_is_reported() {
    let t = TestInstallation::new().await;
    let mut spec = t.spec("hog", fixture_image().await);
    spec.memory_bytes = Some(16 * 1024 * 1024);
    spec.env.push(("ALLOC_MB".into(), "64".into()));
    // Killed before or after the start returned, depending on the machine's speed: its
    // container is listed exited either way.
    match t.node.start_instance(&spec).await {
        Ok(_) => {}
        Err(NodeError::ExitedAtStart { exit_code, .. }) => assert_eq!(exit_code, 137),
        Err(e) => panic!("unexpected {e:?}"),
    }
    let gone = wait_exited(&t, "hog").await;
    assert!(gone.oom_killed, "{gone:?}");
    assert_eq!(gone.exit_code, Some(137));
}

#[tokio::test]
async fn logs_return_request_lines_with_timestamps() {
    let t = TestInstallation::new().await;
    let started = t
        .node
        .start_instance(&t.spec("talky", fixture_image().await))
        .await
        .unwrap();
    http_get_ready(started.addr, "/health").await;
    http_get(started.addr, "/env/ESCALE_INSTANCE")
        .await
        .unwrap();

    let lines: Vec<_> = wait_for("request lines in logs", WAIT, || async {
        let lines: Vec<_> = t
            .node
            .logs(&started.container_id, false, None)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        lines
            .iter()
            .any(|l| l.text == "GET /env/ESCALE_INSTANCE 200")
            .then_some(lines)
    })
    .await;
    let health = lines
        .iter()
        .find(|l| l.text == "GET /health 200")
        .expect("health line");
    assert_eq!(health.stream, LogStream::Stdout);
    assert!(
        health.time.ends_with('Z') && health.time.contains('T'),
        "{health:?}"
    );
    assert!(lines.iter().any(|l| l.text.starts_with("listening on")));

    let tail: Vec<_> = t
        .node
        .logs(&started.container_id, false, Some(1))
        .collect::<Vec<_>>()
        .await;
    assert_eq!(tail.len(), 1);

    // follow: the stream replays what is there, stays open, and delivers new lines. (The
    // request is only sent when the stream is first polled, so read old lines first.)
    let mut follow = Box::pin(t.node.logs(&started.container_id, true, None));
    let mut next_line = async |want: &str| {
        tokio::time::timeout(WAIT, async {
            while let Some(line) = follow.next().await {
                if line.unwrap().text == want {
                    return;
                }
            }
            panic!("log stream ended before `{want}`");
        })
        .await
        .unwrap_or_else(|_| panic!("no log line `{want}`"))
    };
    next_line("GET /health 200").await;
    http_get(started.addr, "/env/FOLLOW").await.unwrap();
    next_line("GET /env/FOLLOW 404").await;
}

#[tokio::test]
async fn events_report_start_and_die_on_kill() {
    let t = TestInstallation::new().await;
    let since = SystemTime::now() - Duration::from_secs(1);
    let started = t
        .node
        .start_instance(&t.spec("victim", fixture_image().await))
        .await
        .unwrap();
    t.node
        .kill_instance(&started.container_id, "KILL")
        .await
        .unwrap();

    let mut events = Box::pin(t.node.events_since(&t.id, Some(since)));
    let mut seen = Vec::new();
    let die = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            let ev = ev.unwrap();
            seen.push(ev.action.clone());
            if ev.action == "die" {
                return ev;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("a die event");
    assert_eq!(die.container_id, started.container_id);
    assert_eq!(die.instance.as_deref(), Some("victim"));
    assert_eq!(die.app.as_deref(), Some("app"));
    assert_eq!(die.exit_code, Some(137));
    assert!(seen.contains(&"start".to_string()), "{seen:?}");
    assert!(seen.contains(&"kill".to_string()), "{seen:?}");

    // Live: removing it yields destroy.
    let mut live = Box::pin(t.node.events(&t.id));
    let waiter = tokio::spawn(async move {
        while let Some(ev) = live.next().await {
            let ev = ev.unwrap();
            if ev.action == "destroy" {
                return ev;
            }
        }
        panic!("event stream ended");
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.node.remove_instance(&started.container_id).await.unwrap();
    let destroy = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert_eq!(destroy.container_id, started.container_id);
}

#[tokio::test]
async fn missing_image_is_unavailable() {
    let t = TestInstallation::new().await;
    let missing = "escale-test/does-not-exist:nope";
    assert!(!t.node.image_exists(missing).await.unwrap());
    let err = t.node.ensure_image(missing).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::ImageUnavailable { image, .. } if image == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("is not on node `local`"), "{err}");

    // Starting an instance of an absent image says so too.
    let err = t
        .node
        .start_instance(&t.spec("noimg", missing))
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::ImageUnavailable { .. }), "{err:?}");

    // A present image is fine.
    t.node.ensure_image(fixture_image().await).await.unwrap();
}

#[tokio::test]
async fn leftover_with_same_name_is_replaced() {
    let t = TestInstallation::new().await;
    let spec = t.spec("again", fixture_image().await);
    let first = t.node.start_instance(&spec).await.unwrap();
    let second = t.node.start_instance(&spec).await.unwrap();
    assert_ne!(first.container_id, second.container_id);
    let list = t.node.list_instances(&t.id).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].container_id, second.container_id);
    http_get_ready(second.addr, "/health").await;

    // Same name but not this instance (no instance label): refused, not removed.
    let name = escale::node::container_name(&t.id, "clash");
    let created = docker_cli(&[
        "create",
        "--name",
        &name,
        "--label",
        &format!("{LABEL_INSTALLATION}={}", t.id),
        spec.image.as_str(),
    ]);
    assert!(!created.trim().is_empty(), "docker create failed");
    let err = t
        .node
        .start_instance(&t.spec("clash", &spec.image))
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::NameTaken { .. }), "{err:?}");
    assert_eq!(
        docker_cli(&["ps", "-aq", "--filter", &format!("name={name}")]).trim(),
        created.trim().get(..12).unwrap_or("")
    );
}

#[tokio::test]
async fn remove_all_leaves_nothing() {
    let t = TestInstallation::new().await;
    let image = fixture_image().await;
    for (i, name) in ["r0", "r1", "r2"].iter().enumerate() {
        let mut spec = t.spec(name, image);
        spec.slot = i as u32;
        t.node.start_instance(&spec).await.unwrap();
    }
    assert_eq!(t.node.list_instances(&t.id).await.unwrap().len(), 3);
    assert_eq!(t.node.remove_all(&t.id).await.unwrap(), 3);
    assert!(t.node.list_instances(&t.id).await.unwrap().is_empty());
    let ps = docker_cli(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label={LABEL_INSTALLATION}={}", t.id),
    ]);
    assert_eq!(ps.trim(), "");
    assert_eq!(t.node.remove_all(&t.id).await.unwrap(), 0);
}

#[tokio::test]
async fn build_copy_and_remove_image() {
    let t = TestInstallation::new().await;
    let base = fixture_image().await;
    let tag = format!("escale-fixture/derived:{}", t.id);
    let dockerfile = format!("FROM {base}\nLABEL derived=yes\n");
    let context = crate::support::tar::tar_files(&[("Dockerfile", 0o644, dockerfile.as_bytes())]);
    let mut lines = Vec::new();
    let id = t
        .node
        .build_image(
            context.into(),
            &tag,
            &[],
            &[("escale.test".into(), "1".into())],
            |l| lines.push(l.to_string()),
        )
        .await
        .unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(lines.iter().any(|l| l.contains("Step 1/")), "{lines:?}");
    assert!(t.node.image_exists(&tag).await.unwrap());

    // A broken Dockerfile is a BuildFailed with the builder's message.
    let bad = crate::support::tar::tar_files(&[("Dockerfile", 0o644, b"FROM scratch\nRUN x\n")]);
    let err = t
        .node
        .build_image(bad.into(), &format!("{tag}-bad"), &[], &[], |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::BuildFailed { .. }), "{err:?}");

    // Copy to "another" node (the same engine under a second name): present, so a no-op.
    let other = crate::support::local_node().await;
    escale::node::Node::copy_image(&t.node, &other, &tag)
        .await
        .unwrap();

    t.node.remove_image(&tag).await.unwrap();
    assert!(!t.node.image_exists(&tag).await.unwrap());
    t.node.remove_image(&tag).await.unwrap();

    // Copying something the source does not have fails clearly.
    let err = escale::node::Node::copy_image(&t.node, &other, &tag)
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::CopyFailed { .. }), "{err:?}");
}
