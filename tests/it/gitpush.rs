//! Deploy by `git push`: the real `git` binary pushes to a real `escale serve` over smart HTTP;
//! the push builds the repository's Dockerfile (`FROM` the fixture image), rolls it out, and
//! shows progress as `remote:` lines; failures fail the push and leave the old release serving.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::fixture_image;
use crate::support::server::{healthy, TestServer};

/// A git working copy with its own HOME, so no user config leaks in.
pub(crate) struct Repo {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    pub(crate) dir: PathBuf,
}

impl Repo {
    pub(crate) fn new() -> Repo {
        let tmp = tempfile::tempdir().expect("temp dir");
        let home = tmp.path().join("home");
        let dir = tmp.path().join("src");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let r = Repo {
            _tmp: tmp,
            home,
            dir,
        };
        r.ok(&["init", "--quiet", "--initial-branch=main"]);
        r
    }

    pub(crate) fn git(&self, args: &[&str]) -> Output {
        Command::new("git")
            .args([
                "-c",
                "user.name=Pusher",
                "-c",
                "user.email=pusher@example.com",
                "-c",
                "credential.helper=",
            ])
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", &self.home)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_ASKPASS", "")
            .env("SSH_ASKPASS", "")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .output()
            .expect("git runs")
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.git(args);
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `files` and commits them.
    pub(crate) fn commit(&self, files: &[(&str, &str)], msg: &str) -> String {
        for (name, content) in files {
            std::fs::write(self.dir.join(name), content).unwrap();
        }
        self.ok(&["add", "--all"]);
        self.ok(&["commit", "--quiet", "--allow-empty", "-m", msg]);
        self.ok(&["rev-parse", "HEAD"]).trim().to_string()
    }

