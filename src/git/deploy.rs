//! Build and deploy one pushed commit: archive it, build its `Dockerfile` on a node, create a
//! release with the build log, and follow the rollout until the release is active or failed,
//! telling the pusher as it goes.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::http::Progress;
use super::{run_git, GitError, RefUpdate, MAX_CONTEXT_BYTES};
use crate::api::AppState;
use crate::manifest::{Checks, Located, Manifest, ManifestError};
use crate::registry::{Actor, AppRef, ReleaseStatus};

/// Largest build log kept with a release; the tail is kept.
const MAX_BUILD_LOG: usize = 256 * 1024;

/// The manifest file read from the root of a pushed commit.
pub const MANIFEST_FILE: &str = "escale.toml";
/// Largest manifest read from a commit.
const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// One deploy of a push.
pub(crate) struct Job<'a> {
    pub state: &'a AppState,
    pub actor: &'a Actor,
    pub app: &'a AppRef,
    pub repo: &'a Path,
    pub update: &'a RefUpdate,
    pub progress: &'a Progress,
}

impl Job<'_> {
    /// Builds and rolls out; the new release's version, or why it did not go live.
    pub(crate) async fn run(&self) -> Result<u32, GitError> {
        let sha = self.update.new.as_str();
        debug_assert!(super::valid_oid(sha));
        let short = &sha[..7];
        let say = |l: &str| self.progress.say(l);
        let sched = self
            .state
            .scheduler
            .as_ref()
            .ok_or_else(|| GitError::Deploy("this server runs no scheduler".into()))?;

        let git_settings = &self.state.config.git;
        let dockerfile = git_settings.dockerfile.as_str();
        let object = format!("{sha}:{dockerfile}");
        if run_git("cat-file", self.repo, &["cat-file", "-e", &object])
            .await
            .is_err()
        {
            return Err(GitError::Rejected(format!(
                "commit {short} has no `{dockerfile}` in the repository: escale builds every push to `{}` with it (e.g. `FROM nginx:alpine` and `COPY . /usr/share/nginx/html`; the path is the server's `git.dockerfile` setting); commit one and push again",
                git_settings.deploy_branch
            )));
        }
        let manifest = self.manifest(sha).await?;
        let subject = run_git(
            "log",
            self.repo,
            &["log", "-1", "--no-show-signature", "--format=%s", sha, "--"],
        )
        .await
        .map(|o| super::one_line(&String::from_utf8_lossy(&o)))
        .unwrap_or_default();
        let context = run_git(
            "archive",
            self.repo,
            &["archive", "--format=tar", sha, "--"],
        )
        .await?;
        if context.len() > MAX_CONTEXT_BYTES {
            return Err(GitError::Rejected(format!(
                "the source of {short} is {} MiB; builds take at most {} MiB",
                context.len() >> 20,
                MAX_CONTEXT_BYTES >> 20
            )));
        }

        let next = self
            .state
            .registry
            .next_release_version(self.app.id)
            .await?;
        let tag = format!("{}:v{next}-{short}", self.app.name);
        let node = sched
            .nodes()
            .first()
            .ok_or_else(|| GitError::Deploy("no node to build on".into()))?;
        say(&format!(
            "-----> Building {short} ({} KiB) as {tag} on node `{}`",
            context.len() / 1024,
            node.name
        ));
        let labels = vec![
            (
                crate::node::LABEL_INSTALLATION.to_string(),
                self.state.registry.installation_id().to_string(),
            ),
            ("escale.app".to_string(), self.app.name.clone()),
            ("escale.git.commit".to_string(), sha.to_string()),
        ];
        // Non-secret config vars are build args (a Dockerfile takes one with `ARG NAME`);
        // secrets are not: build args are visible in the image's history.
        let build_args: Vec<(String, String)> = self
            .state
            .registry
            .config_rows(self.app.id)
            .await?
            .into_iter()
            .filter(|(_, _, secret)| !secret)
            .map(|(k, v, _)| (k, v))
            .collect();
        let started = std::time::Instant::now();
        let mut log = String::new();
        let built = node
            .build_image_with(
                dockerfile,
                Bytes::from(context),
                &tag,
                &build_args,
                &labels,
                |line| {
                    if !line.trim().is_empty() {
                        self.progress.say(&format!("       {line}"));
                    }
                    log.push_str(line);
                    log.push('\n');
                    if log.len() > MAX_BUILD_LOG * 2 {
                        let cut = log.len() - MAX_BUILD_LOG;
                        let cut = (cut..log.len())
                            .find(|i| log.is_char_boundary(*i))
                            .unwrap_or(log.len());
                        log.drain(..cut);
                    }
                },
            )
            .await;
        if let Err(e) = built {
            return Err(GitError::Build(match e {
                crate::node::NodeError::BuildFailed { reason, .. } => reason,
                other => other.to_string(),
            }));
        }
        say(&format!(
            "-----> Built {tag} in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        if log.len() > MAX_BUILD_LOG {
            let cut = log.len() - MAX_BUILD_LOG;
            let cut = (cut..log.len())
                .find(|i| log.is_char_boundary(*i))
                .unwrap_or(log.len());
            log.drain(..cut);
        }

        let description = if subject.is_empty() {
            format!("git push {short}")
        } else {
            let mut d = format!("git push {short}: {subject}");
            if d.len() > 400 {
                let mut cut = 400;
                while !d.is_char_boundary(cut) {
                    cut -= 1;
                }
                d.truncate(cut);
            }
            d
        };
        if let Some(m) = &manifest {
            let out = self
                .state
                .registry
                .apply_manifest(
                    self.actor,
                    &self.app.name,
                    m,
                    self.state.config.scheduler.default_port,
                )
                .await?;
            if out.changes.is_empty() {
                say("-----> escale.toml: the app already matches it");
            } else {
                say("-----> escale.toml applied:");
                for c in &out.changes {
                    say(&format!("       {c}"));
                }
                self.state.changed.notify_one();
            }
        }
        let v = self
            .state
            .registry
            .create_built_release(
                self.actor,
                &self.app.name,
                &tag,
                &format!("git {short}"),
                &description,
                &log,
            )
            .await?;
        self.state.changed.notify_one();
        say(&format!("-----> Releasing v{v}: rolling out"));
        self.follow(v).await?;
        say(&format!("-----> v{v} is serving"));
        self.prune_images().await;
        Ok(v)
    }

    /// Removes, on every node, the images escale built for this app that belong to none of
    /// its last `scheduler.keep_releases` releases and that no instance (live or not) of the
    /// installation uses. Failures are logged, never fatal: the deploy has succeeded.
    async fn prune_images(&self) {
        let Some(sched) = self.state.scheduler.as_ref() else {
            return;
        };
        let keep_n = self.state.config.scheduler.keep_releases as usize;
        let releases = match self
            .state
            .registry
            .releases(self.actor, &self.app.name)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(app = %self.app.name, error = %e, "image pruning: cannot list releases");
                return;
            }
        };
        // Newest first; any release still rolling out is among them.
        let mut keep: std::collections::HashSet<String> = releases
            .iter()
            .take(keep_n)
            .map(|r| r.image.clone())
            .collect();
        let installation = self.state.registry.installation_id().to_string();
        let labels = vec![
            format!("{}={installation}", crate::node::LABEL_INSTALLATION),
            format!("escale.app={}", self.app.name),
        ];
        // Never an image an instance uses, whatever its release, state or node: when a node
        // cannot be asked, nothing is pruned.
        for node in sched.nodes() {
            match node.list_instances(&installation).await {
                Ok(instances) => keep.extend(instances.into_iter().map(|i| i.image)),
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "image pruning skipped: cannot list instances");
                    return;
                }
            }
        }
        let mut removed = 0usize;
        for node in sched.nodes() {
            let images = match node.list_labelled_images(&labels).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "image pruning: cannot list images");
                    continue;
                }
            };
            for tag in images.iter().filter(|t| !keep.contains(*t)) {
                match node.remove_image(tag).await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::info!(node = %node.name, image = %tag, error = %e, "image pruning: not removed")
                    }
                }
            }
        }
        if removed > 0 {
            self.progress.say(&format!(
                "-----> Removed {removed} old image(s) (keeping the last {keep_n} releases')"
            ));
        }
    }

    /// The commit's `escale.toml`, parsed and checked as the API checks it; `None` when the
    /// commit has none at its root. An invalid manifest rejects the push, naming where.
    async fn manifest(&self, sha: &str) -> Result<Option<Manifest>, GitError> {
        let spec = format!("{sha}:{MANIFEST_FILE}");
        if run_git("cat-file", self.repo, &["cat-file", "-e", &spec])
            .await
            .is_err()
        {
            return Ok(None);
        }
        let bytes = run_git("show", self.repo, &["show", "--no-textconv", &spec, "--"]).await?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(GitError::Rejected(format!(
                "{MANIFEST_FILE} is {} KiB; a manifest may be at most {} KiB",
                bytes.len() / 1024,
                MAX_MANIFEST_BYTES / 1024
            )));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| GitError::Rejected(format!("{MANIFEST_FILE} is not UTF-8 text")))?;
        let checks = Checks {
            app: Some(&self.app.name),
            max_instances: Some(self.state.config.max_instances),
            apps_domain: Some(&self.state.config.apps_domain),
        };
        match Manifest::parse_with(&text, &checks) {
            Ok(m) => {
                // Domains other apps hold are refused now, before the build (applying the
                // manifest checks again).
                if let Some(domains) = &m.domains {
                    if let Err(e) = self
                        .state
                        .registry
                        .check_domains(self.actor, &self.app.name, domains)
                        .await
                    {
                        return Err(GitError::Rejected(format!(
                            "{MANIFEST_FILE}: {e}; nothing was changed"
                        )));
                    }
                }
                self.progress.say(&format!(
                    "-----> {MANIFEST_FILE} is valid; applied before the release"
                ));
                Ok(Some(m))
            }
            Err(e) => {
                let problems: Vec<Located> = match e {
                    ManifestError::Syntax(l) => vec![l],
                    ManifestError::Invalid(v) => v,
                };
                for p in &problems {
                    self.progress.say(&format!("{MANIFEST_FILE}:{p}"));
                }
                Err(GitError::Rejected(format!(
                    "invalid {MANIFEST_FILE}: {MANIFEST_FILE}:{}; nothing was changed",
                    problems[0]
                )))
            }
        }
    }

    /// Waits for release `v` to become active or fail, reporting healthy instances.
    async fn follow(&self, v: u32) -> Result<(), GitError> {
        let limit = self.state.config.scheduler.deploy_timeout + Duration::from_secs(120);
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(sched) = &self.state.scheduler {
                let view = sched.view.load();
                let mine: Vec<_> = view
                    .instances
                    .iter()
                    .filter(|i| i.app == self.app.name && i.release == v && i.state != "exited")
                    .collect();
                let healthy = mine.iter().filter(|i| i.health == "healthy").count();
                let now = (healthy, mine.len());
                if now.1 > 0 && last != Some(now) {
                    self.progress.say(&format!(
                        "       {healthy} of {} new instance(s) healthy",
                        now.1
                    ));
                    last = Some(now);
                }
            }
            let r = self
                .state
                .registry
                .release_by_id(self.app.id, v)
                .await?
                .ok_or_else(|| GitError::Deploy(format!("release v{v} disappeared")))?;
            match r.status {
                ReleaseStatus::Active => return Ok(()),
                ReleaseStatus::Failed => {
                    return Err(GitError::Deploy(format!(
                        "rollout of v{v} failed: {}; the previous release keeps serving",
                        r.status_reason.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                ReleaseStatus::Superseded => {
                    return Err(GitError::Deploy(format!(
                        "v{v} was superseded by a newer release before it finished rolling out"
                    )))
                }
                ReleaseStatus::Deploying => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(GitError::Deploy(format!(
                    "v{v} did not finish rolling out within {}s; see `escale releases {}`",
                    limit.as_secs(),
                    self.app.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
