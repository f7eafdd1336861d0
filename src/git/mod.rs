//! Deploy by `git push`: git's smart HTTP protocol on the API listener, one bare repository
//! per app under `data_dir/git/apps/<app uid>.git` (keyed by the app's never-reused uid, removed
//! when the app is destroyed, see [`crate::cleanup`]), and a build-and-deploy of the deploy branch after
//! every push that moves it.
//!
//! Routes (outside `/api/v1`, merged into [`crate::api::router`]):
//! - `GET /git/{app}.git/info/refs?service=git-receive-pack`: ref advertisement;
//! - `POST /git/{app}.git/git-receive-pack`: the push itself.
//!
//! Clone and fetch (`git-upload-pack`) are refused with a message: the repository is a deploy
//! target, not a source host.
//!
//! Policy:
//! - Authentication is HTTP Basic with an API token as password (any user name); a request
//!   without valid credentials gets 401 with `WWW-Authenticate: Basic`, so git asks for them.
//!   An app the caller cannot see is 404, as in the API.
//! - Only the deploy branch (`git.deploy_branch`, default `main`) deploys. Pushes to other branches and tags are stored, not deployed,
//!   and the pusher is told so; deleting the deploy branch stops nothing.
//! - Ref names are restricted to letters, digits, `.`, `_`, `-` and `/` (see [`valid_ref`]);
//!   a push naming anything else is rejected as a whole before git sees it.
//! - One deploying push per app at a time: a second push to the deploy branch while one is
//!   building or rolling out is rejected with a message saying so.
//! - When the build or the rollout fails, the deploy branch is put back where it was, so the
//!   repository's branch always names what serves (or was last tried and kept), the push fails
//!   (`! [remote rejected] main -> main (reason)`), and pushing the same commit again retries.
//!
//! Invariants: user input never reaches a shell. Git runs through
//! [`tokio::process::Command`] with argv arrays; the only user-derived arguments are the
//! repository path (from a validated app name) and object ids (checked to be hex); ref names
//! travel to git on standard input and are validated anyway.

pub(crate) mod deploy;
pub(crate) mod http;
pub mod pkt;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

pub use http::router;

/// Largest request body of one push.
pub const MAX_PUSH_BYTES: u64 = 512 << 20;
/// The all-zero object id (SHA-1): "no object".
pub const ZERO_OID: &str = "0000000000000000000000000000000000000000";

