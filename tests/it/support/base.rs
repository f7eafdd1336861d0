//! A Debian base image made here, with no registry: `debootstrap` (minbase, bookworm, with git
//! and the CA roots) from the Debian mirror, imported into the engine as
//! [`BASE_REPO`]`:bookworm-<hash>`. The repository's `Dockerfile` builds its `runtime` stage
//! `FROM` it (`--build-arg BASE=...`), as it would from `debian:bookworm-slim` elsewhere.
//!
//! Made at most once per test binary and kept on the engine across runs (the tag carries a
//! hash of the recipe); processes racing to make it are serialised by a lock file.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::docker::docker_cli;

pub const BASE_REPO: &str = "escale-test/debian-base";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const INCLUDE: &str = "git,ca-certificates";

static BASE: OnceCell<String> = OnceCell::const_new();

/// The base image's tag, made on first use.
pub async fn debian_base() -> &'static str {
    BASE.get_or_init(|| async {
        tokio::task::spawn_blocking(make)
            .await
            .expect("base image task")
            .unwrap_or_else(|e| panic!("cannot make the Debian base image: {e}"))
    })
    .await
}

fn tag() -> String {
    let mut h = Sha256::new();
    h.update(format!("{SUITE} {MIRROR} minbase {INCLUDE} slim-1").as_bytes());
    format!("{BASE_REPO}:{SUITE}-{}", hex::encode(&h.finalize()[..6]))
}

fn exists(tag: &str) -> bool {
    !docker_cli(&["images", "-q", tag]).trim().is_empty()
}

fn make() -> Result<String, String> {
    let tag = tag();
    if exists(&tag) {
        return Ok(tag);
    }
    let lock = std::env::temp_dir().join("escale-debian-base.lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let _guard = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break LockFile(lock.clone()),
            Err(_) => {
                // A lock older than the deadline is a crashed run's.
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(900));
                if stale {
                    let _ = std::fs::remove_file(&lock);
                    continue;
                }
                if exists(&tag) {
                    return Ok(tag);
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("timed out waiting for {}", lock.display()));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    if exists(&tag) {
        return Ok(tag);
    }
    let root: PathBuf = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debian-base-rootfs");
    let _ = std::fs::remove_dir_all(&root);
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            SUITE,
            root.to_str().unwrap(),
            MIRROR,
        ])
        .output()
        .map_err(|e| format!("debootstrap cannot run ({e}); scripts/test installs it"))?;
    if !out.status.success() {
        return Err(format!(
            "debootstrap failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // What a slim image leaves out: package caches, documentation, manuals.
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
    ] {
        let p = root.join(dir);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::create_dir_all(&p);
    }
    // `tar -C root -c . | docker import - TAG`
    let mut tar = Command::new("tar")
        .args(["-C", root.to_str().unwrap(), "--numeric-owner", "-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            "CMD [\"/bin/bash\"]",
            "--change",
            "LABEL escale.test-base=1",
            "-",
            &tag,
        ])
        .stdin(tar.stdout.take().expect("piped"))
        .output()
        .map_err(|e| format!("docker import: {e}"))?;
    let tarred = tar.wait().map_err(|e| format!("tar: {e}"))?;
    let _ = std::fs::remove_dir_all(&root);
    if !tarred.success() || !import.status.success() {
        return Err(format!(
            "importing the rootfs: tar {tarred}, docker import: {}",
            String::from_utf8_lossy(&import.stderr)
        ));
    }
    Ok(tag)
}

struct LockFile(PathBuf);

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
