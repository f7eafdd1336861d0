//! The pure planner: `plan(desired, observed) -> Vec<Action>`. No I/O.
//!
//! The reconciler reads the registry (what should run: [`Desired`]) and the Docker engines
//! (what runs: [`Observed`]), calls [`plan`], and executes the returned [`Action`]s. This module
//! performs no I/O and reads no clock: the current time is [`Observed::now_ms`]. The same input
//! always gives the same actions in the same order.
//!
//! # Vocabulary
//!
//! For one process of one app (an `(app, process)` pair), let `N` be the desired instance count,
//! `S` the surge (a surge of 0 is treated as 1) and `R` the target release.
//!
//! - An instance is **live** when it is `Starting`, `Healthy` or `Unhealthy` *and* sits on a node
//!   that is listed and ready. `Draining` instances are ignored entirely (the executor is stopping
//!   them). Instances on nodes that are not ready or not listed are **lost**: they are not live,
//!   they hold no slot, and the planner emits nothing for them (it cannot act on such a node).
//! - An instance is **current** when it runs `R` and was started from the current process
//!   definition: its [`ObservedInstance::spec`] equals [`DesiredProcess::spec`] (an unknown spec
//!   on either side counts as equal). A resource, command, port or image change thus rolls
//!   instances exactly like a new release. The release number is not part of the spec hash:
//!   it is compared on its own.
//! - The **target slots** are `1..=N`. In each target slot at most one live current instance
//!   is the slot's **keeper** (preferring `Healthy`, then `Starting`, then `Unhealthy`, then the
//!   smallest container id).
//! - A live current instance is **misplaced** when its node is draining or lacks a label the
//!   process is constrained to ([`DesiredProcess::constraints`]): it is retiring
//!   ([`DrainReason::Moved`]) and its slot is free, so a replacement starts on another node and
//!   the old one is drained only once enough instances are healthy, as in a rolling deploy.
//! - Every other live instance of the process is **retiring**: instances of other releases
//!   (older ones during a deploy, newer ones after a rollback) or of an older spec, current
//!   instances in slots outside `1..=N` (scaled down), and the non-keepers of a slot
//!   (duplicates).
//! - A live instance **accepts** connections when it is `Healthy`, or `Unhealthy` with
//!   [`HealthFacts::accepting`] (its failing probes were answered late, badly or with a 5xx, not
//!   refused): it is busy, not gone.
//!
//! # Algorithm, per `(app, process)`
//!
//! 1. Exited containers are removed ([`Action::Remove`]). `crashed` is true only for a current
//!    instance in a target slot that was not being drained; that slot is then not restarted in
//!    the same pass, so the backoff the reconciler records takes effect.
//! 2. Keepers are chosen. An `Unhealthy` keeper is not routed (the reconciler routes healthy
//!    instances only) but stays.
//! 3. Retiring instances are drained in this order: `Unhealthy`, `Starting`, `Healthy`; among
//!    equals, non-current before current, the oldest release first, the highest slot first,
//!    then container id. Non-healthy ones (they serve nothing) are always drained. A healthy
//!    one is drained only while `healthy keepers + healthy retiring left afterwards >= N`.
//! 4. **Unhealthy keepers are replaced late, one at a time, never the last accepting one.** At
//!    most one `Unhealthy` keeper per process and pass is drained ([`DrainReason::Unhealthy`];
//!    its slot is not restarted in the same pass), the one unhealthy the longest (then the
//!    lowest slot) among those that: have been unhealthy for at least
//!    [`DesiredProcess::unhealthy_replace_after_ms`] (since [`HealthFacts::unhealthy_since_ms`];
//!    unknown counts as `now_ms`); and are not the last instance of the process accepting
//!    connections (counting keepers and the retiring instances left running). None is drained
//!    while a replacement is under way in the process: a target slot whose keeper is
//!    `Starting`, whose current instance is `Draining`, or that is empty and cooling or in
//!    backoff. So an app that is only slow keeps its instance (out of rotation until it
//!    answers again), while one that refuses connections is replaced.
//! 5. Free target slots (no keeper, not cooling from steps 1 and 4, no backoff with
//!    `until_ms > now_ms`) are started in ascending order, as many as the budget
//!    `N + S - live after the drains` allows.
//! 6. Each start is placed by [`super::placement`]: a ready, open node with the labels and
//!    the free resources it needs, spread first. A start no node can take is left out and
//!    reported with the reason per node ([`plan_report`], [`Unplaced`]).
//!
//! Instances whose app or process is not desired are **orphans**: live ones are drained
//! ([`DrainReason::Orphan`]), exited ones removed with `crashed = false`.
//!
//! # Invariants (each is covered by tests below)
//!
//! - **Surge cap**: after applying a plan, live instances of a process never exceed `N + S`
//!   unless they already did before the pass (then the count does not grow, and nothing starts).
//!   Target-slot instances of `R` never exceed `N` (one keeper per slot).
//! - **Availability**: when `N > 0`, healthy instances after applying a plan are at least
//!   `min(N, healthy before)`. In particular the last healthy instance of a process is never
//!   drained before a replacement of `R` is healthy. With `N = 0`, everything is drained.
//! - **First deploy / scale up**: when no retiring instance is live, every missing slot is
//!   started at once (the budget is at least `S + missing`).
//! - **Scale down**: instances of `R` above slot `N` and duplicates are drained, without dropping
//!   below `N` healthy instances while the target slots are not all healthy yet.
//! - **Backoff**: a slot with a [`SlotBackoff`] whose `until_ms > now_ms` is never started.
//! - **Lost nodes**: no action names a container on, or a start onto, a node that is not ready
//!   or not listed; replacements for lost instances go to ready nodes. No ready node: no start.
//! - **Rollout verdict** (only when [`DesiredApp::rollout_deadline_ms`] is set):
//!   [`Action::RolloutSucceeded`] when every desired process has a healthy keeper in every target
//!   slot and the app has no live instance outside its target (other releases, older specs,
//!   undesired processes); otherwise, once `now_ms >= deadline`, [`Action::RolloutFailed`] with a
//!   reason a person can act on, and in that pass no non-current instance is drained (the
//!   reconciler switches the target back to the previous release).
//! - **Early rollout failure**: before the deadline, [`Action::RolloutFailed`] (same effects) as
//!   soon as a desired process with `N > 0` cannot succeed, and only while **no** current
//!   instance of any process of the app is healthy: (a) its instances of `R` exited or failed to
//!   start [`CRASHES_TO_FAIL_ROLLOUT`] times ([`Observed::crashes`]), or (b) it has live current
//!   instances and every one of them never passed a probe and failed at least
//!   [`FAILED_PROBES_TO_FAIL_ROLLOUT`] probes after its start grace
//!   ([`HealthFacts::failed_after_grace`]). The reason names the rule and the last exit code.
//! - **Unhealthy replacement**: an `Unhealthy` keeper is drained only as step 4 allows; in
//!   particular an instance that accepts connections and is the only one of its process doing
//!   so is never drained as unhealthy, and at most one is drained per process and pass.
//! - **Determinism and convergence**: output is sorted by app, process, action kind
//!   (remove, drain, start), slot, container id, with the rollout verdict last for its app.
//!   Re-planning after applying a plan makes progress towards exactly `N` healthy instances of
//!   `R` in slots `1..=N` and nothing else, and once there the plan is empty (no flip-flop).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::placement::{Placer, Request, Resources};

/// First crash-loop backoff delay, in milliseconds.
pub const BACKOFF_BASE_MS: u64 = 1_000;
/// Largest crash-loop backoff delay, in milliseconds.
pub const BACKOFF_MAX_MS: u64 = 60_000;
/// Exits (or failed starts) of instances of the target release of a process that fail its
/// rollout early, when none of them is healthy.
pub const CRASHES_TO_FAIL_ROLLOUT: u32 = 3;
/// Probes failed after the start grace by every new instance of a process, none of which ever
/// passed one, that fail its rollout early.
pub const FAILED_PROBES_TO_FAIL_ROLLOUT: u32 = 3;
/// Largest instance count per process; larger desired counts are clamped to it, so a corrupt
/// registry row cannot make the planner iterate over billions of slots.
pub const MAX_INSTANCES: u32 = 10_000;

/// What should run: one entry per app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The apps. Names should be unique; if not, the first entry of a name wins.
    pub apps: Vec<DesiredApp>,
}

/// The target state of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredApp {
    /// The app name.
    pub app: String,
    /// The target release (v1, v2, ...).
    pub release: u32,
    /// The process types of the target release. If a name repeats, the first entry wins.
    pub processes: Vec<DesiredProcess>,
    /// Set (unix ms) while a rollout of `release` is in progress; `None` when settled.
    pub rollout_deadline_ms: Option<u64>,
}

/// The desired shape of one process type (`web`, `worker`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredProcess {
    /// The process type name.
    pub process: String,
    /// Desired instance count (clamped to [`MAX_INSTANCES`]); instances occupy slots
    /// `1..=instances`.
    pub instances: u32,
    /// Extra instances allowed during a rollout (>= 1; 0 is treated as 1).
    pub surge: u32,
    /// The hash of what an instance of this process is started from (image, command, port,
    /// memory, cpus; see `scheduler::spec_hash`). An instance of the target release is current
    /// only when its [`ObservedInstance::spec`] is this one (or unknown); otherwise it is
    /// rolled like an instance of another release. Empty: every spec is current.
    pub spec: String,
    /// How long an instance of the target release in a target slot must have been `Unhealthy`
    /// before it is replaced (`scheduler.unhealthy_replace_after`), in ms.
    pub unhealthy_replace_after_ms: u64,
    /// Declared CPUs and memory of one instance (zero: none declared); placement counts them
    /// against each node's capacity.
    pub resources: Resources,
    /// Node labels an instance needs (`disk = "ssd"`). An instance on a node that lacks one is
    /// moved like one on a draining node.
    pub constraints: BTreeMap<String, String>,
    /// Free node resources do not limit placement (`scheduler.overcommit` or the process's own
    /// flag).
    pub overcommit: bool,
    /// The image of the target release (nodes holding it are preferred); empty: unknown.
    pub image: String,
}

/// What runs, as seen by the reconciler at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The current time, unix ms. The planner reads no clock.
    pub now_ms: u64,
    /// The nodes (Docker engines) and whether they can be acted on.
    pub nodes: Vec<NodeState>,
    /// Every escale container found on the nodes.
    pub instances: Vec<ObservedInstance>,
    /// Crash-loop backoff the reconciler remembers per slot.
    pub backoff: Vec<SlotBackoff>,
    /// Exits (and failed starts) counted per release of a process, for the early rollout
    /// verdict. Entries of the same `(app, process, release)` add up.
    pub crashes: Vec<ReleaseCrashes>,
}

/// How many instances of one release of a process exited unexpectedly or failed to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseCrashes {
    /// The app.
    pub app: String,
    /// The process type.
    pub process: String,
    /// The release.
    pub release: u32,
    /// Unexpected exits and failed starts of its instances.
    pub crashes: u32,
    /// The exit code of the last exit and whether it was an OOM kill (`None`: only failed
    /// starts, or unknown).
    pub last_exit: Option<(i64, bool)>,
}

/// What escale's health checker knows of one running container (all default when unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthFacts {
    /// It passed a probe at least once.
    pub ever_healthy: bool,
    /// Consecutive probes failed after its start grace, counted only while it has never
    /// passed one.
    pub failed_after_grace: u32,
    /// Unix ms at which it turned `Unhealthy`; `None` when it is not unhealthy or the time is
    /// unknown (then it is treated as unhealthy since `now_ms`: never replaced on that basis).
    pub unhealthy_since_ms: Option<u64>,
    /// Whether its last probe found the port accepting connections (the probe failed by a
    /// timeout, a slow or a 5xx answer: busy, not dead). False when nothing was listening
    /// (refused, reset, closed without an answer) or no probe failed yet.
    pub accepting: bool,
}

/// One node. A name listed several times is ready only if every entry says so (and cordoned,
/// draining or suspect if one says so; capacity, labels and images come from the first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The node name.
    pub name: String,
    /// Whether the node's instances count (it answers, or has only just stopped answering).
    pub ready: bool,
    /// It has stopped answering, not for long (a blip so far): its instances count as last
    /// seen, but nothing new is placed on it.
    pub suspect: bool,
    /// What the node has in all (`None`: unknown, resources are then not judged).
    pub capacity: Option<Resources>,
    /// The node's labels (`disk = "ssd"`), matched against process constraints.
    pub labels: BTreeMap<String, String>,
    /// Nothing new is placed on it; its instances stay.
    pub cordoned: bool,
    /// Nothing new is placed on it and its instances are replaced elsewhere: a replacement
    /// starts on another node, and the old instance is drained once enough are healthy.
    pub draining: bool,
    /// Images known to be on the node (preferred by placement).
    pub images: BTreeSet<String>,
}

/// One container: an instance of (app, process, release, slot) on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedInstance {
    /// The Docker container id.
    pub container_id: String,
    /// The node the container runs on.
    pub node: String,
    /// The app.
    pub app: String,
    /// The process type.
    pub process: String,
    /// The release the container runs.
    pub release: u32,
    /// The slot, 1-based.
    pub slot: u32,
    /// The container's state.
    pub state: InstanceState,
    /// The spec hash the container was started with (label `escale.spec`); `None` when unknown.
    pub spec: Option<String>,
    /// Health checker facts (meaningful for `Starting` and `Unhealthy`).
    pub health: HealthFacts,
}

/// The state of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// Running, no health verdict yet (within start grace).
    Starting,
    /// Running and passing health checks: routable.
    Healthy,
    /// Running, failing health checks after the start grace.
    Unhealthy,
    /// Being stopped by the executor: not routable; the planner neither counts nor acts on it.
    Draining,
    /// The container stopped (crashed, killed, OOM).
    Exited {
        /// The exit code.
        code: i64,
        /// Whether the kernel OOM-killed it.
        oom: bool,
    },
}

