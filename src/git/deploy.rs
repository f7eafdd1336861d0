//! Build and deploy one pushed commit: archive it, build its `Dockerfile` on a node, create a
//! release with the build log, and follow the rollout until the release is active or failed,
//! telling the pusher as it goes.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::http::Progress;
use super::{run_git, GitError, RefUpdate};
use crate::manifest::{Checks, Located, Manifest, ManifestError};
use crate::registry::{Actor, AppRef};
use crate::service::{DeployGuard, Services};

/// Largest build log kept with a release; the tail is kept.
const MAX_BUILD_LOG: usize = 256 * 1024;

/// The manifest file read from the root of a pushed commit.
pub const MANIFEST_FILE: &str = "escale.toml";
/// Largest manifest read from a commit.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest Dockerfile read from a commit.
const MAX_DOCKERFILE_BYTES: u64 = 1 << 20;
/// Largest commit object whose subject is read for the release description.
const MAX_COMMIT_BYTES: u64 = 1 << 20;

/// The size of object `spec` (`<commit>:<path>`, or a commit), or `None` when it does not
/// exist: from the object's header, without inflating it.
async fn object_size(repo: &Path, spec: &str) -> Option<u64> {
    let out = run_git("cat-file", repo, &["cat-file", "-s", spec])
        .await
        .ok()?;
    String::from_utf8_lossy(&out).trim().parse().ok()
}

/// The summed size of the files of commit `sha` (`git ls-tree -r -l`, read as it comes);
/// stops counting past `max`.
async fn tree_size(repo: &Path, sha: &str, max: u64) -> Result<u64, GitError> {
    use tokio::io::AsyncBufReadExt;
    let mut child = super::spawn_git_stdout(
        "ls-tree",
        repo,
        &["ls-tree", "-r", "-l", "-z", "--full-tree", sha, "--"],
    )?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut total = 0u64;
    let mut entry = Vec::new();
    loop {
        entry.clear();
        // One entry: `<mode> <type> <object> <size>\t<path>\0`; paths are capped by git.
        let n = tokio::io::AsyncReadExt::take(&mut lines, 64 * 1024)
            .read_until(0, &mut entry)
            .await?;
        if n == 0 {
            break;
        }
        let meta = entry.split(|b| *b == b'\t').next().unwrap_or_default();
        let size = String::from_utf8_lossy(meta)
            .split_ascii_whitespace()
            .nth(3)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        // Each file also costs a tar header.
        total = total.saturating_add(size).saturating_add(512);
        if total > max {
            let _ = child.start_kill();
            break;
        }
    }
    let status = child.wait().await?;
    if total <= max && !status.success() {
        return Err(GitError::Git {
            what: "ls-tree",
            stderr: format!("listing the files of {sha} failed ({status})"),
        });
    }
    Ok(total)
}

fn too_big(short: &str, size: u64, max: u64) -> GitError {
    GitError::Rejected(format!(
        "the source of {short} is over {} MiB ({} MiB or more); a build context may be at most {} MiB (the server's `git.max_context_size`): leave large files out of the repository, or ask the operator to raise it",
        max >> 20,
        size.div_ceil(1 << 20),
        max >> 20
    ))
}

/// `stream`, ended with an error once more than `max` bytes went through (`over` is set).
fn capped(
    stream: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    max: u64,
    over: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use futures_util::StreamExt;
    let mut sent = 0u64;
    stream.map(move |chunk| {
        let chunk = chunk?;
        sent += chunk.len() as u64;
        if sent > max {
            over.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::other("the build context is over the limit"));
        }
        Ok(chunk)
    })
}

