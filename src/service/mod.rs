//! The service layer: the one path every surface (the API, `git push`, push webhooks, next the
//! dashboard) takes to change an app's releases. A surface parses and authenticates; the
//! service checks, serialises and writes.
//!
//! - **One deploy at a time per app** ([`AppLocks`]): an image deploy, a push, a webhook
//!   delivery, a rollback and a manifest apply each hold the app's deploy lock from their
//!   first check to their release (a push and a webhook: to the end of the rollout they
//!   follow). A second one is refused with a message naming the first (API, `git push`), or
//!   waits its turn in the lock's queue (webhook deliveries). Config and formation changes are
//!   single transactions and take no lock: scaling is never held up by a build.
//! - **One transaction per deploy**: a deploy's release and what comes with it (the `web`
//!   port of an image deploy, the manifest of a push) commit together or not at all, so
//!   "nothing was changed" is true when it is said.
//! - **Progress from the event bus** ([`follow`]): a rollout is followed by its events, never
//!   by polling.
//!
//! Depends on the registry, the scheduler and the event bus; never on a surface.

mod follow;
mod locks;
pub mod nodes;

use std::sync::Arc;

pub use follow::{follow, FollowError, Progress};
pub use locks::{AppLocks, Busy, DeployGuard, Queue};

use crate::config::Config;
use crate::registry::{Actor, AppRef, ManifestApplied, Registry, RegistryError, Release};
use crate::scheduler::{ImageError, Scheduler};

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Another deploy of the app holds its lock.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The image cannot be deployed; nothing was changed.
    #[error("cannot deploy `{image}`: {source}; nothing was changed")]
    Image {
        image: String,
        #[source]
        source: Box<ImageError>,
    },
    /// The input is refused; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("this server runs no scheduler, so it cannot deploy")]
    NoScheduler,
    /// The request conflicts with the current state; the message says what to do first.
    #[error("{0}")]
    Conflict(String),
    /// The cluster's certificate authority failed (ours, not the caller's).
    #[error("cluster CA: {0}")]
    Cluster(String),
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// How long a node may take to say what it has (a node that does not answer is left out).
const CAPACITY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the surfaces share; cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub registry: Registry,
    pub config: Arc<Config>,
    /// The scheduler, when this server runs one (API-only tests do not).
    pub scheduler: Option<Arc<Scheduler>>,
    /// One deploy at a time per app.
    pub locks: Arc<AppLocks>,
}

impl axum::extract::FromRef<Services> for Registry {
    fn from_ref(s: &Services) -> Registry {
        s.registry.clone()
    }
}

/// An image deploy.
#[derive(Debug, Clone)]
pub struct ImageDeploy {
    /// An image reference (checked by [`crate::validate::image_ref`] already).
    pub image: String,
    /// The `web` process's port, changed with the release when given.
    pub port: Option<u16>,
    pub description: String,
}

/// A built image released by a push.
pub struct PushRelease<'a> {
    pub image: &'a str,
    /// `git <short sha>`.
    pub source: &'a str,
    pub description: &'a str,
    pub build_log: &'a str,
    /// The pushed `escale.toml`, applied in the release's transaction.
    pub manifest: Option<&'a crate::manifest::Manifest>,
}

impl Services {
    pub fn new(
        registry: Registry,
        config: Arc<Config>,
        scheduler: Option<Arc<Scheduler>>,
    ) -> Services {
        Services {
            registry,
            config,
            scheduler,
            locks: Arc::new(AppLocks::default()),
        }
    }

    /// The scheduler, or why there is none.
    pub fn scheduler(&self) -> Result<&Arc<Scheduler>> {
        self.scheduler.as_ref().ok_or(ServiceError::NoScheduler)
    }

    /// Takes the deploy lock of `app` for `what` (`deploy nginx:1.27 by alice`), refusing at
    /// once when another deploy holds it.
    pub fn try_lock(&self, app: &AppRef, what: String) -> Result<DeployGuard, Busy> {
        self.locks.try_lock(app, what)
    }

    /// Waits for the deploy lock of `app` in its queue, at most `queue.limit`.
    pub async fn lock(
        &self,
        app: &AppRef,
        what: String,
        queue: Queue,
    ) -> Result<DeployGuard, Busy> {
        self.locks.lock(app, what, queue).await
    }

    /// Deploys an image: the image is checked on the nodes (it must exist or be pullable,
    /// and be this app's to use), then the release (and the `web` port, when given) is
    /// written in one transaction.
    pub async fn deploy_image(
        &self,
        actor: &Actor,
        app: &str,
        req: &ImageDeploy,
    ) -> Result<Release> {
        crate::images::refuse_id(&req.image).map_err(|e| {
            ServiceError::Invalid(format!(
                "cannot deploy `{}`: {e}; nothing was changed",
                req.image
            ))
        })?;
        let a = self.registry.app(actor, app).await?;
        let _guard = self.try_lock(
            &a,
            format!("an image deploy of `{}` by {}", req.image, actor.name),
        )?;
        if let Some(sched) = &self.scheduler {
            sched
                .check_image(&req.image, &a.uid)
                .await
                .map_err(|source| ServiceError::Image {
                    image: req.image.clone(),
                    source: Box::new(source),
                })?;
        }
        let v = self
            .registry
            .deploy_image(
                actor,
                &a,
                &req.image,
                &req.description,
                req.port.map(|p| (p, self.config.scheduler.default_port)),
            )
            .await?;
        Ok(self.registry.release(actor, app, v).await?)
    }