/// A slot that must not be started before `until_ms` (crash-loop backoff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBackoff {
    /// The app.
    pub app: String,
    /// The process type.
    pub process: String,
    /// The slot.
    pub slot: u32,
    /// Unix ms; the slot may start again once `now_ms >= until_ms`.
    pub until_ms: u64,
}

/// Why an instance is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DrainReason {
    /// An instance of another release, superseded by the target release.
    Replaced,
    /// An instance of the target release in a slot above the desired count (or the count is 0).
    ScaledDown,
    /// A second instance of the target release in the same slot.
    Duplicate,
    /// The slot's instance of the target release has failed its health checks for
    /// `unhealthy_replace_after` (see the module docs for when that is allowed). The reconciler
    /// records backoff for the slot; it is restarted in a later pass.
    Unhealthy,
    /// The app or the process is no longer desired.
    Orphan,
    /// Its node is draining, or lacks a label its process is constrained to: a replacement
    /// on another node is healthy (or enough others are).
    Moved,
}

/// One step for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start a container for this instance on `node`.
    Start {
        /// The app.
        app: String,
        /// The process type.
        process: String,
        /// The release to run (always the target release).
        release: u32,
        /// The slot to fill.
        slot: u32,
        /// The chosen ready node.
        node: String,
    },
    /// Remove from routing, wait, SIGTERM, remove.
    Drain {
        /// The container.
        container_id: String,
        /// Its node.
        node: String,
        /// The app.
        app: String,
        /// The process type.
        process: String,
        /// Why.
        reason: DrainReason,
    },
    /// Delete an exited container. `crashed = true` feeds the slot's backoff
    /// (see [`backoff_delay_ms`]).
    Remove {
        /// The container.
        container_id: String,
        /// Its node.
        node: String,
        /// The app.
        app: String,
        /// The process type.
        process: String,
        /// Its slot.
        slot: u32,
        /// Its release.
        release: u32,
        /// True for an unexpected exit of a target-slot instance of the target release.
        crashed: bool,
    },
    /// Every process of the app runs its desired count of healthy instances of `release`, and
    /// nothing else of the app is live.
    RolloutSucceeded {
        /// The app.
        app: String,
        /// The release that is now serving alone.
        release: u32,
    },
    /// The deadline passed before the rollout completed, or the rollout cannot succeed (see
    /// the module docs, early failure). Old instances were left serving.
    RolloutFailed {
        /// The app.
        app: String,
        /// The release that failed to roll out.
        release: u32,
        /// What went wrong, per process, for a person to act on.
        reason: String,
    },
}

/// Crash-loop backoff after `consecutive_crashes` crashes of a slot: 1 s, 2 s, 4 s, ... capped
/// at 60 s. Zero crashes means no delay.
pub fn backoff_delay_ms(consecutive_crashes: u32) -> u64 {
    match consecutive_crashes {
        0 => 0,
        n if n > 6 => BACKOFF_MAX_MS,
        n => (BACKOFF_BASE_MS << (n - 1)).min(BACKOFF_MAX_MS),
    }
}

/// Plans the next actions that move `observed` towards `desired`.
///
/// See the module documentation for the rules. Placement of a [`Action::Start`] (see
/// [`super::placement`]): among feasible nodes, the one with the fewest live instances of the
/// same `(app, process)`, then one holding the image, then the fewest live instances in total,
/// then the smallest name; counts exclude instances drained in this pass and include starts
/// planned earlier in this pass. Resources count every container still running (drained ones
/// until they stop) at its process's declared CPUs and memory.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Action> {
    plan_report(desired, observed).actions
}

/// A plan with what it could not place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What the executor does, as [`plan`] returns it.
    pub actions: Vec<Action>,
    /// Starts no node could take, with the reason per node.
    pub unplaced: Vec<Unplaced>,
}

/// A start the planner wanted but no node could take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub app: String,
    pub process: String,
    pub slot: u32,
    /// One line per node: `n2: 200 MiB free, needs 256 MiB`, `n3: lacks disk=ssd`; empty when
    /// there is no node.
    pub reasons: Vec<String>,
}

/// [`plan`], and the starts it could not place with why.
pub fn plan_report(desired: &Desired, observed: &Observed) -> Plan {
    let now = observed.now_ms;
    let ready = ready_nodes(&observed.nodes);
    let views = instance_views(&observed.instances);
    let targets = index_desired(desired);

    // Instances on ready nodes, by (app, process). Lost instances are left out on purpose.
    let mut groups: BTreeMap<(&str, &str), Vec<&View<'_>>> = BTreeMap::new();
    for view in &views {
        if ready.contains(view.inst.node.as_str()) {
            groups
                .entry((view.inst.app.as_str(), view.inst.process.as_str()))
                .or_default()
                .push(view);
        }
    }

    let mut out: Vec<(SortKey, Action)> = Vec::new();
    let mut drained: BTreeSet<&str> = BTreeSet::new();
    let mut starts: Vec<(&str, &str, u32, u32)> = Vec::new();

    // Orphans: the app or the process is not desired.
    for (&(app, process), group) in &groups {
        let desired_here = targets
            .get(app)
            .is_some_and(|t| t.processes.contains_key(process));
        if desired_here {
            continue;
        }
        for view in group {
            match view.phase {
                Phase::Live(_) => {
                    drained.insert(view.inst.container_id.as_str());
                    out.push(drain(view, DrainReason::Orphan));
                }
                Phase::Exited { .. } => out.push(remove(view, false)),
                Phase::Draining => {}
            }
        }
    }

    // Nodes whose instances move away: draining ones, and (per process) those lacking a
    // label the process is constrained to.
    let node_facts = node_facts(&observed.nodes);
    for (&app, target) in &targets {
        let verdict = rollout_verdict(target, &groups, observed, !ready.is_empty());
        let freeze_other_releases = matches!(verdict, Some(Action::RolloutFailed { .. }));
        for (&process, spec) in &target.processes {
            let group = groups.get(&(app, process)).map_or(&[][..], Vec::as_slice);
            let blocked = blocked_slots(&observed.backoff, app, process, now);
            let misplaced = |node: &str| {
                node_facts.get(node).is_some_and(|&(draining, labels)| {
                    draining
                        || spec
                            .constraints
                            .iter()
                            .any(|(k, v)| labels.get(k) != Some(v))
                })
            };
            let pp = plan_process(
                target.spec.release,
                spec,
                group,
                &blocked,
                freeze_other_releases,
                &misplaced,
                now,
            );
            for (view, crashed) in pp.removes {
                out.push(remove(view, crashed));
            }
            for (view, reason) in pp.drains {
                drained.insert(view.inst.container_id.as_str());
                out.push(drain(view, reason));
            }
            for slot in pp.start_slots {
                starts.push((app, process, target.spec.release, slot));
            }
        }
        if let Some(action) = verdict {
            let key = SortKey {
                app: app.to_owned(),
                section: 1,
                process: String::new(),
                kind: 0,
                slot: 0,
                container_id: String::new(),
            };
            out.push((key, action));
        }
    }

    // Placement (see `placement`): feasible nodes (ready, open, labels, free resources), spread
    // first; resources count every container still running (drained ones too, until they
    // stop), spread only the live ones kept, and both count this pass's starts.
    let declared = |app: &str, process: &str| {
        targets
            .get(app)
            .and_then(|t| t.processes.get(process))
            .map_or(Resources::default(), |p| p.resources)
    };
    let mut placer = Placer::new(&observed.nodes);
    for v in &views {
        let inst = v.inst;
        let resources = declared(&inst.app, &inst.process);
        match v.phase {
            Phase::Live(_) if !drained.contains(inst.container_id.as_str()) => {
                placer.add(&inst.app, &inst.process, &inst.node, resources);
            }
            Phase::Live(_) | Phase::Draining => placer.reserve(&inst.node, resources),
            Phase::Exited { .. } => {}
        }
    }
    let mut unplaced = Vec::new();
    for (app, process, release, slot) in starts {
        let Some(spec) = targets.get(app).and_then(|t| t.processes.get(process)) else {
            continue;
        };
        let request = Request {
            app,
            process,
            resources: spec.resources,
            constraints: &spec.constraints,
            image: &spec.image,
            overcommit: spec.overcommit,
        };
        let node = match placer.place(&request) {
            Ok(node) => node,
            Err(why) => {
                unplaced.push(Unplaced {
                    app: app.to_owned(),
                    process: process.to_owned(),
                    slot,
                    reasons: why.reasons,
                });
                continue;
            }
        };
        let key = SortKey {
            app: app.to_owned(),
            section: 0,
            process: process.to_owned(),
            kind: 2,
            slot,
            container_id: String::new(),
        };
        out.push((
            key,
            Action::Start {
                app: app.to_owned(),
                process: process.to_owned(),
                release,
                slot,
                node: node.to_owned(),
            },
        ));
    }

    // A failed rollout says what could not be placed, and why, node by node.
    for (_, action) in &mut out {
        let Action::RolloutFailed { app, reason, .. } = action else {
            continue;
        };
        let mut per: BTreeMap<&str, (usize, &[String])> = BTreeMap::new();
        for u in unplaced.iter().filter(|u| &u.app == app) {
            per.entry(u.process.as_str())
                .or_insert((0, u.reasons.as_slice()))
                .0 += 1;
        }
        for (process, (n, reasons)) in per {
            if reasons.is_empty() {
                continue;
            }
            reason.push_str(&format!(
                "; {process}: no node can take {n} instance(s): {}",
                reasons.join(", ")
            ));
        }
    }

    out.sort_by(|a, b| a.0.cmp(&b.0));
    Plan {
        actions: out.into_iter().map(|(_, action)| action).collect(),
        unplaced,
    }
}

/// Per node name (entries merged): whether it is draining, and its labels (first entry's).
fn node_facts(nodes: &[NodeState]) -> BTreeMap<&str, (bool, &BTreeMap<String, String>)> {
    let mut out: BTreeMap<&str, (bool, &BTreeMap<String, String>)> = BTreeMap::new();
    for n in nodes {
        out.entry(n.name.as_str()).or_insert((false, &n.labels)).0 |= n.draining;
    }
    out
}

/// Output order: app, then its process actions before its rollout verdict, then process,
/// kind (remove, drain, start), slot, container id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    app: String,
    section: u8,
    process: String,
    kind: u8,
    slot: u32,
    container_id: String,
}

/// A live state, ordered by drain preference (drain `Unhealthy` first, `Healthy` last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Live {
    Unhealthy,
    Starting,
    Healthy,
}

/// The planner's reading of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live(Live),
    Draining,
    Exited {
        code: i64,
        oom: bool,
        after_drain: bool,
    },
}

/// One container (deduplicated by container id) and how the planner reads it.
#[derive(Debug)]
struct View<'a> {
    inst: &'a ObservedInstance,
    phase: Phase,
}

/// What [`plan_process`] decided for one `(app, process)`.
struct ProcessPlan<'v, 'a> {
    removes: Vec<(&'v View<'a>, bool)>,
    drains: Vec<(&'v View<'a>, DrainReason)>,
    start_slots: Vec<u32>,
}

/// A desired app with its processes indexed by name.
struct AppTarget<'a> {
    spec: &'a DesiredApp,
    processes: BTreeMap<&'a str, &'a DesiredProcess>,
}

fn ready_nodes(nodes: &[NodeState]) -> BTreeSet<&str> {
    let mut ready: BTreeMap<&str, bool> = BTreeMap::new();
    for node in nodes {
        *ready.entry(node.name.as_str()).or_insert(true) &= node.ready;
    }
    ready
        .into_iter()
        .filter_map(|(name, ok)| ok.then_some(name))
        .collect()
}

/// Deduplicates containers by id (sorted by id). A container reported both `Draining` and
/// `Exited` exited after being drained: that is not a crash. Otherwise the first report wins.
fn instance_views(instances: &[ObservedInstance]) -> Vec<View<'_>> {
    let mut by_id: BTreeMap<&str, Vec<&ObservedInstance>> = BTreeMap::new();
    for inst in instances {
        by_id
            .entry(inst.container_id.as_str())
            .or_default()
            .push(inst);
    }
    let mut views = Vec::with_capacity(by_id.len());
    for reports in by_id.into_values() {
        let Some(&first) = reports.first() else {
            continue;
        };
        let draining = reports
            .iter()
            .any(|i| matches!(i.state, InstanceState::Draining));
        let exit = reports.iter().find_map(|i| match i.state {
            InstanceState::Exited { code, oom } => Some((code, oom)),
            _ => None,
        });
        let phase = match (draining, exit) {
            (true, Some((code, oom))) => Phase::Exited {
                code,
                oom,
                after_drain: true,
            },
            (true, None) => Phase::Draining,
            (false, _) => match first.state {
                InstanceState::Starting => Phase::Live(Live::Starting),
                InstanceState::Healthy => Phase::Live(Live::Healthy),
                InstanceState::Unhealthy => Phase::Live(Live::Unhealthy),
                InstanceState::Draining => Phase::Draining,
                InstanceState::Exited { code, oom } => Phase::Exited {
                    code,
                    oom,
                    after_drain: false,
                },
            },
        };
        views.push(View { inst: first, phase });
    }
    views
}

fn index_desired(desired: &Desired) -> BTreeMap<&str, AppTarget<'_>> {
    let mut targets: BTreeMap<&str, AppTarget<'_>> = BTreeMap::new();
    for spec in &desired.apps {
        targets.entry(spec.app.as_str()).or_insert_with(|| {
            let mut processes = BTreeMap::new();
            for p in &spec.processes {
                processes.entry(p.process.as_str()).or_insert(p);
            }
            AppTarget { spec, processes }
        });
    }
    targets
}

