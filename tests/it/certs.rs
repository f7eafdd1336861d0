//! TLS certificates end to end through a real `escale serve`: an uploaded certificate (rcgen
//! CA + leaf) served by the HTTPS proxy, refused uploads (422), the HTTP->HTTPS redirect once
//! a certificate exists, the private key sealed in the database, and a certificate ordered
//! from Pebble (a test ACME CA) over HTTP-01 and TLS-ALPN-01 answered by the proxy, what the
//! HTTPS listener shows `acme-tls/1` clients, and the ACME account reused across restarts.

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
    // On the HTTPS listener's own port (not 443 here): the redirect keeps it.
    let https_port = s
        .https
        .as_deref()
        .and_then(|a| a.rsplit(':').next())
        .expect("the HTTPS listener's port");
    assert_ne!(https_port, "443");
    assert!(
        text.to_ascii_lowercase().contains(&format!(
            "location: https://shop.example.eu:{https_port}/a?b=1"
        )),
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
        // Files only: the data dir also holds directories and the handover socket.
        if !path.is_file() {
            continue;
        }
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

/// Pebble (a test ACME CA) and pebble-challtestsrv (its DNS, resolving every name to
/// 127.0.0.1), on free ports, killed on drop. Its VA validates HTTP-01 on `http_port` and
/// TLS-ALPN-01 on `tls_port` of 127.0.0.1.
struct Pebble {
    work: tempfile::TempDir,
    /// The CA of Pebble's own HTTPS listener (escale is told to trust it).
    ca: TestCa,
    ca_path: String,
    acme_port: u16,
    mgmt_port: u16,
    dns_port: u16,
    config_path: String,
    /// How many times Pebble was started (names its log file).
    starts: u32,
    pebble: Option<Proc>,
    _dns: Proc,
}

impl Pebble {
    async fn start(http_port: u16, tls_port: u16) -> Pebble {
        ensure_pebble();
        let work = tempfile::tempdir().unwrap();
        let dir = work.path();
        let ca = TestCa::new("pebble listener CA");
        let (pcert, pkey) = ca.leaf(&["localhost", "127.0.0.1"]);
        let ca_path = write(dir, "ca.pem", &ca.pem);
        let (acme_port, mgmt_port, dns_port, dns_mgmt) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": write(dir, "pebble-cert.pem", &pcert),
            "privateKey": write(dir, "pebble-key.pem", &pkey),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_path = write(dir, "pebble.json", &config.to_string());
        let dns = Proc(
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
                .stdout(std::fs::File::create(dir.join("challtestsrv.log")).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .expect("pebble-challtestsrv starts"),
        );
        let mut p = Pebble {
            work,
            ca,
            ca_path,
            acme_port,
            mgmt_port,
            dns_port,
            config_path,
            starts: 0,
            pebble: None,
            _dns: dns,
        };
        p.spawn().await;
        p
    }

    /// Starts (again) the CA process; a restarted Pebble has forgotten every account, order
    /// and its root.
    async fn spawn(&mut self) {
        self.pebble = None; // killed and waited for
        self.starts += 1;
        let log = |name: String| std::fs::File::create(self.work.path().join(name)).unwrap();
        self.pebble = Some(Proc(
            Command::new("pebble")
                .args([
                    "-config",
                    &self.config_path,
                    "-dnsserver",
                    &format!("127.0.0.1:{}", self.dns_port),
                ])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log(format!("pebble-{}.log", self.starts)))
                .stderr(log(format!("pebble-{}.err", self.starts)))
                .spawn()
                .expect("pebble starts"),
        ));
        wait_port(&format!("127.0.0.1:{}", self.acme_port)).await;
        wait_port(&format!("127.0.0.1:{}", self.mgmt_port)).await;
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// `escale serve` settings that order from this Pebble.
    fn escale_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ESCALE_ACME_DIRECTORY_URL", self.directory()),
            ("ESCALE_ACME_CA_ROOT", self.ca_path.clone()),
            ("ESCALE_ACME_EMAIL", "ops@example.eu".into()),
        ]
    }

    /// What the running Pebble logged (stdout and stderr).
    fn log(&self) -> String {
        let read = |ext: &str| {
            std::fs::read_to_string(
                self.work
                    .path()
                    .join(format!("pebble-{}.{ext}", self.starts)),
            )
            .unwrap_or_default()
        };
        read("log") + &read("err")
    }

    /// Accounts the running Pebble registered, from its log.
    fn accounts_created(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("accounts in memory"))
            .count()
    }

    /// Pebble's current root certificate, from its management interface.
    async fn root(&self) -> CertificateDer<'static> {
        let root = https_get(
            format!("127.0.0.1:{}", self.mgmt_port).parse().unwrap(),
            "localhost",
            std::slice::from_ref(&self.ca.der),
            "/roots/0",
        )
        .await
        .expect("Pebble's root");
        assert_eq!(root.status, 200, "{}", root.text);
        let pem = &root.text[root.text.find("-----BEGIN").expect("a PEM root")..];
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        der
    }
}

