//! The service layer: the one path every surface (the API, `git push`, push webhooks, the
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

mod backups;
mod follow;
mod locks;
pub mod logs;
pub mod nodes;
pub mod stream;
pub mod upkeep;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use follow::{follow, FollowError, Progress};
pub use locks::{AppLocks, Busy, DeployGuard, Queue};

use crate::config::Config;
use crate::model::{ProcessPatch, ProcessType};
use crate::registry::{Actor, AppRef, ManifestApplied, Registry, RegistryError, Release};
use crate::scheduler::{placement, ImageError, Scheduler};

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
    /// A backup failed or was refused.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// The cluster's certificate authority failed (ours, not the caller's).
    #[error("cluster CA: {0}")]
    Cluster(String),
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// How long a node may take to say what it has (what the scheduler knows is used otherwise).
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
    /// Backups: one at a time, and what `/metrics` says of them.
    pub backups: Arc<crate::backup::BackupStatus>,
    /// What the nodes use, as the upkeep last measured it ([`upkeep::run`]).
    pub usage: Arc<upkeep::Usage>,
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
            backups: Arc::new(crate::backup::BackupStatus::default()),
            usage: Arc::new(upkeep::Usage::default()),
        }
    }

    /// The scheduler, or why there is none.
    pub fn scheduler(&self) -> Result<&Arc<Scheduler>> {
        self.scheduler.as_ref().ok_or(ServiceError::NoScheduler)
    }

    /// Takes the deploy lock of `app` for `what` (`deploy nginx:1.27 by alice`), refusing at
    /// once when another deploy holds it (waiting when escale's own pruning does).
    pub async fn try_lock(&self, app: &AppRef, what: String) -> Result<DeployGuard, Busy> {
        self.locks.try_lock(app, what).await
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
        let _guard = self
            .try_lock(
                &a,
                format!("an image deploy of `{}` by {}", req.image, actor.name),
            )
            .await?;
        let formation = self.registry.processes_of(a.id).await?;
        self.check_placement(&a.name, &formation).await?;
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
        let _guard = self
            .try_lock(&a, format!("a rollback to v{version} by {}", actor.name))
            .await?;
        let v = self.registry.rollback(actor, app, version).await?;
        Ok(self.registry.release(actor, app, v).await?)
    }

    /// Changes an existing process type (an unknown one is refused, naming those the app
    /// has). When the change touches what placement judges (CPUs, memory, constraints,
    /// overcommit), the app's whole formation with it must fit the nodes
    /// ([`Services::check_placement`]), else nothing is changed.
    pub async fn update_process(
        &self,
        actor: &Actor,
        app: &str,
        process: &str,
        patch: &ProcessPatch,
    ) -> Result<ProcessType> {
        self.change_process(actor, app, process, patch, false).await
    }

    /// Defines a process type, or changes it when it exists (`escale processes set`).
    pub async fn define_process(
        &self,
        actor: &Actor,
        app: &str,
        process: &str,
        patch: &ProcessPatch,
    ) -> Result<ProcessType> {
        self.change_process(actor, app, process, patch, true).await
    }

    /// Removes a process type; its instances stop at the next reconcile.
    pub async fn remove_process(&self, actor: &Actor, app: &str, process: &str) -> Result<()> {
        Ok(self.registry.remove_process(actor, app, process).await?)
    }

    async fn change_process(
        &self,
        actor: &Actor,
        app: &str,
        process: &str,
        patch: &ProcessPatch,
        create: bool,
    ) -> Result<ProcessType> {
        let a = self.registry.app(actor, app).await?;
        let placement = patch.nano_cpus.is_some()
            || patch.memory_bytes.is_some()
            || patch.constraints.is_some()
            || patch.overcommit.is_some();
        if placement {
            let mut formation = self.registry.processes_of(a.id).await?;
            match formation.iter_mut().find(|p| p.name == process) {
                Some(p) => patched(p, patch),
                None => {
                    let mut p = new_process(process);
                    patched(&mut p, patch);
                    formation.push(p);
                }
            }
            self.check_placement(app, &formation).await?;
        }
        Ok(self
            .registry
            .upsert_process(
                actor,
                app,
                process,
                patch,
                self.config.scheduler.default_port,
                create,
            )
            .await?)
    }

    /// Sets instance counts. When a count grows, the whole formation must fit the nodes
    /// ([`Services::check_placement`]), else nothing is changed; scaling down is never
    /// refused.
    pub async fn scale(
        &self,
        actor: &Actor,
        app: &str,
        counts: &BTreeMap<String, u32>,
    ) -> Result<Vec<ProcessType>> {
        let a = self.registry.app(actor, app).await?;
        let mut formation = self.registry.processes_of(a.id).await?;
        let mut grows = false;
        for p in &mut formation {
            if let Some(&n) = counts.get(&p.name) {
                grows |= n > p.instances;
                p.instances = n;
            }
        }
        if grows {
            self.check_placement(app, &formation).await?;
        }
        Ok(self.registry.set_formation(actor, app, counts).await?)
    }

    /// Refuses a formation of `app` that the nodes cannot take, naming each node's reason
    /// (`n2: 200 MiB free, needs 256 MiB`, `n3: lacks disk=ssd`). The nodes are asked for their
    /// capacity once (a few seconds at most; what the scheduler knows otherwise); what other
    /// apps run counts at their declared resources; this app's own instances do not (its
    /// formation is placed afresh). Every instance is placed as the planner would
    /// ([`placement::fit`]); a process with no instances must still fit one node by its
    /// CPUs and memory (free resources, labels, cordons and drains aside). Readiness is not judged. Without a scheduler or a
    /// node, nothing is refused.
    pub async fn check_placement(&self, app: &str, formation: &[ProcessType]) -> Result<()> {
        let Some(sched) = &self.scheduler else {
            return Ok(());
        };
        let nodes = sched.placement_nodes(CAPACITY_TIMEOUT).await;
        if nodes.is_empty() {
            return Ok(());
        }
        let overcommit = self.config.scheduler.overcommit;
        fn request(p: &ProcessType, overcommit: bool) -> placement::Request<'_> {
            placement::Request {
                app: "",
                process: &p.name,
                resources: placement::Resources::declared(p.nano_cpus, p.memory_bytes),
                constraints: &p.constraints,
                image: "",
                overcommit: overcommit || p.overcommit,
            }
        }
        // One instance of each process, on empty open nodes: CPUs or memory no node has
        // (constraints are judged with the instances: nodes may be labelled later).
        let open: Vec<_> = nodes
            .iter()
            .map(|n| crate::scheduler::plan::NodeState {
                cordoned: false,
                draining: false,
                ..n.clone()
            })
            .collect();
        let empty = placement::Placer::new(&open);
        for p in formation {
            let one = placement::Request {
                app,
                overcommit: true,
                constraints: &NO_CONSTRAINTS,
                ..request(p, overcommit)
            };
            if empty.rank(&one).is_empty() {
                return Err(refusal(app, p, &empty.explain(&one)));
            }
        }
        // The formation, against what the others use.
        let placed = sched.placed();
        let mut placer = placement::Placer::new(&nodes);
        for other in placed.iter().filter(|i| i.app != app) {
            placer.reserve(&other.node, other.resources);
        }
        let demands: Vec<placement::Demand<'_>> = formation
            .iter()
            .map(|p| placement::Demand {
                request: placement::Request {
                    app,
                    ..request(p, overcommit)
                },
                instances: p.instances,
            })
            .collect();
        placement::fit(&mut placer, &demands).map_err(|(process, why)| {
            let p = formation
                .iter()
                .find(|p| p.name == process)
                .expect("a process of the formation");
            refusal(app, p, &why.reasons)
        })
    }

    /// [`Services::check_placement`] of the formation a manifest leaves `app` with.
    async fn check_manifest_placement(
        &self,
        app: &AppRef,
        m: &crate::manifest::Manifest,
    ) -> Result<()> {
        let mut formation = self.registry.processes_of(app.id).await?;
        for (name, spec) in &m.processes {
            let i = match formation.iter().position(|p| &p.name == name) {
                Some(i) => i,
                None => {
                    formation.push(new_process(name));
                    formation.len() - 1
                }
            };
            let p = &mut formation[i];
            p.instances = spec.instances.unwrap_or(p.instances);
            p.memory_bytes = spec.memory_bytes;
            p.nano_cpus = spec.nano_cpus;
            p.constraints = spec.constraints.clone();
            p.overcommit = spec.overcommit;
        }
        self.check_placement(&app.name, &formation).await
    }

    /// Makes `app` match a manifest, in one transaction (a release when its config changed).
    pub async fn apply_manifest(
        &self,
        actor: &Actor,
        app: &str,
        m: &crate::manifest::Manifest,
        prune: bool,
    ) -> Result<ManifestApplied> {
        let a = self.registry.app(actor, app).await?;
        self.check_manifest_placement(&a, m).await?;
        let _guard = self
            .try_lock(&a, format!("a manifest apply by {}", actor.name))
            .await?;
        Ok(self
            .registry
            .apply_manifest(actor, app, m, self.config.scheduler.default_port, prune)
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
            self.check_manifest_placement(app, m).await?;
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

static NO_CONSTRAINTS: BTreeMap<String, String> = BTreeMap::new();

/// A process type as created by a change that names it first (as the registry creates it;
/// only what placement judges matters here).
fn new_process(name: &str) -> ProcessType {
    ProcessType {
        name: name.to_string(),
        command: None,
        port: 0,
        instances: 0,
        memory_bytes: None,
        nano_cpus: None,
        surge: 1,
        health: crate::manifest::default_health(),
        constraints: BTreeMap::new(),
        overcommit: false,
    }
}

/// `p` with what `patch` changes of placement.
fn patched(p: &mut ProcessType, patch: &ProcessPatch) {
    if let Some(m) = patch.memory_bytes {
        p.memory_bytes = m;
    }
    if let Some(c) = patch.nano_cpus {
        p.nano_cpus = c;
    }
    if let Some(c) = &patch.constraints {
        p.constraints = c.clone();
    }
    if let Some(o) = patch.overcommit {
        p.overcommit = o;
    }
}

/// The 422 for a formation the nodes cannot take.
fn refusal(app: &str, p: &ProcessType, reasons: &[String]) -> ServiceError {
    let mut asked = vec![format!(
        "{} instance{}",
        p.instances,
        if p.instances == 1 { "" } else { "s" }
    )];
    if let Some(m) = p.memory_bytes {
        asked.push(format!("{} each", placement::mib(m)));
    }
    if let Some(c) = p.nano_cpus {
        asked.push(format!("{} CPU(s) each", placement::cpus(c.max(0) as u64)));
    }
    if !p.constraints.is_empty() {
        asked.push(format!(
            "on {}",
            crate::registry::constraints_text(&p.constraints)
        ));
    }
    let reasons = if reasons.is_empty() {
        "no node".to_string()
    } else {
        reasons.join("; ")
    };
    // The nodes' state, not the request, is at odds: 409.
    ServiceError::Conflict(format!(
        "no node can run `{}` of `{app}` ({}): {reasons}; nothing was changed",
        p.name,
        asked.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_what_was_asked_and_each_node() {
        let mut p = new_process("web");
        p.instances = 3;
        p.memory_bytes = Some(256 << 20);
        p.nano_cpus = Some(500_000_000);
        p.constraints.insert("disk".into(), "ssd".into());
        let e = refusal(
            "shop",
            &p,
            &[
                "n2: 200 MiB free, needs 256 MiB".into(),
                "n3: lacks disk=ssd".into(),
            ],
        );
        assert_eq!(
            e.to_string(),
            "no node can run `web` of `shop` (3 instances, 256 MiB each, 0.5 CPU(s) each, on disk=ssd): n2: 200 MiB free, needs 256 MiB; n3: lacks disk=ssd; nothing was changed"
        );
    }
}