fn blocked_slots(backoff: &[SlotBackoff], app: &str, process: &str, now: u64) -> BTreeSet<u32> {
    backoff
        .iter()
        .filter(|b| b.app == app && b.process == process && b.until_ms > now)
        .map(|b| b.slot)
        .collect()
}

/// Whether `inst` is an instance of the target `release` started from the current process
/// definition `spec` (an unknown spec on either side counts as current).
fn is_current(inst: &ObservedInstance, release: u32, spec: &DesiredProcess) -> bool {
    inst.release == release
        && (spec.spec.is_empty() || inst.spec.as_deref().is_none_or(|h| h == spec.spec))
}

/// Whether a live instance accepts connections: healthy ones do; unhealthy ones when their
/// last failed probe was answered or timed out rather than refused.
fn accepts(view: &View<'_>, state: Live) -> bool {
    match state {
        Live::Healthy => true,
        Live::Unhealthy => view.inst.health.accepting,
        Live::Starting => false,
    }
}

/// Plans one desired `(app, process)` from its instances on ready nodes.
fn plan_process<'v, 'a>(
    release: u32,
    spec: &DesiredProcess,
    group: &[&'v View<'a>],
    blocked: &BTreeSet<u32>,
    freeze_other_releases: bool,
    misplaced: &dyn Fn(&str) -> bool,
    now: u64,
) -> ProcessPlan<'v, 'a> {
    let n = spec.instances.min(MAX_INSTANCES);
    let surge = spec.surge.max(1);
    let in_target = |slot: u32| (1..=n).contains(&slot);

    let mut removes = Vec::new();
    let mut drains = Vec::new();
    // Slots that crashed or were found unhealthy in this pass: restarted in a later pass, once
    // the reconciler has recorded their backoff.
    let mut cooling: BTreeSet<u32> = BTreeSet::new();
    let mut by_slot: BTreeMap<u32, Vec<(&'v View<'a>, Live)>> = BTreeMap::new();
    let mut retiring: Vec<(&'v View<'a>, Live, DrainReason)> = Vec::new();
    // Target slots whose current instance is being stopped (a replacement under way).
    let mut draining_slots: BTreeSet<u32> = BTreeSet::new();

    for &view in group {
        let inst = view.inst;
        let current = is_current(inst, release, spec);
        match view.phase {
            Phase::Draining => {
                if current && in_target(inst.slot) {
                    draining_slots.insert(inst.slot);
                }
            }
            Phase::Exited { after_drain, .. } => {
                let crashed = !after_drain && current && in_target(inst.slot);
                if crashed {
                    cooling.insert(inst.slot);
                }
                removes.push((view, crashed));
            }
            Phase::Live(state) => {
                if !current {
                    retiring.push((view, state, DrainReason::Replaced));
                } else if misplaced(&inst.node) {
                    // Its slot is free for a replacement on another node; it is drained
                    // like an old release, once enough instances are healthy.
                    retiring.push((view, state, DrainReason::Moved));
                } else if in_target(inst.slot) {
                    by_slot.entry(inst.slot).or_default().push((view, state));
                } else {
                    retiring.push((view, state, DrainReason::ScaledDown));
                }
            }
        }
    }

    // One keeper per target slot: healthiest first, then smallest container id.
    let mut keepers: BTreeMap<u32, (&'v View<'a>, Live)> = BTreeMap::new();
    for (slot, mut candidates) in by_slot {
        candidates.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.inst.container_id.cmp(&b.0.inst.container_id))
        });
        let mut candidates = candidates.into_iter();
        let Some((keeper, state)) = candidates.next() else {
            continue;
        };
        for (dup, dup_state) in candidates {
            retiring.push((dup, dup_state, DrainReason::Duplicate));
        }
        keepers.insert(slot, (keeper, state));
    }

    // Drain retiring instances without letting healthy capacity fall below N.
    let healthy_keepers = keepers
        .values()
        .filter(|(_, s)| *s == Live::Healthy)
        .count();
    retiring.sort_by_key(|(view, state, _)| {
        (
            *state,
            is_current(view.inst, release, spec),
            view.inst.release,
            Reverse(view.inst.slot),
            view.inst.container_id.as_str(),
        )
    });
    let mut healthy_retiring = retiring
        .iter()
        .filter(|(_, state, _)| *state == Live::Healthy)
        .count();
    let mut kept_retiring = 0usize;
    let mut kept_retiring_accepting = 0usize;
    for (view, state, reason) in retiring {
        let frozen = freeze_other_releases && !is_current(view.inst, release, spec);
        let spare = healthy_keepers + healthy_retiring > n as usize;
        if !frozen && (state != Live::Healthy || spare) {
            if state == Live::Healthy {
                healthy_retiring -= 1;
            }
            drains.push((view, reason));
        } else {
            kept_retiring += 1;
            if accepts(view, state) {
                kept_retiring_accepting += 1;
            }
        }
    }

    // Unhealthy keepers stay (unrouted) until they have been unhealthy for the threshold; then
    // at most one is replaced, only while no replacement is under way in the process (a target
    // slot whose keeper is starting, whose current instance is draining, or that is empty and
    // in backoff), and never the last instance accepting connections.
    let under_way = (1..=n).any(|s| match keepers.get(&s) {
        Some((_, state)) => *state == Live::Starting,
        None => draining_slots.contains(&s) || blocked.contains(&s) || cooling.contains(&s),
    });
    let accepting =
        keepers.values().filter(|(v, s)| accepts(v, *s)).count() + kept_retiring_accepting;
    let mut unhealthy: Vec<(u64, u32, &'v View<'a>)> = keepers
        .iter()
        .filter(|(_, (_, s))| *s == Live::Unhealthy)
        .map(|(&slot, &(v, _))| (v.inst.health.unhealthy_since_ms.unwrap_or(now), slot, v))
        .collect();
    unhealthy.sort_by_key(|&(since, slot, _)| (since, slot));
    let replace = unhealthy.into_iter().find(|&(since, _, v)| {
        let due = now.saturating_sub(since) >= spec.unhealthy_replace_after_ms;
        let last_accepting = v.inst.health.accepting && accepting <= 1;
        due && !under_way && !last_accepting
    });
    if let Some((_, slot, view)) = replace {
        keepers.remove(&slot);
        cooling.insert(slot);
        drains.push((view, DrainReason::Unhealthy));
    }

    // Start free target slots within the surge budget.
    let live_after = keepers.len() + kept_retiring;
    let cap = usize::try_from(n.saturating_add(surge)).unwrap_or(usize::MAX);
    let budget = cap.saturating_sub(live_after);
    let start_slots = (1..=n)
        .filter(|s| !keepers.contains_key(s) && !cooling.contains(s) && !blocked.contains(s))
        .take(budget)
        .collect();

    ProcessPlan {
        removes,
        drains,
        start_slots,
    }
}

/// The rollout verdict for an app, if a rollout is in progress and it is decided.
fn rollout_verdict(
    target: &AppTarget<'_>,
    groups: &BTreeMap<(&str, &str), Vec<&View<'_>>>,
    observed: &Observed,
    any_ready_node: bool,
) -> Option<Action> {
    let deadline = target.spec.rollout_deadline_ms?;
    let app = target.spec.app.as_str();
    let release = target.spec.release;
    let empty: Vec<&View<'_>> = Vec::new();

    let mut complete = true;
    let mut problems: Vec<String> = Vec::new();
    // Processes whose rollout cannot succeed, for the early verdict, and whether any current
    // instance of the app is healthy (then there is no early verdict).
    let mut hopeless: Vec<String> = Vec::new();
    let mut app_healthy = false;

    for (&process, spec) in &target.processes {
        let n = spec.instances.min(MAX_INSTANCES);
        let group = groups.get(&(app, process)).unwrap_or(&empty);
        let mut healthy_slots: BTreeSet<u32> = BTreeSet::new();
        let (mut starting, mut unhealthy, mut others) = (0usize, 0usize, 0usize);
        let mut any_healthy = false;
        let mut exits: Vec<(u32, &str, i64, bool)> = Vec::new();
        // Live current instances, and how many of them never passed a probe and failed
        // enough probes after their grace.
        let (mut new_live, mut new_failing) = (0usize, 0usize);
        let mut min_failed = u32::MAX;
        for view in group {
            let inst = view.inst;
            let mine = is_current(inst, release, spec);
            if mine {
                if let Phase::Live(state) = view.phase {
                    new_live += 1;
                    let f = &inst.health;
                    if state != Live::Healthy
                        && !f.ever_healthy
                        && f.failed_after_grace >= FAILED_PROBES_TO_FAIL_ROLLOUT
                    {
                        new_failing += 1;
                        min_failed = min_failed.min(f.failed_after_grace);
                    }
                }
            }
            match view.phase {
                Phase::Live(_) if !mine => others += 1,
                Phase::Live(Live::Healthy) => {
                    any_healthy = true;
                    if (1..=n).contains(&inst.slot) {
                        healthy_slots.insert(inst.slot);
                    }
                }
                Phase::Live(Live::Starting) => starting += 1,
                Phase::Live(Live::Unhealthy) => unhealthy += 1,
                Phase::Exited { code, oom, .. } if mine => {
                    exits.push((inst.slot, inst.container_id.as_str(), code, oom));
                }
                Phase::Exited { .. } | Phase::Draining => {}
            }
        }
        exits.sort();
        let recorded = observed
            .crashes
            .iter()
            .filter(|c| c.app == app && c.process == process && c.release == release);
        let crashes: u32 = recorded
            .clone()
            .fold(0u32, |sum, c| sum.saturating_add(c.crashes));
        // An exit still observed, else the last one the reconciler recorded.
        let last = exits
            .last()
            .map(|&(_, _, code, oom)| (code, oom))
            .or_else(|| recorded.filter_map(|c| c.last_exit).max());
        let last_exit = last.map(|(code, oom)| {
            if oom {
                format!("last exit code {code} (killed: out of memory)")
            } else {
                format!("last exit code {code}")
            }
        });

        app_healthy |= any_healthy;
        // Early failure (only if no current instance of any process is healthy, see below).
        if n > 0 && !any_healthy {
            if crashes >= CRASHES_TO_FAIL_ROLLOUT {
                let mut text = format!(
                    "{process}: instances of v{release} exited or failed to start {crashes} times and none became healthy"
                );
                if let Some(e) = &last_exit {
                    text.push_str("; ");
                    text.push_str(e);
                }
                hopeless.push(text);
            } else if new_live > 0 && new_failing == new_live {
                hopeless.push(format!(
                    "{process}: every new instance of v{release} ({new_live}) failed its health check on each probe after its start grace ({min_failed} or more) and none ever passed"
                ));
            }
        }

        let healthy = healthy_slots.len();
        if healthy == n as usize && others == 0 {
            continue;
        }
        complete = false;
        let mut parts = vec![format!(
            "{process}: {healthy} of {n} instances of v{release} healthy after the deploy timeout"
        )];
        if starting > 0 {
            parts.push(format!("{starting} still starting"));
        }
        if unhealthy > 0 {
            parts.push(format!("{unhealthy} failing health checks"));
        }
        let backing_off = blocked_slots(&observed.backoff, app, process, observed.now_ms)
            .into_iter()
            .filter(|s| (1..=n).contains(s) && !healthy_slots.contains(s))
            .count();
        if backing_off > 0 {
            parts.push(format!("{backing_off} in crash-loop backoff"));
        }
        if let Some(e) = last_exit {
            parts.push(e);
        }
        if healthy == n as usize {
            parts.push(format!(
                "{others} instances of other releases still running"
            ));
        }
        problems.push(parts.join("; "));
    }

    // Live instances of processes the target release does not have.
    for (&(group_app, process), group) in groups {
        if group_app != app || target.processes.contains_key(process) {
            continue;
        }
        let live = group
            .iter()
            .filter(|v| matches!(v.phase, Phase::Live(_)))
            .count();
        if live > 0 {
            complete = false;
            problems.push(format!(
                "{process}: {live} instances still running, but v{release} has no such process"
            ));
        }
    }

    if complete {
        return Some(Action::RolloutSucceeded {
            app: app.to_owned(),
            release,
        });
    }
    if observed.now_ms < deadline {
        if hopeless.is_empty() || app_healthy {
            return None;
        }
        return Some(Action::RolloutFailed {
            app: app.to_owned(),
            release,
            reason: hopeless.join("; "),
        });
    }
    if !any_ready_node {
        problems.push("no node is ready to run instances".to_owned());
    }
    Some(Action::RolloutFailed {
        app: app.to_owned(),
        release,
        reason: problems.join("; "),
    })
}

fn drain<'a>(view: &View<'a>, reason: DrainReason) -> (SortKey, Action) {
    let inst = view.inst;
    let key = SortKey {
        app: inst.app.clone(),
        section: 0,
        process: inst.process.clone(),
        kind: 1,
        slot: inst.slot,
        container_id: inst.container_id.clone(),
    };
    let action = Action::Drain {
        container_id: inst.container_id.clone(),
        node: inst.node.clone(),
        app: inst.app.clone(),
        process: inst.process.clone(),
        reason,
    };
    (key, action)
}