/// Starts `escale serve` with `env` plus the settings of `pebble`.
async fn server_for(pebble: &Pebble, env: &[(&str, &str)]) -> TestServer {
    let acme = pebble.escale_env();
    let mut all: Vec<(&str, &str)> = acme.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(env);
    TestServer::start(&all).await
}

/// Waits for an ACME certificate for `domain` of `app`; returns its `certs list` row.
async fn wait_acme_cert(s: &TestServer, app: &str, domain: &str) -> Value {
    let row = s
        .wait_for(
            &format!("an ACME certificate for {domain}"),
            Duration::from_secs(90),
            || {
                let list = s.json(&["certs", "list", app]);
                list.as_array()?
                    .iter()
                    .find(|r| r["domain"] == domain && r["has_certificate"] == true)
                    .cloned()
            },
        )
        .await;
    assert_eq!(row["source"], "acme", "{row}");
    assert!(
        row["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "{row}"
    );
    assert!(row["not_after"].as_i64().unwrap_or(0) > 0, "{row}");
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_added_to_an_app_gets_a_certificate_from_pebble() {
    let http_port = free_port();
    let pebble = Pebble::start(http_port, free_port()).await;
    let s = server_for(
        &pebble,
        &[
            ("ESCALE_HTTP_ADDR", &format!("127.0.0.1:{http_port}")),
            ("ESCALE_HTTPS_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    let https: SocketAddr = s.https.clone().expect("https proxy").parse().unwrap();
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["domains", "add", "shop", "shop.example.eu"]);
    wait_acme_cert(&s, "shop", "shop.example.eu").await;

    // Served by the proxy, chained to Pebble's root (from its management interface).
    let a = https_get(https, "shop.example.eu", &[pebble.root().await], "/")
        .await
        .expect("TLS with the certificate Pebble issued");
    assert!(a.status > 0, "{}", a.text);
    let domains = s.ok(&["domains", "list", "shop"]);
    assert!(domains.contains("acme"), "{domains}");
}

/// A rustls client verifier that accepts any server certificate and handshake signature, to
/// look at what the proxy shows an ACME validator (webpki refuses to even parse a certificate
/// with the critical acmeIdentifier extension, so nothing here may go through it).
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` for `host` offering `alpn`; `roots` verify the server, or any
/// certificate is accepted when `None`.
async fn tls_connect(
    addr: SocketAddr,
    host: &str,
    alpn: &[&[u8]],
    roots: Option<&[CertificateDer<'static>]>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let mut config = match roots {
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store.add(r.clone()).unwrap();
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_string()).unwrap(), tcp)
        .await
}

/// Sends a GET on an established connection; returns everything the server sent back.
async fn get_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: &mut S,
    host: &str,
) -> String {
    let _ = io
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection");
    String::from_utf8_lossy(&buf).into_owned()
}

fn has_acme_identifier(der: &CertificateDer<'_>) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    cert.extensions()
        .iter()
        .any(|e| e.critical && e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
}

#[tokio::test]
async fn acme_tls_clients_get_only_validation_certificates_and_no_http() {
    let store = Arc::new(escale::proxy::CertStore::new());
    let challenges = Arc::new(escale::certs::TlsAlpn01Challenges::default());
    let resolver = Arc::new(escale::certs::CertResolver::new(
        store.clone(),
        challenges.clone(),
    ));
    let ca = TestCa::new("escale test CA");
    let (cert, key) = ca.leaf(&["shop.example.eu", "blog.example.eu"]);
    let served =
        Arc::new(escale::proxy::certified_key_from_pem(cert.as_bytes(), key.as_bytes()).unwrap());
    store.insert("shop.example.eu", served.clone());
    store.insert("blog.example.eu", served.clone());
    let validation = Arc::new(
        escale::certs::alpn::validation_certificate("shop.example.eu", &[9u8; 32]).unwrap(),
    );
    challenges.insert("shop.example.eu", validation.clone());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(escale::proxy::run_tls(
        listener,
        escale::routing::shared(),
        escale::proxy::ProxyConfig::default(),
        Arc::new(escale::proxy::ProxyMetrics::new()),
        resolver,
        async move {
            let _ = stopped.await;
        },
    ));

    // A validator gets the pending validation certificate, negotiates acme-tls/1, and the
    // connection is closed without any HTTP.
    let mut v = tls_connect(addr, "shop.example.eu", &[b"acme-tls/1"], None)
        .await
        .expect("the validation handshake succeeds");
    assert_eq!(v.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let leaf = v.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(leaf, validation.cert[0], "the validation certificate");
    assert!(has_acme_identifier(&leaf));
    let answer = get_over(&mut v, "shop.example.eu").await;
    assert!(answer.is_empty(), "no HTTP over acme-tls/1: {answer}");
    // Even when it also offers h2, a validator never gets HTTP.
    let mut v = tls_connect(addr, "shop.example.eu", &[b"h2", b"acme-tls/1"], None)
        .await
        .unwrap();
    assert_eq!(v.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    assert!(get_over(&mut v, "shop.example.eu").await.is_empty());

    // No validation pending for the name: no certificate, the handshake fails (a served
    // certificate is never shown to a validator).
    assert!(tls_connect(addr, "blog.example.eu", &[b"acme-tls/1"], None)
        .await
        .is_err());

    // Ordinary clients are unaffected: the served certificate, h2 or http/1.1, HTTP answers.
    let roots = [ca.der.clone()];
    let c = tls_connect(addr, "shop.example.eu", &[b"h2", b"http/1.1"], Some(&roots))
        .await
        .expect("an ordinary client verifies the served certificate");
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        c.get_ref().1.peer_certificates().unwrap()[0],
        served.cert[0]
    );
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let mut c = tls_connect(addr, "shop.example.eu", alpn, Some(&roots))
            .await
            .unwrap();
        let want = (!alpn.is_empty()).then_some(&b"http/1.1"[..]);
        assert_eq!(c.get_ref().1.alpn_protocol(), want);
        let answer = get_over(&mut c, "shop.example.eu").await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    }

    // Once the validation is over, validators get nothing.
    challenges.remove("shop.example.eu");
    assert!(tls_connect(addr, "shop.example.eu", &[b"acme-tls/1"], None)
        .await
        .is_err());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_gets_a_certificate_over_tls_alpn_01_without_port_80() {
    // Pebble validates TLS-ALPN-01 on escale's HTTPS port; its HTTP-01 port has no listener
    // and escale's plain HTTP listener is off, so HTTP-01 cannot succeed.
    let https_port = free_port();
    let pebble = Pebble::start(free_port(), https_port).await;
    let s = server_for(
        &pebble,
        &[
            ("ESCALE_HTTP_ADDR", "off"),
            ("ESCALE_HTTPS_ADDR", &format!("127.0.0.1:{https_port}")),
            ("ESCALE_ACME_CHALLENGE", "tls-alpn-01"),
        ],
    )
    .await;
    assert!(s.proxy.is_none(), "no plain HTTP listener");
    let https: SocketAddr = s.https.clone().expect("https proxy").parse().unwrap();
    assert_eq!(https.port(), https_port);
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["domains", "add", "shop", "shop.example.eu"]);
    let row = wait_acme_cert(&s, "shop", "shop.example.eu").await;
    assert!(row["last_error"].is_null(), "{row}");
    // Pebble's validator completed acme-tls/1 handshakes with the proxy (logged at debug).
    let log = s.server_log();
    assert!(
        log.contains("\"tls-alpn-01\"") // the challenge the order used
            && log.contains("acme-tls/1 validation handshake done"),
        "the order used TLS-ALPN-01:\n{log}"
    );
    // Served on the HTTPS port, chained to Pebble's root; ordinary clients get h2.
    let root = pebble.root().await;
    let c = tls_connect(
        https,
        "shop.example.eu",
        &[b"h2", b"http/1.1"],
        Some(std::slice::from_ref(&root)),
    )
    .await
    .expect("TLS with the certificate Pebble issued");
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let a = https_get(https, "shop.example.eu", &[root], "/")
        .await
        .expect("HTTP/1.1 over TLS with the certificate Pebble issued");
    assert!(a.status > 0, "{}", a.text);
    // The validation certificate is gone once the order completed.
    assert!(
        tls_connect(https, "shop.example.eu", &[b"acme-tls/1"], None)
            .await
            .is_err()
    );
    let domains = s.ok(&["domains", "list", "shop"]);
    assert!(
        domains.contains("acme") && domains.contains("Pebble"),
        "{domains}"
    );
}

/// `(account_url, rows)` of the stored ACME accounts, read from the registry file.
async fn stored_accounts(s: &TestServer) -> (String, i64) {
    let mut conn = s.registry().await;
    let rows: Vec<String> = sqlx::query_scalar("SELECT account_url FROM acme_accounts")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    (rows.first().cloned().unwrap_or_default(), rows.len() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acme_account_is_stored_and_reused_across_restarts() {
    let http_port = free_port();
    let mut pebble = Pebble::start(http_port, free_port()).await;
    let mut s = server_for(
        &pebble,
        &[("ESCALE_HTTP_ADDR", &format!("127.0.0.1:{http_port}"))],
    )
    .await;
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["domains", "add", "shop", "a.example.eu"]);
    wait_acme_cert(&s, "shop", "a.example.eu").await;
    let (account, rows) = stored_accounts(&s).await;
    assert_eq!(rows, 1);
    assert!(account.starts_with("https://127.0.0.1:"), "{account}");
    assert_eq!(pebble.accounts_created(), 1, "{}", pebble.log());

    // A restart reuses the stored account: Pebble registers no other.
    assert!(s.terminate().success());
    s.restart();
    s.ok(&["domains", "add", "shop", "b.example.eu"]);
    wait_acme_cert(&s, "shop", "b.example.eu").await;
    assert_eq!(stored_accounts(&s).await, (account.clone(), 1));
    assert_eq!(pebble.accounts_created(), 1, "{}", pebble.log());
    let log = s.server_log();
    assert!(
        log.contains("using the stored ACME account") && log.contains(&account),
        "{log}"
    );

    // The CA forgets every account (Pebble restarted): the stored one is rejected, a new one
    // is registered and replaces it, and the order goes through.
    pebble.spawn().await;
    s.ok(&["domains", "add", "shop", "c.example.eu"]);
    let row = wait_acme_cert(&s, "shop", "c.example.eu").await;
    assert!(row["last_error"].is_null(), "{row}");
    let (replaced, rows) = stored_accounts(&s).await;
    assert_eq!(rows, 1);
    assert_ne!(replaced, account, "a new account replaced the rejected one");
    assert_eq!(pebble.accounts_created(), 1, "{}", pebble.log());
    assert!(
        s.server_log()
            .contains("the CA rejects the stored ACME account"),
        "{}",
        s.server_log()
    );
}