    /// `git push URL REFSPEC`; returns (success, stderr).
    pub(crate) fn push(&self, url: &str, refspec: &str) -> (bool, String) {
        let out = self.git(&["push", "--progress", url, refspec]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

pub(crate) fn push_url(s: &TestServer, app: &str) -> String {
    let host = s.api.trim_start_matches("http://");
    format!("http://admin:{}@{host}/git/{app}.git", s.token)
}

pub(crate) fn releases(s: &TestServer, app: &str) -> Vec<Value> {
    s.json(&["releases", app]).as_array().cloned().unwrap()
}

/// The bare repository of `app`: `data/git/apps/<uid>.git`, keyed by the app's uid.
pub(crate) async fn app_repo(s: &TestServer, app: &str) -> PathBuf {
    let mut conn = s.registry().await;
    let uid: String = sqlx::query_scalar("SELECT uid FROM apps WHERE name = ?")
        .bind(app)
        .fetch_one(&mut conn)
        .await
        .expect("app row");
    s.dir
        .path()
        .join("data/git/apps")
        .join(format!("{uid}.git"))
}

fn status_of(releases: &[Value], v: u64) -> String {
    releases
        .iter()
        .find(|r| r["version"] == v)
        .map(|r| r["status"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("no v{v} in {releases:#?}"))
}

/// The body the app's instance `i` answers at `/`.
async fn answer(i: &Value) -> String {
    let addr = i["address"].as_str().expect("instance address");
    crate::support::http_get_ready(addr.parse().unwrap(), "/")
        .await
        .1
}

async fn build_log(s: &TestServer, app: &str, v: i64) -> Option<String> {
    let mut conn = s.registry().await;
    sqlx::query_scalar(
        "SELECT r.build_log FROM releases r JOIN apps a ON a.id = r.app_id WHERE a.name = ? AND r.version = ?",
    )
    .bind(app)
    .bind(v)
    .fetch_one(&mut conn)
    .await
    .expect("release row")
}

fn built_seconds(out: &str) -> f64 {
    out.lines()
        .find_map(|l| {
            let rest = l.split("-----> Built ").nth(1)?;
            rest.rsplit(" in ")
                .next()?
                .trim()
                .strip_suffix('s')?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_push_to_main_builds_deploys_and_serves() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop"]);
    s.ok(&[
        "processes",
        "set",
        "shop",
        "web",
        "--health-path",
        "/health",
    ]);
    s.ok(&["scale", "shop", "web=3"]);
    let repo = Repo::new();
    // 3 MiB that do not compress: larger than git's 1 MiB post buffer, so git probes and then
    // streams the pack in chunks.
    let noise: Vec<u8> = (0..3 << 20).map(|_| rand::random::<u8>()).collect();
    std::fs::write(repo.dir.join("noise.bin"), noise).unwrap();
    let sha = repo.commit(
        &[
            (
                "Dockerfile",
                &format!("FROM {image}\nENV GREETING=hello-from-git\n"),
            ),
            ("README", "hi\n"),
        ],
        "first",
    );
    let url = push_url(&s, "shop");
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "push succeeds: {out}");
    for want in [
        "remote: -----> Building",
        "remote: -----> Releasing v1",
        "remote: -----> v1 is serving",
        "main -> main",
    ] {
        assert!(out.contains(want), "`{want}` in push output:\n{out}");
    }
    assert!(!out.contains(&s.token), "the token is never echoed");

    let rel = releases(&s, "shop");
    assert_eq!(status_of(&rel, 1), "active");
    assert_eq!(rel[0]["source"], format!("git {}", &sha[..7]));
    assert_eq!(rel[0]["image"], format!("shop:v1-{}", &sha[..7]));
    let log = build_log(&s, "shop", 1).await.expect("build log kept");
    assert!(log.contains("GREETING"), "build log: {log}");

    let ps = s.instances("shop");
    assert_eq!(healthy(&ps, "web", 1), 3, "{ps:#?}");
    let body = answer(&ps[0]).await;
    assert!(body.contains("hello-from-git"), "{body}");

    // A second push: measure push-to-serving for 3 instances, less the build.
    repo.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=second-push\n"),
        )],
        "second",
    );
    let t = Instant::now();
    let (ok, out) = repo.push(&url, "main");
    let total = t.elapsed().as_secs_f64();
    assert!(ok, "second push succeeds: {out}");
    let build = built_seconds(&out);
    eprintln!(
        "git push to v2 serving on 3 instances: {total:.2}s total, build {build:.2}s, rest {:.2}s",
        total - build
    );
    let rel = releases(&s, "shop");
    assert_eq!(status_of(&rel, 2), "active");
    assert_eq!(status_of(&rel, 1), "superseded");
    let ps = s.instances("shop");
    let v2: Vec<&Value> = ps
        .iter()
        .filter(|i| i["release"] == 2 && i["health"] == "healthy")
        .collect();
    assert_eq!(v2.len(), 3, "{ps:#?}");
    assert!(answer(v2[0]).await.contains("second-push"));

    // Another branch is stored, not deployed.
    let (ok, out) = repo.push(&url, "main:refs/heads/feature");
    assert!(ok, "{out}");
    assert!(out.contains("was stored, not deployed"), "{out}");
    assert_eq!(releases(&s, "shop").len(), 2);
}

#[tokio::test]
async fn a_failing_build_fails_the_push_and_creates_no_release() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "broken"]);
    let url = push_url(&s, "broken");

    // No Dockerfile: the message says what escale needs.
    let repo = Repo::new();
    repo.commit(&[("index.html", "<p>hi</p>\n")], "no dockerfile");
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok, "push without a Dockerfile fails: {out}");
    assert!(
        out.contains("remote rejected") && out.contains("Dockerfile"),
        "{out}"
    );

    // A build step that fails.
    repo.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nRUN [\"/no-such-command\"]\n"),
        )],
        "bad step",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok, "push with a failing build fails: {out}");
    assert!(out.contains("build failed"), "{out}");
    assert!(
        out.contains("no-such-command"),
        "the build error is shown: {out}"
    );

    // A missing base image.
    repo.commit(
        &[("Dockerfile", "FROM escale-test/does-not-exist:nope\n")],
        "bad base",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok, "push with a missing base fails: {out}");
    assert!(out.contains("could not be pulled"), "{out}");
    assert!(releases(&s, "broken").is_empty(), "no release was created");

    // Fixed: the same branch deploys (the failed pushes left it where it was).
    repo.commit(&[("Dockerfile", &format!("FROM {image}\n"))], "fixed");
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "{out}");
    assert_eq!(status_of(&releases(&s, "broken"), 1), "active");
}

