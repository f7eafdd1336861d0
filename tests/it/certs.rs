//! TLS certificates end to end through a real `escale serve`: an uploaded certificate (rcgen
//! CA + leaf) served by the HTTPS proxy, refused uploads (422), the HTTP->HTTPS redirect once
//! a certificate exists, the private key sealed in the database, and a certificate ordered
//! from Pebble (a test ACME CA) over HTTP-01 answered by the proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::server::TestServer;
use crate::support::{fixture_image, wait_for};

/// A test CA that signs leaf certificates.
struct TestCa {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (cert PEM, key PEM) of a leaf for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS answer: status, head and body text, and the server's leaf certificate.
struct HttpsAnswer {
    status: u16,
    text: String,
    leaf: CertificateDer<'static>,
}

/// `GET path` over TLS to `addr` with SNI and Host `host`, trusting only `roots`.
async fn https_get(
    addr: SocketAddr,
    host: &str,
    roots: &[CertificateDer<'static>],
    path: &str,
) -> std::io::Result<HttpsAnswer> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(host.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await; // a close without close_notify is fine here
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(HttpsAnswer { status, text, leaf })
}

/// A plain HTTP/1.1 exchange; returns (status, whole answer).
async fn http_raw(addr: &str, request: String) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn http_get_host(addr: &str, host: &str, path: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// `POST /api/v1/apps/{app}/certs` with a raw JSON body; returns (status, answer).
async fn post_cert(s: &TestServer, app: &str, body: &Value) -> (u16, String) {
    let api = s.api.trim_start_matches("http://");
    let body = body.to_string();
    http_raw(
        api,
        format!(
            "POST /api/v1/apps/{app}/certs HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            s.token,
            body.len()
        ),
    )
    .await
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn an_uploaded_certificate_is_served_and_turns_on_the_https_redirect() {
    let s = TestServer::start(&[("ESCALE_HTTPS_ADDR", "127.0.0.1:0")]).await;
    let http = s.proxy.clone().expect("http proxy");
    let https: SocketAddr = s.https.clone().expect("https proxy").parse().unwrap();
    let image = fixture_image().await.to_string();
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["deploy", "shop", "--image", &image]);
    s.ok(&["domains", "add", "shop", "shop.example.eu"]);
    wait_for(
        "shop answers over plain HTTP",
        Duration::from_secs(30),
        || async {
            let (st, _) = http_get_host(&http, "shop.example.eu", "/").await;
            (st == 200).then_some(())
        },
    )
    .await;

    let ca = TestCa::new("escale test CA");
    let (cert, key) = ca.leaf(&["shop.example.eu"]);
    let dir = s.dir.path();

    // Refused uploads: key of another certificate, a certificate for another name, a domain
    // that is not the app's.
    let (_, other_key) = ca.leaf(&["shop.example.eu"]);
    let (st, body) = post_cert(
        &s,
        "shop",
        &serde_json::json!({"domain": "shop.example.eu", "cert_pem": cert, "key_pem": other_key}),
    )
    .await;
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("application/problem+json"), "{body}");
    assert!(body.contains("does not match"), "{body}");
    let (blog_cert, blog_key) = ca.leaf(&["blog.example.eu"]);
    let (st, body) = post_cert(
        &s,
        "shop",
        &serde_json::json!({"domain": "shop.example.eu", "cert_pem": blog_cert, "key_pem": blog_key}),
    )
    .await;
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("not valid for `shop.example.eu`"), "{body}");
    let (st, body) = post_cert(
        &s,
        "shop",
        &serde_json::json!({"domain": "blog.example.eu", "cert_pem": blog_cert, "key_pem": blog_key}),
    )
    .await;
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("not a domain of app `shop`"), "{body}");
    let bad = s.cli(&[
        "certs",
        "add",
        "shop",
        "shop.example.eu",
        "--cert",
        &write(dir, "c.pem", &cert),
        "--key",
        &write(dir, "k2.pem", &other_key),
    ]);
    assert_eq!(bad.status.code(), Some(1), "a refused upload exits 1");
    // No certificate yet: no TLS for the host, plain HTTP is served.
    assert!(
        https_get(https, "shop.example.eu", std::slice::from_ref(&ca.der), "/")
            .await
            .is_err()
    );

    s.ok(&[
        "certs",
        "add",
        "shop",
        "shop.example.eu",
        "--cert",
        &write(dir, "cert.pem", &cert),
        "--key",
        &write(dir, "key.pem", &key),
    ]);
    // Served at once, no restart.
    let a = https_get(https, "shop.example.eu", std::slice::from_ref(&ca.der), "/")
        .await
        .expect("TLS with the uploaded certificate");
    assert_eq!(a.status, 200, "{}", a.text);
    let want = rustls_pemfile::certs(&mut cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(a.leaf, want, "the proxy serves the uploaded leaf");

    // Plain HTTP now redirects, but ACME challenges are not.
    let (st, text) = wait_for("the redirect appears", Duration::from_secs(15), || async {
        let r = http_get_host(&http, "shop.example.eu", "/a?b=1").await;
        (r.0 == 308).then_some(r)
    })
    .await;
    assert_eq!(st, 308);
    assert!(
        text.to_ascii_lowercase()
            .contains("location: https://shop.example.eu/a?b=1"),
        "{text}"
    );
    let (st, _) = http_get_host(&http, "shop.example.eu", "/.well-known/acme-challenge/x").await;
    assert_ne!(st, 308);

    // The listings show it.
    let list = s.json(&["certs", "list", "shop"]);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == "shop.example.eu")
        .unwrap();
    assert_eq!(row["source"], "manual");
    assert_eq!(row["issuer"], "escale test CA");
    let domains = s.ok(&["domains", "list", "shop"]);
    assert!(
        domains.contains("escale test CA") && domains.contains("manual"),
        "{domains}"
    );

