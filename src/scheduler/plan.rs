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
//! - The **target slots** are `1..=N`. In each target slot at most one live instance of `R` is
//!   the slot's **keeper** (preferring `Healthy`, then `Starting`, then `Unhealthy`, then the
//!   smallest container id).
//! - Every other live instance of the process is **retiring**: instances of other releases
//!   (older ones during a deploy, newer ones after a rollback), instances of `R` in slots outside
//!   `1..=N` (scaled down), and the non-keepers of a slot (duplicates).
//!
//! # Algorithm, per `(app, process)`
//!
//! 1. Exited containers are removed ([`Action::Remove`]). `crashed` is true only for an instance
//!    of `R` in a target slot that was not being drained; that slot is then not restarted in the
//!    same pass, so the backoff the reconciler records takes effect.
//! 2. Keepers are chosen. A keeper that is `Unhealthy` is drained ([`DrainReason::Unhealthy`]);
//!    its slot is not restarted in the same pass either.
//! 3. Retiring instances are drained in this order: `Unhealthy`, `Starting`, `Healthy`; among
//!    equals, other releases before `R`, the oldest release first, the highest slot first, then
//!    container id. Non-healthy ones (they serve nothing) are always drained. A healthy one is
//!    drained only while `healthy keepers + healthy retiring left afterwards >= N`.
//! 4. Free target slots (no keeper, not cooling from step 1-2, no backoff with
//!    `until_ms > now_ms`) are started in ascending order, as many as the budget
//!    `N + S - live after the drains` allows.
//! 5. Each start is placed on a ready node (see [`plan`]).
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
//!   slot and the app has no live instance outside its target (other releases, undesired
//!   processes); otherwise, once `now_ms >= deadline`, [`Action::RolloutFailed`] with a reason a
//!   person can act on, and in that pass no instance of another release is drained (the
//!   reconciler switches the target back to the previous release).
//! - **Determinism and convergence**: output is sorted by app, process, action kind
//!   (remove, drain, start), slot, container id, with the rollout verdict last for its app.
//!   Re-planning after applying a plan makes progress towards exactly `N` healthy instances of
//!   `R` in slots `1..=N` and nothing else, and once there the plan is empty (no flip-flop).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// First crash-loop backoff delay, in milliseconds.
pub const BACKOFF_BASE_MS: u64 = 1_000;
/// Largest crash-loop backoff delay, in milliseconds.
pub const BACKOFF_MAX_MS: u64 = 60_000;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredProcess {
    /// The process type name.
    pub process: String,
    /// Desired instance count (0..=100); instances occupy slots `1..=instances`.
    pub instances: u32,
    /// Extra instances allowed during a rollout (>= 1; 0 is treated as 1).
    pub surge: u32,
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
}

/// One node. A name listed several times is ready only if every entry says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The node name.
    pub name: String,
    /// Whether the node's engine answers and accepts work.
    pub ready: bool,
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
    /// The slot's instance of the target release fails its health checks after the start grace.
    /// The reconciler records backoff for the slot; it is restarted in a later pass.
    Unhealthy,
    /// The app or the process is no longer desired.
    Orphan,
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
    /// The deadline passed before the rollout completed. Old instances were left serving.
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
        n if n - 1 >= 6 => BACKOFF_MAX_MS,
        n => (BACKOFF_BASE_MS << (n - 1)).min(BACKOFF_MAX_MS),
    }
}