#[tokio::test]
async fn a_failing_health_check_fails_the_push_and_the_old_release_keeps_serving() {
    let image = fixture_image().await;
    let s = TestServer::start(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "6s")]).await;
    s.ok(&["apps", "create", "fragile"]);
    s.ok(&[
        "processes",
        "set",
        "fragile",
        "web",
        "--health-path",
        "/health",
    ]);
    let url = push_url(&s, "fragile");
    let repo = Repo::new();
    repo.commit(
        &[("Dockerfile", &format!("FROM {image}\nENV GREETING=v1\n"))],
        "good",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "{out}");

    repo.commit(
        &[(
            "Dockerfile",
            &format!("FROM {image}\nENV GREETING=v2\nENV FAIL_HEALTH=1\n"),
        )],
        "unhealthy",
    );
    // The push runs while a second one, from elsewhere, is refused: one deploy at a time.
    let pusher = {
        let url = url.clone();
        std::thread::spawn(move || {
            let r = repo.push(&url, "main");
            (repo, r)
        })
    };
    s.wait_for("v2 deploying", Duration::from_secs(30), || {
        let rel = releases(&s, "fragile");
        rel.iter().any(|r| r["version"] == 2).then_some(())
    })
    .await;
    let other = Repo::new();
    other.commit(&[("Dockerfile", &format!("FROM {image}\n"))], "elsewhere");
    let (ok2, out2) = other.push(&url, "+main");
    assert!(!ok2, "{out2}");
    assert!(
        out2.contains("another deploy of `fragile` is in progress (a git push of"),
        "{out2}"
    );
    let (repo, (ok, out)) = pusher.join().unwrap();
    assert!(!ok, "an unhealthy release fails the push: {out}");
    assert!(
        out.contains("rollout of v2 failed") && out.contains("previous release keeps serving"),
        "{out}"
    );
    let rel = releases(&s, "fragile");
    assert_eq!(status_of(&rel, 2), "failed");
    assert_eq!(status_of(&rel, 1), "active");
    let ps = s
        .wait_for("only v1 left", Duration::from_secs(20), || {
            let ps = s.instances("fragile");
            ps.iter().all(|i| i["release"] == 1).then_some(ps)
        })
        .await;
    assert_eq!(healthy(&ps, "web", 1), 1, "{ps:#?}");
    assert!(answer(&ps[0]).await.contains("v1"));
    // The branch was put back: pushing the same commit again tries again (and fails again).
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok && out.contains("rollout of v3 failed"), "{out}");
}

