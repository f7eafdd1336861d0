//! The scheduler: a pure planner ([`plan`]) and the reconciler that feeds and executes it.
//!
//! Each pass of the [`Scheduler`] reads the desired state from the registry (two queries),
//! observes every node through its [`Engine`] (one labelled list call per node, all at once,
//! each bounded by a timeout; a node's capacity is asked only when it becomes ready and every
//! minute, its labels, cordon and drain come from [`Scheduler::set_node_meta`]), asks
//! [`plan::plan_report`] what to do ([`placement`] chooses nodes and explains the ones it
//! cannot use), and
//! executes the actions through thin executors. Starting, draining and removing run as
//! supervised tasks (tracked, cancelled at shutdown, panics caught and counted) so a pass never
//! waits on a container; what is in flight is remembered (`pending`, `draining`, `removing`)
//! and shown to the planner, so nothing is done twice. What the scheduler sees change is
//! published on the registry's event bus, and what it does on its own is audited. Docker is observed, never trusted as memory: after a
//! restart the whole picture is rebuilt from container labels.
//!
//! A pass runs on every API change and engine event, on health verdict changes, and at least
//! every `scheduler.reconcile_interval`. At the end of each pass the routing table (host ->
//! healthy `web` instances) is rebuilt and, when it changed, published for the proxy.

pub mod health;
pub mod plan;

pub mod placement;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::events::{DrainCause, Event, HealthStatus, InstanceRef, InstanceStatus};
use crate::node::{self, InstanceSpec, Node};
use crate::registry::{
    now_ms, AppRef, DesiredApp as RegistryApp, ProcessType, Registry, ReleaseStatus,
};
use crate::routing::{Backend, Route, RoutingTable, SharedRoutes};
use crate::runtime::{self, Engine, EngineError};
use health::{Health, HealthTable, ProbeTarget};
use plan::{Action, InstanceState};

/// Scheduler failures (a failed pass is logged and retried at the next one).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("no node is reachable")]
    NoNode,
}

/// Why an image cannot be deployed ([`Scheduler::check_image`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a name escale runs (an image id or id prefix).
    #[error("{0}")]
    Refused(String),
    /// Missing, unpullable, or built by escale for another app: the same answer for all.
    #[error("no node has image `{0}` and it could not be pulled (check its name and tag, and that the nodes can reach its registry)")]
    NotFound(String),
    #[error(transparent)]
    Node(node::NodeError),
    #[error("no node is reachable")]
    NoNode,
}

/// One instance as `escale ps` and the API show it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub instance: String,
    pub app: String,
    pub process: String,
    pub release: u32,
    pub slot: u32,
    pub node: String,
    pub container_id: String,
    /// The container's name on its node's engine: what `docker inspect`, `docker logs` and
    /// `docker exec` accept (`escale-<installation>-<instance>`).
    #[serde(default)]
    pub container: String,
    /// `starting`, `running`, `draining` or `exited`.
    pub state: InstanceStatus,
    /// `starting`, `healthy`, `unhealthy`, or `-` when not running.
    pub health: HealthStatus,
    pub address: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Times this slot's instance was replaced since escale started or the slot was created:
    /// exits, failed starts and replacements of an unhealthy instance, a running total (kept
    /// while the slot exists, however healthy it is since).
    pub restarts: u32,
}

/// A slot whose instances keep crashing.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CrashView {
    pub app: String,
    pub process: String,
    pub slot: u32,
    pub crashes: u32,
    /// Unix milliseconds at which the next start is allowed.
    pub retry_at: i64,
    pub last_exit_code: Option<i64>,
    pub oom: bool,
    pub last_logs: Vec<String>,
}

/// What the scheduler last saw, for the API.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    pub instances: Vec<InstanceView>,
    pub crashing: Vec<CrashView>,
    pub nodes: Vec<NodeView>,
    /// Instances the last pass wanted to start but no node could take.
    pub unplaced: Vec<UnplacedView>,
}

/// A slot that no node can take now, with the reason per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UnplacedView {
    pub app: String,
    pub process: String,
    pub slot: u32,
    /// One line per node: `n2: 200 MiB free, needs 256 MiB`, `n3: lacks disk=ssd`.
    pub reasons: Vec<String>,
}

/// A change of what no node can take ([`Scheduler::report_unplaced`]).
#[derive(Debug, Clone, PartialEq)]
enum PlacementChange {
    Unplaced {
        app: String,
        process: String,
        missing: u32,
        reasons: Vec<String>,
    },
    Placed {
        app: String,
        process: String,
    },
}

/// A node's reachability.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    /// Answering now (`state` is `ready`).
    pub ready: bool,
    pub state: NodeStatus,
    pub error: Option<String>,
    /// When it last answered (unix milliseconds).
    #[serde(default)]
    pub last_heartbeat: Option<i64>,
}

/// A node's membership, as the scheduler judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Answering.
    Ready,
    /// Not answering for less than `scheduler.node_down_after`: its instances are kept, nothing
    /// new is placed on it.
    Suspect,
    /// Not answering for longer: its instances are replaced on the other nodes.
    Down,
    /// Registered, and not reached yet (its engine is not set up with its bundle, or does
    /// not answer): it is not in the pool.
    Joining,
}

#[derive(Debug, Clone)]
struct Pending {
    node: String,
    app: String,
    process: String,
    release: u32,
    slot: u32,
    created_at: i64,
}

#[derive(Debug, Clone, Default)]
struct SlotCrash {
    crashes: u32,
    until_ms: u64,
    last_exit: Option<i64>,
    oom: bool,
    last_logs: Vec<String>,
}

/// Exits and failed starts of one release of a process.
#[derive(Debug, Clone, Default)]
struct ReleaseCrash {
    crashes: u32,
    last_exit: Option<(i64, bool)>,
    last_logs: Vec<String>,
}

/// A node's membership: its last answer, and since when it has not answered.
#[derive(Default)]
struct Member {
    last_seen: Option<Vec<node::ContainerInstance>>,
    /// When the first call it has not answered (since it last did) was made.
    silent_since: Option<std::time::Instant>,
    /// When it last answered (unix milliseconds).
    last_ok_ms: Option<i64>,
}

#[derive(Default)]
struct ExecState {
    /// Starts in flight, by instance id.
    pending: HashMap<String, Pending>,
    /// Instances whose start must be undone once it lands (drained while pending).
    cancelled: HashSet<String>,
    /// Containers being drained.
    draining: HashSet<String>,
    /// Routing snapshots built so far; bumped (under this lock) when one reads `draining`.
    routes_built: u64,
    crashes: HashMap<(String, String, u32), SlotCrash>,
    /// Replacements of each slot so far (exits, failed starts, unhealthy replacements): the
    /// `restarts` of `escale ps`, a running total that a healthy slot keeps; dropped once the
    /// app, its process or the slot is no longer desired.
    restarts: HashMap<(String, String, u32), u32>,
    /// Exits and failed starts per (app, process, release), with the last logs of one: the
    /// planner's early rollout verdict and the failure reason. Kept for target releases only.
    release_crashes: HashMap<(String, String, u32), ReleaseCrash>,
    /// App networks: when they were last swept (`None`: not since start), the apps (name,
    /// uid) of the registry then, and whether a sweep left a network it could not remove yet.
    networks_swept: Option<std::time::Instant>,
    network_apps: HashSet<(String, String)>,
    networks_left: bool,
    /// Exited containers being removed (by a task): not seen again as crashes meanwhile.
    removing: HashSet<String>,
    /// What each node answered last, and since when it has been silent.
    members: HashMap<String, Member>,
    /// Failed rollouts being recorded, by (app, release).
    failing: HashSet<(String, u32)>,
    /// The health last announced on the bus, by container id.
    announced: HashMap<String, HealthStatus>,
    /// The rollout progress last announced, by app: (release, healthy, total, old).
    progress: HashMap<String, (u32, u32, u32, u32)>,
    /// Node readiness as last observed.
    node_ready: HashMap<String, bool>,
    /// Each node's capacity and when it was asked (see [`CAPACITY_REFRESH`]).
    capacity: HashMap<String, (std::time::Instant, Option<placement::Resources>)>,
    /// What was last logged as unplaceable, by (app, process): logged again when it changes.
    unplaced: HashMap<(String, String), Vec<String>>,
}

/// How often a node's capacity is asked again (also whenever it becomes ready).
const CAPACITY_REFRESH: Duration = Duration::from_secs(60);

/// How often app networks are swept when nothing suggests one is due (an app destroyed, a
/// network left by the last sweep, the first pass after start).
const NETWORK_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// How long an engine call made by a pass (or by an action task) may take by default.
pub const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a crashed container's last log lines may take.
/// Container changes in flight per engine (see `Scheduler::limited`).
const ENGINE_PARALLELISM: usize = 8;

const LAST_LOGS_TIMEOUT: Duration = Duration::from_secs(2);

/// The reconciler and its shared views.
pub struct Scheduler {
    registry: Registry,
    config: Arc<Config>,
    /// The engines the reconciler drives, one per node; swapped whole when a node joins or
    /// leaves ([`Scheduler::add_node`], [`Scheduler::remove_node`]).
    pool: ArcSwap<Pool>,
    /// Each engine's event watcher, cancelled when its node leaves.
    watchers: Mutex<HashMap<String, CancellationToken>>,
    /// Registered nodes not in the pool yet, with why (the last failed attempt to reach
    /// them); shown as `joining`.
    joining: Mutex<BTreeMap<String, String>>,
    /// Image transfers (pull or copy) in flight, by (node, image).
    transfers: Mutex<HashMap<(String, String), TransferSlot>>,
    /// Set once [`Scheduler::run`] started the watchers of the first engines.
    running: std::sync::atomic::AtomicBool,
    installation: String,
    /// The routing snapshot the proxy reads.
    pub routes: SharedRoutes,
    /// What the API shows.
    pub view: Arc<ArcSwap<ClusterView>>,
    pub health: Arc<HealthTable>,
    changed: Arc<Notify>,
    state: Mutex<ExecState>,
    /// The number of the last routing snapshot published (see `ExecState::routes_built`):
    /// a drain waits for a snapshot without its instance before its grace period starts.
    routes_published: tokio::sync::watch::Sender<u64>,
    /// Engine calls made by passes (for the benchmark of calls per pass).
    pub engine_calls: std::sync::atomic::AtomicU64,
    /// Completed passes.
    pub passes: std::sync::atomic::AtomicU64,
    /// Hosts with a certificate here get `redirect_https` routes.
    certs: std::sync::OnceLock<Arc<crate::tls::CertStore>>,
    /// Every task the scheduler spawns (starts, drains, removals, watchers, the health
    /// checker, the bus listener); [`Scheduler::run`] waits for them at shutdown.
    tasks: TaskTracker,
    /// Cancels the tracked tasks at shutdown; a fresh token when [`Scheduler::run`] starts
    /// again (a failed handover gives the reconciler back to this server).
    cancel: Mutex<CancellationToken>,
    /// Tasks that panicked (caught, logged; the reconciler went on).
    pub panics: AtomicU64,
    /// Engine calls that did not answer within the timeout.
    pub engine_timeouts: AtomicU64,
    /// The bound on one engine call, in milliseconds ([`Scheduler::set_engine_timeout`]).
    engine_timeout_ms: AtomicU64,
    /// What the node registry says of each node (labels, cordoned, draining), by name; a node
    /// not listed has no labels and is open. See [`Scheduler::set_node_meta`].
    node_meta: Mutex<HashMap<String, placement::NodeMeta>>,
    /// What the last pass saw running, with declared resources (the service's placement
    /// check counts what other apps use).
    placed: ArcSwap<Vec<PlacedInstance>>,
}

