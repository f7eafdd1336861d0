//! The cluster CA against a real extra Docker engine: a second `dockerd` on 127.0.0.2:2376
//! (and 127.0.0.3:2376) with `--tlsverify` and the bundle escale issued for it, reached by
//! escale's client over mutual TLS; a client certificate of another CA is refused by the
//! node, and escale refuses, with the reason, a node whose certificate names another address
//! or comes from another CA, or has expired.
//!
//! The daemon follows the recipe of DESIGN.md: its own bridge (`br-esc-pki`, 172.31.216.1/24),
//! `--data-root`, `--exec-root`, pidfile, containerd namespaces, the host's storage driver,
//! and no iptables changes (it runs no container). [`ExtraDaemon`] stops it (its whole process
//! group), removes the bridge and its directory on drop, also when the test fails; a run that
//! crashed is swept at the start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use escale::cluster::pki::{self, Ca, NodeAddress, Pki, PkiError};
use escale::registry::Registry;
use escale::secrets::MasterKey;

use crate::support::nodes::{daemon_config, run, stop_group, unmount_below};
use crate::support::wait_for;

const BRIDGE: &str = "br-esc-pki";
const BRIDGE_CIDR: &str = "172.31.216.1/24";
const ADDRESS: &str = "127.0.0.2:2376";
const OTHER_ADDRESS: &str = "127.0.0.3:2376";
/// Where the daemon keeps everything; fixed, so that a crashed run can be swept.
const ROOT: &str = "/tmp/escale-it-cluster-pki";

/// Removes what a run left: its daemon (by the pid file, if it is a dockerd), the bridge, the
/// directory.
fn sweep() {
    let root = Path::new(ROOT);
    if let Ok(pid) = std::fs::read_to_string(root.join("pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "dockerd" {
                eprintln!("sweeping a leftover extra dockerd (pid {pid})");
                stop_group(pid);
            }
        }
    }
    if run(&["ip", "link", "show", BRIDGE]).is_some() {
        let _ = run(&["ip", "link", "del", BRIDGE]);
    }
    unmount_below(root);
    let _ = std::fs::remove_dir_all(root);
}

/// An extra dockerd, stopped and cleaned up on drop.
struct ExtraDaemon {
    child: Child,
    root: PathBuf,
}