/// What can go wrong serving git or deploying a push.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git protocol error: {0}")]
    Protocol(String),
    #[error("running git {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("git {what} failed: {stderr}")]
    Git { what: &'static str, stderr: String },
    #[error("{0}")]
    Rejected(String),
    #[error("build failed: {0}")]
    Build(String),
    #[error("{0}")]
    Deploy(String),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("git I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Serialises creating and removing repositories (in this process; one server per data dir).
static REPOS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The bare repository of the app with uid `uid`: `data_dir/git/apps/<uid>.git`. Keyed by the
/// app's uid, never reused, so an app created later under a destroyed app's name starts with
/// an empty repository whatever happened to the old one.
pub fn repo_path(data_dir: &Path, uid: &str) -> PathBuf {
    repos_dir(data_dir).join(format!("{uid}.git"))
}

fn repos_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("git").join("apps")
}

/// An app uid as the registry makes them: 32 lowercase hex digits.
fn valid_uid(uid: &str) -> bool {
    uid.len() == 32
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Makes the existing repositories (`data_dir/git/apps/<uid>.git`) keep what git writes later
/// owner-only (`core.sharedRepository = 0600`, as new ones get from `git init --shared=0600`);
/// for installs made before that rule. Best effort: a failure is logged, start-up goes on (the
/// data dir itself is 0700).
pub fn make_repos_private(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(repos_dir(data_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "git") || !path.join("config").is_file() {
            continue;
        }
        let mut git_dir = std::ffi::OsString::from("--git-dir=");
        git_dir.push(path.as_os_str());
        let out = std::process::Command::new("git")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .arg(git_dir)
            .args(["config", "--", "core.sharedRepository", "0600"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(repo = %path.display(),
                "cannot make the repository owner-only: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => tracing::warn!(repo = %path.display(), "cannot run git: {e}"),
        }
    }
}

pub use crate::validate::git_ref as valid_ref;

/// An object id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
pub fn valid_oid(o: &str) -> bool {
    (o.len() == 40 || o.len() == 64)
        && o.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_zero(oid: &str) -> bool {
    oid.bytes().all(|b| b == b'0')
}

/// One ref update of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

impl RefUpdate {
    pub fn is_delete(&self) -> bool {
        is_zero(&self.new)
    }
}

/// The command section of a receive-pack request: ref updates and the client's capabilities.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PushCommands {
    pub updates: Vec<RefUpdate>,
    pub capabilities: Vec<String>,
}

impl PushCommands {
    pub fn has(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }

    /// Parses the packets up to the first flush. Ref names that escale refuses are kept (the
    /// caller rejects them with a message); lines that are not ref updates are an error.
    pub fn parse(pkts: &[pkt::Pkt]) -> Result<PushCommands, GitError> {
        let mut out = PushCommands::default();
        for p in pkts {
            let data = match p {
                pkt::Pkt::Data(d) => d,
                pkt::Pkt::Flush => break,
                pkt::Pkt::Special(_) => {
                    return Err(GitError::Protocol("unexpected delimiter packet".into()))
                }
            };
            let line = data.strip_suffix(b"\n").unwrap_or(data);
            let (cmd, caps) = match line.iter().position(|b| *b == 0) {
                Some(i) => (&line[..i], Some(&line[i + 1..])),
                None => (line, None),
            };
            let cmd = std::str::from_utf8(cmd)
                .map_err(|_| GitError::Protocol("ref update is not UTF-8".into()))?;
            if cmd.starts_with("shallow ") {
                continue;
            }
            let mut parts = cmd.splitn(3, ' ');
            let (old, new, name) = match (parts.next(), parts.next(), parts.next()) {
                (Some(o), Some(n), Some(r)) if valid_oid(o) && valid_oid(n) => (o, n, r),
                _ => {
                    return Err(GitError::Protocol(
                        "unsupported request (signed pushes are not supported)".into(),
                    ))
                }
            };
            if let Some(caps) = caps {
                out.capabilities = String::from_utf8_lossy(caps)
                    .split(' ')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            out.updates.push(RefUpdate {
                old: old.into(),
                new: new.into(),
                name: name.into(),
            });
        }
        Ok(out)
    }
}

/// A receive-pack status report (`report-status` or `report-status-v2`), as its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<String>,
}

impl Report {
    /// Parses the report's packets (up to its flush).
    pub fn parse(bytes: &[u8]) -> Result<Report, GitError> {
        let mut lines = Vec::new();
        for p in pkt::parse_all(bytes)? {
            match p {
                pkt::Pkt::Data(d) => lines.push(
                    String::from_utf8_lossy(d.strip_suffix(b"\n").unwrap_or(&d)).into_owned(),
                ),
                _ => break,
            }
        }
        Ok(Report { lines })
    }

    /// A report for a push rejected before git ran: every ref `ng` with `reason`.
    pub fn rejected(updates: &[RefUpdate], reason: &str) -> Report {
        let mut lines = vec!["unpack ok".to_string()];
        for u in updates {
            lines.push(format!("ng {} {}", u.name, one_line(reason)));
        }
        Report { lines }
    }

    /// Whether git reported `ok` for `name`.
    pub fn ok(&self, name: &str) -> bool {
        self.lines.iter().any(|l| l == &format!("ok {name}"))
    }

    /// Turns the `ok` of `name` into `ng` with `reason`.
    pub fn fail(&mut self, name: &str, reason: &str) {
        let ok = format!("ok {name}");
        for l in &mut self.lines {
            if *l == ok {
                *l = format!("ng {name} {}", one_line(reason));
            }
        }
    }

    /// The report as packets, with its flush.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for l in &self.lines {
            let mut line = l.clone().into_bytes();
            line.truncate(pkt::MAX_PKT - 100);
            line.push(b'\n');
            out.extend_from_slice(&pkt::encode(&line));
        }
        out.extend_from_slice(pkt::FLUSH);
        out
    }
}

/// `s` on one line, printable, at most 1000 bytes: for `ng` reasons.
pub fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if out.len() > 1000 {
        let mut cut = 1000;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// A `git` command with a clean environment: no system or global config, no prompts.
pub(crate) fn git() -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Starts a git command on `repo` whose stdout is read as a stream (stderr dropped): for
/// output too large to hold, read as it comes. Killed when the child is dropped.
pub(crate) fn spawn_git_stdout(
    what: &'static str,
    repo: &Path,
    args: &[&str],
) -> Result<tokio::process::Child, GitError> {
    git()
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| GitError::Spawn { what, source })
}

/// Runs a git command to completion; its stdout, or its stderr as the error.
pub(crate) async fn run_git(
    what: &'static str,
    repo: &Path,
    args: &[&str],
) -> Result<Vec<u8>, GitError> {
    let out = git()
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .output()
        .await
        .map_err(|source| GitError::Spawn { what, source })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(GitError::Git {
            what,
            stderr: one_line(&String::from_utf8_lossy(&out.stderr)),
        })
    }
}

/// Creates the bare repository of `app` if it does not exist yet; returns its path.
pub async fn ensure_repo(
    data_dir: &Path,
    app: &crate::registry::AppRef,
) -> Result<PathBuf, GitError> {
    ensure_repo_of(data_dir, &app.uid).await
}

/// [`ensure_repo`] by app uid.
async fn ensure_repo_of(data_dir: &Path, uid: &str) -> Result<PathBuf, GitError> {
    if !valid_uid(uid) {
        return Err(GitError::Rejected(format!(
            "`{}` is not an app uid",
            crate::validate::printable(uid)
        )));
    }
    let path = repo_path(data_dir, uid);
    if path.join("HEAD").exists() {
        return Ok(path);
    }
    let _g = REPOS.lock().await;
    if path.join("HEAD").exists() {
        return Ok(path);
    }
    let parent = path.parent().expect("repo path has a parent");
    let mut dirs = tokio::fs::DirBuilder::new();
    dirs.recursive(true);
    #[cfg(unix)]
    dirs.mode(0o700);
    dirs.create(parent).await?;
    // Built under a temporary name and renamed, so a crash never leaves half a repository.
    let tmp = parent.join(format!(".{uid}.git.tmp"));
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    let out = git()
        // Owner-only, like everything in the data dir: git keeps files 0600, directories
        // 0700, also for what later pushes and fetches write (`core.sharedRepository`).
        .args([
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            "--shared=0600",
            "--",
        ])
        .arg(&tmp)
        .output()
        .await
        .map_err(|source| GitError::Spawn {
            what: "init",
            source,
        })?;
    if !out.status.success() {
        return Err(GitError::Git {
            what: "init",
            stderr: one_line(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    // Pushes only: no hooks, objects checked on receipt, no rewinding history by accident.
    for (k, v) in [
        ("core.hooksPath", "/dev/null"),
        ("receive.fsckObjects", "true"),
        ("receive.denyDeletes", "false"),
        ("gc.auto", "0"),
    ] {
        run_git("config", &tmp, &["config", "--", k, v]).await?;
    }
    tokio::fs::rename(&tmp, &path).await?;
    Ok(path)
}

/// Removes the repository of the app with uid `uid` (a destroyed app). Absent is success. A
/// repository that cannot be removed now is removed by the next [`collect_repos`].
pub async fn remove_repo(data_dir: &Path, uid: &str) -> std::io::Result<()> {
    if !valid_uid(uid) {
        return Ok(());
    }
    let _g = REPOS.lock().await;
    let dir = repos_dir(data_dir);
    for p in [
        dir.join(format!("{uid}.git")),
        dir.join(format!(".{uid}.git.tmp")),
    ] {
        match tokio::fs::remove_dir_all(&p).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes every repository under `data_dir/git` that belongs to no app in `live` (uids):
/// the leftovers of destroyed apps whose removal failed, and the name-keyed repositories of
/// escale versions before uids (`git/<app>.git`, which an app created under a destroyed app's
/// name would otherwise inherit; escale serves no fetch, so they hold nothing a push cannot
/// send again). Returns how many were removed; the first error, if any, after trying all.
pub async fn collect_repos(
    data_dir: &Path,
    live: &HashSet<String>,
) -> Result<usize, std::io::Error> {
    // Under the init lock: no repository is being created while we decide.
    let _g = REPOS.lock().await;
    let mut doomed = Vec::new();
    for (dir, by_uid) in [(data_dir.join("git"), false), (repos_dir(data_dir), true)] {
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        while let Some(e) = entries.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if !by_uid {
                // Legacy `<app>.git` and `.<app>.git.tmp`; `apps/` is the uid-keyed store.
                if name.ends_with(".git") || name.ends_with(".git.tmp") {
                    doomed.push(e.path());
                }
                continue;
            }
            let uid = name
                .trim_start_matches('.')
                .trim_end_matches(".tmp")
                .trim_end_matches(".git");
            if !live.contains(uid) {
                doomed.push(e.path());
            }
        }
    }
    let mut first_err = None;
    let mut removed = 0;
    for p in doomed {
        match tokio::fs::remove_dir_all(&p).await {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove the git repository of a destroyed app; retrying at the next collection");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_restricted() {
        for ok in [
            "refs/heads/main",
            "refs/heads/feature/x-1",
            "refs/tags/v1.2.3",
            "refs/heads/a_b",
        ] {
            assert!(valid_ref(ok), "{ok}");
        }
        for bad in [
            "refs/heads/$(id)",
            "refs/heads/`id`",
            "refs/heads/a;b",
            "refs/heads/a\nb",
            "refs/heads/-x",
            "refs/heads/../x",
            "refs/heads/a..b",
            "refs/heads/.hidden",
            "refs/heads/x.lock",
            "refs/heads/",
            "refs/heads//x",
            "refs/notes/x",
            "HEAD",
            "refs/heads/a b",
            "refs/heads/ü",
        ] {
            assert!(!valid_ref(bad), "{bad:?}");
        }
    }

    #[test]
    fn oids_are_hex() {
        assert!(valid_oid(ZERO_OID));
        assert!(valid_oid(&"a".repeat(64)));
        assert!(!valid_oid(&"A".repeat(40)));
        assert!(!valid_oid(
            "-0000000000000000000000000000000000000000"[..40].as_ref()
        ));
        assert!(!valid_oid("abc"));
    }

    #[test]
    fn commands_parse_with_capabilities() {
        let a = "1".repeat(40);
        let b = "2".repeat(40);
        let first =
            format!("{ZERO_OID} {a} refs/heads/main\0report-status side-band-64k agent=git/2\n");
        let second = format!("{a} {b} refs/tags/v1\n");
        let pkts = vec![
            pkt::Pkt::Data(first.into_bytes()),
            pkt::Pkt::Data(second.into_bytes()),
            pkt::Pkt::Flush,
        ];
        let c = PushCommands::parse(&pkts).unwrap();
        assert!(c.has("side-band-64k") && c.has("report-status"));
        assert_eq!(c.updates.len(), 2);
        assert_eq!(c.updates[0].name, "refs/heads/main");
        assert_eq!(c.updates[1].old, a);
        assert!(!c.updates[0].is_delete());
        let bad = vec![pkt::Pkt::Data(b"push-cert\0caps\n".to_vec())];
        assert!(PushCommands::parse(&bad).is_err());
    }

    #[test]
    fn reports_are_rewritten() {
        let mut bytes = pkt::encode(b"unpack ok\n");
        bytes.extend(pkt::encode(b"ok refs/heads/main\n"));
        bytes.extend(pkt::encode(b"ok refs/heads/dev\n"));
        bytes.extend_from_slice(pkt::FLUSH);
        let mut r = Report::parse(&bytes).unwrap();
        assert!(r.ok("refs/heads/main"));
        r.fail("refs/heads/main", "build failed:\nstep 2\n");
        assert!(!r.ok("refs/heads/main"));
        assert!(r.ok("refs/heads/dev"));
        let again = Report::parse(&r.encode()).unwrap();
        assert_eq!(again.lines[1], "ng refs/heads/main build failed: step 2");
    }

    #[tokio::test]
    async fn a_repository_is_created_once_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "0123456789abcdef0123456789abcdef";
        let p = ensure_repo_of(dir.path(), uid).await.unwrap();
        assert!(p.join("HEAD").exists());
        assert_eq!(ensure_repo_of(dir.path(), uid).await.unwrap(), p);
        for bad in [
            "../x",
            "-x",
            "$(id)",
            "a;b",
            "a\nb",
            "`id`",
            "shop",
            &uid.to_uppercase(),
        ] {
            assert!(ensure_repo_of(dir.path(), bad).await.is_err(), "{bad}");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path().join("git/apps"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(format!("{uid}.git"))]);
    }

    #[tokio::test]
    async fn repositories_of_destroyed_apps_and_legacy_ones_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let live = "0123456789abcdef0123456789abcdef";
        let dead = "fedcba9876543210fedcba9876543210";
        let kept = ensure_repo_of(dir.path(), live).await.unwrap();
        let gone = ensure_repo_of(dir.path(), dead).await.unwrap();
        // A repository of an escale before uids, keyed by app name.
        let legacy = dir.path().join("git/shop.git");
        std::fs::create_dir_all(legacy.join("refs")).unwrap();
        let uids = HashSet::from([live.to_string()]);
        assert_eq!(collect_repos(dir.path(), &uids).await.unwrap(), 2);
        assert!(kept.join("HEAD").exists());
        assert!(!gone.exists() && !legacy.exists());
        remove_repo(dir.path(), live).await.unwrap();
        assert!(!kept.exists());
        remove_repo(dir.path(), live).await.unwrap();
    }
}