/// One image transfer to one node: held while it runs, so the next start there waits for it.
type TransferSlot = Arc<tokio::sync::Mutex<()>>;

/// The engines of the nodes the reconciler drives.
#[derive(Default)]
struct Pool {
    engines: Vec<Arc<dyn Engine>>,
    /// The Docker nodes among them (builds, image facts, cleanup need Docker itself).
    docker: Vec<Arc<Node>>,
    /// Container changes (start, stop, remove) in flight per engine, at most
    /// [`ENGINE_PARALLELISM`]: a deploy of 300 instances queues here instead of asking an
    /// engine for 300 starts at once (each then too slow for its timeout).
    slots: HashMap<String, Arc<tokio::sync::Semaphore>>,
}

/// A container escale runs on a node, at its process's declared CPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedInstance {
    pub app: String,
    pub node: String,
    pub resources: placement::Resources,
}

impl Pool {
    fn new(engines: Vec<Arc<dyn Engine>>, docker: Vec<Arc<Node>>) -> Pool {
        let slots = engines
            .iter()
            .map(|e| {
                (
                    e.name().to_string(),
                    Arc::new(tokio::sync::Semaphore::new(ENGINE_PARALLELISM)),
                )
            })
            .collect();
        Pool {
            engines,
            docker,
            slots,
        }
    }

    /// This pool with `engine` (and `docker`, its Docker node) in place of any engine of the
    /// same name.
    fn with(&self, engine: Arc<dyn Engine>, docker: Option<Arc<Node>>) -> Pool {
        let name = engine.name().to_string();
        let mut p = self.without(&name);
        p.slots.insert(
            name,
            Arc::new(tokio::sync::Semaphore::new(ENGINE_PARALLELISM)),
        );
        p.engines.push(engine);
        p.engines.sort_by(|a, b| a.name().cmp(b.name()));
        if let Some(d) = docker {
            p.docker.push(d);
            p.docker.sort_by(|a, b| a.name.cmp(&b.name));
        }
        p
    }

    /// This pool without the engine named `name`.
    fn without(&self, name: &str) -> Pool {
        Pool {
            engines: self
                .engines
                .iter()
                .filter(|e| e.name() != name)
                .cloned()
                .collect(),
            docker: self
                .docker
                .iter()
                .filter(|d| d.name != name)
                .cloned()
                .collect(),
            slots: self
                .slots
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
        }
    }
}

/// The processes of an app to converge, with what the executor needs to start instances.
struct AppPlanInput {
    app: AppRef,
    image: String,
    processes: Vec<ProcessType>,
}

impl Scheduler {
    /// A scheduler over Docker `nodes`, sharing `routes` with the proxy. It wakes on the
    /// registry's events (see [`Scheduler::run`]).
    pub fn new(
        registry: Registry,
        config: Arc<Config>,
        nodes: Vec<Arc<Node>>,
        routes: SharedRoutes,
    ) -> Arc<Scheduler> {
        let engines = nodes.iter().map(|n| n.clone() as Arc<dyn Engine>).collect();
        Scheduler::build(registry, config, engines, nodes, routes)
    }

    /// A scheduler over any engines (the unit tests' fakes); it has no Docker node, so no
    /// builds or image checks.
    pub fn with_engines(
        registry: Registry,
        config: Arc<Config>,
        engines: Vec<Arc<dyn Engine>>,
        routes: SharedRoutes,
    ) -> Arc<Scheduler> {
        Scheduler::build(registry, config, engines, Vec::new(), routes)
    }