fn remove<'a>(view: &View<'a>, crashed: bool) -> (SortKey, Action) {
    let inst = view.inst;
    let key = SortKey {
        app: inst.app.clone(),
        section: 0,
        process: inst.process.clone(),
        kind: 0,
        slot: inst.slot,
        container_id: inst.container_id.clone(),
    };
    let action = Action::Remove {
        container_id: inst.container_id.clone(),
        node: inst.node.clone(),
        app: inst.app.clone(),
        process: inst.process.clone(),
        slot: inst.slot,
        release: inst.release,
        crashed,
    };
    (key, action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;
    const REPLACE_AFTER_MS: u64 = 60_000;
    const TICK_MS: u64 = 10_000;

    // ---------- builders ----------

    fn nodes(names: &[&str]) -> Vec<NodeState> {
        names
            .iter()
            .map(|n| NodeState {
                name: (*n).to_owned(),
                ready: true,
                ..NodeState::default()
            })
            .collect()
    }

    fn process(name: &str, instances: u32, surge: u32) -> DesiredProcess {
        DesiredProcess {
            process: name.to_owned(),
            instances,
            surge,
            spec: String::new(),
            unhealthy_replace_after_ms: REPLACE_AFTER_MS,
            ..DesiredProcess::default()
        }
    }

    fn app(name: &str, release: u32, processes: Vec<DesiredProcess>) -> DesiredApp {
        DesiredApp {
            app: name.to_owned(),
            release,
            processes,
            rollout_deadline_ms: None,
        }
    }

    fn inst(
        id: &str,
        node: &str,
        app: &str,
        process: &str,
        release: u32,
        slot: u32,
        state: InstanceState,
    ) -> ObservedInstance {
        // An `Unhealthy` instance built here has been so for long, and refuses connections:
        // replaceable unless a test says otherwise.
        let health = HealthFacts {
            ever_healthy: state != Starting,
            unhealthy_since_ms: (state == Unhealthy).then_some(0),
            ..HealthFacts::default()
        };
        ObservedInstance {
            container_id: id.to_owned(),
            node: node.to_owned(),
            app: app.to_owned(),
            process: process.to_owned(),
            release,
            slot,
            state,
            spec: None,
            health,
        }
    }

    /// `web` instance of app `shop`.
    fn web(
        id: &str,
        node: &str,
        release: u32,
        slot: u32,
        state: InstanceState,
    ) -> ObservedInstance {
        inst(id, node, "shop", "web", release, slot, state)
    }

    fn shop(release: u32, instances: u32, surge: u32) -> Desired {
        Desired {
            apps: vec![app("shop", release, vec![process("web", instances, surge)])],
        }
    }

    fn observed(node_names: &[&str], instances: Vec<ObservedInstance>) -> Observed {
        Observed {
            now_ms: NOW,
            nodes: nodes(node_names),
            instances,
            backoff: Vec::new(),
            crashes: Vec::new(),
        }
    }

    use InstanceState::{Draining, Healthy, Starting, Unhealthy};

    fn exited(code: i64) -> InstanceState {
        InstanceState::Exited { code, oom: false }
    }

    /// (process, slot, node) of every start.
    fn starts(actions: &[Action]) -> Vec<(String, u32, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start {
                    process,
                    slot,
                    node,
                    ..
                } => Some((process.clone(), *slot, node.clone())),
                _ => None,
            })
            .collect()
    }

    fn start_slots(actions: &[Action]) -> Vec<u32> {
        starts(actions).into_iter().map(|(_, s, _)| s).collect()
    }

    /// (container id, reason) of every drain.
    fn drains(actions: &[Action]) -> Vec<(String, DrainReason)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Drain {
                    container_id,
                    reason,
                    ..
                } => Some((container_id.clone(), *reason)),
                _ => None,
            })
            .collect()
    }

    /// (container id, crashed) of every remove.
    fn removes(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove {
                    container_id,
                    crashed,
                    ..
                } => Some((container_id.clone(), *crashed)),
                _ => None,
            })
            .collect()
    }

    fn ids(list: &[(String, DrainReason)]) -> Vec<&str> {
        list.iter().map(|(id, _)| id.as_str()).collect()
    }

    // ---------- a simulated executor + reconciler ----------

    /// Applies plans the way the executor and reconciler would: starts create `Starting`
    /// containers, drains mark `Draining` (gone at the next tick), removes delete, crashes and
    /// unhealthy drains record backoff, a success verdict settles the rollout.
    #[derive(Debug, Clone)]
    struct Sim {
        desired: Desired,
        observed: Observed,
        next_id: u64,
        crashes: BTreeMap<(String, String, u32), u32>,
        verdicts: Vec<Action>,
    }

    impl Sim {
        fn new(desired: Desired, node_names: &[&str]) -> Sim {
            Sim::from_state(desired, observed(node_names, Vec::new()))
        }

        fn from_state(desired: Desired, observed: Observed) -> Sim {
            Sim {
                desired,
                observed,
                next_id: 0,
                crashes: BTreeMap::new(),
                verdicts: Vec::new(),
            }
        }

        fn plan(&self) -> Vec<Action> {
            plan(&self.desired, &self.observed)
        }

        fn record_crash(&mut self, app: &str, process: &str, slot: u32) {
            let count = self
                .crashes
                .entry((app.to_owned(), process.to_owned(), slot))
                .or_default();
            *count += 1;
            let until_ms = self.observed.now_ms + backoff_delay_ms(*count);
            self.observed
                .backoff
                .retain(|b| !(b.app == app && b.process == process && b.slot == slot));
            self.observed.backoff.push(SlotBackoff {
                app: app.to_owned(),
                process: process.to_owned(),
                slot,
                until_ms,
            });
        }

        fn apply(&mut self, actions: &[Action]) {
            for action in actions {
                match action {
                    Action::Start {
                        app,
                        process,
                        release,
                        slot,
                        node,
                    } => {
                        self.next_id += 1;
                        let id = format!("c{:05}", self.next_id);
                        let spec = index_desired(&self.desired)
                            .get(app.as_str())
                            .and_then(|t| t.processes.get(process.as_str()))
                            .map(|p| p.spec.clone())
                            .filter(|s| !s.is_empty());
                        let mut started = inst(&id, node, app, process, *release, *slot, Starting);
                        started.spec = spec;
                        self.observed.instances.push(started);
                    }
                    Action::Drain {
                        container_id,
                        reason,
                        ..
                    } => {
                        let mut crashed_slot = None;
                        for i in &mut self.observed.instances {
                            if &i.container_id == container_id {
                                i.state = Draining;
                                if *reason == DrainReason::Unhealthy {
                                    crashed_slot = Some((i.app.clone(), i.process.clone(), i.slot));
                                }
                            }
                        }
                        if let Some((app, process, slot)) = crashed_slot {
                            self.record_crash(&app, &process, slot);
                        }
                    }
                    Action::Remove {
                        container_id,
                        app,
                        process,
                        slot,
                        release,
                        crashed,
                        ..
                    } => {
                        self.observed
                            .instances
                            .retain(|i| &i.container_id != container_id);
                        if *crashed {
                            self.record_crash(app, process, *slot);
                            self.observed.crashes.push(ReleaseCrashes {
                                app: app.clone(),
                                process: process.clone(),
                                release: *release,
                                crashes: 1,
                                last_exit: Some((1, false)),
                            });
                        }
                    }
                    Action::RolloutSucceeded { app, .. } => {
                        for a in &mut self.desired.apps {
                            if &a.app == app {
                                a.rollout_deadline_ms = None;
                            }
                        }
                        self.verdicts.push(action.clone());
                    }
                    Action::RolloutFailed { .. } => self.verdicts.push(action.clone()),
                }
            }
        }

        /// Time passes: drained containers are gone.
        fn tick(&mut self) {
            self.observed.instances.retain(|i| i.state != Draining);
            self.observed.now_ms += TICK_MS;
        }

        fn step(&mut self) -> Vec<Action> {
            let actions = self.plan();
            self.apply(&actions);
            self.tick();
            actions
        }

        fn mark_starting(&mut self, state: InstanceState) {
            for i in &mut self.observed.instances {
                if i.state == Starting {
                    i.state = state.clone();
                }
            }
        }

        fn ready(&self) -> BTreeSet<String> {
            ready_nodes(&self.observed.nodes)
                .into_iter()
                .map(str::to_owned)
                .collect()
        }

        /// Live instances of (app, process) on ready nodes.
        fn live(&self, app: &str, process: &str) -> Vec<&ObservedInstance> {
            let ready = self.ready();
            self.observed
                .instances
                .iter()
                .filter(|i| i.app == app && i.process == process && ready.contains(&i.node))
                .filter(|i| matches!(i.state, Starting | Healthy | Unhealthy))
                .collect()
        }

        fn healthy(&self, app: &str, process: &str) -> usize {
            self.live(app, process)
                .iter()
                .filter(|i| i.state == Healthy)
                .count()
        }

        /// Exactly N healthy instances of R in slots 1..=N per desired process, and nothing
        /// else on ready nodes.
        fn converged(&self) -> bool {
            let ready = self.ready();
            let mut slots: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
            for i in &self.observed.instances {
                if !ready.contains(&i.node) {
                    continue;
                }
                if i.state != Healthy {
                    return false;
                }
                slots
                    .entry((i.app.as_str(), i.process.as_str()))
                    .or_default()
                    .push(i.slot);
            }
            let targets = index_desired(&self.desired);
            let all_desired = slots
                .keys()
                .all(|&(a, p)| targets.get(a).is_some_and(|t| t.processes.contains_key(p)));
            if !all_desired {
                return false;
            }
            for (&a, t) in &targets {
                for (&p, spec) in &t.processes {
                    let mut want: Vec<u32> = (1..=spec.instances).collect();
                    let mut have = slots.get(&(a, p)).cloned().unwrap_or_default();
                    have.sort_unstable();
                    want.sort_unstable();
                    if have != want {
                        return false;
                    }
                    let wrong_release = self.observed.instances.iter().any(|i| {
                        ready.contains(&i.node)
                            && i.app == a
                            && i.process == p
                            && !is_current(i, t.spec.release, spec)
                    });
                    if wrong_release {
                        return false;
                    }
                }
            }
            true
        }

        /// Runs passes in which every start becomes healthy; returns the passes taken.
        fn run_until_converged(&mut self, max_passes: usize) -> Option<usize> {
            for pass in 0..max_passes {
                let actions = self.step();
                self.mark_starting(Healthy);
                let only_verdicts = actions
                    .iter()
                    .all(|a| matches!(a, Action::RolloutSucceeded { .. }));
                if only_verdicts && self.converged() {
                    return Some(pass + 1);
                }
            }
            None
        }
    }

    // ---------- placement: drain, cordon, constraints, resources ----------

    fn node_mut<'s>(sim: &'s mut Sim, name: &str) -> &'s mut NodeState {
        sim.observed
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node")
    }

    fn on(sim: &Sim, node: &str) -> usize {
        sim.live("shop", "web")
            .iter()
            .filter(|i| i.node == node)
            .count()
    }

    #[test]
    fn a_draining_node_is_emptied_replacements_first_never_below_the_healthy_count() {
        for surge in [1, 2] {
            let mut sim = Sim::new(shop(1, 3, surge), &["n1", "n2", "n3"]);
            assert!(sim.run_until_converged(10).is_some());
            assert_eq!(on(&sim, "n1"), 1);
            node_mut(&mut sim, "n1").draining = true;
            let mut passes = 0;
            while on(&sim, "n1") > 0 || !sim.converged() {
                passes += 1;
                assert!(passes < 20, "no progress: {:?}", sim.observed.instances);
                let actions = sim.plan();
                for (_, _, node) in starts(&actions) {
                    assert_ne!(node, "n1", "nothing new on a draining node");
                }
                for (_, reason) in drains(&actions) {
                    assert_eq!(reason, DrainReason::Moved);
                }
                sim.apply(&actions);
                assert!(sim.healthy("shop", "web") >= 3, "healthy count kept");
                assert!(
                    sim.live("shop", "web").len() <= 3 + surge as usize,
                    "surge cap"
                );
                sim.tick();
                sim.mark_starting(Healthy);
            }
            assert_eq!(on(&sim, "n1"), 0);
            assert!(sim.plan().is_empty());
        }
    }

    #[test]
    fn a_draining_node_with_nowhere_else_to_go_keeps_its_instances() {
        let mut sim = Sim::new(shop(1, 2, 1), &["n1"]);
        assert!(sim.run_until_converged(10).is_some());
        node_mut(&mut sim, "n1").draining = true;
        let report = plan_report(&sim.desired, &sim.observed);
        assert!(report.actions.is_empty(), "{:?}", report.actions);
        assert_eq!(report.unplaced.len(), 1);
        assert_eq!(report.unplaced[0].reasons, ["n1: draining"]);
    }

    #[test]
    fn a_cordoned_node_keeps_its_instances_and_gets_nothing_new() {
        let mut sim = Sim::new(shop(1, 2, 1), &["n1", "n2"]);
        assert!(sim.run_until_converged(10).is_some());
        node_mut(&mut sim, "n1").cordoned = true;
        assert!(sim.plan().is_empty(), "its instance stays");
        sim.desired = shop(1, 4, 1);
        let actions = sim.plan();
        assert_eq!(
            starts(&actions),
            [
                ("web".into(), 3, "n2".into()),
                ("web".into(), 4, "n2".into())
            ]
        );
    }

    #[test]
    fn constraints_place_on_labelled_nodes_and_move_instances_off_the_others() {
        let mut sim = Sim::new(shop(1, 2, 1), &["n1", "n2", "n3"]);
        node_mut(&mut sim, "n3")
            .labels
            .insert("disk".into(), "ssd".into());
        assert!(sim.run_until_converged(10).is_some());
        assert_eq!(on(&sim, "n3"), 0, "spread by name: n1 and n2");
        sim.desired.apps[0].processes[0]
            .constraints
            .insert("disk".into(), "ssd".into());
        assert!(sim.run_until_converged(20).is_some());
        assert_eq!(on(&sim, "n3"), 2, "{:?}", sim.observed.instances);
    }

    #[test]
    fn unplaceable_starts_are_reported_with_a_reason_per_node() {
        let mut sim = Sim::new(shop(1, 3, 1), &["n1", "n2", "n3"]);
        let gib = |g: u64| Resources {
            nano_cpus: 2 * super::super::placement::NANOS_PER_CPU,
            memory_bytes: g << 30,
        };
        node_mut(&mut sim, "n1").capacity = Some(gib(1));
        node_mut(&mut sim, "n2").capacity = Some(gib(1));
        node_mut(&mut sim, "n2").cordoned = true;
        node_mut(&mut sim, "n3").capacity = Some(gib(1));
        node_mut(&mut sim, "n3")
            .labels
            .insert("disk".into(), "hdd".into());
        let web = &mut sim.desired.apps[0].processes[0];
        web.resources.memory_bytes = 600 << 20;
        // Another app already uses 500 MiB on n1... through an instance of its own.
        sim.desired.apps.push(app(
            "blog",
            1,
            vec![DesiredProcess {
                resources: Resources {
                    nano_cpus: 0,
                    memory_bytes: 500 << 20,
                },
                ..process("web", 1, 1)
            }],
        ));
        sim.observed
            .instances
            .push(inst("b1", "n1", "blog", "web", 1, 1, Healthy));
        let report = plan_report(&sim.desired, &sim.observed);
        // n3 takes the first; nothing takes the others.
        assert_eq!(starts(&report.actions), [("web".into(), 1, "n3".into())]);
        assert_eq!(
            report.unplaced,
            [2, 3]
                .map(|slot| Unplaced {
                    app: "shop".into(),
                    process: "web".into(),
                    slot,
                    reasons: vec![
                        "n1: 524 MiB free, needs 600 MiB".into(),
                        "n2: cordoned".into(),
                        "n3: 424 MiB free, needs 600 MiB".into(),
                    ],
                })
                .to_vec()
        );
        // With overcommit, free memory does not limit.
        sim.desired.apps[0].processes[0].overcommit = true;
        let report = plan_report(&sim.desired, &sim.observed);
        assert_eq!(start_slots(&report.actions), [1, 2, 3]);
        assert!(report.unplaced.is_empty());
    }

    #[test]
    fn a_failed_rollout_names_what_could_not_be_placed() {
        let mut desired = shop(2, 2, 1);
        desired.apps[0].rollout_deadline_ms = Some(NOW);
        desired.apps[0].processes[0]
            .constraints
            .insert("disk".into(), "ssd".into());
        let obs = observed(&["n1"], vec![web("a", "n1", 1, 1, Healthy)]);
        let report = plan_report(&desired, &obs);
        let reason = report
            .actions
            .iter()
            .find_map(|a| match a {
                Action::RolloutFailed { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .expect("failed");
        assert!(
            reason.ends_with("; web: no node can take 2 instance(s): n1: lacks disk=ssd"),
            "{reason}"
        );
    }

    #[test]
    fn the_image_is_preferred_after_spread() {
        let mut sim = Sim::new(shop(1, 1, 1), &["n1", "n2"]);
        sim.desired.apps[0].processes[0].image = "shop:1".into();
        node_mut(&mut sim, "n2").images.insert("shop:1".into());
        assert_eq!(starts(&sim.plan()), [("web".into(), 1, "n2".into())]);
    }

    // ---------- backoff ----------

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_sixty() {
        let delays: Vec<u64> = (0..10).map(backoff_delay_ms).collect();
        assert_eq!(
            delays,
            [0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(backoff_delay_ms(u32::MAX), BACKOFF_MAX_MS);
    }

    // ---------- rule 3: starts ----------

    #[test]
    fn first_deploy_starts_all_instances_at_once_spread_over_nodes() {
        let actions = plan(&shop(1, 3, 1), &observed(&["n1", "n2", "n3"], vec![]));
        assert_eq!(
            starts(&actions),
            vec![
                ("web".into(), 1, "n1".into()),
                ("web".into(), 2, "n2".into()),
                ("web".into(), 3, "n3".into()),
            ]
        );
        assert!(actions
            .iter()
            .all(|a| matches!(a, Action::Start { release: 1, .. })));
    }

    #[test]
    fn absurd_instance_counts_are_clamped() {
        let a = plan(&shop(1, u32::MAX, u32::MAX), &observed(&["n1"], vec![]));
        assert_eq!(starts(&a).len(), MAX_INSTANCES as usize);
    }

    #[test]
    fn surge_zero_is_treated_as_one() {
        let obs = observed(&["n1"], vec![web("old", "n1", 1, 1, Healthy)]);
        assert_eq!(start_slots(&plan(&shop(2, 1, 0), &obs)), vec![1]);
    }

    #[test]
    fn scale_up_from_zero_to_seven_then_down_to_two_then_zero() {
        let mut sim = Sim::new(shop(1, 0, 1), &["n1", "n2", "n3"]);
        assert!(sim.plan().is_empty());

        sim.desired.apps[0].processes[0].instances = 7;
        let actions = sim.step();
        assert_eq!(start_slots(&actions), (1..=7).collect::<Vec<_>>());
        sim.mark_starting(Healthy);
        assert!(sim.converged());
        assert!(sim.plan().is_empty(), "converged state plans nothing");

        sim.desired.apps[0].processes[0].instances = 2;
        let actions = sim.plan();
        let drained = drains(&actions);
        assert_eq!(drained.len(), 5);
        assert!(drained.iter().all(|(_, r)| *r == DrainReason::ScaledDown));
        assert!(starts(&actions).is_empty());
        sim.apply(&actions);
        sim.tick();
        assert!(sim.converged());
        let mut slots: Vec<u32> = sim.live("shop", "web").iter().map(|i| i.slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, vec![1, 2]);

        sim.desired.apps[0].processes[0].instances = 0;
        let actions = sim.step();
        assert_eq!(drains(&actions).len(), 2);
        assert!(sim.converged());
        assert!(sim.live("shop", "web").is_empty());
        assert!(sim.plan().is_empty());
    }

    #[test]
    fn draining_instances_are_ignored_and_free_their_slot() {
        let obs = observed(
            &["n1"],
            vec![
                web("a", "n1", 1, 1, Draining),
                web("b", "n1", 1, 2, Healthy),
            ],
        );
        let actions = plan(&shop(1, 2, 1), &obs);
        assert_eq!(start_slots(&actions), vec![1]);
        assert!(drains(&actions).is_empty() && removes(&actions).is_empty());
    }

    // ---------- rule 4: rolling deploy ----------

    /// Deploys v2 over a converged v1 and walks the rollout, checking capacity at every pass.
    fn rolling_deploy(instances: u32, surge: u32) -> Sim {
        let mut sim = Sim::new(shop(1, instances, surge), &["n1", "n2", "n3"]);
        sim.run_until_converged(5).expect("v1 converges");
        sim.desired.apps[0].release = 2;
        sim.desired.apps[0].rollout_deadline_ms = Some(sim.observed.now_ms + 3_600_000);
        let n = instances as usize;
        let cap = (instances + surge.max(1)) as usize;
        for _ in 0..(4 * n + 4) {
            let actions = sim.plan();
            let new_starts = starts(&actions).len();
            assert!(new_starts <= surge.max(1) as usize, "{actions:?}");
            sim.apply(&actions);
            assert!(sim.live("shop", "web").len() <= cap, "surge cap");
            assert!(sim.healthy("shop", "web") >= n, "capacity kept at N");
            sim.tick();
            sim.mark_starting(Healthy);
            if sim.desired.apps[0].rollout_deadline_ms.is_none() {
                break;
            }
        }
        assert_eq!(
            sim.verdicts,
            vec![Action::RolloutSucceeded {
                app: "shop".into(),
                release: 2
            }]
        );
        assert!(sim.converged());
        assert!(sim.plan().is_empty());
        sim
    }

    #[test]
    fn rolling_deploy_surge_one_step_by_step() {
        let mut sim = Sim::new(shop(1, 3, 1), &["n1", "n2", "n3"]);
        sim.run_until_converged(5).unwrap();
        sim.desired.apps[0].release = 2;
        sim.desired.apps[0].rollout_deadline_ms = Some(sim.observed.now_ms + 600_000);

        // Pass 1: one surge instance, nothing drained yet.
        let a = sim.step();
        assert_eq!(start_slots(&a), vec![1]);
        assert!(drains(&a).is_empty());
        // Still starting: wait.
        assert!(sim.plan().is_empty());
        sim.mark_starting(Healthy);
        // v2 slot 1 healthy: one v1 goes, slot 2 starts.
        let a = sim.step();
        assert_eq!(drains(&a).len(), 1);
        assert_eq!(drains(&a)[0].1, DrainReason::Replaced);
        assert_eq!(start_slots(&a), vec![2]);
        sim.mark_starting(Healthy);
        let a = sim.step();
        assert_eq!((drains(&a).len(), start_slots(&a)), (1, vec![3]));
        sim.mark_starting(Healthy);
        let a = sim.step();
        assert_eq!((drains(&a).len(), starts(&a).len()), (1, 0));
        let a = sim.step();
        assert_eq!(
            a,
            vec![Action::RolloutSucceeded {
                app: "shop".into(),
                release: 2
            }]
        );
        assert!(sim.converged());
    }

    #[test]
    fn rolling_deploys_keep_capacity_and_cap_for_various_sizes() {
        for (n, s) in [(1, 1), (2, 1), (3, 2), (5, 1), (4, 4), (6, 3)] {
            rolling_deploy(n, s);
        }
    }

    #[test]
    fn last_healthy_old_instance_survives_until_replacement_is_healthy() {
        let desired = shop(2, 1, 1);
        let old = web("old", "n1", 1, 1, Healthy);
        // Nothing of v2 yet: start, keep old.
        let a = plan(&desired, &observed(&["n1"], vec![old.clone()]));
        assert_eq!((start_slots(&a), drains(&a)), (vec![1], vec![]));
        // v2 starting: wait.
        let a = plan(
            &desired,
            &observed(&["n1"], vec![old.clone(), web("new", "n1", 2, 1, Starting)]),
        );
        assert!(a.is_empty());
        // v2 unhealthy: the new one goes, the old one stays.
        let a = plan(
            &desired,
            &observed(
                &["n1"],
                vec![old.clone(), web("new", "n1", 2, 1, Unhealthy)],
            ),
        );
        assert_eq!(drains(&a), vec![("new".into(), DrainReason::Unhealthy)]);
        assert!(starts(&a).is_empty());
        // v2 healthy: now the old one goes.
        let a = plan(
            &desired,
            &observed(&["n1"], vec![old, web("new", "n1", 2, 1, Healthy)]),
        );
        assert_eq!(drains(&a), vec![("old".into(), DrainReason::Replaced)]);
    }

    #[test]
    fn non_serving_old_instances_are_drained_first_and_at_once() {
        let obs = observed(
            &["n1"],
            vec![
                web("h1", "n1", 1, 1, Healthy),
                web("h2", "n1", 1, 2, Healthy),
                web("s3", "n1", 1, 3, Starting),
                web("u4", "n1", 1, 4, Unhealthy),
            ],
        );
        let a = plan(&shop(2, 2, 1), &obs);
        assert_eq!(ids(&drains(&a)), vec!["s3", "u4"]);
        // After those drains, 2 live: one start fits in N + S = 3.
        assert_eq!(start_slots(&a), vec![1]);
    }

    #[test]
    fn rollback_treats_the_newer_release_as_retiring() {
        let obs = observed(&["n1"], vec![web("v7", "n1", 7, 1, Healthy)]);
        let a = plan(&shop(6, 1, 1), &obs);
        assert_eq!((start_slots(&a), drains(&a)), (vec![1], vec![]));
        let obs = observed(
            &["n1"],
            vec![
                web("v7", "n1", 7, 1, Healthy),
                web("v6", "n1", 6, 1, Healthy),
            ],
        );
        let a = plan(&shop(6, 1, 1), &obs);
        assert_eq!(drains(&a), vec![("v7".into(), DrainReason::Replaced)]);
    }

    #[test]
    fn zero_instances_drains_everything_including_the_last_healthy() {
        let obs = observed(
            &["n1"],
            vec![
                web("a", "n1", 1, 1, Healthy),
                web("b", "n1", 1, 2, Healthy),
                web("c", "n1", 2, 1, Starting),
            ],
        );
        let a = plan(&shop(2, 0, 1), &obs);
        assert_eq!(
            drains(&a),
            vec![
                ("a".into(), DrainReason::Replaced),
                ("c".into(), DrainReason::ScaledDown),
                ("b".into(), DrainReason::Replaced),
            ]
        );
        assert!(starts(&a).is_empty());
    }

    // ---------- rule 5: scale down and duplicates ----------

    #[test]
    fn scale_down_drains_above_n_but_keeps_capacity_while_slots_are_not_healthy() {
        let obs = observed(
            &["n1"],
            vec![
                web("s1", "n1", 1, 1, Starting),
                web("s2", "n1", 1, 2, Starting),
                web("h3", "n1", 1, 3, Healthy),
                web("h4", "n1", 1, 4, Healthy),
                web("s5", "n1", 1, 5, Starting),
                web("u6", "n1", 1, 6, Unhealthy),
            ],
        );
        let a = plan(&shop(1, 2, 1), &obs);
        // Unhealthy and Starting go, both healthy ones stay until slots 1-2 are healthy.
        assert_eq!(ids(&drains(&a)), vec!["s5", "u6"]);
        assert!(drains(&a)
            .iter()
            .all(|(_, r)| *r == DrainReason::ScaledDown));

        // With slot 1 healthy, one healthy surplus may go: the highest slot first.
        let mut obs = obs;
        obs.instances[0].state = Healthy;
        let a = plan(&shop(1, 2, 1), &obs);
        assert_eq!(ids(&drains(&a)), vec!["h4", "s5", "u6"]);
    }

    #[test]
    fn duplicates_of_a_slot_keep_the_healthiest() {
        let obs = observed(
            &["n1", "n2"],
            vec![
                web("c1", "n1", 1, 1, Starting),
                web("c2", "n2", 1, 1, Healthy),
                web("c3", "n1", 1, 1, Unhealthy),
                web("c4", "n1", 1, 2, Healthy),
                web("c5", "n2", 1, 2, Healthy),
            ],
        );
        let a = plan(&shop(1, 2, 1), &obs);
        assert_eq!(
            drains(&a),
            vec![
                ("c1".into(), DrainReason::Duplicate),
                ("c3".into(), DrainReason::Duplicate),
                ("c5".into(), DrainReason::Duplicate),
            ]
        );
        assert!(starts(&a).is_empty());
    }

    // ---------- rules 2 and 6: crashes, unhealthy, backoff ----------

    #[test]
    fn crash_is_removed_as_crashed_and_not_restarted_in_the_same_pass() {
        let obs = observed(
            &["n1"],
            vec![
                web("ok", "n1", 1, 1, Healthy),
                web(
                    "boom",
                    "n1",
                    1,
                    2,
                    InstanceState::Exited {
                        code: 137,
                        oom: true,
                    },
                ),
            ],
        );
        let a = plan(&shop(1, 2, 1), &obs);
        assert_eq!(removes(&a), vec![("boom".into(), true)]);
        assert!(starts(&a).is_empty());
        assert!(matches!(
            &a[0],
            Action::Remove { slot: 2, release: 1, node, .. } if node == "n1"
        ));
    }

    #[test]
    fn backoff_is_respected_until_it_expires() {
        let mut obs = observed(&["n1"], vec![web("ok", "n1", 1, 1, Healthy)]);
        obs.backoff.push(SlotBackoff {
            app: "shop".into(),
            process: "web".into(),
            slot: 2,
            until_ms: NOW + 2_000,
        });
        // Other apps' or processes' backoff does not matter.
        obs.backoff.push(SlotBackoff {
            app: "shop".into(),
            process: "worker".into(),
            slot: 3,
            until_ms: NOW + 2_000,
        });
        let desired = shop(1, 3, 1);
        assert_eq!(start_slots(&plan(&desired, &obs)), vec![3]);
        obs.now_ms = NOW + 1_999;
        assert_eq!(start_slots(&plan(&desired, &obs)), vec![3]);
        obs.now_ms = NOW + 2_000;
        assert_eq!(start_slots(&plan(&desired, &obs)), vec![2, 3]);
    }

    #[test]
    fn crash_loop_in_simulation_backs_off_exponentially() {
        let mut sim = Sim::new(shop(1, 1, 1), &["n1"]);
        let mut start_times = Vec::new();
        for _ in 0..40 {
            let a = sim.plan();
            if !starts(&a).is_empty() {
                start_times.push(sim.observed.now_ms);
            }
            sim.apply(&a);
            sim.mark_starting(exited(1));
            sim.observed.now_ms += 1_000;
        }
        let gaps: Vec<u64> = start_times.windows(2).map(|w| w[1] - w[0]).collect();
        // start, crash seen and removed a second later, then wait 1 s, 2 s, 4 s ... .
        assert_eq!(&gaps[..5], &[2_000, 3_000, 5_000, 9_000, 17_000]);
    }

    #[test]
    fn exits_that_are_not_crashes() {
        let mut drained_then_exited = web("d", "n1", 2, 1, Draining);
        drained_then_exited.state = Draining;
        let mut exit_report = drained_then_exited.clone();
        exit_report.state = exited(0);
        let obs = observed(
            &["n1"],
            vec![
                web("old", "n1", 1, 1, exited(1)),
                web("above", "n1", 2, 5, exited(1)),
                drained_then_exited,
                exit_report,
                inst("orph", "n1", "gone", "web", 1, 1, exited(1)),
                web("mine", "n1", 2, 2, exited(1)),
            ],
        );
        let a = plan(&shop(2, 2, 1), &obs);
        assert_eq!(
            removes(&a),
            vec![
                ("orph".into(), false),
                ("d".into(), false),
                ("old".into(), false),
                ("mine".into(), true),
                ("above".into(), false),
            ]
        );
        // Slot 1 starts; slot 2 crashed this pass and waits for its backoff.
        assert_eq!(start_slots(&a), vec![1]);
    }

    #[test]
    fn unhealthy_target_instance_is_drained_and_replaced_later() {
        let mut sim = Sim::from_state(
            shop(1, 2, 1),
            observed(
                &["n1"],
                vec![
                    web("a", "n1", 1, 1, Healthy),
                    web("b", "n1", 1, 2, Unhealthy),
                ],
            ),
        );
        let a = sim.step();
        assert_eq!(drains(&a), vec![("b".into(), DrainReason::Unhealthy)]);
        assert!(starts(&a).is_empty());
        // The reconciler recorded a 1 s backoff; a tick later the slot restarts.
        let a = sim.step();
        assert_eq!(start_slots(&a), vec![2]);
    }

    // ---------- rule 7: placement and lost nodes ----------

    #[test]
    fn spread_over_three_nodes() {
        let a = plan(&shop(1, 6, 1), &observed(&["n3", "n1", "n2"], vec![]));
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        for (_, _, node) in starts(&a) {
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(
            per_node.values().copied().collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
    }

    #[test]
    fn placement_prefers_fewest_of_the_process_then_fewest_in_total_then_name() {
        let obs = observed(
            &["n1", "n2", "n3"],
            vec![
                inst("x1", "n1", "blog", "web", 1, 1, Healthy),
                inst("x2", "n1", "blog", "web", 1, 2, Healthy),
                inst("x3", "n2", "blog", "web", 1, 3, Healthy),
                web("w1", "n3", 1, 1, Healthy),
                // Drained in this pass: does not count on n2.
                inst("x4", "n2", "gone", "web", 1, 1, Healthy),
            ],
        );
        let desired = Desired {
            apps: vec![
                app("blog", 1, vec![process("web", 3, 1)]),
                app("shop", 1, vec![process("web", 4, 1)]),
            ],
        };
        let a = plan(&desired, &obs);
        // shop web: n3 already has one, so slot 2 goes to n2 (total 1, x4 is drained) over
        // n1 (total 2); slot 3 to n1 (the only node without shop web); slot 4: one each,
        // totals n1 = 3, n2 = 2, n3 = 1 -> n3.
        assert_eq!(
            starts(&a),
            vec![
                ("web".into(), 2, "n2".into()),
                ("web".into(), 3, "n1".into()),
                ("web".into(), 4, "n3".into()),
            ]
        );
    }

    #[test]
    fn lost_node_gets_no_actions_and_its_instances_are_replaced_elsewhere() {
        let mut obs = observed(
            &["n1", "n2", "n3"],
            vec![
                web("a", "n1", 1, 1, Healthy),
                web("b", "n2", 1, 2, Healthy),
                web("c", "n3", 1, 3, Healthy),
                web("d", "n3", 1, 4, exited(1)),
                inst("e", "n3", "gone", "web", 1, 1, Healthy),
            ],
        );
        obs.nodes[2].ready = false;
        let a = plan(&shop(1, 3, 1), &obs);
        assert!(
            a.iter().all(|x| !format!("{x:?}").contains("\"n3\"")),
            "{a:?}"
        );
        assert_eq!(starts(&a), vec![("web".into(), 3, "n1".into())]);

        // The node comes back while the replacement is healthy: one of the two goes.
        obs.nodes[2].ready = true;
        obs.instances.push(web("f", "n1", 1, 3, Healthy));
        let a = plan(&shop(1, 3, 1), &obs);
        assert_eq!(
            drains(&a),
            vec![
                ("e".into(), DrainReason::Orphan),
                ("f".into(), DrainReason::Duplicate),
            ]
        );
        assert_eq!(removes(&a), vec![("d".into(), false)]);
        assert!(starts(&a).is_empty());
    }

    #[test]
    fn unlisted_node_counts_as_lost() {
        let obs = observed(&["n1"], vec![web("a", "n9", 1, 1, Healthy)]);
        let a = plan(&shop(1, 1, 1), &obs);
        assert_eq!(starts(&a), vec![("web".into(), 1, "n1".into())]);
        // A node listed twice with one "not ready" entry is not ready.
        let mut obs = observed(&["n1", "n1"], vec![]);
        obs.nodes[1].ready = false;
        assert!(plan(&shop(1, 1, 1), &obs).is_empty());
    }

    #[test]
    fn no_ready_node_means_no_start_and_an_explicit_failure_reason() {
        let mut desired = shop(1, 2, 1);
        let mut obs = observed(&["n1"], vec![]);
        obs.nodes[0].ready = false;
        assert!(plan(&desired, &obs).is_empty());
        assert!(plan(&desired, &observed(&[], vec![])).is_empty());
        desired.apps[0].rollout_deadline_ms = Some(NOW);
        let a = plan(&desired, &obs);
        let [Action::RolloutFailed { reason, .. }] = a.as_slice() else {
            panic!("{a:?}");
        };
        assert!(reason.contains("no node is ready"), "{reason}");
    }

    // ---------- rule 8: orphans ----------

    #[test]
    fn orphans_are_drained_or_removed() {
        let obs = observed(
            &["n1"],
            vec![
                inst("g1", "n1", "gone", "web", 3, 1, Healthy),
                inst("g2", "n1", "gone", "web", 3, 2, Draining),
                inst("g3", "n1", "gone", "web", 3, 3, exited(2)),
                inst("k1", "n1", "shop", "cron", 1, 1, Starting),
                web("w1", "n1", 1, 1, Healthy),
            ],
        );
        let a = plan(&shop(1, 1, 1), &obs);
        assert_eq!(
            a,
            vec![
                Action::Remove {
                    container_id: "g3".into(),
                    node: "n1".into(),
                    app: "gone".into(),
                    process: "web".into(),
                    slot: 3,
                    release: 3,
                    crashed: false,
                },
                Action::Drain {
                    container_id: "g1".into(),
                    node: "n1".into(),
                    app: "gone".into(),
                    process: "web".into(),
                    reason: DrainReason::Orphan,
                },
                Action::Drain {
                    container_id: "k1".into(),
                    node: "n1".into(),
                    app: "shop".into(),
                    process: "cron".into(),
                    reason: DrainReason::Orphan,
                },
            ]
        );
    }

    // ---------- rule 9: rollout verdict ----------

    #[test]
    fn rollout_succeeds_only_when_the_target_serves_alone() {
        let mut desired = shop(2, 2, 1);
        desired.apps[0].rollout_deadline_ms = Some(NOW + 1);
        let serving = vec![web("a", "n1", 2, 1, Healthy), web("b", "n1", 2, 2, Healthy)];
        let success = Action::RolloutSucceeded {
            app: "shop".into(),
            release: 2,
        };

        let mut with_old = serving.clone();
        with_old.push(web("old", "n1", 1, 1, Starting));
        let a = plan(&desired, &observed(&["n1"], with_old));
        assert!(!a.contains(&success));

        let mut with_orphan_process = serving.clone();
        with_orphan_process.push(inst("k", "n1", "shop", "cron", 1, 1, Healthy));
        let a = plan(&desired, &observed(&["n1"], with_orphan_process));
        assert!(!a.contains(&success));

        let a = plan(&desired, &observed(&["n1"], serving.clone()));
        assert_eq!(a, vec![success.clone()]);
        // Succeeds even past the deadline, and not at all once settled.
        let mut obs = observed(&["n1"], serving);
        obs.now_ms = NOW + 10;
        assert_eq!(plan(&desired, &obs), vec![success]);
        desired.apps[0].rollout_deadline_ms = None;
        assert!(plan(&desired, &obs).is_empty());
    }

    #[test]
    fn failed_rollout_reason_is_actionable_and_old_release_is_not_drained() {
        let mut desired = Desired {
            apps: vec![app(
                "shop",
                7,
                vec![process("web", 3, 1), process("worker", 1, 1)],
            )],
        };
        desired.apps[0].rollout_deadline_ms = Some(NOW);
        let instances = vec![
            web("o1", "n1", 6, 1, Healthy),
            web("o2", "n1", 6, 2, Healthy),
            web("o3", "n1", 6, 3, Healthy),
            web("n1", "n1", 7, 1, Healthy),
            web("n2", "n1", 7, 2, exited(1)),
            inst(
                "wk",
                "n1",
                "shop",
                "worker",
                7,
                1,
                InstanceState::Exited {
                    code: 137,
                    oom: true,
                },
            ),
        ];
        let obs = observed(&["n1"], instances);
        let a = plan(&desired, &obs);
        let Some(Action::RolloutFailed {
            app,
            release,
            reason,
        }) = a.last()
        else {
            panic!("{a:?}");
        };
        assert_eq!((app.as_str(), *release), ("shop", 7));
        assert_eq!(
            reason,
            "web: 1 of 3 instances of v7 healthy after the deploy timeout; last exit code 1; \
             worker: 0 of 1 instances of v7 healthy after the deploy timeout; \
             last exit code 137 (killed: out of memory)"
        );
        assert!(drains(&a).is_empty(), "old release keeps serving: {a:?}");

        // Before the deadline the same state drains one old instance (4 healthy > 3).
        let mut early = obs.clone();
        early.now_ms = NOW - 1;
        let a = plan(&desired, &early);
        assert_eq!(ids(&drains(&a)), vec!["o3"]);
        assert!(!a.iter().any(|x| matches!(x, Action::RolloutFailed { .. })));
    }

    #[test]
    fn failing_rollout_keeps_old_serving_then_fails_after_the_deadline() {
        let mut sim = Sim::new(shop(1, 3, 1), &["n1", "n2"]);
        sim.run_until_converged(5).unwrap();
        let deadline = sim.observed.now_ms + 120_000;
        sim.desired.apps[0].release = 2;
        sim.desired.apps[0].rollout_deadline_ms = Some(deadline);
        while sim.observed.now_ms < deadline + 30_000 {
            let now = sim.observed.now_ms;
            let a = sim.plan();
            let failed = a.iter().any(|x| matches!(x, Action::RolloutFailed { .. }));
            assert_eq!(failed, now >= deadline, "{a:?}");
            sim.apply(&a);
            assert_eq!(sim.healthy("shop", "web"), 3, "v1 keeps serving");
            assert!(sim.live("shop", "web").len() <= 4);
            sim.tick();
            // Every v2 container fails its health checks.
            sim.mark_starting(Unhealthy);
        }
        let Some(Action::RolloutFailed { reason, .. }) = sim.verdicts.last() else {
            panic!("{:?}", sim.verdicts);
        };
        assert!(
            reason.starts_with("web: 0 of 3 instances of v2 healthy after the deploy timeout"),
            "{reason}"
        );
        // The reconciler switches back: v1 is the target again and everything settles.
        sim.desired.apps[0].release = 1;
        sim.desired.apps[0].rollout_deadline_ms = None;
        sim.run_until_converged(10).unwrap();
    }

    // ---------- early rollout failure ----------

    fn crashes(release: u32, n: u32) -> ReleaseCrashes {
        ReleaseCrashes {
            app: "shop".into(),
            process: "web".into(),
            release,
            crashes: n,
            last_exit: Some((1, false)),
        }
    }

    fn failed_reason(a: &[Action]) -> Option<&str> {
        a.iter().find_map(|x| match x {
            Action::RolloutFailed { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
    }

    fn rolling_to_v2() -> (Desired, Observed) {
        let mut desired = shop(2, 3, 1);
        desired.apps[0].rollout_deadline_ms = Some(NOW + 100_000);
        let obs = observed(
            &["n1"],
            vec![
                web("o1", "n1", 1, 1, Healthy),
                web("o2", "n1", 1, 2, Healthy),
                web("o3", "n1", 1, 3, Healthy),
            ],
        );
        (desired, obs)
    }

    #[test]
    fn three_exits_of_the_target_release_fail_the_rollout_before_the_deadline() {
        let (desired, mut obs) = rolling_to_v2();
        obs.crashes.push(crashes(2, 2));
        // Other releases' and processes' exits do not count.
        obs.crashes.push(crashes(1, 5));
        let mut worker = crashes(2, 5);
        worker.process = "worker".into();
        obs.crashes.push(worker);
        assert_eq!(failed_reason(&plan(&desired, &obs)), None);

        obs.crashes.push(crashes(2, 1));
        let a = plan(&desired, &obs);
        assert_eq!(
            failed_reason(&a),
            Some(
                "web: instances of v2 exited or failed to start 3 times and none became \
                 healthy; last exit code 1"
            )
        );
        assert!(drains(&a).is_empty(), "v1 keeps serving: {a:?}");

        // Not while an instance of v2 is healthy.
        obs.instances.push(web("n1", "n1", 2, 1, Healthy));
        assert_eq!(failed_reason(&plan(&desired, &obs)), None);
    }

    #[test]
    fn new_instances_failing_every_probe_after_grace_fail_the_rollout_early() {
        let (desired, mut obs) = rolling_to_v2();
        let mut new = web("n1", "n1", 2, 1, Unhealthy);
        new.health = HealthFacts {
            ever_healthy: false,
            failed_after_grace: FAILED_PROBES_TO_FAIL_ROLLOUT - 1,
            unhealthy_since_ms: Some(NOW - 1_000),
            accepting: true,
        };
        obs.instances.push(new);
        assert_eq!(failed_reason(&plan(&desired, &obs)), None, "not yet");

        obs.instances[3].health.failed_after_grace = FAILED_PROBES_TO_FAIL_ROLLOUT;
        let a = plan(&desired, &obs);
        let reason = failed_reason(&a).expect("fails early");
        assert!(
            reason.starts_with("web: every new instance of v2 (1) failed its health check"),
            "{reason}"
        );
        assert!(drains(&a).is_empty(), "v1 keeps serving: {a:?}");

        // One that passed once (it may be busy) is not hopeless.
        let mut passed = obs.clone();
        passed.instances[3].health.ever_healthy = true;
        assert_eq!(failed_reason(&plan(&desired, &passed)), None);

        // Another new instance still in its grace: wait for it.
        let mut young = obs.clone();
        young.instances.push(web("n2", "n1", 2, 2, Starting));
        assert_eq!(failed_reason(&plan(&desired, &young)), None);
    }

    #[test]
    fn a_crash_looping_rollout_fails_early_in_simulation() {
        let mut sim = Sim::new(shop(1, 2, 1), &["n1"]);
        sim.run_until_converged(5).unwrap();
        let deadline = sim.observed.now_ms + 10_000_000;
        sim.desired.apps[0].release = 2;
        sim.desired.apps[0].rollout_deadline_ms = Some(deadline);
        for _ in 0..40 {
            let a = sim.plan();
            sim.apply(&a);
            assert_eq!(sim.healthy("shop", "web"), 2, "v1 keeps serving");
            if !sim.verdicts.is_empty() {
                break;
            }
            sim.mark_starting(exited(1));
            sim.observed.now_ms += 1_000;
        }
        assert!(sim.observed.now_ms < deadline);
        let [Action::RolloutFailed { reason, .. }] = sim.verdicts.as_slice() else {
            panic!("{:?}", sim.verdicts);
        };
        assert!(reason.contains("3 times"), "{reason}");
    }

    // ---------- unhealthy instances: replaced late, one at a time, never the last ----------

    fn sick(id: &str, slot: u32, since: u64, accepting: bool) -> ObservedInstance {
        let mut i = web(id, "n1", 1, slot, Unhealthy);
        i.health = HealthFacts {
            ever_healthy: true,
            failed_after_grace: 0,
            unhealthy_since_ms: Some(since),
            accepting,
        };
        i
    }

    #[test]
    fn an_unhealthy_instance_is_replaced_only_after_the_threshold() {
        let desired = shop(1, 2, 1);
        let mut obs = observed(
            &["n1"],
            vec![
                web("a", "n1", 1, 1, Healthy),
                sick("b", 2, NOW - REPLACE_AFTER_MS + 1, true),
            ],
        );
        assert!(plan(&desired, &obs).is_empty(), "kept (unrouted) for now");
        obs.instances[1].health.unhealthy_since_ms = Some(NOW - REPLACE_AFTER_MS);
        let a = plan(&desired, &obs);
        assert_eq!(drains(&a), vec![("b".into(), DrainReason::Unhealthy)]);
        assert!(starts(&a).is_empty(), "restarted after its backoff");
        // Unknown since when: never on that basis.
        obs.instances[1].health.unhealthy_since_ms = None;
        assert!(plan(&desired, &obs).is_empty());
    }

    #[test]
    fn unhealthy_instances_are_replaced_one_at_a_time() {
        let desired = shop(1, 3, 1);
        let obs = observed(
            &["n1"],
            vec![
                sick("a", 1, NOW - 200_000, false),
                sick("b", 2, NOW - 300_000, false),
                web("c", "n1", 1, 3, Healthy),
            ],
        );
        // The longest unhealthy first, one per pass.
        let a = plan(&desired, &obs);
        assert_eq!(drains(&a), vec![("b".into(), DrainReason::Unhealthy)]);
        // While its replacement starts, nothing else is replaced.
        let mut replacing = obs.clone();
        replacing.instances[1] = web("b2", "n1", 1, 2, Starting);
        assert!(drains(&plan(&desired, &replacing)).is_empty());
        // Nor while the slot is empty (draining, backing off).
        let mut empty = obs.clone();
        empty.instances[1].state = Draining;
        assert!(drains(&plan(&desired, &empty)).is_empty());
        // Once it is healthy, the next one goes.
        let mut done = obs;
        done.instances[1] = web("b2", "n1", 1, 2, Healthy);
        assert_eq!(
            drains(&plan(&desired, &done)),
            vec![("a".into(), DrainReason::Unhealthy)]
        );
    }

    #[test]
    fn the_last_instance_accepting_connections_is_never_replaced() {
        let long_ago = NOW - 10 * REPLACE_AFTER_MS;
        // Alone and busy (accepts, answers slowly): kept forever.
        let one = shop(1, 1, 1);
        let obs = observed(&["n1"], vec![sick("busy", 1, long_ago, true)]);
        assert!(plan(&one, &obs).is_empty());
        // Alone and refusing connections: replaced.
        let obs = observed(&["n1"], vec![sick("dead", 1, long_ago, false)]);
        assert_eq!(
            drains(&plan(&one, &obs)),
            vec![("dead".into(), DrainReason::Unhealthy)]
        );
        // Two: a busy one that is the only one accepting stays; the refusing one goes, although
        // it became unhealthy later.
        let two = shop(1, 2, 1);
        let obs = observed(
            &["n1"],
            vec![
                sick("busy", 1, long_ago, true),
                sick("dead", 2, long_ago + 1, false),
            ],
        );
        assert_eq!(
            drains(&plan(&two, &obs)),
            vec![("dead".into(), DrainReason::Unhealthy)]
        );
        // Two busy ones: one of them may go (the other still accepts).
        let obs = observed(
            &["n1"],
            vec![
                sick("b1", 1, long_ago, true),
                sick("b2", 2, long_ago + 1, true),
            ],
        );
        assert_eq!(
            drains(&plan(&two, &obs)),
            vec![("b1".into(), DrainReason::Unhealthy)]
        );
    }

    #[test]
    fn a_busy_instance_that_answers_again_is_kept() {
        let mut sim = Sim::from_state(
            shop(1, 1, 1),
            observed(&["n1"], vec![sick("busy", 1, NOW, true)]),
        );
        for _ in 0..20 {
            let a = sim.step();
            assert!(a.is_empty(), "{a:?}");
        }
        sim.observed.instances[0].state = Healthy;
        sim.observed.instances[0].health = HealthFacts::default();
        assert!(sim.step().is_empty());
        assert!(sim.converged());
        assert_eq!(sim.observed.instances[0].container_id, "busy");
    }

    // ---------- process spec identity ----------

    fn with_spec(mut i: ObservedInstance, spec: Option<&str>) -> ObservedInstance {
        i.spec = spec.map(str::to_owned);
        i
    }

    #[test]
    fn an_instance_of_the_target_release_with_another_spec_is_rolled() {
        let mut desired = shop(1, 2, 1);
        desired.apps[0].processes[0].spec = "big".into();
        let obs = observed(
            &["n1"],
            vec![
                with_spec(web("a", "n1", 1, 1, Healthy), Some("small")),
                with_spec(web("b", "n1", 1, 2, Healthy), Some("small")),
            ],
        );
        // Like a new release: one surge start, nothing drained yet.
        let a = plan(&desired, &obs);
        assert_eq!((start_slots(&a), drains(&a)), (vec![1], vec![]));
        // An unknown spec (no label) counts as current.
        let legacy = observed(
            &["n1"],
            vec![
                with_spec(web("a", "n1", 1, 1, Healthy), None),
                with_spec(web("b", "n1", 1, 2, Healthy), Some("big")),
            ],
        );
        assert!(plan(&desired, &legacy).is_empty());
        // A stale exit is not a crash of the slot.
        let stale_exit = observed(
            &["n1"],
            vec![with_spec(web("a", "n1", 1, 1, exited(1)), Some("small"))],
        );
        assert_eq!(
            removes(&plan(&desired, &stale_exit)),
            vec![("a".into(), false)]
        );
    }

    #[test]
    fn a_resource_change_rolls_every_instance_keeping_capacity() {
        let mut desired = shop(1, 3, 1);
        desired.apps[0].processes[0].spec = "small".into();
        let mut sim = Sim::new(desired, &["n1", "n2"]);
        sim.run_until_converged(5).unwrap();
        sim.desired.apps[0].processes[0].spec = "big".into();
        sim.desired.apps[0].rollout_deadline_ms = Some(sim.observed.now_ms + 600_000);
        assert!(!sim.converged(), "stale specs are not converged");
        for _ in 0..20 {
            let a = sim.plan();
            assert!(starts(&a).len() <= 1, "{a:?}");
            sim.apply(&a);
            assert!(sim.live("shop", "web").len() <= 4, "surge cap");
            assert!(sim.healthy("shop", "web") >= 3, "capacity kept");
            sim.tick();
            sim.mark_starting(Healthy);
            if sim.desired.apps[0].rollout_deadline_ms.is_none() {
                break;
            }
        }
        assert!(sim.converged());
        assert!(sim
            .observed
            .instances
            .iter()
            .all(|i| i.spec.as_deref() == Some("big") && i.release == 1));
        assert_eq!(
            sim.verdicts,
            vec![Action::RolloutSucceeded {
                app: "shop".into(),
                release: 1
            }]
        );
    }

    // ---------- rule 10: determinism ----------

    #[test]
    fn output_does_not_depend_on_input_order() {
        let desired = Desired {
            apps: vec![
                app(
                    "shop",
                    2,
                    vec![process("web", 3, 1), process("worker", 2, 1)],
                ),
                app("blog", 1, vec![process("web", 2, 2)]),
            ],
        };
        let mut obs = observed(
            &["n1", "n2", "n3"],
            vec![
                web("a", "n1", 1, 1, Healthy),
                web("b", "n2", 1, 2, Healthy),
                web("c", "n3", 2, 1, Healthy),
                web("d", "n3", 2, 1, Starting),
                inst("e", "n2", "shop", "worker", 1, 1, Unhealthy),
                inst("f", "n1", "blog", "web", 1, 4, Healthy),
                inst("g", "n2", "zzz", "web", 1, 1, exited(3)),
            ],
        );
        let first = plan(&desired, &obs);
        assert!(!first.is_empty());
        obs.instances.reverse();
        obs.nodes.reverse();
        let mut reordered = desired.clone();
        reordered.apps.reverse();
        for a in &mut reordered.apps {
            a.processes.reverse();
        }
        assert_eq!(plan(&reordered, &obs), first);
        assert_eq!(plan(&reordered, &obs), first);
    }

    #[test]
    fn replanning_without_progress_emits_no_new_starts() {
        let mut sim = Sim::new(shop(1, 4, 1), &["n1", "n2"]);
        let a = sim.plan();
        sim.apply(&a);
        assert!(
            sim.plan().is_empty(),
            "started slots are held while Starting"
        );
    }

    // ---------- property tests ----------

    const APPS: [&str; 3] = ["a", "b", "zz"];
    const PROCESSES: [&str; 3] = ["web", "worker", "cron"];
    const NODES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];

    fn arb_state_kind() -> impl Strategy<Value = InstanceState> {
        prop_oneof![
            3 => Just(Starting),
            5 => Just(Healthy),
            2 => Just(Unhealthy),
            1 => Just(Draining),
            1 => (0i64..3, any::<bool>()).prop_map(|(code, oom)| InstanceState::Exited { code, oom }),
        ]
    }

    fn arb_deadline() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(NOW - 1)),
            1 => Just(Some(NOW + 100 * TICK_MS)),
        ]
    }

    fn arb_desired_app(name: &'static str) -> impl Strategy<Value = DesiredApp> {
        (
            1u32..=3,
            prop::option::of((0u32..=6, 0u32..=3)),
            prop::option::of((0u32..=4, 0u32..=2)),
            arb_deadline(),
        )
            .prop_map(move |(release, web_p, worker_p, deadline)| {
                let mut processes = Vec::new();
                if let Some((n, s)) = web_p {
                    processes.push(process("web", n, s));
                }
                if let Some((n, s)) = worker_p {
                    processes.push(process("worker", n, s));
                }
                let mut desired_app = app(name, release, processes);
                desired_app.rollout_deadline_ms = deadline;
                desired_app
            })
    }

    fn arb_desired() -> impl Strategy<Value = Desired> {
        (arb_desired_app("a"), prop::option::of(arb_desired_app("b"))).prop_map(|(a, b)| Desired {
            apps: std::iter::once(a).chain(b).collect(),
        })
    }

    fn arb_instances() -> impl Strategy<Value = Vec<ObservedInstance>> {
        prop::collection::vec(
            (
                prop_oneof![4 => Just(0usize), 2 => Just(1), 1 => Just(2)],
                prop_oneof![4 => Just(0usize), 2 => Just(1), 1 => Just(2)],
                1u32..=3,
                prop_oneof![3 => 1u32..=3, 1 => 0u32..=7],
                0usize..5,
                arb_state_kind(),
                (
                    prop_oneof![3 => Just(None), 1 => Just(Some("x")), 1 => Just(Some("y"))],
                    any::<bool>(),
                    0u32..=5,
                    prop::option::of(0u64..=2 * REPLACE_AFTER_MS),
                    any::<bool>(),
                ),
            ),
            0..=16,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(
                    |(k, (a, p, release, slot, node, state, (spec, ever, failed, ago, acc)))| {
                        let mut i = inst(
                            &format!("o{k:03}"),
                            NODES[node],
                            APPS[a],
                            PROCESSES[p],
                            release,
                            slot,
                            state,
                        );
                        i.spec = spec.map(str::to_owned);
                        i.health = HealthFacts {
                            ever_healthy: ever,
                            failed_after_grace: failed,
                            unhealthy_since_ms: ago.map(|d| NOW - d),
                            accepting: acc,
                        };
                        i
                    },
                )
                .collect()
        })
    }

    fn arb_observed() -> impl Strategy<Value = Observed> {
        (
            prop::collection::vec(prop::bool::weighted(0.8), 1..=4),
            arb_instances(),
            prop::collection::vec((0usize..2, 0usize..2, 1u32..=6, 0u64..=20_000), 0..=3),
            prop::collection::vec((0usize..2, 0usize..3, 1u32..=3, 0u32..=4), 0..=3),
        )
            .prop_map(|(ready, instances, backoff, crashes)| Observed {
                now_ms: NOW,
                nodes: ready
                    .into_iter()
                    .enumerate()
                    .map(|(k, ready)| NodeState {
                        name: NODES[k].to_owned(),
                        ready,
                        ..NodeState::default()
                    })
                    .collect(),
                instances,
                backoff: backoff
                    .into_iter()
                    .map(|(a, p, slot, until)| SlotBackoff {
                        app: APPS[a].to_owned(),
                        process: PROCESSES[p].to_owned(),
                        slot,
                        until_ms: NOW - 5_000 + until,
                    })
                    .collect(),
                crashes: crashes
                    .into_iter()
                    .map(|(a, p, release, n)| ReleaseCrashes {
                        app: APPS[a].to_owned(),
                        process: PROCESSES[p].to_owned(),
                        release,
                        crashes: n,
                        last_exit: Some((1, false)),
                    })
                    .collect(),
            })
    }

    /// Checks one pass: `actions` planned on `before`, `after` is the result of applying them.
    fn check_pass(before: &Sim, actions: &[Action], after: &Sim) -> Result<(), TestCaseError> {
        let ready = before.ready();
        let by_id: BTreeMap<&str, &ObservedInstance> = before
            .observed
            .instances
            .iter()
            .map(|i| (i.container_id.as_str(), i))
            .collect();
        let targets = index_desired(&before.desired);
        for action in actions {
            match action {
                Action::Drain {
                    container_id, node, ..
                }
                | Action::Remove {
                    container_id, node, ..
                } => {
                    prop_assert!(ready.contains(node), "acts on a lost node: {action:?}");
                    let i = by_id[container_id.as_str()];
                    let drain = matches!(action, Action::Drain { .. });
                    prop_assert!(
                        i.state != Draining || !drain,
                        "drains a draining one: {action:?}"
                    );
                }
                Action::Start {
                    app,
                    process,
                    release,
                    slot,
                    node,
                } => {
                    prop_assert!(ready.contains(node));
                    let t = &targets[app.as_str()];
                    prop_assert_eq!(*release, t.spec.release);
                    prop_assert!((1..=t.processes[process.as_str()].instances).contains(slot));
                    let blocked = blocked_slots(
                        &before.observed.backoff,
                        app,
                        process,
                        before.observed.now_ms,
                    );
                    prop_assert!(!blocked.contains(slot), "starts a slot in backoff");
                    // An instance on a draining node does not hold its slot: it is replaced.
                    let draining = |node: &str| {
                        before
                            .observed
                            .nodes
                            .iter()
                            .any(|n| n.name == node && n.draining)
                    };
                    let held = before
                        .live(app, process)
                        .iter()
                        .any(|i| i.release == *release && i.slot == *slot && !draining(&i.node));
                    prop_assert!(!held, "starts a held slot: {action:?}");
                }
                Action::RolloutSucceeded { .. } | Action::RolloutFailed { .. } => {}
            }
        }
        for (&app_name, t) in &targets {
            for (&process_name, spec) in &t.processes {
                let n = spec.instances as usize;
                let cap = n + spec.surge.max(1) as usize;
                let live_before = before.live(app_name, process_name).len();
                let live_after = after.live(app_name, process_name).len();
                let started = actions
                    .iter()
                    .filter(|a| {
                        matches!(a, Action::Start { app, process, .. }
                            if app == app_name && process == process_name)
                    })
                    .count();
                // (a) surge cap.
                prop_assert!(
                    live_after <= cap.max(live_before),
                    "{app_name}/{process_name}: {live_before} -> {live_after} live, cap {cap}"
                );
                if started > 0 {
                    prop_assert!(live_after <= cap, "started beyond N + S");
                }
                // (b) availability.
                let healthy_before = before.healthy(app_name, process_name);
                let healthy_after = after.healthy(app_name, process_name);
                if n > 0 {
                    prop_assert!(
                        healthy_after >= n.min(healthy_before),
                        "{app_name}/{process_name}: healthy {healthy_before} -> {healthy_after}, N = {n}"
                    );
                }
            }
        }
        Ok(())
    }

    fn permuted(observed: &Observed) -> Observed {
        let mut o = observed.clone();
        o.instances.reverse();
        o.nodes.reverse();
        o.backoff.reverse();
        o
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// One pass over arbitrary states: cap, availability, no action on lost nodes or
        /// draining containers, starts only into free target slots, determinism.
        #[test]
        fn single_pass_invariants(desired in arb_desired(), observed in arb_observed()) {
            let before = Sim::from_state(desired.clone(), observed.clone());
            let actions = before.plan();
            prop_assert_eq!(&plan(&desired, &permuted(&observed)), &actions);
            let mut after = before.clone();
            after.apply(&actions);
            check_pass(&before, &actions, &after)?;
        }

        /// Random executions: instances become healthy, unhealthy, exit; nodes flap, are
        /// cordoned and drained; the target changes. Every pass keeps the cap and the
        /// availability guarantee, and starts nothing on a cordoned or draining node.
        #[test]
        fn random_executions_keep_invariants(
            desired in arb_desired(),
            observed in arb_observed(),
            dice in prop::collection::vec(any::<u8>(), 400),
        ) {
            let mut sim = Sim::from_state(desired, observed);
            let mut dice = dice.into_iter().cycle();
            let mut roll = move || dice.next().unwrap_or(0);
            for pass in 0..15u64 {
                let actions = sim.plan();
                for (_, _, node) in starts(&actions) {
                    let closed = sim
                        .observed
                        .nodes
                        .iter()
                        .any(|n| n.name == node && (n.cordoned || n.draining));
                    prop_assert!(!closed, "a start on closed node {node}: {actions:?}");
                }
                let before = sim.clone();
                sim.apply(&actions);
                check_pass(&before, &actions, &sim)?;
                sim.tick();
                for i in &mut sim.observed.instances {
                    let r = roll();
                    i.state = match (&i.state, r % 20) {
                        (Starting, 0..=7) => Healthy,
                        (Starting, 8..=10) => Unhealthy,
                        (Starting, 11) => exited(1),
                        (Healthy, 0) => Unhealthy,
                        (Healthy, 1) => exited(137),
                        (Unhealthy, 0..=2) => Healthy,
                        (s, _) => s.clone(),
                    };
                }
                if roll() % 8 == 0 {
                    let k = usize::from(roll()) % sim.observed.nodes.len();
                    sim.observed.nodes[k].ready = !sim.observed.nodes[k].ready;
                }
                if roll() % 6 == 0 {
                    let k = usize::from(roll()) % sim.observed.nodes.len();
                    let n = &mut sim.observed.nodes[k];
                    match roll() % 3 {
                        0 => n.cordoned = !n.cordoned,
                        1 => n.draining = !n.draining,
                        _ => {}
                    }
                }
                if roll() % 10 == 0 {
                    let now = sim.observed.now_ms;
                    let a = &mut sim.desired.apps[0];
                    a.release += 1;
                    a.rollout_deadline_ms = Some(now + pass * TICK_MS);
                    if let Some(p) = a.processes.first_mut() {
                        p.instances = u32::from(roll() % 7);
                    }
                }
            }
        }

        /// The early rollout verdict never fails a rollout while an instance of the target
        /// release (current spec) is healthy; and it only comes from the stated facts.
        #[test]
        fn early_failure_never_while_a_new_instance_is_healthy(
            desired in arb_desired(),
            observed in arb_observed(),
            spec in prop_oneof![Just(""), Just("x"), Just("y")],
        ) {
            let mut desired = desired;
            for a in &mut desired.apps {
                a.rollout_deadline_ms = Some(NOW + 1_000 * TICK_MS);
                for p in &mut a.processes {
                    p.spec = spec.to_owned();
                }
            }
            let actions = plan(&desired, &observed);
            let ready = ready_nodes(&observed.nodes);
            let targets = index_desired(&desired);
            for action in &actions {
                let Action::RolloutFailed { app, release, .. } = action else { continue };
                let t = &targets[app.as_str()];
                let healthy_new = observed.instances.iter().any(|i| {
                    i.app == *app
                        && i.state == Healthy
                        && ready.contains(i.node.as_str())
                        && t.processes
                            .get(i.process.as_str())
                            .is_some_and(|p| is_current(i, *release, p))
                });
                prop_assert!(!healthy_new, "failed early with a healthy new instance: {action:?}");
            }
        }

        /// (c) When starts become healthy, any state converges to exactly N healthy instances
        /// of R in slots 1..=N and nothing else, then plans nothing.
        #[test]
        fn converges_when_starts_become_healthy(
            desired in arb_desired(),
            observed in arb_observed(),
        ) {
            let mut observed = observed;
            observed.nodes[0].ready = true;
            // Crashes of a target release make its rollout fail early, and the reconciler then
            // rolls back, as for a missed deadline; here rollouts must finish.
            observed.crashes.clear();
            // Unhealthy instances here refuse connections and the reconciler knows since when
            // (a busy instance that still accepts is kept by design: see its own tests).
            for i in &mut observed.instances {
                i.health.accepting = false;
                i.health.unhealthy_since_ms.get_or_insert(NOW);
            }
            let mut desired = desired;
            for a in &mut desired.apps {
                // A missed deadline means the reconciler rolls back; here rollouts must finish.
                a.rollout_deadline_ms = a.rollout_deadline_ms.map(|_| NOW + 1_000 * TICK_MS);
            }
            let mut sim = Sim::from_state(desired, observed);
            let passes = sim.run_until_converged(30);
            prop_assert!(passes.is_some(), "no convergence: {:?}", sim.observed.instances);
            prop_assert!(sim.desired.apps.iter().all(|a| a.rollout_deadline_ms.is_none()));
            prop_assert!(sim.plan().is_empty());
            prop_assert!(sim.plan().is_empty());
        }
    }
}