/// A raw HTTP/1.1 request to the API; returns status and body.
async fn raw(s: &TestServer, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let addr = s.api.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth
        .map(|t| {
            format!(
                "authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(format!("git:{t}"))
            )
        })
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/x-git-receive-pack-request\r\ncontent-length: 4\r\nconnection: close\r\n\r\n0000"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn pushes_need_a_token_and_names_and_refs_cannot_inject() {
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop"]);
    let host = s.api.trim_start_matches("http://").to_string();
    let repo = Repo::new();
    repo.commit(&[("README", "x\n")], "one");

    // No token, a wrong token: refused, and git was asked for credentials (401 + Basic).
    let (ok, out) = repo.push(&format!("http://{host}/git/shop.git"), "main");
    assert!(!ok, "{out}");
    assert!(
        out.contains("could not read Username") || out.contains("Authentication failed"),
        "{out}"
    );
    let (ok, out) = repo.push(&format!("http://git:esc_bogus@{host}/git/shop.git"), "main");
    assert!(!ok && out.contains("Authentication failed"), "{out}");
    let (status, text) = raw(
        &s,
        "GET",
        "/git/shop.git/info/refs?service=git-receive-pack",
        None,
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains("www-authenticate: Basic realm=\"escale\""),
        "{text}"
    );
    // Another team's member cannot see the app: 404, as for an unknown app.
    s.ok(&["teams", "create", "blue"]);
    let out = s.cli_with_token(
        Some(&s.token.clone()),
        &[
            "users",
            "create",
            "eve",
            "--role",
            "member",
            "--team",
            "blue",
            "--password-stdin",
        ],
        Some("eve-password-1"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli_with_token(
        None,
        &["login", "--name", "eve", "--password-stdin"],
        Some("eve-password-1"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("home/.config/escale/credentials.json"))
            .unwrap(),
    )
    .unwrap();
    let eve = creds["token"].as_str().unwrap().to_string();
    let (status, text) = raw(
        &s,
        "GET",
        "/git/shop.git/info/refs?service=git-receive-pack",
        Some(&eve),
    )
    .await;
    assert_eq!(status, 404, "{text}");
    let (ok, out) = repo.push(&format!("http://eve:{eve}@{host}/git/shop.git"), "main");
    assert!(!ok, "{out}");
    let (status, text) = raw(
        &s,
        "GET",
        "/git/shop.git/info/refs?service=git-receive-pack",
        Some(&s.token),
    )
    .await;
    assert_eq!(status, 200, "{text}");

    // An unknown app is 404; clone is refused with a message.
    let (ok, out) = repo.push(&push_url(&s, "nope"), "main");
    assert!(!ok, "{out}");
    let clone = repo.git(&["clone", &push_url(&s, "shop"), "copy"]);
    assert!(!clone.status.success());
    assert!(
        String::from_utf8_lossy(&clone.stderr).contains("pushes only"),
        "{}",
        String::from_utf8_lossy(&clone.stderr)
    );

    // App names that are not names: 404 before anything touches the disk.
    for name in [
        "%24(id)",
        "%60id%60",
        "a%3Bb",
        "a%0Ab",
        "-rf",
        "..%2F..%2Fescape",
        "%2E%2E",
        "SHOP",
    ] {
        for path in [
            format!("/git/{name}.git/info/refs?service=git-receive-pack"),
            format!("/git/{name}.git/git-receive-pack"),
        ] {
            let method = if path.contains("info/refs") {
                "GET"
            } else {
                "POST"
            };
            let (status, text) = raw(&s, method, &path, Some(&s.token)).await;
            assert_eq!(status, 404, "{path}: {text}");
        }
        let (ok, out) = repo.push(
            &format!("http://admin:{}@{host}/git/{name}.git", s.token),
            "main",
        );
        assert!(!ok, "{name}: {out}");
    }

    // Refs that are not plain names: the whole push is rejected.
    for r in [
        "refs/heads/$(id)",
        "refs/heads/`id`",
        "refs/heads/a;touch${IFS}pwned",
        "refs/heads/-x",
        "refs/tags/x;id",
    ] {
        let (ok, out) = repo.push(&push_url(&s, "shop"), &format!("main:{r}"));
        assert!(!ok && out.contains("remote rejected"), "{r}: {out}");
    }
    // A plain branch works, and only it exists.
    let (ok, out) = repo.push(&push_url(&s, "shop"), "main:refs/heads/dev");
    assert!(ok, "{out}");
    let data = s.dir.path().join("data");
    let bare = app_repo(&s, "shop").await;
    let refs = Command::new("git")
        .args(["--git-dir"])
        .arg(&bare)
        .args(["for-each-ref", "--format=%(refname)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&refs.stdout), "refs/heads/dev\n");
    let names: Vec<String> = std::fs::read_dir(data.join("git/apps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want = bare.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(names, vec![want]);
    assert_nothing_named(s.dir.path(), &["pwned", "escape", "id"]);
    assert!(!Path::new("pwned").exists());
}

fn assert_nothing_named(dir: &Path, names: &[&str]) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!names.contains(&n.as_str()), "unexpected {:?}", e.path());
        if e.file_type().unwrap().is_dir() && n != "objects" {
            assert_nothing_named(&e.path(), names);
        }
    }
}

#[tokio::test]
async fn a_pushed_escale_toml_is_applied_and_an_invalid_one_changes_nothing() {
    let image = fixture_image().await;
    let s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "declared"]);
    let url = push_url(&s, "declared");
    let repo = Repo::new();

    // An invalid manifest: the push fails naming line, column and field; nothing changes.
    repo.commit(
        &[
            ("Dockerfile", &format!("FROM {image}\n")),
            (
                "escale.toml",
                "domains = [\"declared.example.eu\"]\n\n[processes.web]\ninstances = 2\nmemory = \"lots\"\n",
            ),
        ],
        "invalid manifest",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(!ok, "an invalid manifest fails the push: {out}");
    assert!(
        out.contains("remote: escale.toml:5:10 processes.web.memory:"),
        "the problem is named with its line: {out}"
    );
    assert!(out.contains("remote rejected"), "{out}");
    assert!(!out.contains("-----> Building"), "nothing was built: {out}");
    assert!(releases(&s, "declared").is_empty(), "no release");
    let domains = s.json(&["domains", "list", "declared"]);
    assert!(
        !domains.to_string().contains("declared.example.eu"),
        "no domain was added: {domains}"
    );
    assert!(s.instances("declared").is_empty());

    // Fixed: applied before the release, its changes reported; 2 instances and the domain.
    repo.commit(
        &[(
            "escale.toml",
            "domains = [\"declared.example.eu\"]\n\n[processes.web]\ninstances = 2\n",
        )],
        "valid manifest",
    );
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "{out}");
    assert!(out.contains("remote: -----> escale.toml applied"), "{out}");
    assert!(out.contains("declared.example.eu"), "{out}");
    assert!(out.contains("remote: -----> v1 is serving"), "{out}");
    assert_eq!(status_of(&releases(&s, "declared"), 1), "active");
    let domains = s.json(&["domains", "list", "declared"]);
    assert!(
        domains.to_string().contains("declared.example.eu"),
        "{domains}"
    );
    let ps = s
        .wait_for("2 healthy instances", Duration::from_secs(30), || {
            let ps = s.instances("declared");
            (healthy(&ps, "web", 1) == 2).then_some(ps)
        })
        .await;
    assert_eq!(ps.len(), 2, "{ps:#?}");
}

/// Tags of the images this server built for `app`, sorted.
fn built_images(s: &TestServer, app: &str) -> Vec<String> {
    let out = crate::support::docker::docker_cli(&[
        "images",
        "--filter",
        &format!("label=escale.installation={}", s.installation),
        "--filter",
        &format!("label=escale.app={app}"),
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ]);
    let mut tags: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    tags.sort();
    tags
}

#[tokio::test]
async fn old_built_images_are_pruned_after_a_deploy() {
    let image = fixture_image().await;
    let s = TestServer::start(&[("ESCALE_SCHEDULER_KEEP_RELEASES", "2")]).await;
    s.ok(&["apps", "create", "pruned"]);
    let url = push_url(&s, "pruned");
    let repo = Repo::new();
    let mut shas = Vec::new();
    for n in 1..=4 {
        let sha = repo.commit(
            &[("Dockerfile", &format!("FROM {image}\nENV BUILD={n}\n"))],
            &format!("build {n}"),
        );
        let (ok, out) = repo.push(&url, "main");
        assert!(ok, "push {n}: {out}");
        shas.push(sha);
    }
    let want: Vec<String> = (3..=4)
        .map(|n| format!("pruned:v{n}-{}", &shas[n - 1][..7]))
        .collect();
    // The last 2 releases' images remain; older ones were removed by the deploys.
    let got = s
        .wait_for("only the last 2 images", Duration::from_secs(30), || {
            let got = built_images(&s, "pruned");
            (got == want).then_some(got)
        })
        .await;
    assert_eq!(got, want);
    let rel = releases(&s, "pruned");
    assert_eq!(status_of(&rel, 4), "active");
    // Rolling back to a kept release still works (its image is there).
    s.ok(&["rollback", "pruned", "3"]);
}

#[tokio::test]
async fn deploy_branch_and_dockerfile_come_from_config_and_config_vars_are_build_args() {
    let image = fixture_image().await;
    let s = TestServer::start(&[
        ("ESCALE_GIT_DEPLOY_BRANCH", "production"),
        ("ESCALE_GIT_DOCKERFILE", "deploy/Dockerfile"),
    ])
    .await;
    s.ok(&["apps", "create", "shop"]);
    s.ok(&["config", "set", "shop", "BUILD_MARK=mark42"]);
    s.ok(&["config", "set", "shop", "SECRET_MARK=hush", "--secret"]);
    let repo = Repo::new();
    std::fs::create_dir_all(repo.dir.join("deploy")).unwrap();
    repo.commit(
        &[(
            "deploy/Dockerfile",
            &format!(
                "FROM {image}\nARG BUILD_MARK\nARG SECRET_MARK\nENV GREETING=built-with-$BUILD_MARK LEAK=x$SECRET_MARK\n"
            ),
        )],
        "first",
    );
    let url = push_url(&s, "shop");
    // `main` is not the deploy branch here: stored only, with a message naming the right one.
    let (ok, out) = repo.push(&url, "main");
    assert!(ok, "{out}");
    assert!(out.contains("deploys pushes to `production` only"), "{out}");
    assert!(releases(&s, "shop").is_empty());

    let (ok, out) = repo.push(&url, "main:production");
    assert!(ok, "push to the deploy branch deploys: {out}");
    assert!(out.contains("remote: -----> v1 is serving"), "{out}");
    let ps = s.instances("shop");
    let i = ps
        .iter()
        .find(|i| i["health"] == "healthy")
        .expect("a healthy instance");
    assert!(
        answer(i).await.contains("built-with-mark42"),
        "a non-secret config var is a build arg"
    );
    let addr = i["address"].as_str().unwrap().parse().unwrap();
    let (_, leak) = crate::support::http_get_ready(addr, "/env/LEAK").await;
    assert_eq!(leak.trim(), "x", "secrets are not build args");

    // Without the configured Dockerfile the push says which path escale builds.
    repo.ok(&["rm", "--quiet", "deploy/Dockerfile"]);
    repo.commit(&[("Dockerfile", &format!("FROM {image}\n"))], "moved");
    let (ok, out) = repo.push(&url, "main:production");
    assert!(!ok, "{out}");
    assert!(out.contains("`deploy/Dockerfile`"), "{out}");
}

/// Issue #11 finding 7, the git-push path: a pushed `escale.toml` naming a domain below or
/// above another team's name is refused before anything is built, and nothing changes.
#[tokio::test]
async fn a_pushed_escale_toml_cannot_take_another_teams_names() {
    let s = TestServer::start(&[]).await;
    s.ok(&["teams", "create", "red"]);
    s.ok(&["apps", "create", "aapp", "--team", "red"]);
    s.ok(&["domains", "add", "aapp", "shop.example.test"]);
    s.ok(&["apps", "create", "bapp"]);
    let url = push_url(&s, "bapp");
    let repo = Repo::new();
    let apps_domain = "localhost";
    for domain in [
        "www.shop.example.test".to_string(),
        "example.test".to_string(),
        format!("login.aapp.{apps_domain}"),
    ] {
        repo.commit(
            &[
                ("Dockerfile", "FROM scratch\n"),
                ("escale.toml", &format!("domains = [\"{domain}\"]\n")),
            ],
            &domain,
        );
        let (ok, out) = repo.push(&url, "main");
        assert!(!ok, "{domain}: the push fails: {out}");
        assert!(out.contains("remote rejected"), "{domain}: {out}");
        assert!(
            out.contains(&domain),
            "{domain}: the domain is named: {out}"
        );
        assert!(
            !out.contains("`red`"),
            "{domain}: the team is not named: {out}"
        );
        assert!(
            !out.contains("-----> Building"),
            "{domain}: nothing built: {out}"
        );
    }
    assert!(releases(&s, "bapp").is_empty(), "no release");
    let domains = s.json(&["domains", "list", "bapp"]);
    assert_eq!(domains, serde_json::json!([]), "no domain was added");
}