impl ExtraDaemon {
    /// Starts dockerd with the bundle in `bundle_dir`, listening on [`ADDRESS`] and
    /// [`OTHER_ADDRESS`].
    fn start(bundle_dir: &Path, root: &Path) -> ExtraDaemon {
        // The bundle's daemon.json with its paths moved into the test's directory.
        let config = daemon_config(
            bundle_dir,
            root,
            &[format!("tcp://{ADDRESS}"), format!("tcp://{OTHER_ADDRESS}")],
        );
        let config_path = root.join("daemon.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

        assert!(
            run(&["ip", "link", "add", BRIDGE, "type", "bridge"]).is_some(),
            "cannot create bridge {BRIDGE}"
        );
        run(&["ip", "addr", "add", BRIDGE_CIDR, "dev", BRIDGE]).expect("bridge address");
        run(&["ip", "link", "set", BRIDGE, "up"]).expect("bridge up");

        let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
        let p = |name: &str| root.join(name).to_string_lossy().into_owned();
        use std::os::unix::process::CommandExt;
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config_path)
            .args(["--data-root", &p("data")])
            .args(["--exec-root", &p("exec")])
            .args(["-p", &p("pid")])
            .args(["--bridge", BRIDGE])
            .args(["--iptables=false", "--ip-masq=false"])
            .args(["--containerd-namespace", "esc-pki"])
            .args(["--containerd-plugins-namespace", "esc-pki-p"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("dockerd starts");
        ExtraDaemon {
            child,
            root: root.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default()
    }

    /// Panics with the daemon's log if it has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the extra dockerd exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for ExtraDaemon {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (its containerd) goes too.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("extra dockerd log:\n{}", self.log());
        }
        sweep();
    }
}

/// A TLS server on 127.0.0.2 presenting `cert` (a node as escale might meet it); answers
/// nothing past the handshake.
async fn fake_node(cert: &pki::IssuedCert) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert_der.clone()], cert.private_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_node_with_an_escale_bundle_speaks_mutual_tls_only_with_escale() {
    // 127.0.0.2-3:2376 are shared with the multi-node tests.
    let _addresses = crate::support::nodes::ADDRESSES.lock().await;
    sweep();
    let root = PathBuf::from(ROOT);
    std::fs::create_dir_all(&root).unwrap();
    let data = tempfile::tempdir().unwrap();
    let registry = Registry::open(&data.path().join("escale.db"), MasterKey::random())
        .await
        .unwrap();
    let pki = Pki::load_or_create(&registry).await.unwrap();
    let bundle = pki.issue_node("tester", "n2", ADDRESS).await.unwrap();
    let bundle_dir = root.join("bundle");
    bundle.write_to(&bundle_dir).unwrap();

    let mut daemon = ExtraDaemon::start(&bundle_dir, &root);
    let address = NodeAddress::parse(ADDRESS).unwrap();

    // (a) escale's client reaches the node once its socket answers.
    let node = wait_for(
        "the extra dockerd to answer over TLS",
        Duration::from_secs(90),
        || {
            daemon.check_running();
            let pki = &pki;
            let address = &address;
            async move { pki.connect("n2", address).await.ok() }
        },
    )
    .await;
    let version = node.version().await.unwrap();
    assert!(!version.api_version.is_empty(), "{version:?}");
    node.ping().await.unwrap();
    // The path-based client (bollard's own TLS transport) with the PEMs written privately.
    let by_files = pki
        .connect_with_files("n2", &address, &data.path().join(pki::CLIENT_FILES_DIR))
        .await
        .unwrap();
    by_files.version().await.unwrap();

    // (b) A client certificate of another CA is refused by the node (escale accepts the node).
    let foreign = Ca::generate("foreign", time::OffsetDateTime::now_utc()).unwrap();
    let foreign_client = foreign
        .issue_client("foreign", 30, time::OffsetDateTime::now_utc())
        .unwrap();
    let config = pki::node_client_config(pki.ca(), &foreign_client).unwrap();
    let err = pki::connect_with("n2", &address, config).await.unwrap_err();
    assert!(!err.is_refusal(), "the node refuses, not escale: {err}");
    // Under TLS 1.3 the client sees the refusal only as a closed connection; the node's log
    // says why.
    wait_for(
        "the node to log the refused client certificate",
        Duration::from_secs(10),
        || {
            let log = daemon.log();
            async move {
                log.contains("failed to verify client certificate: x509: certificate signed by unknown authority")
                    .then_some(())
            }
        },
    )
    .await;
    // And with escale's own CA trusted but no client certificate at all, likewise.
    let no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(pki.ca().verifier().unwrap()))
    .with_no_client_auth();
    assert!(pki::connect_with("n2", &address, no_cert).await.is_err());

    // (c) The same node reached at an address its certificate does not name is refused by
    // escale, saying what it names.
    let other = NodeAddress::parse(OTHER_ADDRESS).unwrap();
    let err = pki.connect("n2", &other).await.unwrap_err();
    assert!(matches!(err, PkiError::AddressNotInSan { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.3") && msg.contains("IP:127.0.0.2"),
        "{msg}"
    );

    // A node presenting a certificate of another CA (for the right address) is refused.
    let theirs = foreign
        .issue_server("n2", &address, 30, time::OffsetDateTime::now_utc())
        .unwrap();
    let fake = fake_node(&theirs).await;
    let fake_address = NodeAddress::parse(&fake.to_string()).unwrap();
    let err = pki.connect("n2", &fake_address).await.unwrap_err();
    assert!(matches!(err, PkiError::ForeignCa { .. }), "{err:?}");
    assert!(
        err.to_string().contains("escale cluster CA foreign"),
        "{err}"
    );

    // An expired certificate of our own CA is refused, saying when it expired.
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.2".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2025, 1, 1);
    let expired = pki.ca().issue_with(params).unwrap();
    let fake = fake_node(&expired).await;
    let err = pki
        .connect("n2", &NodeAddress::parse(&fake.to_string()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Expired { .. }), "{err:?}");
    assert!(err.to_string().contains("2025-01-01T00:00:00Z"), "{err}");

    // A node presenting a client certificate of our CA (clientAuth only) is refused.
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.2".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let client_as_server = pki.ca().issue_with(params).unwrap();
    let fake = fake_node(&client_as_server).await;
    let err = pki
        .connect("n2", &NodeAddress::parse(&fake.to_string()).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::WrongUsage { .. }), "{err:?}");
    assert!(err.to_string().contains("clientAuth"), "{err}");

    // escale's client still works after all that.
    node.version().await.unwrap();
    drop(daemon);
    assert!(
        run(&["ip", "link", "show", BRIDGE]).is_none(),
        "bridge removed"
    );
    assert!(!root.exists(), "directory removed");
}