/// Plans the next actions that move `observed` towards `desired`.
///
/// See the module documentation for the rules. Placement of a [`Action::Start`]: among ready
/// nodes, the one with the fewest live instances of the same `(app, process)`, then the fewest
/// live instances in total, then the smallest name; counts exclude instances drained in this
/// pass and include starts planned earlier in this pass.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Action> {
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

    for (&app, target) in &targets {
        let verdict = rollout_verdict(target, &groups, observed, !ready.is_empty());
        let freeze_other_releases = matches!(verdict, Some(Action::RolloutFailed { .. }));
        for (&process, spec) in &target.processes {
            let group = groups.get(&(app, process)).map_or(&[][..], Vec::as_slice);
            let blocked = blocked_slots(&observed.backoff, app, process, now);
            let pp = plan_process(
                target.spec.release,
                spec,
                group,
                &blocked,
                freeze_other_releases,
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

    // Placement: spread over ready nodes, counting this pass's drains and starts.
    let mut per_process: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
    let mut total: BTreeMap<&str, usize> = ready.iter().map(|&n| (n, 0)).collect();
    for view in &views {
        let node = view.inst.node.as_str();
        let counted = matches!(view.phase, Phase::Live(_))
            && !drained.contains(view.inst.container_id.as_str());
        if counted {
            if let Some(count) = total.get_mut(node) {
                *count += 1;
                *per_process
                    .entry((view.inst.app.as_str(), view.inst.process.as_str(), node))
                    .or_default() += 1;
            }
        }
    }
    for (app, process, release, slot) in starts {
        let best = total
            .iter()
            .map(|(&node, &load)| {
                let mine = per_process.get(&(app, process, node)).copied().unwrap_or(0);
                (mine, load, node)
            })
            .min();
        let Some((_, _, node)) = best else {
            continue; // no ready node: nothing can start
        };
        *total.entry(node).or_default() += 1;
        *per_process.entry((app, process, node)).or_default() += 1;
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

    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, action)| action).collect()
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

/// Plans one desired `(app, process)` from its instances on ready nodes.
fn plan_process<'v, 'a>(
    release: u32,
    spec: &DesiredProcess,
    group: &[&'v View<'a>],
    blocked: &BTreeSet<u32>,
    freeze_other_releases: bool,
) -> ProcessPlan<'v, 'a> {
    let n = spec.instances;
    let surge = spec.surge.max(1);
    let in_target = |slot: u32| (1..=n).contains(&slot);

    let mut removes = Vec::new();
    let mut drains = Vec::new();
    // Slots that crashed or were found unhealthy in this pass: restarted in a later pass, once
    // the reconciler has recorded their backoff.
    let mut cooling: BTreeSet<u32> = BTreeSet::new();
    let mut by_slot: BTreeMap<u32, Vec<(&'v View<'a>, Live)>> = BTreeMap::new();
    let mut retiring: Vec<(&'v View<'a>, Live, DrainReason)> = Vec::new();

    for &view in group {
        let inst = view.inst;
        match view.phase {
            Phase::Draining => {}
            Phase::Exited { after_drain, .. } => {
                let crashed = !after_drain && inst.release == release && in_target(inst.slot);
                if crashed {
                    cooling.insert(inst.slot);
                }
                removes.push((view, crashed));
            }
            Phase::Live(state) => {
                if inst.release != release {
                    retiring.push((view, state, DrainReason::Replaced));
                } else if in_target(inst.slot) {
                    by_slot.entry(inst.slot).or_default().push((view, state));
                } else {
                    retiring.push((view, state, DrainReason::ScaledDown));
                }
            }
        }
    }

    // One keeper per target slot: healthiest first, then smallest container id.
    let mut keepers: BTreeMap<u32, Live> = BTreeMap::new();
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
        if state == Live::Unhealthy {
            cooling.insert(slot);
            drains.push((keeper, DrainReason::Unhealthy));
        } else {
            keepers.insert(slot, state);
        }
    }

    // Drain retiring instances without letting healthy capacity fall below N.
    let healthy_keepers = keepers.values().filter(|&&s| s == Live::Healthy).count();
    retiring.sort_by_key(|(view, state, _)| {
        (
            *state,
            view.inst.release == release,
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
    for (view, state, reason) in retiring {
        let frozen = freeze_other_releases && view.inst.release != release;
        let spare = healthy_keepers + healthy_retiring > n as usize;
        if !frozen && (state != Live::Healthy || spare) {
            if state == Live::Healthy {
                healthy_retiring -= 1;
            }
            drains.push((view, reason));
        } else {
            kept_retiring += 1;
        }
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

    for (&process, spec) in &target.processes {
        let n = spec.instances;
        let group = groups.get(&(app, process)).unwrap_or(&empty);
        let mut healthy_slots: BTreeSet<u32> = BTreeSet::new();
        let (mut starting, mut unhealthy, mut others) = (0usize, 0usize, 0usize);
        let mut exits: Vec<(u32, &str, i64, bool)> = Vec::new();
        for view in group {
            let inst = view.inst;
            let mine = inst.release == release;
            match view.phase {
                Phase::Live(_) if !mine => others += 1,
                Phase::Live(Live::Healthy) => {
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
        exits.sort();
        if let Some(&(_, _, code, oom)) = exits.last() {
            if oom {
                parts.push(format!("last exit code {code} (killed: out of memory)"));
            } else {
                parts.push(format!("last exit code {code}"));
            }
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
        return None;
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