    // The key is not in the database files in clear.
    let needle = key.lines().nth(1).unwrap().to_string();
    for f in std::fs::read_dir(dir.join("data")).unwrap() {
        let path = f.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&needle),
            "{} holds the private key in clear",
            path.display()
        );
    }

    // Removing it stops TLS and the redirect.
    s.ok(&["certs", "remove", "shop", "shop.example.eu"]);
    assert!(
        https_get(https, "shop.example.eu", std::slice::from_ref(&ca.der), "/")
            .await
            .is_err()
    );
    wait_for("the redirect goes", Duration::from_secs(15), || async {
        let r = http_get_host(&http, "shop.example.eu", "/").await;
        (r.0 == 200).then_some(())
    })
    .await;
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Installs Pebble (Debian package `pebble`) if missing.
fn ensure_pebble() {
    let have = |b: &str| {
        Command::new("which")
            .arg(b)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("pebble") && have("pebble-challtestsrv") {
        return;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = ["install", "-y", "-qq", "pebble"];
    let ok = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
    assert!(
        ok && have("pebble") && have("pebble-challtestsrv"),
        "Pebble is needed for this test: apt-get install pebble"
    );
}

async fn wait_port(addr: &str) {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_added_to_an_app_gets_a_certificate_from_pebble() {
    ensure_pebble();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // Pebble's own listener: a certificate from a test CA escale is told to trust.
    let ca = TestCa::new("pebble listener CA");
    let (pcert, pkey) = ca.leaf(&["localhost", "127.0.0.1"]);
    let ca_path = write(dir, "ca.pem", &ca.pem);
    let (acme_port, mgmt_port, dns_port, dns_mgmt, http_port) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
        "certificate": write(dir, "pebble-cert.pem", &pcert),
        "privateKey": write(dir, "pebble-key.pem", &pkey),
        "httpPort": http_port,
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    let config_path = write(dir, "pebble.json", &config.to_string());
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let _dns = Proc(
        Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv starts"),
    );
    let _pebble = Proc(
        Command::new("pebble")
            .args([
                "-config",
                &config_path,
                "-dnsserver",
                &format!("127.0.0.1:{dns_port}"),
            ])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble starts"),
    );
    wait_port(&format!("127.0.0.1:{acme_port}")).await;
    wait_port(&format!("127.0.0.1:{mgmt_port}")).await;

    let s = TestServer::start(&[
        ("ESCALE_HTTP_ADDR", &format!("127.0.0.1:{http_port}")),
        ("ESCALE_HTTPS_ADDR", "127.0.0.1:0"),
        (
            "ESCALE_ACME_DIRECTORY_URL",
            &format!("https://127.0.0.1:{acme_port}/dir"),
        ),
        ("ESCALE_ACME_CA_ROOT", &ca_path),
        ("ESCALE_ACME_EMAIL", "ops@example.eu"),
    ])
    .await;
    let https: SocketAddr = s.https.clone().expect("https proxy").parse().unwrap();
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["domains", "add", "shop", "shop.example.eu"]);
    let row = s
        .wait_for(
            "an ACME certificate for shop.example.eu",
            Duration::from_secs(90),
            || {
                let list = s.json(&["certs", "list", "shop"]);
                list.as_array()?
                    .iter()
                    .find(|r| r["domain"] == "shop.example.eu" && r["has_certificate"] == true)
                    .cloned()
            },
        )
        .await;
    assert_eq!(row["source"], "acme", "{row}");
    assert!(
        row["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "{row}"
    );

    // Served by the proxy, chained to Pebble's root (from its management interface).
    let root = https_get(
        format!("127.0.0.1:{mgmt_port}").parse().unwrap(),
        "localhost",
        std::slice::from_ref(&ca.der),
        "/roots/0",
    )
    .await
    .expect("Pebble's root");
    assert_eq!(root.status, 200, "{}", root.text);
    let pem = &root.text[root.text.find("-----BEGIN").expect("a PEM root")..];
    let pebble_root = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let a = https_get(https, "shop.example.eu", &[pebble_root], "/")
        .await
        .expect("TLS with the certificate Pebble issued");
    assert!(a.status > 0, "{}", a.text);
    let domains = s.ok(&["domains", "list", "shop"]);
    assert!(domains.contains("acme"), "{domains}");
}