/// Checks one image a Dockerfile builds on (see [`crate::images`]): named by reference, this
/// app's to use, and pulled when missing. A missing image, and one escale built for another
/// app, get the same answer. With `triggers`, the `ONBUILD` instructions of a base image
/// (which run in this build) are checked too.
async fn check_base(
    node: &crate::node::Node,
    used: &crate::images::Used,
    app_uid: &str,
    triggers: bool,
) -> Result<(), GitError> {
    use crate::images::{builder, may_use, referenced_by, refuse_id};
    let what = format!(
        "{} {} (Dockerfile line {})",
        used.instruction, used.image, used.line
    );
    refuse_id(&used.image).map_err(|e| GitError::Rejected(format!("{what}: {e}")))?;
    let missing = || {
        GitError::Rejected(format!(
            "{what}: no node has image `{}` and it could not be pulled (check its name and tag, and that the nodes can reach its registry)",
            used.image
        ))
    };
    let engine = |e: crate::node::NodeError| GitError::Deploy(e.to_string());
    let mut facts = node.image_facts(&used.image).await.map_err(engine)?;
    if !facts
        .as_ref()
        .is_some_and(|f| referenced_by(&used.image, &f.repo_tags, &f.repo_digests))
    {
        // Absent under that name: pulled now, as the builder would.
        if let Err(e) = node.ensure_image(&used.image).await {
            tracing::info!(image = %used.image, error = %e, "build base cannot be had");
            return Err(missing());
        }
        facts = node.image_facts(&used.image).await.map_err(engine)?;
    }
    let Some(f) = facts.filter(|f| referenced_by(&used.image, &f.repo_tags, &f.repo_digests))
    else {
        return Err(missing());
    };
    if !may_use(&builder(&f.labels), app_uid) {
        tracing::info!(image = %used.image, "build refused: base image built by escale for another app");
        return Err(missing());
    }
    if triggers && !f.on_build.is_empty() {
        let text = f.on_build.join("\n");
        let inner = crate::images::dockerfile_images(&text, &[])
            .map_err(|e| GitError::Rejected(format!("{what}: its ONBUILD instructions: {e}")))?;
        for i in &inner {
            Box::pin(check_base(node, i, app_uid, false)).await?;
        }
    }
    Ok(())
}