    fn build(
        registry: Registry,
        config: Arc<Config>,
        engines: Vec<Arc<dyn Engine>>,
        docker: Vec<Arc<Node>>,
        routes: SharedRoutes,
    ) -> Arc<Scheduler> {
        let installation = registry.installation_id().to_string();
        Arc::new(Scheduler {
            pool: ArcSwap::from_pointee(Pool::new(engines, docker)),
            watchers: Default::default(),
            joining: Default::default(),
            transfers: Default::default(),
            running: Default::default(),
            registry,
            config,
            installation,
            routes,
            view: Arc::new(ArcSwap::from_pointee(ClusterView::default())),
            health: Arc::new(HealthTable::default()),
            changed: Arc::new(Notify::new()),
            state: Mutex::new(ExecState::default()),
            routes_published: tokio::sync::watch::Sender::new(0),
            engine_calls: Default::default(),
            passes: Default::default(),
            certs: Default::default(),
            tasks: TaskTracker::new(),
            cancel: Mutex::new(CancellationToken::new()),
            panics: Default::default(),
            engine_timeouts: Default::default(),
            engine_timeout_ms: AtomicU64::new(ENGINE_CALL_TIMEOUT.as_millis() as u64),
            node_meta: Mutex::new(HashMap::new()),
            placed: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// What the last pass saw running on the nodes, with declared resources.
    pub fn placed(&self) -> Arc<Vec<PlacedInstance>> {
        self.placed.load_full()
    }

    /// Every node as a placement check before a change sees it: capacity asked now (each
    /// engine at once, bounded by `timeout`; what the passes cached when it does not answer),
    /// labels, cordoned and draining. Readiness is not judged (a node down now may be back
    /// before the change rolls out): every node is ready here.
    pub async fn placement_nodes(&self, timeout: Duration) -> Vec<plan::NodeState> {
        let engines = self.engines();
        let asked = futures_util::future::join_all(engines.iter().map(|e| async move {
            let r = self.bounded_for(timeout, e.name(), "reading its capacity", e.capacity());
            (e.name().to_string(), r.await)
        }))
        .await;
        let cached: HashMap<String, Option<placement::Resources>> = self
            .st()
            .capacity
            .iter()
            .map(|(name, (_, c))| (name.clone(), *c))
            .collect();
        asked
            .into_iter()
            .map(|(name, r)| {
                let capacity = match r {
                    Ok(c) => c.map(capacity_resources),
                    Err(_) => cached.get(&name).copied().flatten(),
                };
                let meta = self.node_meta(&name);
                plan::NodeState {
                    name,
                    ready: true,
                    suspect: false,
                    capacity,
                    labels: meta.labels,
                    cordoned: meta.cordoned,
                    draining: meta.draining,
                    images: Default::default(),
                }
            })
            .collect()
    }

    /// Sets what the node registry says of node `name` (labels, cordoned, draining), read by
    /// every pass from now on; wakes a pass. Cordoned: nothing new is placed there. Draining:
    /// nothing new either, and its instances are replaced on other nodes, each old one drained
    /// once enough replacements are healthy.
    pub fn set_node_meta(&self, name: &str, meta: placement::NodeMeta) {
        self.node_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), meta);
        self.changed.notify_one();
    }

    /// What the node registry says of node `name` (the default when it said nothing).
    pub fn node_meta(&self, name: &str) -> placement::NodeMeta {
        self.node_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Bounds every engine call of passes and action tasks (default [`ENGINE_CALL_TIMEOUT`]).
    pub fn set_engine_timeout(&self, timeout: Duration) {
        self.engine_timeout_ms.store(
            timeout.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn engine_timeout(&self) -> Duration {
        Duration::from_millis(
            self.engine_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Runs one engine call of `engine`, bounded by the engine timeout.
    async fn bounded<T>(
        &self,
        engine: &str,
        action: &str,
        call: impl std::future::Future<Output = runtime::Result<T>>,
    ) -> runtime::Result<T> {
        self.bounded_for(self.engine_timeout(), engine, action, call)
            .await
    }

    /// Runs one container change (start, stop, remove) on `engine` once one of its
    /// [`ENGINE_PARALLELISM`] slots is free, bounded by `after` from then on (the wait for a
    /// slot is not the engine's slowness).
    async fn limited<T>(
        &self,
        after: Duration,
        engine: &str,
        action: &str,
        call: impl std::future::Future<Output = runtime::Result<T>>,
    ) -> runtime::Result<T> {
        let slot = self.pool.load().slots.get(engine).cloned();
        let _slot = match slot {
            Some(s) => Some(s.clone().acquire_owned().await),
            None => None,
        };
        self.bounded_for(after, engine, action, call).await
    }

    /// Runs one engine call of `engine`, bounded by `after`.
    async fn bounded_for<T>(
        &self,
        after: Duration,
        engine: &str,
        action: &str,
        call: impl std::future::Future<Output = runtime::Result<T>>,
    ) -> runtime::Result<T> {
        match tokio::time::timeout(after, call).await {
            Ok(r) => r,
            Err(_) => {
                self.engine_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(EngineError::Timeout {
                    engine: engine.to_string(),
                    action: action.to_string(),
                    after,
                })
            }
        }
    }

    /// The execution state; a panic elsewhere while it was held does not make it unusable
    /// (every update to it is a single step, so what a panicking holder left is consistent).
    fn st(&self) -> MutexGuard<'_, ExecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns a tracked task that runs until shutdown: `make()` again (after a second) when
    /// the future it made panicked (counted) or ended.
    fn supervise_forever<F>(
        self: &Arc<Self>,
        what: &'static str,
        make: impl Fn() -> F + Send + 'static,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.supervise_until(what, self.cancel_token(), make)
    }

    /// [`Scheduler::supervise_forever`] until `cancel` (a child of the shutdown token).
    fn supervise_until<F>(
        self: &Arc<Self>,
        what: &'static str,
        cancel: CancellationToken,
        make: impl Fn() -> F + Send + 'static,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        self.tasks.spawn(async move {
            loop {
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = std::panic::AssertUnwindSafe(make()).catch_unwind() => r,
                };
                if let Err(panic) = outcome {
                    me.panics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(task = what, panic = %panic_message(&*panic), "scheduler task panicked; restarting it");
                } else {
                    tracing::warn!(task = what, "scheduler task ended; restarting it");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    /// Spawns a tracked task: cancelled at shutdown, and a panic in it is caught, logged and
    /// counted in [`Scheduler::panics`], and wakes a pass (whatever it was doing is looked at
    /// again).
    fn supervise(
        self: &Arc<Self>,
        what: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let me = self.clone();
        let cancel = self.cancel_token();
        self.tasks.spawn(async move {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = std::panic::AssertUnwindSafe(task).catch_unwind() => r,
            };
            if let Err(panic) = outcome {
                let message = panic_message(&*panic);
                me.panics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(task = what, panic = %message, "scheduler task panicked; the reconciler goes on");
                me.changed.notify_one();
            }
        });
    }

    /// Routes of hosts with a certificate in `certs` redirect plain HTTP to HTTPS.
    pub fn redirect_https_with(&self, certs: Arc<crate::tls::CertStore>) {
        let _ = self.certs.set(certs);
    }

    /// The engine of the node named `name`.
    pub fn engine(&self, name: &str) -> Option<Arc<dyn Engine>> {
        self.pool
            .load()
            .engines
            .iter()
            .find(|n| n.name() == name)
            .cloned()
    }

    /// All engines, by name.
    pub fn engines(&self) -> Vec<Arc<dyn Engine>> {
        self.pool.load().engines.clone()
    }

    /// The Docker nodes (for builds, image facts and cleanup, which need Docker itself).
    pub fn docker_nodes(&self) -> Vec<Arc<Node>> {
        self.pool.load().docker.clone()
    }

    /// The Docker node a build runs on ([`placement::build_node`] over what the last pass saw
    /// and the nodes' cordons and drains); before any pass, the first. The image it makes
    /// reaches other nodes by transfer when an instance needs it there.
    pub fn build_node(&self) -> Option<Arc<Node>> {
        let docker = self.docker_nodes();
        let view = self.view.load();
        if view.nodes.is_empty() {
            return docker.first().cloned();
        }
        let candidates: Vec<placement::BuildCandidate> = docker
            .iter()
            .map(|d| {
                let meta = self.node_meta(&d.name);
                placement::BuildCandidate {
                    node: d.name.clone(),
                    ready: view
                        .nodes
                        .iter()
                        .any(|n| n.name == d.name && n.state == NodeStatus::Ready),
                    closed: meta.cordoned || meta.draining,
                    instances: view.instances.iter().filter(|i| i.node == d.name).count(),
                }
            })
            .collect();
        let chosen = placement::build_node(&candidates)?;
        docker.into_iter().find(|d| d.name == chosen)
    }

    /// Notes that the registered node `name` could not be reached yet (`None`: forget it:
    /// it joined, or it was removed); it is shown as `joining` with `error`.
    pub fn set_joining(&self, name: &str, error: Option<String>) {
        let mut joining = self.joining.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => joining.insert(name.to_string(), e),
            None => joining.remove(name),
        };
    }

    /// Whether node `name` is in the pool.
    pub fn has_node(&self, name: &str) -> bool {
        self.pool.load().slots.contains_key(name)
    }

    /// Adds the Docker node `node` to the pool (replacing one of the same name: a renewed
    /// certificate, a new address), watches its events, and wakes a pass. Its instances are
    /// adopted from their labels like any node's.
    pub fn add_node(self: &Arc<Self>, node: Arc<Node>) {
        let engine = node.clone() as Arc<dyn Engine>;
        self.add_engine(engine, Some(node));
    }

    /// [`Scheduler::add_node`] for any engine (the unit tests' fakes).
    pub fn add_engine(self: &Arc<Self>, engine: Arc<dyn Engine>, docker: Option<Arc<Node>>) {
        let name = engine.name().to_string();
        self.pool
            .rcu(|p| Pool::with(p, engine.clone(), docker.clone()));
        self.set_joining(&name, None);
        if self.running.load(std::sync::atomic::Ordering::SeqCst) {
            self.watch(engine);
        }
        tracing::info!(node = %name, "node joined the pool");
        self.changed.notify_one();
    }

    /// Takes node `name` out of the pool: nothing is observed, placed or routed there any
    /// more (its containers are left as they are). Returns whether it was there.
    pub fn remove_node(&self, name: &str) -> bool {
        let was = self.has_node(name);
        self.pool.rcu(|p| p.without(name));
        if let Some(token) = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
        {
            token.cancel();
        }
        self.st().members.remove(name);
        if was {
            tracing::info!(node = %name, "node left the pool");
        }
        self.changed.notify_one();
        was
    }

    /// Starts the event watcher of `engine` (replacing one of the same name).
    fn watch(self: &Arc<Self>, engine: Arc<dyn Engine>) {
        let token = self.cancel_token().child_token();
        if let Some(old) = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(engine.name().to_string(), token.clone())
        {
            old.cancel();
        }
        let me = self.clone();
        self.supervise_until("engine event watcher", token, move || {
            watch_events(
                engine.clone(),
                me.installation.clone(),
                me.changed.clone(),
                me.clone(),
            )
        });
    }

    /// Makes sure the app with uid `app_uid` may run `image`: named by reference (not by id
    /// or id prefix), present on a node under that very name or pullable, and not an image
    /// escale built for another app. An image built for another app is answered exactly as a
    /// missing one ([`ImageError::NotFound`]), and is never pulled over. Nothing is recorded.
    pub async fn check_image(&self, image: &str, app_uid: &str) -> Result<(), ImageError> {
        crate::images::refuse_id(image).map_err(ImageError::Refused)?;
        let usable = |f: &node::ImageFacts| {
            crate::images::referenced_by(image, &f.repo_tags, &f.repo_digests)
                .then(|| crate::images::may_use(&crate::images::builder(&f.labels), app_uid))
        };
        let mut last = None;
        for n in &self.docker_nodes() {
            match n.image_facts(image).await {
                Ok(Some(f)) => match usable(&f) {
                    Some(true) => return Ok(()),
                    Some(false) => {
                        tracing::info!(image, node = %n.name, "image deploy refused: built by escale for another app");
                        return Err(ImageError::NotFound(image.to_string()));
                    }
                    // Found by something else than its name (e.g. a digest that is an id).
                    None => {}
                },
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
        }
        let mut engine_ok = false;
        for n in &self.docker_nodes() {
            match n.ensure_image(image).await {
                Ok(()) => {}
                Err(e @ node::NodeError::ImageUnavailable { .. }) => {
                    tracing::info!(image, node = %n.name, error = %e, "image deploy: the image cannot be had");
                    engine_ok = true;
                    continue;
                }
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            }
            engine_ok = true;
            match n.image_facts(image).await {
                Ok(Some(f)) if usable(&f) == Some(true) => return Ok(()),
                Ok(_) => {}
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) if !engine_ok => Err(ImageError::Node(e)),
            None if self.pool.load().docker.is_empty() => Err(ImageError::NoNode),
            _ => Err(ImageError::NotFound(image.to_string())),
        }
    }

    /// Waits until a pass has run and no instance it saw is still waiting for its first
    /// probe (so the routing table holds what is healthy), at most `timeout`; true when warm.
    /// A server taking over from another waits for this before it accepts requests.
    pub async fn wait_warm(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let passes = self.passes.load(std::sync::atomic::Ordering::SeqCst);
            let starting = self
                .view
                .load()
                .instances
                .iter()
                .any(|i| i.health == crate::events::HealthStatus::Starting);
            if passes > 0 && !starting {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Passes run on every health verdict change; this only looks at their outcome.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Runs passes until `shutdown`; also runs the health checker and follows engine events.
    /// Containers keep running when escale stops: they are the apps. Returns once every task
    /// the scheduler spawned has ended or been cancelled. A failed or panicking pass is
    /// logged (a panic counted in [`Scheduler::panics`]) and the loop goes on.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        {
            // Started again after a shutdown: new tasks under a new token.
            let mut cancel = self.cancel.lock().unwrap_or_else(|e| e.into_inner());
            if cancel.is_cancelled() {
                *cancel = CancellationToken::new();
                self.tasks.reopen();
            }
        }
        let me = self.clone();
        self.supervise_forever("health checker", move || {
            me.health.clone().run(me.changed.clone())
        });
        // Committed changes of desired state wake a pass; so does missing some (look anyway).
        let me = self.clone();
        self.supervise_forever("bus listener", move || {
            let mut events = me.registry.bus().subscribe();
            let wake = me.changed.clone();
            async move {
                loop {
                    match events.recv().await {
                        Ok(e) if !e.event.changes_desired_state() => {}
                        _ => wake.notify_one(),
                    }
                }
            }
        });
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for n in self.engines() {
            self.watch(n);
        }
        tokio::pin!(shutdown);
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.changed.notified() => {},
                _ = tokio::time::sleep(wait) => {},
            }
            wait = match std::panic::AssertUnwindSafe(self.pass())
                .catch_unwind()
                .await
            {
                Ok(Ok(next)) => next,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reconcile pass failed; retrying");
                    Duration::from_secs(1)
                }
                Err(_) => {
                    self.panics
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!("reconcile pass panicked; retrying");
                    Duration::from_secs(1)
                }
            };
        }
        self.shutdown().await;
    }

    /// Cancels every tracked task and waits until they have ended.
    pub async fn shutdown(&self) {
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.cancel_token().cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The token that cancels the tasks of the current run.
    fn cancel_token(&self) -> CancellationToken {
        self.cancel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tasks still running (starts, drains, watchers, ...).
    pub fn tasks_running(&self) -> usize {
        self.tasks.len()
    }

    /// One reconcile pass. Returns how long to wait before the next one at the latest.
    pub async fn pass(self: &Arc<Self>) -> Result<Duration, SchedulerError> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        let desired_apps = self.registry.desired_state().await?;
        let registry_apps: HashSet<(String, String)> = desired_apps
            .iter()
            .map(|d| (d.app.name.clone(), d.app.uid.clone()))
            .collect();

        let domains = self.registry.all_domains().await?;
        let now = now_ms();

        // What is in flight, taken before listing: a start or drain that completes while we list
        // must still be seen as in flight, not as a leftover or a live instance.
        let (pending_before, draining_before, removing_before) = {
            let st = self.st();
            (st.pending.clone(), st.draining.clone(), st.removing.clone())
        };

        // Observe every node: one labelled list call each, all at once, each bounded by a
        // quarter of `node_down_after` (at least a second, at most the engine timeout): a node
        // that hangs (stopped, cut off) holds a pass up that long, no longer, and is judged
        // by the time since it last answered.
        let engines = self.engines();
        let down_after = self.config.scheduler.node_down_after;
        let list_within = (down_after / 4)
            .max(Duration::from_secs(1))
            .min(self.engine_timeout());
        let asked_at = std::time::Instant::now();
        let lists = futures_util::future::join_all(engines.iter().map(|n| async move {
            self.engine_calls.fetch_add(1, Relaxed);
            let r = self
                .bounded_for(
                    list_within,
                    n.name(),
                    "listing instances",
                    n.list_instances(&self.installation),
                )
                .await;
            (n.name().to_string(), r)
        }))
        .await;
        let mut observed_nodes = Vec::new();
        let mut containers = Vec::new();
        let mut node_views = Vec::new();
        for (name, result) in lists {
            // Membership: one failed call is a blip. A node that answered before and has
            // been silent for less than `node_down_after` is suspect: its instances count as
            // last seen (nothing is rescheduled) and nothing new goes there. Then it is down.
            let mut st = self.st();
            let member = st.members.entry(name.clone()).or_default();
            match result {
                Ok(list) => {
                    member.silent_since = None;
                    member.last_ok_ms = Some(now);
                    member.last_seen = Some(list.clone());
                    observed_nodes.push(plan::NodeState {
                        name: name.clone(),
                        ready: true,
                        ..Default::default()
                    });
                    node_views.push(NodeView {
                        name: name.clone(),
                        ready: true,
                        state: NodeStatus::Ready,
                        error: None,
                        last_heartbeat: Some(now),
                    });
                    containers.extend(list.into_iter().map(|c| (name.clone(), c)));
                }
                Err(e) => {
                    // Silent since the first call it did not answer was made.
                    let since = *member.silent_since.get_or_insert(asked_at);
                    let suspect = member.last_seen.is_some() && since.elapsed() < down_after;
                    if suspect {
                        tracing::info!(node = %name, error = %e, silent = ?since.elapsed(), "node not answering; suspect");
                        let seen = member.last_seen.clone().unwrap_or_default();
                        containers.extend(seen.into_iter().map(|c| (name.clone(), c)));
                    } else {
                        tracing::warn!(node = %name, error = %e, "node down");
                        member.last_seen = None;
                    }
                    observed_nodes.push(plan::NodeState {
                        name: name.clone(),
                        ready: suspect,
                        suspect,
                        ..Default::default()
                    });
                    node_views.push(NodeView {
                        last_heartbeat: member.last_ok_ms,
                        name,
                        ready: false,
                        state: if suspect {
                            NodeStatus::Suspect
                        } else {
                            NodeStatus::Down
                        },
                        error: Some(e.to_string()),
                    });
                }
            }
        }
        self.node_facts(&mut observed_nodes, &containers).await;
        self.announce_nodes(&node_views).await;
        for (name, error) in self
            .joining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if !node_views.iter().any(|n| &n.name == name) {
                node_views.push(NodeView {
                    name: name.clone(),
                    ready: false,
                    state: NodeStatus::Joining,
                    error: Some(error.clone()),
                    last_heartbeat: None,
                });
            }
        }

        // Desired state, with rollout deadlines.
        let timeout_ms = self.config.scheduler.deploy_timeout.as_millis() as i64;
        let mut desired = plan::Desired { apps: Vec::new() };
        let mut inputs: HashMap<String, AppPlanInput> = HashMap::new();
        for RegistryApp {
            app,
            release,
            processes,
        } in desired_apps
        {
            let Some((version, image, status, deadline)) = release else {
                continue;
            };
            let deadline = match (status, deadline) {
                (ReleaseStatus::Deploying, Some(d)) => Some(d),
                (ReleaseStatus::Deploying, None) => {
                    self.registry
                        .rollout_deadline(app.id, version, timeout_ms)
                        .await?
                }
                _ => None,
            };
            desired.apps.push(plan::DesiredApp {
                app: app.name.clone(),
                release: version,
                processes: processes
                    .iter()
                    .map(|p| plan::DesiredProcess {
                        process: p.name.clone(),
                        instances: p.instances,
                        surge: p.surge.max(1),
                        spec: spec_hash(&image, p),
                        unhealthy_replace_after_ms: self
                            .config
                            .scheduler
                            .unhealthy_replace_after
                            .as_millis() as u64,
                        resources: placement::Resources::declared(p.nano_cpus, p.memory_bytes),
                        constraints: p.constraints.clone(),
                        overcommit: self.config.scheduler.overcommit || p.overcommit,
                        image: image.clone(),
                    })
                    .collect(),
                rollout_deadline_ms: deadline.map(|d| d.max(0) as u64),
            });
            inputs.insert(
                app.name.clone(),
                AppPlanInput {
                    app,
                    image,
                    processes,
                },
            );
        }

        // Observed instances, as the planner sees them.
        let (observed, mut views) = {
            let st = self.st();
            let mut instances = Vec::new();
            let mut views = Vec::new();
            let mut seen = HashSet::new();
            for (node_name, c) in &containers {
                seen.insert(c.instance.clone());
                let health = self.health.get(&c.container_id);
                let removing = st.removing.contains(&c.container_id)
                    || removing_before.contains(&c.container_id);
                let state = if removing
                    || st.draining.contains(&c.container_id)
                    || draining_before.contains(&c.container_id)
                {
                    InstanceState::Draining
                } else {
                    match c.state {
                        node::InstanceState::Running => match health {
                            Some(Health::Healthy) => InstanceState::Healthy,
                            Some(Health::Unhealthy) => InstanceState::Unhealthy,
                            _ => InstanceState::Starting,
                        },
                        node::InstanceState::Exited | node::InstanceState::Dead => {
                            InstanceState::Exited {
                                code: c.exit_code.unwrap_or(-1),
                                oom: c.oom_killed,
                            }
                        }
                        node::InstanceState::Removing => InstanceState::Draining,
                        // A start of ours in flight, or a leftover of a crash between create and start.
                        _ if st.pending.contains_key(&c.instance)
                            || pending_before.contains_key(&c.instance) =>
                        {
                            InstanceState::Starting
                        }
                        _ => InstanceState::Exited {
                            code: -1,
                            oom: false,
                        },
                    }
                };
                views.push(InstanceView {
                    instance: c.instance.clone(),
                    app: c.app.clone(),
                    process: c.process.clone(),
                    release: c.release,
                    slot: c.slot,
                    node: node_name.clone(),
                    container_id: c.container_id.chars().take(12).collect(),
                    container: if c.name.is_empty() {
                        node::container_name(&self.installation, &c.instance)
                    } else {
                        c.name.clone()
                    },
                    state: match state {
                        _ if removing => InstanceStatus::Exited,
                        InstanceState::Draining => InstanceStatus::Draining,
                        InstanceState::Exited { .. } => InstanceStatus::Exited,
                        InstanceState::Starting if c.state != node::InstanceState::Running => {
                            InstanceStatus::Starting
                        }
                        _ => InstanceStatus::Running,
                    },
                    health: match state {
                        _ if removing => HealthStatus::None,
                        InstanceState::Healthy => HealthStatus::Healthy,
                        InstanceState::Unhealthy => HealthStatus::Unhealthy,
                        InstanceState::Starting => HealthStatus::Starting,
                        _ => HealthStatus::None,
                    },
                    address: c.addr.map(|a| a.to_string()),
                    created_at: c.created * 1000,
                    // Set at the end of the pass, after its actions.
                    restarts: 0,
                });
                instances.push(plan::ObservedInstance {
                    container_id: c.container_id.clone(),
                    node: node_name.clone(),
                    app: c.app.clone(),
                    process: c.process.clone(),
                    release: c.release,
                    slot: c.slot,
                    state,
                    spec: c.spec.clone(),
                    health: self.health.facts(&c.container_id, now as u64),
                });
            }
            // Starts in flight, and starts that finished while the nodes were listed (their
            // containers may be missing from a list answered before they existed: counted as
            // starting for this pass, or their slots would be started twice).
            let in_flight = st.pending.iter().chain(
                pending_before
                    .iter()
                    .filter(|(i, _)| !st.pending.contains_key(*i)),
            );
            for (instance, p) in in_flight {
                if !seen.insert(instance.clone()) {
                    continue;
                }
                instances.push(plan::ObservedInstance {
                    container_id: pending_id(instance),
                    node: p.node.clone(),
                    app: p.app.clone(),
                    process: p.process.clone(),
                    release: p.release,
                    slot: p.slot,
                    state: if st.cancelled.contains(instance) {
                        InstanceState::Draining
                    } else {
                        InstanceState::Starting
                    },
                    spec: None,
                    health: Default::default(),
                });
                views.push(InstanceView {
                    instance: instance.clone(),
                    app: p.app.clone(),
                    process: p.process.clone(),
                    release: p.release,
                    slot: p.slot,
                    node: p.node.clone(),
                    container_id: String::new(),
                    container: node::container_name(&self.installation, instance),
                    state: InstanceStatus::Starting,
                    health: HealthStatus::Starting,
                    address: None,
                    created_at: p.created_at,
                    restarts: 0,
                });
            }
            // A slot that has been healthy is no longer crash-looping.
            let backoff = st
                .crashes
                .iter()
                .filter(|(_, c)| c.until_ms > now as u64)
                .map(|((app, process, slot), c)| plan::SlotBackoff {
                    app: app.clone(),
                    process: process.clone(),
                    slot: *slot,
                    until_ms: c.until_ms,
                })
                .collect();
            let crashes = st
                .release_crashes
                .iter()
                .map(|((app, process, release), c)| plan::ReleaseCrashes {
                    app: app.clone(),
                    process: process.clone(),
                    release: *release,
                    crashes: c.crashes,
                    last_exit: c.last_exit,
                })
                .collect();
            (
                plan::Observed {
                    now_ms: now as u64,
                    nodes: observed_nodes,
                    instances,
                    backoff,
                    crashes,
                },
                views,
            )
        };

        let plan::Plan { actions, unplaced } = plan::plan_report(&desired, &observed);
        self.placed
            .store(Arc::new(placed_instances(&desired, &observed)));
        let (unplaced, placement_changes) = self.report_unplaced(unplaced);
        self.announce_placement(placement_changes).await;
        let refs: HashMap<String, InstanceRef> = containers
            .iter()
            .map(|(node_name, c)| {
                (
                    c.container_id.clone(),
                    InstanceRef {
                        app: c.app.clone(),
                        container_id: c.container_id.clone(),
                        process: c.process.clone(),
                        release: c.release,
                        slot: c.slot,
                        instance: c.instance.clone(),
                        node: node_name.clone(),
                    },
                )
            })
            .collect();
        for action in actions {
            self.execute(action, &inputs, &observed, &refs).await;
        }
        self.announce_health(&containers, &views);
        self.announce_progress(&desired, &observed, &inputs);

        // Health targets and routes from what is running now.
        let mut targets = Vec::new();
        for (node_name, c) in &containers {
            if c.state != node::InstanceState::Running {
                continue;
            }
            let (Some(input), Some(addr)) = (inputs.get(&c.app), c.addr) else {
                continue;
            };
            let Some(p) = input.processes.iter().find(|p| p.name == c.process) else {
                continue;
            };
            let _ = node_name;
            targets.push((
                c.container_id.clone(),
                ProbeTarget {
                    addr,
                    kind: p.health.kind,
                    path: p.health.path.clone(),
                    interval: Duration::from_millis(p.health.interval_ms as u64),
                    timeout: Duration::from_millis(p.health.timeout_ms as u64),
                    grace: Duration::from_millis(p.health.grace_ms as u64),
                },
            ));
        }
        self.health.sync(targets);
        self.publish_routes(&containers, &inputs, &domains, &draining_before);

        // Healthy slots forget their crash history.
        let (crashing, next_backoff) = {
            let mut st = self.st();
            for o in &observed.instances {
                if o.state == InstanceState::Healthy {
                    if let Some(c) = st
                        .crashes
                        .get_mut(&(o.app.clone(), o.process.clone(), o.slot))
                    {
                        if c.until_ms + 10_000 < now as u64 {
                            c.crashes = 0;
                        }
                    }
                }
            }
            st.crashes
                .retain(|(app, _, _), c| c.crashes > 0 && inputs.contains_key(app));
            st.restarts
                .retain(|(app, process, slot), _| slot_desired(&inputs, app, process, *slot));
            // As counted after this pass's actions (an exit seen now counts now).
            for v in &mut views {
                v.restarts = st
                    .restarts
                    .get(&(v.app.clone(), v.process.clone(), v.slot))
                    .copied()
                    .unwrap_or(0);
            }
            st.release_crashes.retain(|(app, _, release), _| {
                inputs
                    .get(app)
                    .is_some_and(|i| i.app.target_release == Some(*release as i64))
            });
            // The next pass is due when the earliest backoff of any slot ends.
            let next_backoff = st
                .crashes
                .values()
                .map(|c| c.until_ms as i64 - now)
                .filter(|d| *d > 0)
                .min();
            // Two crashes in a row make a crash loop worth showing, until the slot is healthy
            // again on its app's target release (its backoff is kept a while longer: a slot
            // that is healthy for a moment between crashes still backs off). An instance of
            // an earlier release still serving the slot during a rollout does not end it.
            let targets: HashMap<&str, u32> = desired
                .apps
                .iter()
                .map(|d| (d.app.as_str(), d.release))
                .collect();
            let healthy: HashSet<(&str, &str, u32)> = observed
                .instances
                .iter()
                .filter(|o| {
                    o.state == InstanceState::Healthy
                        && targets.get(o.app.as_str()) == Some(&o.release)
                })
                .map(|o| (o.app.as_str(), o.process.as_str(), o.slot))
                .collect();
            let loops = st.crashes.iter().filter(|((app, process, slot), c)| {
                c.crashes >= 2 && !healthy.contains(&(app.as_str(), process.as_str(), *slot))
            });
            let crashing = loops
                .map(|((app, process, slot), c)| CrashView {
                    app: app.clone(),
                    process: process.clone(),
                    slot: *slot,
                    crashes: c.crashes,
                    retry_at: c.until_ms as i64,
                    last_exit_code: c.last_exit,
                    oom: c.oom,
                    last_logs: c.last_logs.clone(),
                })
                .collect::<Vec<_>>();
            (crashing, next_backoff)
        };
        self.view.store(Arc::new(ClusterView {
            instances: views,
            crashing,
            nodes: node_views,
            unplaced,
        }));
        self.sweep_networks(registry_apps).await;
        self.passes.fetch_add(1, Relaxed);
        tracing::trace!(took = ?started.elapsed(), "reconcile pass done");

        let interval = self.config.scheduler.reconcile_interval;
        Ok(match next_backoff {
            Some(ms) => interval.min(Duration::from_millis(ms as u64 + 5)),
            None => interval,
        })
    }

    async fn execute(
        self: &Arc<Self>,
        action: Action,
        inputs: &HashMap<String, AppPlanInput>,
        observed: &plan::Observed,
        refs: &HashMap<String, InstanceRef>,
    ) {
        match action {
            Action::Start {
                app,
                process,
                release,
                slot,
                node,
            } => {
                let Some(input) = inputs.get(&app) else {
                    return;
                };
                let Some(p) = input.processes.iter().find(|p| p.name == process).cloned() else {
                    return;
                };
                let instance = format!(
                    "{app}-{process}-{slot}-v{release}-{}",
                    crate::auth::random_hex(2)
                );
                self.st().pending.insert(
                    instance.clone(),
                    Pending {
                        node: node.clone(),
                        app: app.clone(),
                        process: process.clone(),
                        release,
                        slot,
                        created_at: now_ms(),
                    },
                );
                tracing::info!(%app, %process, release, slot, %node, %instance, "starting instance");
                let me = self.clone();
                let app_ref = input.app.clone();
                let image = input.image.clone();
                let mut iref = InstanceRef {
                    app: app.clone(),
                    container_id: String::new(),
                    process: process.clone(),
                    release,
                    slot,
                    instance: instance.clone(),
                    node: node.clone(),
                };
                self.supervise("start", async move {
                    // Whatever happens below (an error, a panic), the start is no longer
                    // pending afterwards and a pass looks again.
                    let _done = Undo::new(&me, {
                        let instance = instance.clone();
                        move |st| {
                            st.pending.remove(&instance);
                            st.cancelled.remove(&instance);
                        }
                    });
                    let result = me
                        .start(&app_ref, &image, &p, release, slot, &node, &instance)
                        .await;
                    let cancel = {
                        let mut st = me.st();
                        st.pending.remove(&instance);
                        st.cancelled.remove(&instance)
                    };
                    match result {
                        Ok(started) if cancel => {
                            if let Some(n) = me.engine(&node) {
                                let _ = me
                                    .limited(
                                        me.engine_timeout(),
                                        &node,
                                        "removing an instance",
                                        n.remove_instance(&started.container_id),
                                    )
                                    .await;
                            }
                        }
                        Ok(started) => {
                            iref.container_id = started.container_id;
                            me.registry
                                .bus()
                                .publish(Event::InstanceStarted { instance: iref })
                        }
                        Err(e) => {
                            tracing::warn!(%instance, error = %e, "instance failed to start");
                            let mut logs = vec![e.to_string()];
                            // It exited at once: what it wrote says why (read here, in the
                            // start's task, bounded).
                            if let SchedulerError::Engine(runtime::EngineError::Docker(
                                node::NodeError::ExitedAtStart { container_id, .. },
                            )) = &e
                            {
                                if let Some(n) = me.engine(&node) {
                                    let written = runtime::last_logs(
                                        n.as_ref(),
                                        container_id,
                                        10,
                                        LAST_LOGS_TIMEOUT,
                                    )
                                    .await;
                                    if written.iter().any(|l| !l.is_empty()) {
                                        logs = written;
                                    }
                                }
                            }
                            me.record_crash(
                                &app_ref.name,
                                &p.name,
                                (slot, Some(release)),
                                None,
                                false,
                                logs.clone(),
                            );
                            me.crashed(iref, None, false, logs).await;
                        }
                    }
                });
            }
            Action::Drain {
                container_id,
                node,
                app,
                process,
                reason,
            } => {
                if let Some(instance) = container_id.strip_prefix("pending:") {
                    self.st().cancelled.insert(instance.to_string());
                    return;
                }
                let slot = observed
                    .instances
                    .iter()
                    .find(|i| i.container_id == container_id)
                    .map(|i| i.slot);
                let health_error = self.health.last_error(&container_id);
                if reason == plan::DrainReason::Unhealthy {
                    if let Some(slot) = slot {
                        let line = health_error
                            .as_ref()
                            .map(|e| format!("health check: {e}"))
                            .unwrap_or_default();
                        self.record_crash(&app, &process, (slot, None), None, false, vec![line]);
                    }
                }
                // The first snapshot built after this insert leaves the instance out.
                let unrouted = {
                    let mut st = self.st();
                    if !st.draining.insert(container_id.clone()) {
                        return;
                    }
                    st.routes_built + 1
                };
                tracing::info!(%app, %process, container = %short(&container_id), ?reason, "draining instance");
                let (cause, why) = drain_cause(reason, health_error.as_deref());
                let iref = refs.get(&container_id).cloned();
                let draining = iref.clone().map(|instance| Event::InstanceDraining {
                    instance,
                    cause,
                    reason: why.clone(),
                });
                // A replacement escale decided on its own is audited (the audit row publishes
                // the event, from the task); other drains are announced at once.
                if reason != plan::DrainReason::Unhealthy {
                    if let Some(e) = draining.clone() {
                        self.registry.bus().publish(e);
                    }
                }
                let me = self.clone();
                let mut published = self.routes_published.subscribe();
                self.supervise("drain", async move {
                    let _done = Undo::new(&me, {
                        let id = container_id.clone();
                        move |st| {
                            st.draining.remove(&id);
                        }
                    });
                    if reason == plan::DrainReason::Unhealthy {
                        let detail = match &iref {
                            Some(i) => format!(
                                "{}.{} v{} ({}) replaced: {why}",
                                i.process, i.slot, i.release, i.instance
                            ),
                            None => format!("{process} instance replaced: {why}"),
                        };
                        if let Some(event) = draining {
                            if let Err(e) = me
                                .registry
                                .record(Some(&app), "instance.replaced", &detail, event.clone())
                                .await
                            {
                                tracing::warn!(%app, error = %e, "cannot record the replacement");
                                me.registry.bus().publish(event);
                            }
                        }
                        // Why it failed, for `escale ps`: read out of the pass.
                        if let (Some(n), Some(slot)) = (me.engine(&node), slot) {
                            let logs = runtime::last_logs(
                                n.as_ref(),
                                &container_id,
                                10,
                                LAST_LOGS_TIMEOUT,
                            )
                            .await;
                            me.add_crash_logs(&app, &process, (slot, None), logs);
                        }
                    }
                    // Out of the routing table first: the grace period starts once the proxy
                    // has a snapshot without the instance (this pass publishes one after its
                    // actions, however long they take), so no new request reaches the instance
                    // after the grace, when it is stopped. The timeout is only a safety net.
                    me.changed.notify_one();
                    let wait = published.wait_for(|n| *n >= unrouted);
                    if tokio::time::timeout(Duration::from_secs(30), wait)
                        .await
                        .is_err()
                    {
                        tracing::warn!(container = %short(&container_id), "no routing snapshot published; draining anyway");
                    }
                    tokio::time::sleep(me.config.scheduler.drain_grace).await;
                    if let Some(n) = me.engine(&node) {
                        let stop_timeout = me.config.scheduler.stop_timeout;
                        let stopped = me
                            .limited(
                                stop_timeout + me.engine_timeout(),
                                &node,
                                "stopping an instance",
                                n.stop_instance(&container_id, stop_timeout),
                            )
                            .await;
                        if let Err(e) = stopped {
                            tracing::warn!(container = %short(&container_id), error = %e, "stop failed")
                        }
                        match me
                            .limited(
                                me.engine_timeout(),
                                &node,
                                "removing an instance",
                                n.remove_instance(&container_id),
                            )
                            .await
                        {
                            Ok(()) => {
                                if let Some(i) = iref {
                                    me.registry
                                        .bus()
                                        .publish(Event::InstanceStopped { instance: i });
                                }
                            }
                            Err(e) => {
                                tracing::warn!(container = %short(&container_id), error = %e, "remove failed")
                            }
                        }
                    }
                });
            }
            Action::Remove {
                container_id,
                node,
                app,
                process,
                slot,
                release,
                crashed,
            } => {
                let exited = observed
                    .instances
                    .iter()
                    .find(|i| i.container_id == container_id)
                    .map(|i| i.state.clone());
                let (code, oom) = match exited {
                    Some(InstanceState::Exited { code, oom }) => (Some(code), oom),
                    _ => (None, false),
                };
                if !self.st().removing.insert(container_id.clone()) {
                    return;
                }
                if crashed {
                    tracing::warn!(%app, %process, slot, release, exit_code = ?code, oom, "instance exited; it will be replaced");
                    // The backoff counts at once; the last lines follow from the task.
                    self.record_crash(&app, &process, (slot, Some(release)), code, oom, vec![]);
                }
                let iref = refs.get(&container_id).cloned();
                let me = self.clone();
                self.supervise("remove", async move {
                    let _done = Undo::new(&me, {
                        let id = container_id.clone();
                        move |st| {
                            st.removing.remove(&id);
                        }
                    });
                    let Some(n) = me.engine(&node) else {
                        return;
                    };
                    if crashed {
                        let logs =
                            runtime::last_logs(n.as_ref(), &container_id, 10, LAST_LOGS_TIMEOUT)
                                .await;
                        me.add_crash_logs(&app, &process, (slot, Some(release)), logs.clone());
                        if let Some(i) = iref {
                            me.crashed(i, code, oom, logs).await;
                        }
                    }
                    me.engine_calls
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = me
                        .limited(
                                me.engine_timeout(),
                                &node,
                                "removing an instance",
                                n.remove_instance(&container_id),
                            )
                        .await
                    {
                        tracing::warn!(container = %short(&container_id), error = %e, "remove failed");
                    }
                });
            }
            Action::RolloutSucceeded { app, release } => {
                if let Some(input) = inputs.get(&app) {
                    tracing::info!(%app, release, "rollout succeeded");
                    match self.registry.rollout_succeeded(&input.app, release).await {
                        Ok(()) => self
                            .registry
                            .bus()
                            .publish(Event::RolloutSucceeded { app, release }),
                        Err(e) => tracing::warn!(%app, error = %e, "cannot record the rollout"),
                    }
                }
            }
            Action::RolloutFailed {
                app,
                release,
                reason,
            } => {
                let Some(input) = inputs.get(&app) else {
                    return;
                };
                let mut full = reason.clone();
                let health_errors: std::collections::BTreeSet<String> = observed
                    .instances
                    .iter()
                    .filter(|i| i.app == app && i.release == release)
                    .filter_map(|i| self.health.last_error(&i.container_id))
                    .collect();
                if !health_errors.is_empty() {
                    let list: Vec<String> = health_errors.into_iter().collect();
                    full.push_str(&format!("; last health check: {}", list.join("; ")));
                }
                // Logs of the failed release: of its last crash, else of a running instance
                // (read in the task below: a pass never waits on a container).
                let logs: Vec<String> = {
                    let st = self.st();
                    st.release_crashes
                        .iter()
                        .filter(|((a, _, r), _)| *a == app && *r == release)
                        .flat_map(|(_, c)| c.last_logs.clone())
                        .filter(|l| !l.is_empty())
                        .collect()
                };
                let running = observed
                    .instances
                    .iter()
                    .find(|i| {
                        i.app == app
                            && i.release == release
                            && !i.container_id.starts_with("pending:")
                            && matches!(
                                i.state,
                                InstanceState::Starting
                                    | InstanceState::Unhealthy
                                    | InstanceState::Healthy
                            )
                    })
                    .map(|i| (i.node.clone(), i.container_id.clone()));
                // Recorded once: passes planned while the task runs find it here.
                if !self.st().failing.insert((app.clone(), release)) {
                    return;
                }
                let me = self.clone();
                let app_ref = input.app.clone();
                self.supervise("rollout-failed", async move {
                    let _done = Undo::new(&me, {
                        let key = (app.clone(), release);
                        move |st| {
                            st.failing.remove(&key);
                        }
                    });
                    let mut logs = logs;
                    if logs.is_empty() {
                        if let Some((node, id)) = running {
                            if let Some(n) = me.engine(&node) {
                                logs = runtime::last_logs(n.as_ref(), &id, 10, LAST_LOGS_TIMEOUT)
                                    .await;
                                logs.retain(|l| !l.is_empty());
                            }
                        }
                    }
                    if !logs.is_empty() {
                        let tail: Vec<String> =
                            logs.iter().rev().take(10).rev().cloned().collect();
                        full.push_str("\nlast log lines:\n");
                        full.push_str(&tail.join("\n"));
                    }
                    match me.registry.rollout_failed(&app_ref, release, &full).await {
                        Ok(previous) => {
                            match previous {
                                Some(p) => {
                                    tracing::warn!(%app, release, reason = %reason, previous = p, "rollout failed; the previous release keeps serving")
                                }
                                None => {
                                    tracing::warn!(%app, release, reason = %reason, "rollout failed; there is no previous release to serve the app")
                                }
                            }
                            me.registry.bus().publish(Event::RolloutFailed {
                                app,
                                release,
                                reason: full,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(%app, error = %e, "cannot record the failed rollout")
                        }
                    }
                });
            }
        }
    }

    /// Announces a crash (an exit, or a failed start) on the bus and in the audit log.
    async fn crashed(
        &self,
        instance: InstanceRef,
        exit_code: Option<i64>,
        oom: bool,
        last_logs: Vec<String>,
    ) {
        let app = instance.app.clone();
        let event = Event::InstanceCrashed {
            instance,
            exit_code,
            oom,
            last_logs,
        };
        let detail = event.summary();
        if let Err(e) = self
            .registry
            .record(Some(&app), "instance.crashed", &detail, event)
            .await
        {
            tracing::warn!(%app, error = %e, "cannot record the crash");
        }
    }

    /// Publishes `NodeReady`/`NodeDown` when a node's readiness changed (a first sighting of
    /// a ready node is announced too); losing a node and getting it back are audited.
    async fn announce_nodes(&self, nodes: &[NodeView]) {
        let changes: Vec<(NodeView, Option<bool>)> = {
            let mut st = self.st();
            nodes
                .iter()
                // A suspect node is neither lost nor back: nothing to announce yet.
                .filter(|n| n.state != NodeStatus::Suspect)
                .filter_map(|n| {
                    let before = st.node_ready.insert(n.name.clone(), n.ready);
                    (before != Some(n.ready)).then(|| (n.clone(), before))
                })
                .collect()
        };
        for (n, before) in changes {
            if n.ready {
                let event = Event::NodeReady {
                    node: n.name.clone(),
                };
                if before == Some(false) {
                    let detail = format!("node {} answers again", n.name);
                    if let Err(e) = self
                        .registry
                        .record(None, "node.ready", &detail, event)
                        .await
                    {
                        tracing::warn!(node = %n.name, error = %e, "cannot record the node");
                    }
                } else {
                    self.registry.bus().publish(event);
                }
            } else {
                let error = n.error.clone().unwrap_or_default();
                let detail = format!("node {} unreachable: {error}", n.name);
                let event = Event::NodeDown {
                    node: n.name.clone(),
                    error,
                };
                if let Err(e) = self
                    .registry
                    .record(None, "node.down", &detail, event)
                    .await
                {
                    tracing::warn!(node = %n.name, error = %e, "cannot record the node");
                }
            }
        }
    }

    /// Completes the planner's view of the nodes: capacity (cached, asked again every
    /// [`CAPACITY_REFRESH`] and when a node becomes ready, so a steady pass asks nothing),
    /// labels, cordoned and draining ([`Scheduler::set_node_meta`]), and the images of the
    /// containers listed there.
    async fn node_facts(
        &self,
        nodes: &mut [plan::NodeState],
        containers: &[(String, node::ContainerInstance)],
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let engines = self.engines();
        let due: Vec<&Arc<dyn Engine>> = {
            let st = self.st();
            engines
                .iter()
                .filter(|e| {
                    let answering = nodes
                        .iter()
                        .any(|n| n.name == e.name() && n.ready && !n.suspect);
                    let back = st.node_ready.get(e.name()) != Some(&true);
                    let stale = st
                        .capacity
                        .get(e.name())
                        .is_none_or(|(at, _)| at.elapsed() >= CAPACITY_REFRESH);
                    answering && (back || stale)
                })
                .collect()
        };
        let asked = futures_util::future::join_all(due.into_iter().map(|e| async move {
            self.engine_calls.fetch_add(1, Relaxed);
            let r = self
                .bounded(e.name(), "reading its capacity", e.capacity())
                .await;
            (e.name().to_string(), r)
        }))
        .await;
        let meta = self
            .node_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut st = self.st();
        for (name, r) in asked {
            let known = st.capacity.get(&name).and_then(|(_, c)| *c);
            let capacity = match r {
                Ok(c) => c.map(capacity_resources),
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot read the node's capacity; keeping what was known");
                    known
                }
            };
            st.capacity
                .insert(name, (std::time::Instant::now(), capacity));
        }
        for n in nodes.iter_mut() {
            n.capacity = st.capacity.get(&n.name).and_then(|(_, c)| *c);
            if let Some(m) = meta.get(&n.name) {
                n.labels = m.labels.clone();
                n.cordoned = m.cordoned;
                n.draining = m.draining;
            }
            n.images = containers
                .iter()
                .filter(|(node, c)| *node == n.name && !c.image.is_empty())
                .map(|(_, c)| c.image.clone())
                .collect();
        }
    }

    /// Logs starts that no node can take (once per change of reasons) and returns them for the
    /// cluster view, with what changed since the last pass: processes that lost a place (or
    /// whose reasons changed) and processes fully placed again, for [`Self::announce_placement`].
    fn report_unplaced(
        &self,
        unplaced: Vec<plan::Unplaced>,
    ) -> (Vec<UnplacedView>, Vec<PlacementChange>) {
        let mut st = self.st();
        let mut now: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut missing: HashMap<(String, String), u32> = HashMap::new();
        for u in &unplaced {
            now.entry((u.app.clone(), u.process.clone()))
                .or_insert_with(|| u.reasons.clone());
            *missing
                .entry((u.app.clone(), u.process.clone()))
                .or_default() += 1;
        }
        let mut changes = Vec::new();
        for ((app, process), reasons) in &now {
            if st.unplaced.get(&(app.clone(), process.clone())) != Some(reasons) {
                let why = if reasons.is_empty() {
                    "no node".to_string()
                } else {
                    reasons.join("; ")
                };
                tracing::warn!(%app, %process, reasons = %why, "no node can take an instance");
                changes.push(PlacementChange::Unplaced {
                    app: app.clone(),
                    process: process.clone(),
                    missing: missing[&(app.clone(), process.clone())],
                    reasons: reasons.clone(),
                });
            }
        }
        for (app, process) in st.unplaced.keys() {
            if !now.contains_key(&(app.clone(), process.clone())) {
                changes.push(PlacementChange::Placed {
                    app: app.clone(),
                    process: process.clone(),
                });
            }
        }
        st.unplaced = now;
        let views = unplaced
            .into_iter()
            .map(|u| UnplacedView {
                app: u.app,
                process: u.process,
                slot: u.slot,
                reasons: u.reasons,
            })
            .collect();
        (views, changes)
    }

    /// Records (audit log and bus) each process that no node can take an instance of, and
    /// each one fully placed again.
    async fn announce_placement(&self, changes: Vec<PlacementChange>) {
        for change in changes {
            let (app, action, event) = match change {
                PlacementChange::Unplaced {
                    app,
                    process,
                    missing,
                    reasons,
                } => (
                    app.clone(),
                    "instance.unplaced",
                    Event::InstancesUnplaced {
                        app,
                        process,
                        missing,
                        reasons,
                    },
                ),
                PlacementChange::Placed { app, process } => (
                    app.clone(),
                    "instance.placed",
                    Event::InstancesPlaced { app, process },
                ),
            };
            let detail = event.summary();
            if let Err(e) = self
                .registry
                .record(Some(&app), action, &detail, event)
                .await
            {
                tracing::warn!(%app, error = %e, "cannot record a placement change");
            }
        }
    }

    /// Publishes `InstanceHealthy`/`InstanceUnhealthy` for running instances whose verdict
    /// changed since it was last announced.
    fn announce_health(
        &self,
        containers: &[(String, node::ContainerInstance)],
        views: &[InstanceView],
    ) {
        let ids: HashMap<&str, &str> = containers
            .iter()
            .map(|(_, c)| (c.instance.as_str(), c.container_id.as_str()))
            .collect();
        let mut events = Vec::new();
        {
            let mut st = self.st();
            let seen: HashSet<&str> = views.iter().map(|v| v.instance.as_str()).collect();
            st.announced.retain(|i, _| seen.contains(i.as_str()));
            for v in views {
                if v.state != InstanceStatus::Running
                    || !matches!(v.health, HealthStatus::Healthy | HealthStatus::Unhealthy)
                {
                    continue;
                }
                if st.announced.insert(v.instance.clone(), v.health) == Some(v.health) {
                    continue;
                }
                let instance = InstanceRef {
                    app: v.app.clone(),
                    container_id: ids
                        .get(v.instance.as_str())
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    process: v.process.clone(),
                    release: v.release,
                    slot: v.slot,
                    instance: v.instance.clone(),
                    node: v.node.clone(),
                };
                events.push(if v.health == HealthStatus::Healthy {
                    Event::InstanceHealthy { instance }
                } else {
                    let reason = ids
                        .get(v.instance.as_str())
                        .and_then(|id| self.health.last_error(id))
                        .unwrap_or_else(|| "health check failed".into());
                    Event::InstanceUnhealthy { instance, reason }
                });
            }
        }
        for e in events {
            self.registry.bus().publish(e);
        }
    }

    /// Publishes `RolloutProgress` for apps whose release is deploying, when the numbers
    /// changed.
    fn announce_progress(
        &self,
        desired: &plan::Desired,
        observed: &plan::Observed,
        inputs: &HashMap<String, AppPlanInput>,
    ) {
        let mut events = Vec::new();
        {
            let mut st = self.st();
            let deploying: HashSet<&str> = desired
                .apps
                .iter()
                .filter(|a| a.rollout_deadline_ms.is_some() && inputs.contains_key(&a.app))
                .map(|a| a.app.as_str())
                .collect();
            st.progress.retain(|a, _| deploying.contains(a.as_str()));
            for a in desired
                .apps
                .iter()
                .filter(|a| deploying.contains(a.app.as_str()))
            {
                let mine = observed.instances.iter().filter(|i| i.app == a.app);
                let (mut healthy, mut old) = (0, 0);
                for i in mine {
                    let live = matches!(
                        i.state,
                        InstanceState::Starting | InstanceState::Healthy | InstanceState::Unhealthy
                    );
                    if i.release == a.release && i.state == InstanceState::Healthy {
                        healthy += 1;
                    } else if i.release != a.release && live {
                        old += 1;
                    }
                }
                let total = a.processes.iter().map(|p| p.instances).sum::<u32>();
                let now = (a.release, healthy, total, old);
                if st.progress.insert(a.app.clone(), now) != Some(now) {
                    events.push(Event::RolloutProgress {
                        app: a.app.clone(),
                        release: a.release,
                        healthy,
                        total,
                        old,
                    });
                }
            }
        }
        for e in events {
            self.registry.bus().publish(e);
        }
    }

    /// Removes the networks of apps the registry no longer has (destroyed apps, leftovers of
    /// an earlier run). Runs on the first pass, when an app left the registry, while a
    /// network could not be removed yet (its containers still draining), and every
    /// [`NETWORK_SWEEP_INTERVAL`]; otherwise costs nothing. Each call is bounded.
    async fn sweep_networks(&self, apps: HashSet<(String, String)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let due = {
            let mut st = self.st();
            let gone = st.network_apps.difference(&apps).next().is_some();
            st.network_apps = apps.clone();
            gone || st.networks_left
                || st
                    .networks_swept
                    .is_none_or(|t| t.elapsed() >= NETWORK_SWEEP_INTERVAL)
        };
        if !due {
            return;
        }
        let mut left = false;
        for n in &self.engines() {
            self.engine_calls.fetch_add(1, Relaxed);
            let networks = match self
                .bounded(
                    n.name(),
                    "listing app networks",
                    n.list_app_networks(&self.installation),
                )
                .await
            {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!(node = %n.name(), error = %e, "cannot list app networks");
                    left = true;
                    continue;
                }
            };
            for net in networks {
                if apps.contains(&(net.app.clone(), net.app_uid.clone())) {
                    continue;
                }
                self.engine_calls.fetch_add(1, Relaxed);
                match self
                    .bounded(n.name(), "removing a network", n.remove_network(&net.id))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(node = %n.name(), network = %net.name, app = %net.app, "app network removed")
                    }
                    // Most likely containers of the app are still draining: next pass.
                    Err(e) => {
                        tracing::debug!(node = %n.name(), network = %net.name, error = %e, "app network not removed yet");
                        left = true;
                    }
                }
            }
        }
        let mut st = self.st();
        st.networks_swept = Some(std::time::Instant::now());
        st.networks_left = left;
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        app: &AppRef,
        image: &str,
        p: &ProcessType,
        release: u32,
        slot: u32,
        node_name: &str,
        instance: &str,
    ) -> Result<node::StartedInstance, SchedulerError> {
        let node = self.engine(node_name).ok_or(SchedulerError::NoNode)?;
        // Pulls and copies move whole images: bounded by the deploy timeout instead.
        let transfer = self
            .config
            .scheduler
            .deploy_timeout
            .max(self.engine_timeout());
        // One transfer of an image to a node at a time: the starts of several instances
        // there wait for the first to bring it, then find it present.
        let transfer_lock = self
            .transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((node_name.to_string(), image.to_string()))
            .or_default()
            .clone();
        let transferring = transfer_lock.lock().await;
        if !self
            .bounded(node_name, "looking up an image", node.image_exists(image))
            .await?
        {
            let mut copied = false;
            for other in &self.engines() {
                if other.name() != node.name()
                    && self
                        .bounded(
                            other.name(),
                            "looking up an image",
                            other.image_exists(image),
                        )
                        .await
                        .unwrap_or(false)
                {
                    self.bounded_for(
                        transfer,
                        node_name,
                        "copying an image",
                        runtime::copy_image(other.as_ref(), node.as_ref(), image),
                    )
                    .await?;
                    copied = true;
                    break;
                }
            }
            if !copied {
                self.bounded_for(
                    transfer,
                    node_name,
                    "pulling an image",
                    node.ensure_image(image),
                )
                .await?;
            }
        }
        drop(transferring);
        drop(transfer_lock);
        self.transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, l| Arc::strong_count(l) > 1);
        let mut env = self.registry.release_env(app, release).await?;
        env.push(("ESCALE_APP".into(), app.name.clone()));
        env.push(("ESCALE_PROCESS".into(), p.name.clone()));
        env.push(("ESCALE_RELEASE".into(), format!("v{release}")));
        env.push(("ESCALE_INSTANCE".into(), instance.to_string()));
        let spec = InstanceSpec {
            installation: self.installation.clone(),
            app: app.name.clone(),
            process: p.name.clone(),
            release,
            slot,
            instance: instance.to_string(),
            image: image.to_string(),
            env,
            command: p.command.clone(),
            port: p.port,
            memory_bytes: p.memory_bytes.map(|m| m as i64),
            nano_cpus: p.nano_cpus,
            bind_ip: node.advertise_ip(),
            log_max_size: self.config.scheduler.log_max_size.clone(),
            log_max_files: self.config.scheduler.log_max_files,
            extra_labels: vec![(node::LABEL_SPEC.to_string(), spec_hash(image, p))],
            app_uid: app.uid.clone(),
            ..Default::default()
        };
        Ok(self
            .limited(
                self.engine_timeout(),
                node_name,
                "starting an instance",
                node.start_instance(&spec),
            )
            .await?)
    }

    /// Records a crash of `slot`; with a release, an exit or failed start of that release
    /// (an unhealthy drain has none: it is not counted against the release).
    fn record_crash(
        &self,
        app: &str,
        process: &str,
        (slot, release): (u32, Option<u32>),
        code: Option<i64>,
        oom: bool,
        logs: Vec<String>,
    ) {
        let mut st = self.st();
        if let Some(release) = release {
            let r = st
                .release_crashes
                .entry((app.to_string(), process.to_string(), release))
                .or_default();
            r.crashes += 1;
            if let Some(code) = code {
                r.last_exit = Some((code, oom));
            }
            if logs.iter().any(|l| !l.is_empty()) {
                r.last_logs = logs.clone();
            }
        }
        *st.restarts
            .entry((app.to_string(), process.to_string(), slot))
            .or_default() += 1;
        let c = st
            .crashes
            .entry((app.to_string(), process.to_string(), slot))
            .or_default();
        c.crashes += 1;
        // A first crash is restarted at once (as Heroku does); a loop backs off 1 s, 2 s, 4 s ...
        c.until_ms = now_ms() as u64 + plan::backoff_delay_ms(c.crashes - 1);

        if code.is_some() {
            c.last_exit = code;
        }
        c.oom = oom;
        if logs.iter().any(|l| !l.is_empty()) {
            c.last_logs = logs;
        }
    }

    /// Adds the last lines of a crashed (or replaced) instance to its slot's crash record,
    /// once an action task has read them.
    fn add_crash_logs(
        &self,
        app: &str,
        process: &str,
        (slot, release): (u32, Option<u32>),
        logs: Vec<String>,
    ) {
        if !logs.iter().any(|l| !l.is_empty()) {
            return;
        }
        let mut st = self.st();
        if let Some(release) = release {
            if let Some(r) =
                st.release_crashes
                    .get_mut(&(app.to_string(), process.to_string(), release))
            {
                r.last_logs = logs.clone();
            }
        }
        if let Some(c) = st
            .crashes
            .get_mut(&(app.to_string(), process.to_string(), slot))
        {
            c.last_logs
                .retain(|l| !l.is_empty() && l.starts_with("health check: "));
            c.last_logs.extend(logs);
        }
    }

    /// Builds and publishes the routing table. `draining_before` (taken before `containers`
    /// were listed) keeps out a container whose drain completed during this pass: the listing
    /// still shows it running, but it is stopped or gone.
    fn publish_routes(
        &self,
        containers: &[(String, node::ContainerInstance)],
        inputs: &HashMap<String, AppPlanInput>,
        domains: &[(String, String)],
        draining_before: &HashSet<String>,
    ) {
        let (draining, built) = {
            let mut st = self.st();
            st.routes_built += 1;
            (st.draining.clone(), st.routes_built)
        };
        let mut backends: BTreeMap<&str, Vec<Backend>> = BTreeMap::new();
        for name in inputs.keys() {
            backends.insert(name.as_str(), Vec::new());
        }
        for (_, c) in containers {
            if c.process != "web"
                || c.state != node::InstanceState::Running
                || draining.contains(&c.container_id)
                || draining_before.contains(&c.container_id)
            {
                continue;
            }
            if self.health.get(&c.container_id) != Some(Health::Healthy) {
                continue;
            }
            if let (Some(list), Some(addr)) = (backends.get_mut(c.app.as_str()), c.addr) {
                list.push(Backend {
                    instance: c.instance.clone(),
                    addr,
                });
            }
        }
        let mut entries = Vec::new();
        let mut routes: HashMap<&str, Arc<Route>> = HashMap::new();
        for (app, mut list) in backends {
            list.sort_by(|a, b| a.instance.cmp(&b.instance));
            let route = Arc::new(Route {
                app: app.to_string(),
                backends: list,
                max_body_bytes: self.config.proxy.max_body_bytes,
                redirect_https: false,
            });
            entries.push((format!("{app}.{}", self.config.apps_domain), route.clone()));
            routes.insert(app, route);
        }
        for (domain, app) in domains {
            if let Some(r) = routes.get(app.as_str()) {
                entries.push((domain.clone(), r.clone()));
            }
        }
        if let Some(certs) = self.certs.get() {
            for (host, route) in &mut entries {
                if certs.get(host).is_some() {
                    *route = Arc::new(Route {
                        redirect_https: true,
                        ..Route::clone(route)
                    });
                }
            }
        }
        let table = RoutingTable::new(entries);
        if **self.routes.load() != table {
            tracing::debug!(hosts = table.len(), "publishing routing table");
            self.routes.store(Arc::new(table));
        }
        self.routes_published.send_replace(built);
    }
}

/// A short hash of what an instance of `p` runs with: a change (resources, command, port)
/// makes running instances stale, and the planner rolls them like a new release.
/// Every container that holds resources (all but exited ones), at its process's declared
/// CPUs and memory.
/// Whether `slot` of `process` of `app` is one the registry wants now (slots count from 1).
fn slot_desired(
    inputs: &HashMap<String, AppPlanInput>,
    app: &str,
    process: &str,
    slot: u32,
) -> bool {
    inputs.get(app).is_some_and(|i| {
        i.processes
            .iter()
            .any(|p| p.name == process && slot >= 1 && slot <= p.instances)
    })
}

fn placed_instances(desired: &plan::Desired, observed: &plan::Observed) -> Vec<PlacedInstance> {
    let declared: HashMap<(&str, &str), placement::Resources> = desired
        .apps
        .iter()
        .flat_map(|a| {
            a.processes
                .iter()
                .map(move |p| ((a.app.as_str(), p.process.as_str()), p.resources))
        })
        .collect();
    let mut seen = HashSet::new();
    observed
        .instances
        .iter()
        .filter(|i| !matches!(i.state, InstanceState::Exited { .. }))
        .filter(|i| seen.insert(i.container_id.as_str()))
        .map(|i| PlacedInstance {
            app: i.app.clone(),
            node: i.node.clone(),
            resources: declared
                .get(&(i.app.as_str(), i.process.as_str()))
                .copied()
                .unwrap_or_default(),
        })
        .collect()
}

/// A node's capacity in placement's terms.
/// A node's capacity as placement counts it.
pub fn capacity_resources(c: node::Capacity) -> placement::Resources {
    placement::Resources {
        nano_cpus: u64::from(c.cpus) * placement::NANOS_PER_CPU,
        memory_bytes: c.memory_bytes,
    }
}

pub fn spec_hash(image: &str, p: &ProcessType) -> String {
    use sha2::{Digest, Sha256};
    let text =
        serde_json::json!([image, p.command, p.port, p.memory_bytes, p.nano_cpus]).to_string();
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

fn pending_id(instance: &str) -> String {
    format!("pending:{instance}")
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The message a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Why a drain happens, for its event.
fn drain_cause(reason: plan::DrainReason, health_error: Option<&str>) -> (DrainCause, String) {
    use plan::DrainReason as R;
    match reason {
        R::Replaced => (DrainCause::Rollout, "replaced by the target release".into()),
        R::ScaledDown => (DrainCause::ScaledDown, "scaled down".into()),
        R::Duplicate => (
            DrainCause::ScaledDown,
            "a second instance of its slot".into(),
        ),
        R::Unhealthy => (
            DrainCause::Unhealthy,
            match health_error {
                Some(e) => format!("failing its health check: {e}"),
                None => "failing its health check".into(),
            },
        ),
        R::Orphan => (
            DrainCause::ScaledDown,
            "its app or process is no longer desired".into(),
        ),
        R::Moved => (
            DrainCause::Rollout,
            "moved off its node (draining, or lacking a label its process needs)".into(),
        ),
    }
}

/// Undoes one piece of in-flight bookkeeping (a start pending, a drain, a removal, a failed
/// rollout being recorded) when its task ends, whatever way it ends (a panic included), and
/// wakes a pass to look again.
struct Undo {
    me: Arc<Scheduler>,
    undo: Option<UndoFn>,
}

type UndoFn = Box<dyn FnOnce(&mut ExecState) + Send>;

impl Undo {
    fn new(me: &Arc<Scheduler>, undo: impl FnOnce(&mut ExecState) + Send + 'static) -> Undo {
        Undo {
            me: me.clone(),
            undo: Some(Box::new(undo)),
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo(&mut self.me.st());
        }
        self.me.changed.notify_one();
    }
}

/// Follows a node's container events and wakes the reconciler on each; reconnects on error.
async fn watch_events(
    node: Arc<dyn Engine>,
    installation: String,
    changed: Arc<Notify>,
    me: Arc<Scheduler>,
) {
    loop {
        let mut events = node.events(&installation);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    tracing::debug!(node = %node.name(), action = %ev.action, instance = ?ev.instance, "engine event");
                    changed.notify_one();
                    // The engine sends `die` a moment before its container list says
                    // "exited": look again shortly, so healing does not wait for the interval.
                    if matches!(ev.action.as_str(), "die" | "oom") {
                        let again = changed.clone();
                        me.supervise("event follow-up", async move {
                            for ms in [150, 350, 500] {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                again.notify_one();
                            }
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %node.name(), error = %e, "event stream ended");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
