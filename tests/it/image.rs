//! escale as an image, for real: the repository's `Dockerfile` `runtime` stage built from a
//! Debian base made here (`support::base`, debootstrap: no registry), the binary of this test
//! run added on top, then `escale serve` run from that image as the Dockerfile documents
//! (host network, the engine's socket and the data dir mounted). Through the containerised
//! server: the setup flow, an app deployed by image and served by its proxy, and a `git push`
//! built and served (git inside the image).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::gitpush::{push_url, Repo};
use crate::support::base::debian_base;
use crate::support::docker::docker_cli;
use crate::support::fixture_image;
use crate::support::load::get_once;
use crate::support::server::{TestServer, ESCALE};

/// `docker build` with `args`; panics with its output on failure.
fn docker_build(args: &[&str]) {
    let out = Command::new("docker")
        .arg("build")
        .args(args)
        .output()
        .expect("docker build runs");
    assert!(
        out.status.success(),
        "docker build {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the Dockerfile's `runtime` stage on `base`, then that plus this run's binary;
/// returns the image's tag (removed by the caller).
fn build_image(base: &str, tag: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(repo.join("Dockerfile"), ctx.path().join("Dockerfile")).unwrap();
    std::fs::create_dir_all(ctx.path().join("config")).unwrap();
    std::fs::copy(
        repo.join("config/escale.toml"),
        ctx.path().join("config/escale.toml"),
    )
    .unwrap();
    let runtime = format!("{tag}-runtime");
    docker_build(&[
        "-q",
        // The engine here has no default bridge, and the base needs nothing from outside.
        "--network",
        "none",
        "--target",
        "runtime",
        "--build-arg",
        &format!("BASE={base}"),
        "--label",
        "escale.test-image=1",
        "-t",
        &runtime,
        ctx.path().to_str().unwrap(),
    ]);
    let bin = tempfile::tempdir().unwrap();
    std::fs::copy(ESCALE, bin.path().join("escale")).unwrap();
    std::fs::write(
        bin.path().join("Dockerfile"),
        format!("FROM {runtime}\nCOPY escale /usr/local/bin/escale\n"),
    )
    .unwrap();
    docker_build(&["-q", "-t", tag, bin.path().to_str().unwrap()]);
    docker_cli(&["rmi", &runtime]);
}

struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escale_runs_from_its_image_and_deploys_by_image_and_by_git_push() {
    let fixture = fixture_image().await.to_string();
    let base = debian_base().await;
    let tag = format!(
        "escale-it/escale:{}x{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 3]>())
    );
    let _remove = RemoveImage(tag.clone());
    build_image(base, &tag);
    // The runtime has git and the CA roots, and the binary runs in it.
    let run = |args: &[&str]| {
        let out = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                args[0],
                &tag,
            ])
            .args(&args[1..])
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "{args:?} in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run(&["git", "--version"]).starts_with("git version"));
    run(&["test", "-s", "/etc/ssl/certs/ca-certificates.crt"]);
    run(&["test", "-f", "/etc/escale/escale.toml"]);
    assert!(run(&["escale", "--version"]).contains("escale"));

    let s = TestServer::start_in_image(&tag, &[]).await;
    let running = docker_cli(&[
        "ps",
        "-q",
        "--filter",
        &format!("name=^{}$", s.container_name()),
    ]);
    assert!(
        !running.trim().is_empty(),
        "the server runs in its container"
    );
    let proxy = s
        .proxy
        .clone()
        .expect("the containerised server runs a proxy");

    // By image.
    s.ok(&["apps", "create", "boxed"]);
    s.ok(&["deploy", "boxed", "--image", &fixture]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match get_once(&proxy, "boxed.localhost", "/").await {
            Ok((status, _)) if status.is_success() => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "boxed not served through the containerised proxy: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // By git push: the build runs through the engine, git runs in the image.
    s.ok(&["apps", "create", "pushed"]);
    let repo = Repo::new();
    repo.commit(
        &[(
            "Dockerfile",
            &format!("FROM {fixture}\nENV BUILT=in-a-box\n"),
        )],
        "boxed build",
    );
    let (ok, out) = repo.push(&push_url(&s, "pushed"), "main");
    assert!(ok, "push to the containerised escale: {out}");
    assert!(out.contains("is serving"), "{out}");
    let (status, _) = get_once(&proxy, "pushed.localhost", "/").await.unwrap();
    assert!(status.is_success(), "{status}");
}
