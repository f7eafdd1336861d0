//! The fixture app image, built from nothing: `tests/fixtures/webapp.rs` compiled by plain
//! `rustc` into a static binary, packed `FROM scratch`, built through [`escale::node::Node`].
//!
//! Built at most once per test binary ([`fixture_image`]); the tag carries a hash of the source,
//! so an existing image is reused across runs. Several test binaries racing to build it are
//! serialised with a lock file in the temp dir (and a build is idempotent anyway).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::docker::local_node;
use super::tar::tar_files;

/// Source of the fixture app.
pub const FIXTURE_SOURCE: &str = include_str!("../../fixtures/webapp.rs");
/// Repository part of the fixture image tag.
pub const FIXTURE_REPO: &str = "escale-fixture/webapp";
/// Flags the fixture is compiled with (part of the content hash).
const RUSTC_FLAGS: &[&str] = &[
    "-O",
    "-C",
    "target-feature=+crt-static",
    "-C",
    "strip=symbols",
    "--edition",
    "2021",
];
const DOCKERFILE: &str = "FROM scratch\nCOPY webapp /webapp\nENTRYPOINT [\"/webapp\"]\n";

static IMAGE: OnceCell<String> = OnceCell::const_new();

/// The fixture image's tag, `escale-fixture/webapp:<content hash>`, built on first use.
pub async fn fixture_image() -> &'static str {
    IMAGE
        .get_or_init(|| async {
            match build_fixture_image().await {
                Ok(tag) => tag,
                Err(e) => panic!("cannot build the fixture image: {e}"),
            }
        })
        .await
}

fn content_hash() -> String {
    let mut h = Sha256::new();
    h.update(FIXTURE_SOURCE.as_bytes());
    h.update(RUSTC_FLAGS.join(" ").as_bytes());
    h.update(DOCKERFILE.as_bytes());
    hex::encode(&h.finalize()[..8])
}

async fn build_fixture_image() -> Result<String, String> {
    let node = local_node().await;
    let hash = content_hash();
    let tag = format!("{FIXTURE_REPO}:{hash}");
    let lock_path = std::env::temp_dir().join(format!("escale-fixture-{hash}.lock"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        if node.image_exists(&tag).await.map_err(|e| e.to_string())? {
            return Ok(tag);
        }
        match Lock::acquire(&lock_path) {
            Some(_lock) => {
                // Re-check under the lock: another process may have just finished.
                if node.image_exists(&tag).await.map_err(|e| e.to_string())? {
                    return Ok(tag);
                }
                build(&node, &tag).await?;
                return Ok(tag);
            }
            None => {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "timed out waiting for another process building `{tag}` (lock {})",
                        lock_path.display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn build(node: &escale::node::Node, tag: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let binary = compile(dir.path()).await?;
    let webapp = std::fs::read(&binary).map_err(|e| format!("reading {binary:?}: {e}"))?;
    let context = tar_files(&[
        ("Dockerfile", 0o644, DOCKERFILE.as_bytes()),
        ("webapp", 0o755, &webapp),
    ]);
    let labels = vec![("escale.test".to_string(), "1".to_string())];
    let mut output = Vec::new();
    node.build_image(context.into(), tag, &[], &labels, |line| {
        output.push(line.to_string())
    })
    .await
    .map_err(|e| format!("{e}\nbuild output:\n{}", output.join("\n")))?;
    Ok(())
}

async fn compile(dir: &Path) -> Result<PathBuf, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webapp.rs");
    let out = dir.join("webapp");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let result = tokio::process::Command::new(&rustc)
        .args(RUSTC_FLAGS)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .output()
        .await
        .map_err(|e| format!("running `{rustc}`: {e}"))?;
    if !result.status.success() {
        return Err(format!(
            "`{rustc}` failed to compile {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    Ok(out)
}

/// A lock file created with `O_EXCL`; removed on drop. Locks older than 5 minutes are stale
/// (a build process that died) and get broken.
struct Lock(PathBuf);

impl Lock {
    fn acquire(path: &Path) -> Option<Lock> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => Some(Lock(path.to_path_buf())),
            Err(_) => {
                let stale = std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > Duration::from_secs(300));
                if stale {
                    let _ = std::fs::remove_file(path);
                }
                None
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