/// One deploy of a push.
pub(crate) struct Job<'a> {
    pub services: &'a Services,
    /// The app's deploy lock, held by the caller from before the build to the rollout's end.
    pub guard: &'a DeployGuard,
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
            .services
            .scheduler
            .as_ref()
            .ok_or_else(|| GitError::Deploy("this server runs no scheduler".into()))?;

        let git_settings = &self.services.config.git;
        let dockerfile = git_settings.dockerfile.as_str();
        let max_context = git_settings.max_context_size;
        let Some(dockerfile_size) = object_size(self.repo, &format!("{sha}:{dockerfile}")).await
        else {
            return Err(GitError::Rejected(format!(
                "commit {short} has no `{dockerfile}` in the repository: escale builds every push to `{}` with it (e.g. `FROM nginx:alpine` and `COPY . /usr/share/nginx/html`; the path is the server's `git.dockerfile` setting); commit one and push again",
                git_settings.deploy_branch
            )));
        };
        if dockerfile_size > MAX_DOCKERFILE_BYTES {
            return Err(GitError::Rejected(format!(
                "`{dockerfile}` is {} KiB; a Dockerfile may be at most {} KiB",
                dockerfile_size / 1024,
                MAX_DOCKERFILE_BYTES / 1024
            )));
        }
        let manifest = self.manifest(sha).await?;
        // The subject of a commit whose message alone is huge is not worth reading.
        let subject = match object_size(self.repo, sha).await {
            Some(n) if n <= MAX_COMMIT_BYTES => run_git(
                "log",
                self.repo,
                &["log", "-1", "--no-show-signature", "--format=%s", sha, "--"],
            )
            .await
            .map(|o| super::one_line(&String::from_utf8_lossy(&o)))
            .unwrap_or_default(),
            _ => String::new(),
        };
        // The size of the source, from the tree alone: nothing is inflated to learn it.
        let source_size = tree_size(self.repo, sha, max_context).await?;
        if source_size > max_context {
            return Err(too_big(short, source_size, max_context));
        }

        let next = self
            .services
            .registry
            .next_release_version(self.app.id)
            .await?;
        let tag = format!("{}:v{next}-{short}", self.app.name);
        let node = sched
            .build_node()
            .ok_or_else(|| GitError::Deploy("no node is ready to build on".into()))?;
        let node = &node;
        crate::service::upkeep::check_build_disk(node, &self.services.config.upkeep)
            .await
            .map_err(|e| GitError::Rejected(e.to_string()))?;
        // Non-secret config vars are build args (a Dockerfile takes one with `ARG NAME`);
        // secrets are not: build args are visible in the image's history.
        let build_args: Vec<(String, String)> = self
            .services
            .registry
            .config_rows(self.app.id)
            .await?
            .into_iter()
            .filter(|(_, _, secret)| !secret)
            .map(|(k, v, _)| (k, v))
            .collect();
        // The images the Dockerfile builds on must be this app's to use (see crate::images).
        let text = run_git(
            "cat-file",
            self.repo,
            &["cat-file", "blob", &format!("{sha}:{dockerfile}")],
        )
        .await?;
        let text = String::from_utf8_lossy(&text);
        let used = crate::images::dockerfile_images(&text, &build_args)
            .map_err(|e| GitError::Rejected(format!("`{dockerfile}`: {e}")))?;
        for u in &used {
            check_base(node, u, &self.app.uid, true).await?;
        }
        say(&format!(
            "-----> Building {short} ({} KiB) as {tag} on node `{}`",
            source_size / 1024,
            node.name
        ));
        let installation = self.services.registry.installation_id().to_string();
        let labels = vec![
            (
                crate::node::LABEL_INSTALLATION.to_string(),
                installation.clone(),
            ),
            (crate::node::LABEL_APP.to_string(), self.app.name.clone()),
            (
                crate::images::LABEL_BUILT_FOR.to_string(),
                self.app.uid.clone(),
            ),
            (crate::images::LABEL_GIT_COMMIT.to_string(), sha.to_string()),
        ];
        // The build reuses cached layers of this app's own images only: the classic builder's
        // local cache would hand another app's RUN layer (and what it fetched or wrote) to any
        // build with the same parent and command. No image of its own yet: no cache.
        let cache_from = node
            .list_labelled_images(&[
                format!("{}={installation}", crate::node::LABEL_INSTALLATION),
                crate::images::built_for_label(&self.app.uid),
            ])
            .await
            .map_err(|e| GitError::Deploy(e.to_string()))?;
        let spec = crate::node::BuildSpec {
            dockerfile: dockerfile.to_string(),
            tag: tag.clone(),
            build_args,
            labels,
            cache_from,
        };
        let mut archive = super::spawn_git_stdout(
            "archive",
            self.repo,
            &["archive", "--format=tar", sha, "--"],
        )?;
        let stdout = archive.stdout.take().expect("piped stdout");
        let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let context = capped(
            tokio_util::io::ReaderStream::with_capacity(stdout, 64 * 1024),
            max_context,
            over.clone(),
        );
        let started = std::time::Instant::now();
        let mut log = String::new();
        let built = node
            .build_image_stream(&spec, context, |line| {
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
            })
            .await;
        let _ = archive.start_kill();
        let _ = archive.wait().await;
        if over.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = node.remove_image(&tag).await;
            return Err(too_big(short, max_context + 1, max_context));
        }
        let image_id = match built {
            Ok(id) => id,
            Err(e) => {
                return Err(GitError::Build(match e {
                    crate::node::NodeError::BuildFailed { reason, .. } => reason,
                    other => other.to_string(),
                }))
            }
        };
        // Second line of defence: nothing the build stands on was built for another app.
        let ancestors = node
            .image_ancestors(&image_id)
            .await
            .map_err(|e| GitError::Deploy(e.to_string()))?;
        if ancestors
            .iter()
            .any(|a| !crate::images::may_use(&crate::images::builder(&a.labels), &self.app.uid))
        {
            tracing::warn!(app = %self.app.name, image = %tag, "built image stands on an image built for another app; removed");
            if let Err(e) = node.remove_image(&tag).await {
                tracing::warn!(image = %tag, error = %e, "cannot remove a refused build");
            }
            return Err(GitError::Rejected(
                "the build used an image this app may not use (only images escale built for this app, or images not built by escale); nothing was released".into(),
            ));
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
        let push = crate::service::PushRelease {
            image: &tag,
            source: &format!("git {short}"),
            description: &description,
            build_log: &log,
            manifest: manifest.as_ref(),
        };
        let (applied, v) = self
            .services
            .release_push(self.guard, self.actor, self.app, &push)
            .await
            .map_err(|e| GitError::Deploy(format!("{e}; nothing was released")))?;
        if let Some(out) = applied {
            if out.changes.is_empty() {
                say("-----> escale.toml: the app already matches it");
            } else {
                say("-----> escale.toml applied:");
                for c in &out.changes {
                    say(&format!("       {c}"));
                }
            }
        }
        say(&format!("-----> Releasing v{v}: rolling out"));
        self.follow(v).await?;
        say(&format!("-----> v{v} is serving"));
        self.prune_images().await;
        Ok(v)
    }

    /// Removes, on every node, the images escale built for this app that belong to none of
    /// its last `scheduler.keep_releases` releases and that no container of the installation
    /// uses ([`crate::service::upkeep::prune`], with the deploy lock this deploy holds).
    /// Failures are logged, never fatal: the deploy has succeeded.
    async fn prune_images(&self) {
        use crate::service::upkeep::{prune, PruneScope};
        let keep_n = self.services.config.scheduler.keep_releases;
        match prune(self.services, PruneScope::Held(self.app)).await {
            Ok(pruned) => {
                let removed: u32 = pruned.nodes.values().map(|(n, _)| n).sum();
                if removed > 0 {
                    self.progress.say(&format!(
                        "-----> Removed {removed} old image(s) (keeping the last {keep_n} releases')"
                    ));
                }
            }
            Err(e) => {
                tracing::warn!(app = %self.app.name, error = %e, "image pruning skipped")
            }
        }
    }

    /// The commit's `escale.toml`, parsed and checked as the API checks it; `None` when the
    /// commit has none at its root. An invalid manifest rejects the push, naming where.
    async fn manifest(&self, sha: &str) -> Result<Option<Manifest>, GitError> {
        let spec = format!("{sha}:{MANIFEST_FILE}");
        // The size comes from the object's header: a small pack can inflate to gigabytes.
        let Some(size) = object_size(self.repo, &spec).await else {
            return Ok(None);
        };
        if size > MAX_MANIFEST_BYTES {
            return Err(GitError::Rejected(format!(
                "{MANIFEST_FILE} is {} KiB; a manifest may be at most {} KiB",
                size / 1024,
                MAX_MANIFEST_BYTES / 1024
            )));
        }
        let bytes = run_git("cat-file", self.repo, &["cat-file", "blob", &spec]).await?;
        let text = String::from_utf8(bytes)
            .map_err(|_| GitError::Rejected(format!("{MANIFEST_FILE} is not UTF-8 text")))?;
        let checks = Checks {
            app: Some(&self.app.name),
            max_instances: Some(self.services.config.max_instances),
            apps_domain: Some(&self.services.config.apps_domain),
        };
        match Manifest::parse_with(&text, &checks) {
            Ok(m) => {
                // Domains other apps hold are refused now, before the build (applying the
                // manifest checks again).
                if let Some(domains) = &m.domains {
                    if let Err(e) = self
                        .services
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
        let limit = self.services.config.scheduler.deploy_timeout + Duration::from_secs(120);
        let say = |l: &str| self.progress.say(&format!("       {l}"));
        crate::service::follow(
            &self.services.registry,
            self.services.registry.bus(),
            self.app,
            v,
            limit,
            &say,
        )
        .await
        .map_err(|e| GitError::Deploy(e.to_string()))
    }
}
