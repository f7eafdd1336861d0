//! Build and deploy one pushed commit: archive it, build its `Dockerfile` on a node, create a
//! release with the build log, and follow the rollout until the release is active or failed,
//! telling the pusher as it goes.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::http::Progress;
use super::{run_git, GitError, RefUpdate, MAX_CONTEXT_BYTES};
use crate::api::AppState;
use crate::registry::{Actor, AppRef, ReleaseStatus};

/// Largest build log kept with a release; the tail is kept.
const MAX_BUILD_LOG: usize = 256 * 1024;

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

        let dockerfile = format!("{sha}:Dockerfile");
        if run_git("cat-file", self.repo, &["cat-file", "-e", &dockerfile])
            .await
            .is_err()
        {
            return Err(GitError::Rejected(format!(
                "commit {short} has no `Dockerfile` at the root of the repository: escale builds every push to `main` with it (e.g. `FROM nginx:alpine` and `COPY . /usr/share/nginx/html`); commit one and push again"
            )));
        }
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
            ("escale.app".to_string(), self.app.name.clone()),
            ("escale.git.commit".to_string(), sha.to_string()),
        ];
        let started = std::time::Instant::now();
        let mut log = String::new();
        let built = node
            .build_image(Bytes::from(context), &tag, &[], &labels, |line| {
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
        Ok(v)
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