    /// Rolls `app` back to the image and config of `version`, as a new release.
    pub async fn rollback(&self, actor: &Actor, app: &str, version: u32) -> Result<Release> {
        let a = self.registry.app(actor, app).await?;
        let _guard = self.try_lock(&a, format!("a rollback to v{version} by {}", actor.name))?;
        let v = self.registry.rollback(actor, app, version).await?;
        Ok(self.registry.release(actor, app, v).await?)
    }

    /// Changes a process type (created if new). Declared CPUs and memory must fit at least one
    /// node: a process no node can run is refused, naming each node's capacity.
    pub async fn update_process(
        &self,
        actor: &Actor,
        app: &str,
        process: &str,
        patch: &crate::model::ProcessPatch,
    ) -> Result<crate::model::ProcessType> {
        self.registry.app(actor, app).await?;
        let (cpus, memory) = (patch.nano_cpus.flatten(), patch.memory_bytes.flatten());
        if cpus.is_some() || memory.is_some() {
            Self::check_fits(&self.capacities().await, process, cpus, memory)?;
        }
        Ok(self
            .registry
            .upsert_process(
                actor,
                app,
                process,
                patch,
                self.config.scheduler.default_port,
            )
            .await?)
    }

    /// What each node that answers within a few seconds has (none without a scheduler).
    async fn capacities(&self) -> Vec<(String, crate::node::Capacity)> {
        let Some(sched) = &self.scheduler else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in sched.docker_nodes() {
            let asked = tokio::time::timeout(CAPACITY_TIMEOUT, n.capacity()).await;
            if let Ok(Ok(c)) = asked {
                out.push((n.name.clone(), c));
            }
        }
        out
    }

    /// Refuses `cpus`/`memory` that none of `nodes` has (with no node to ask, nothing is
    /// refused).
    fn check_fits(
        nodes: &[(String, crate::node::Capacity)],
        process: &str,
        nano_cpus: Option<i64>,
        memory_bytes: Option<u64>,
    ) -> Result<()> {
        if nodes.is_empty() || (nano_cpus.is_none() && memory_bytes.is_none()) {
            return Ok(());
        }
        let fits = |c: &crate::node::Capacity| {
            nano_cpus.is_none_or(|n| n <= c.cpus as i64 * 1_000_000_000)
                && memory_bytes.is_none_or(|m| m <= c.memory_bytes)
        };
        if nodes.iter().any(|(_, c)| fits(c)) {
            return Ok(());
        }
        let seen: Vec<String> = nodes
            .iter()
            .map(|(name, c)| format!("{name}: {} CPU(s), {} MiB", c.cpus, c.memory_bytes >> 20))
            .collect();
        let asked = [
            nano_cpus.map(|n| format!("{} CPU(s)", n as f64 / 1e9)),
            memory_bytes.map(|m| format!("{} MiB", m >> 20)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ");
        Err(ServiceError::Invalid(format!(
            "no node can run `{process}` with {asked} ({}); ask for what a node has; nothing was changed",
            seen.join("; ")
        )))
    }

    /// [`Services::check_fits`] for every process of a manifest, asking the nodes once.
    async fn check_manifest_fits(&self, m: &crate::manifest::Manifest) -> Result<()> {
        if m.processes
            .values()
            .all(|p| p.nano_cpus.is_none() && p.memory_bytes.is_none())
        {
            return Ok(());
        }
        let nodes = self.capacities().await;
        for (name, p) in &m.processes {
            Self::check_fits(&nodes, name, p.nano_cpus, p.memory_bytes)?;
        }
        Ok(())
    }

    /// Makes `app` match a manifest, in one transaction (a release when its config changed).
    pub async fn apply_manifest(
        &self,
        actor: &Actor,
        app: &str,
        m: &crate::manifest::Manifest,
    ) -> Result<ManifestApplied> {
        let a = self.registry.app(actor, app).await?;
        self.check_manifest_fits(m).await?;
        let _guard = self.try_lock(&a, format!("a manifest apply by {}", actor.name))?;
        Ok(self
            .registry
            .apply_manifest(actor, app, m, self.config.scheduler.default_port)
            .await?)
    }

    /// Releases an image built from a push, with its manifest, in one transaction. The caller
    /// holds the app's deploy lock (`_guard`) from before its build.
    pub async fn release_push(
        &self,
        _guard: &DeployGuard,
        actor: &Actor,
        app: &AppRef,
        push: &PushRelease<'_>,
    ) -> Result<(Option<ManifestApplied>, u32)> {
        if let Some(m) = push.manifest {
            self.check_manifest_fits(m).await?;
        }
        Ok(self
            .registry
            .release_push(
                actor,
                app,
                push.manifest
                    .map(|m| (m, self.config.scheduler.default_port)),
                push.image,
                push.source,
                push.description,
                push.build_log,
            )
            .await?)
    }
}
