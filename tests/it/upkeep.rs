//! Node upkeep end to end, on a remote node: a real `escale serve` with no local engine
//! (`docker_host = off`) and one extra Docker engine, n5, whose whole root (data root
//! included) is a 512 MiB tmpfs, reached over mutual TLS.
//!
//! One walk: a `git push` builds on n5 (the only node; the base image is there, the host
//! engine gets nothing) and serves; under load, `escale nodes list` shows what n5's instances
//! really use (CPU, memory) beside what was placed, and its disk (escale's images, the
//! filesystem of its data root) and `apps info` the app's disk; images escale built that no
//! release keeps are pruned from n5 on the upkeep clock while the release's image, another
//! installation's image and an unlabelled one stay; the disk filled past 95 % -> a
//! `node.disk` event, and a push is refused with a message saying why and creates no
//! release; the disk freed -> the event back to ok and pushes build again.

use std::time::Duration;

use crate::gitpush::{push_url, releases, Repo};
use crate::support::fixture_image;
use crate::support::load::Load;
use crate::support::nodes::ExtraNode;
use crate::support::server::TestServer;

const N: u8 = 5;
const APP: &str = "upkept";

fn node_json(s: &TestServer) -> serde_json::Value {
    s.json(&["nodes", "list"])
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == ExtraNode::name(N).as_str())
        .cloned()
        .unwrap_or_default()
}

