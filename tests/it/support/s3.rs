//! A local S3-compatible store for the backup tests: moto's server (PyPI `moto[server]`),
//! started per test on a port the kernel chose, with signature checking on (its first three
//! actions create an IAM user, key and policy; every later request is checked as a real store
//! does). Dropping [`Moto`] kills the process, also when the test panics.
//!
//! Found as `ESCALE_TEST_MOTO_PYTHON` (a python that has moto), else the venv `scripts/test`
//! installs into `<target dir>/moto-venv`. Missing, the test fails saying how to install it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The fixture client (boto3): `tests/fixtures/s3_store.py`.
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/s3_store.py");

/// A running moto server; killed when dropped.
pub struct Moto {
    child: Child,
    pub python: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub log: tempfile::NamedTempFile,
}

/// An access key of the store's IAM user (allowed everything).
#[derive(Debug, Clone)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("ESCALE_TEST_MOTO_PYTHON") {
        return PathBuf::from(p);
    }
    // The test binary is <target>/debug/deps/it-HASH: the venv is <target>/moto-venv.
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .map(|d| d.join("moto-venv/bin/python"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/moto-venv/bin/python"
            ))
        })
}

impl Moto {
    /// Starts moto's server and waits until it answers.
    pub fn start() -> Moto {
        let python = python();
        let has_moto = Command::new(&python)
            .args(["-c", "import moto.server, boto3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_moto,
            "moto's S3 server is needed and was not found at {}: run scripts/test (it installs it), \
             or `python3 -m venv target/moto-venv && target/moto-venv/bin/pip install 'moto[server]'`, \
             or set ESCALE_TEST_MOTO_PYTHON to a python that has `moto[server]`",
            python.display()
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("moto's server starts");
        let mut moto = Moto {
            child,
            python,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return moto;
            }
            if let Ok(Some(st)) = moto.child.try_wait() {
                panic!("moto's server exited ({st}): {}", moto.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "moto's server did not listen within 60 s: {}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn client(&self, args: &[&str]) -> String {
        let out = Command::new(&self.python)
            .arg(CLIENT)
            .args(args)
            .output()
            .expect("the fixture client runs");
        assert!(
            out.status.success(),
            "s3_store.py {args:?}: {}\nmoto log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates the IAM user and key (the server's first three actions) and the bucket.
    pub fn setup(&self, bucket: &str) -> Keys {
        let v: Value = serde_json::from_str(&self.client(&["setup", &self.endpoint, bucket]))
            .expect("setup prints JSON");
        Keys {
            access_key_id: v["access_key_id"].as_str().unwrap().to_string(),
            secret_access_key: v["secret_access_key"].as_str().unwrap().to_string(),
        }
    }

    /// The objects under `prefix` as `(key, size)`, sorted, and the count of unfinished
    /// multipart uploads in the bucket.
    pub fn list(&self, bucket: &str, keys: &Keys, prefix: &str) -> (Vec<(String, u64)>, u64) {
        let v: Value = serde_json::from_str(&self.client(&[
            "list",
            &self.endpoint,
            bucket,
            &keys.access_key_id,
            &keys.secret_access_key,
            prefix,
        ]))
        .expect("list prints JSON");
        let mut objects: Vec<(String, u64)> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["key"].as_str().unwrap().to_string(),
                    o["size"].as_u64().unwrap(),
                )
            })
            .collect();
        objects.sort();
        (objects, v["unfinished_uploads"].as_u64().unwrap_or(0))
    }

    /// Downloads the object `key` to `to`.
    pub fn get(&self, bucket: &str, keys: &Keys, key: &str, to: &Path) {
        self.client(&[
            "get",
            &self.endpoint,
            bucket,
            &keys.access_key_id,
            &keys.secret_access_key,
            key,
            to.to_str().unwrap(),
        ]);
    }

    /// `ESCALE_BACKUP_S3_*` for a bucket of this store.
    pub fn env(&self, bucket: &str, keys: &Keys, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("ESCALE_BACKUP_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("ESCALE_BACKUP_S3_REGION".into(), "us-east-1".into()),
            ("ESCALE_BACKUP_S3_BUCKET".into(), bucket.into()),
            ("ESCALE_BACKUP_S3_PREFIX".into(), prefix.into()),
            (
                "ESCALE_BACKUP_S3_ACCESS_KEY_ID".into(),
                keys.access_key_id.clone(),
            ),
            (
                "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY".into(),
                keys.secret_access_key.clone(),
            ),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS front for a store (a self-hosted MinIO or Garage behind its own CA): terminates TLS
/// with a certificate for `localhost` from a fresh CA and relays the bytes to the store. Runs
/// as tasks of the test's runtime (they end with it).
pub struct TlsFront {
    /// `https://localhost:PORT`
    pub endpoint: String,
    /// The CA's certificate, PEM.
    pub ca_pem: String,
}

impl TlsFront {
    pub async fn start(backend: &str) -> TlsFront {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "escale test store CA");
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = backend.trim_start_matches("http://").to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(&backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsFront {
            endpoint: format!("https://localhost:{port}"),
            ca_pem,
        }
    }
}
