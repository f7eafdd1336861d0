//! Tenants on the network (issue #11, finding 6): every app has its own bridge network, so a
//! container of one app cannot reach another app's containers directly, while instances of one
//! app reach each other and the proxy and health checks (on the host) reach every instance at
//! its bridge address. A destroyed app's network is removed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::docker::{container_ips, container_networks, docker_cli, http_get};
use crate::support::fixture_image;
use crate::support::server::{healthy, TestServer};

/// `GET /` with `Host: {app}.localhost` through the proxy: the status.
async fn through_proxy(s: &TestServer, app: &str) -> u16 {
    let proxy = s.proxy.as_deref().expect("the test server has a proxy");
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: {app}.localhost\r\nConnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The app networks of the installation, as `(name, app)`.
fn networks(s: &TestServer) -> Vec<(String, String)> {
    docker_cli(&[
        "network",
        "ls",
        "--filter",
        &format!("label=escale.installation={}", s.installation),
        "--format",
        "{{.Name}} {{.Label \"escale.app\"}}",
    ])
    .lines()
    .filter_map(|l| {
        let (n, a) = l.split_once(' ')?;
        Some((n.to_string(), a.to_string()))
    })
    .collect()
}

#[tokio::test]
async fn an_app_cannot_reach_another_apps_containers() {
    let image = fixture_image().await.to_string();
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "aapp"]);
    s.ok(&["apps", "create", "bapp"]);
    s.ok(&["scale", "aapp", "web=2"]);
    s.ok(&["deploy", "aapp", "--image", &image]);
    s.ok(&["deploy", "bapp", "--image", &image]);
    let (a, b) = s
        .wait_for("2 + 1 healthy instances", Duration::from_secs(60), || {
            let (a, b) = (s.instances("aapp"), s.instances("bapp"));
            (healthy(&a, "web", 1) == 2 && healthy(&b, "web", 1) == 1).then_some((a, b))
        })
        .await;

    // Each container is on its app's network only, never on the default bridge.
    let containers = s.containers();
    assert_eq!(containers.len(), 3, "{containers:?}");
    let prefix = format!("escale-{}-", s.installation);
    for (id, app, _) in &containers {
        let nets = container_networks(id);
        assert_eq!(nets.len(), 1, "{app} {id}: {nets:?}");
        assert!(
            nets[0].starts_with(&format!("{prefix}{app}-")),
            "{app} {id}: {nets:?}"
        );
    }
    let mut nets = networks(&s);
    nets.sort();
    assert_eq!(nets.len(), 2, "one network per app: {nets:?}");
    let ip_of = |app: &str| -> Vec<String> {
        containers
            .iter()
            .filter(|(_, a, _)| a == app)
            .flat_map(|(id, _, _)| container_ips(id))
            .collect()
    };
    let (a_ips, b_ips) = (ip_of("aapp"), ip_of("bapp"));
    assert_eq!((a_ips.len(), b_ips.len()), (2, 1), "{a_ips:?} {b_ips:?}");
    let addr = |i: &serde_json::Value| -> std::net::SocketAddr {
        i["address"].as_str().expect("address").parse().unwrap()
    };
    let (a_addrs, b_addr) = (a.iter().map(addr).collect::<Vec<_>>(), addr(&b[0]));
    // The proxy and the health checks reach each instance at its bridge address and port
    // (the local engine is on this host: no docker-proxy hop).
    let mut reported: Vec<String> = a_addrs.iter().map(|a| a.ip().to_string()).collect();
    reported.sort();
    let mut own = a_ips.clone();
    own.sort();
    assert_eq!(reported, own);
    assert!(a_addrs.iter().all(|a| a.port() == 8080), "{a_addrs:?}");
    assert_eq!(
        (b_addr.ip().to_string(), b_addr.port()),
        (b_ips[0].clone(), 8080)
    );

    // Same app: each instance reaches the other on its bridge address.
    for from in &a_addrs {
        for ip in &a_ips {
            let (status, body) = http_get(*from, &format!("/connect/{ip}:8080"))
                .await
                .unwrap();
            assert_eq!(status, 200, "aapp {from} -> aapp {ip}: {body}");
            assert!(body.contains("HTTP/1.1 200"), "{body}");
        }
    }
    // Another app: neither way.
    for from in &a_addrs {
        let (status, body) = http_get(*from, &format!("/connect/{}:8080", b_ips[0]))
            .await
            .unwrap();
        assert_eq!(status, 502, "aapp {from} reached bapp {}: {body}", b_ips[0]);
    }
    for ip in &a_ips {
        let (status, body) = http_get(b_addr, &format!("/connect/{ip}:8080"))
            .await
            .unwrap();
        assert_eq!(status, 502, "bapp reached aapp {ip}: {body}");
    }
    // The proxy (and the health checks, which made them healthy) still reach every instance.
    assert_eq!(through_proxy(&s, "aapp").await, 200);
    assert_eq!(through_proxy(&s, "bapp").await, 200);

    // Destroying an app removes its network; the other app keeps its own and keeps serving.
    s.ok(&["apps", "destroy", "bapp", "--confirm", "bapp"]);
    s.wait_for("bapp's network removed", Duration::from_secs(30), || {
        let nets = networks(&s);
        (nets.len() == 1 && nets[0].1 == "aapp").then_some(())
    })
    .await;
    assert_eq!(through_proxy(&s, "aapp").await, 200);
}