fn events_with(s: &TestServer, action: &str) -> Vec<String> {
    s.json(&["events", "--limit", "200"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == action)
        .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn images_on(node: &ExtraNode) -> Vec<String> {
    node.docker(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_node_is_measured_built_on_pruned_and_refuses_builds_when_full() {
    let image = fixture_image().await.to_string();
    let s = TestServer::start(&[
        ("ESCALE_DOCKER_HOST", "off"),
        ("ESCALE_UPKEEP_USAGE_INTERVAL", "1s"),
        ("ESCALE_UPKEEP_DISK_INTERVAL", "1s"),
        ("ESCALE_UPKEEP_PRUNE_INTERVAL", "2s"),
        ("ESCALE_SCHEDULER_KEEP_RELEASES", "1"),
    ])
    .await;
    let bundles = tempfile::tempdir().unwrap();
    let dir = bundles.path().join(ExtraNode::name(N));
    s.ok(&[
        "nodes",
        "add",
        &ExtraNode::name(N),
        "--address",
        &ExtraNode::address(N),
        "--out",
        dir.to_str().unwrap(),
    ]);
    let mut node = ExtraNode::start_on_tmpfs(N, &dir, "512m");
    s.wait_for("n5 ready", Duration::from_secs(60), || {
        (node_json(&s)["state"] == "ready").then_some(())
    })
    .await;
    node.check_running();
    node.wait_ready();
    node.load_image_from_host(&image);

    // A push builds on n5, the only node, and serves from there.
    s.ok(&["apps", "create", APP]);
    let url = push_url(&s, APP);
    let repo = Repo::new();
    repo.commit(
        &[("Dockerfile", &format!("FROM {image}\nENV BUILD=1\n"))],
        "one",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "push: {out}");
    assert!(out.contains("on node `n5`"), "{out}");
    let built: Vec<String> = images_on(&node)
        .into_iter()
        .filter(|t| t.starts_with(&format!("{APP}:")))
        .collect();
    assert_eq!(built.len(), 1, "the build is on n5: {built:?}");
    let host_images = crate::support::docker::docker_cli(&[
        "images",
        "-q",
        "--filter",
        &format!("label=escale.installation={}", s.installation),
    ]);
    assert!(
        host_images.trim().is_empty(),
        "nothing was built on the host's engine: {host_images}"
    );

    // What n5's instances use, measured, beside what was placed; its disk.
    let proxy = s.proxy.clone().expect("the server runs an HTTP proxy");
    let load = Load::start(&proxy, &format!("{APP}.localhost"));
    let used = s
        .wait_for(
            "n5's measured CPU and memory, and its disk",
            Duration::from_secs(60),
            || {
                let n = node_json(&s);
                let u = &n["used"];
                let busy = u["cpus"].as_f64().unwrap_or(0.0) > 0.0
                    && u["memory_bytes"].as_u64().unwrap_or(0) > 0
                    && u["instances"].as_u64() == Some(1)
                    && u["disk"]["images_bytes"].as_u64().unwrap_or(0) > 0;
                busy.then_some(u.clone())
            },
        )
        .await;
    let tally = load.stop();
    assert!(tally.ok > 0, "{tally:?}");
    let fs = &used["disk"]["filesystem"];
    let total = fs["total_bytes"].as_u64().unwrap_or(0);
    assert_eq!(
        total,
        512 << 20,
        "the data root's filesystem is the tmpfs: {used}"
    );
    assert_eq!(used["disk"]["level"], "ok", "{used}");
    let table = s.ok(&["nodes", "list"]);
    assert!(
        table.contains("DISK") && table.contains("escale)"),
        "{table}"
    );
    let info = s.json(&["apps", "info", APP]);
    assert!(info["disk_bytes"].as_u64().unwrap_or(0) > 0, "{info}");

    // Images escale built that no release keeps are pruned; nothing else is.
    let uid: String = {
        let mut conn = s.registry().await;
        sqlx::query_scalar("SELECT uid FROM apps WHERE name = ?")
            .bind(APP)
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {image}\n")).unwrap();
    let build = |tag: &str, labels: &[String]| {
        let mut args = vec!["build", "-q", "-t", tag];
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.push(ctx.path().to_str().unwrap());
        node.docker(&args);
    };
    let ours = [
        format!("escale.installation={}", s.installation),
        format!("escale.app={APP}"),
        format!("escale.built-for={uid}"),
    ];
    build(&format!("{APP}:v0-old"), &ours);
    build(
        "foreign:v1",
        &[
            "escale.installation=another-installation".to_string(),
            format!("escale.built-for={uid}"),
        ],
    );
    node.docker(&["tag", &image, "unlabelled:v1"]);
    s.wait_for(
        "the old build pruned from n5",
        Duration::from_secs(60),
        || {
            let tags = images_on(&node);
            (!tags.iter().any(|t| t == &format!("{APP}:v0-old"))).then_some(())
        },
    )
    .await;
    let tags = images_on(&node);
    for kept in [built[0].as_str(), "foreign:v1", "unlabelled:v1", &image] {
        assert!(tags.iter().any(|t| t == kept), "{kept} was kept: {tags:?}");
    }
    let pruned = events_with(&s, "node.prune");
    assert!(
        pruned
            .iter()
            .any(|d| d.contains("node n5") && d.contains("removed")),
        "{pruned:?}"
    );

    // The disk filled past 95 %: announced, and builds there refused.
    let avail = node_json(&s)["used"]["disk"]["filesystem"]["available_bytes"]
        .as_u64()
        .unwrap_or(0);
    let filler = node.root().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        // Leave 2 % of the disk free.
        let mut left = avail.saturating_sub(total / 50);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        f.sync_all().unwrap();
    }
    s.wait_for("a node.disk event: full", Duration::from_secs(60), || {
        events_with(&s, "node.disk")
            .into_iter()
            .find(|d| d.contains("node n5") && d.contains("builds there are refused"))
    })
    .await;
    assert_eq!(node_json(&s)["used"]["disk"]["level"], "full");
    let before = releases(&s, APP).len();
    repo.commit(
        &[("Dockerfile", &format!("FROM {image}\nENV BUILD=2\n"))],
        "two",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok, "a push onto a full disk is refused: {out}");
    assert!(
        out.contains("node `n5`") && out.contains("builds are refused from 95%"),
        "the refusal says why: {out}"
    );
    assert_eq!(releases(&s, APP).len(), before, "no release was created");

    // Freed: back to ok, and the same push builds.
    std::fs::remove_file(&filler).unwrap();
    s.wait_for("a node.disk event: back", Duration::from_secs(60), || {
        events_with(&s, "node.disk")
            .into_iter()
            .find(|d| d.contains("node n5") && d.contains("back to"))
    })
    .await;
    repo.commit(
        &[("Dockerfile", &format!("FROM {image}\nENV BUILD=3\n"))],
        "three",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "the push builds once the disk has room: {out}");
    assert_eq!(releases(&s, APP).len(), before + 1);
    node.check_running();
}
