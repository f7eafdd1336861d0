//! Placement: which node a new instance starts on. Pure, like the planner that calls it.
//!
//! Three steps, as Nomad splits them:
//!
//! - [`check`] says whether one node may take an instance at all, and if not why
//!   ([`Rejection`]): the node is not ready, suspect, draining or cordoned; it lacks a label the
//!   process is constrained to (`disk=ssd`); the instance asks for more CPU or memory than the
//!   node has in all; or the node's free memory or CPU is short. Free = the node's capacity
//!   minus the declared memory and CPUs of the instances escale has placed there, starts
//!   planned earlier in the same pass included. With overcommit (`scheduler.overcommit`, or a
//!   process's own flag) free resources do not reject; an instance larger than the whole node
//!   still does. A node whose capacity is unknown is not judged on resources.
//! - [`Placer::rank`] orders the feasible nodes, best first: fewest instances of the same
//!   `(app, process)` (spread), then nodes that already hold the image, then the fewest
//!   instances overall (least loaded), then the smallest name.
//! - [`Placer::explain`] says, node by node, why each was rejected (`n2: 200 MiB free, needs
//!   256 MiB`, `n3: lacks disk=ssd`), for "cannot place" messages.
//!
//! The planner builds one [`Placer`] per pass, [`Placer::add`]s the live instances and calls
//! [`Placer::place`] for each start; the service layer does the same with a whole formation
//! before it accepts a change ([`fit`]).

use std::collections::{BTreeMap, BTreeSet};

use super::plan::NodeState;

/// Nano-CPUs in one CPU.
pub const NANOS_PER_CPU: u64 = 1_000_000_000;

/// CPUs (in billionths) and memory (bytes): a node's capacity, an instance's declared limits,
/// what escale has placed on a node. A zero is "none declared".
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct Resources {
    pub nano_cpus: u64,
    pub memory_bytes: u64,
}

impl Resources {
    /// Declared limits as the registry stores them (`None`: no limit).
    pub fn declared(nano_cpus: Option<i64>, memory_bytes: Option<u64>) -> Resources {
        Resources {
            nano_cpus: nano_cpus.map_or(0, |n| n.max(0) as u64),
            memory_bytes: memory_bytes.unwrap_or(0),
        }
    }

    /// Adds `other` (saturating).
    pub fn add(&mut self, other: Resources) {
        self.nano_cpus = self.nano_cpus.saturating_add(other.nano_cpus);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
    }
}

/// What the node registry says of a node (the lead's `nodes` table feeds it through
/// `Scheduler::set_node_meta`): labels, cordoned, draining. The default: no labels, open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMeta {
    pub labels: BTreeMap<String, String>,
    /// Nothing new is placed on it; its instances stay.
    pub cordoned: bool,
    /// Nothing new is placed on it and its instances are moved away (replacements first).
    pub draining: bool,
}

/// Why a node cannot take an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The node's engine did not answer (or one of its entries says so).
    #[error("not ready")]
    NotReady,
    /// The node stopped answering a moment ago: kept, but given nothing new.
    #[error("not answering (suspect)")]
    Suspect,
    /// The node is being drained.
    #[error("draining")]
    Draining,
    /// The node is cordoned.
    #[error("cordoned")]
    Cordoned,
    /// The process is constrained to a label the node does not have (or has with another value).
    #[error("lacks {key}={value}")]
    LacksLabel { key: String, value: String },
    /// The instance asks for more CPUs than the whole node has.
    #[error("has {} CPU(s), needs {}", cpus(*has), cpus(*needs))]
    CpusAboveNode { has: u64, needs: u64 },
    /// The instance asks for more memory than the whole node has.
    #[error("has {} in all, needs {}", mib(*has), mib(*needs))]
    MemoryAboveNode { has: u64, needs: u64 },
    /// Not enough memory left after what escale placed there.
    #[error("{} free, needs {}", mib(*free), mib(*needs))]
    Memory { free: u64, needs: u64 },
    /// Not enough CPU left after what escale placed there.
    #[error("{} CPU(s) free, needs {}", cpus(*free), cpus(*needs))]
    Cpus { free: u64, needs: u64 },
}

/// `256 MiB` (rounded down; below 1 MiB in KiB).
pub fn mib(bytes: u64) -> String {
    if bytes != 0 && bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// `0.5`, `2`, `1.25` (nano-CPUs as CPUs, trailing zeros dropped).
pub fn cpus(nanos: u64) -> String {
    let whole = nanos / NANOS_PER_CPU;
    let frac = nanos % NANOS_PER_CPU;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// What one instance asks of a node.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub app: &'a str,
    pub process: &'a str,
    /// Declared CPUs and memory (zero: none declared, never rejected on that resource).
    pub resources: Resources,
    /// Labels the node must carry with these values.
    pub constraints: &'a BTreeMap<String, String>,
    /// The image to run (nodes holding it are preferred); empty: unknown.
    pub image: &'a str,
    /// Free resources do not reject (an instance larger than a whole node still does).
    pub overcommit: bool,
}

/// One node as placement sees it: its state (entries of the same name merged) and what escale
/// has placed there.
#[derive(Debug, Clone)]
struct Slot<'a> {
    ready: bool,
    suspect: bool,
    cordoned: bool,
    draining: bool,
    capacity: Option<Resources>,
    labels: &'a BTreeMap<String, String>,
    images: BTreeSet<&'a str>,
    used: Resources,
    total: usize,
    per_process: BTreeMap<(&'a str, &'a str), usize>,
}

/// Whether `node` (with `used` placed on it) may take `req`; the first reason if not, in this
/// order: not ready, suspect, draining, cordoned, a missing label, larger than the node, memory,
/// CPUs.
pub fn check(node: &NodeState, used: Resources, req: &Request<'_>) -> Result<(), Rejection> {
    let slot = Slot {
        ready: node.ready,
        suspect: node.suspect,
        cordoned: node.cordoned,
        draining: node.draining,
        capacity: node.capacity,
        labels: &node.labels,
        images: BTreeSet::new(),
        used,
        total: 0,
        per_process: BTreeMap::new(),
    };
    judge(&slot, req)
}

fn judge(slot: &Slot<'_>, req: &Request<'_>) -> Result<(), Rejection> {
    if !slot.ready {
        return Err(Rejection::NotReady);
    }
    if slot.suspect {
        return Err(Rejection::Suspect);
    }
    if slot.draining {
        return Err(Rejection::Draining);
    }
    if slot.cordoned {
        return Err(Rejection::Cordoned);
    }
    for (key, value) in req.constraints {
        if slot.labels.get(key) != Some(value) {
            return Err(Rejection::LacksLabel {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    let Some(cap) = slot.capacity else {
        return Ok(());
    };
    let needs = req.resources;
    // A capacity of 0 is an engine that did not say: not judged on that resource.
    if cap.nano_cpus > 0 && needs.nano_cpus > cap.nano_cpus {
        return Err(Rejection::CpusAboveNode {
            has: cap.nano_cpus,
            needs: needs.nano_cpus,
        });
    }
    if cap.memory_bytes > 0 && needs.memory_bytes > cap.memory_bytes {
        return Err(Rejection::MemoryAboveNode {
            has: cap.memory_bytes,
            needs: needs.memory_bytes,
        });
    }
    if req.overcommit {
        return Ok(());
    }
    let free_memory = cap.memory_bytes.saturating_sub(slot.used.memory_bytes);
    if cap.memory_bytes > 0 && needs.memory_bytes > free_memory {
        return Err(Rejection::Memory {
            free: free_memory,
            needs: needs.memory_bytes,
        });
    }
    let free_cpus = cap.nano_cpus.saturating_sub(slot.used.nano_cpus);
    if cap.nano_cpus > 0 && needs.nano_cpus > free_cpus {
        return Err(Rejection::Cpus {
            free: free_cpus,
            needs: needs.nano_cpus,
        });
    }
    Ok(())
}

/// A node's verdict for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub node: &'a str,
    /// `None`: the node may take the instance.
    pub rejected: Option<Rejection>,
}

/// The nodes of one pass (or one service check) and what escale placed on them.
#[derive(Debug, Clone)]
pub struct Placer<'a> {
    nodes: BTreeMap<&'a str, Slot<'a>>,
}

impl<'a> Placer<'a> {
    /// Every node once, sorted by name. A name listed several times is ready only if every
    /// entry says so, suspect, cordoned or draining if one says so; capacity, labels and images
    /// come from its first entry.
    pub fn new(nodes: &'a [NodeState]) -> Placer<'a> {
        let mut out: BTreeMap<&'a str, Slot<'a>> = BTreeMap::new();
        for n in nodes {
            let slot = out.entry(n.name.as_str()).or_insert_with(|| Slot {
                ready: true,
                suspect: false,
                cordoned: false,
                draining: false,
                capacity: n.capacity,
                labels: &n.labels,
                images: n.images.iter().map(String::as_str).collect(),
                used: Resources::default(),
                total: 0,
                per_process: BTreeMap::new(),
            });
            slot.ready &= n.ready;
            slot.suspect |= n.suspect;
            slot.cordoned |= n.cordoned;
            slot.draining |= n.draining;
        }
        Placer { nodes: out }
    }

    /// Counts one live instance of `(app, process)` on `node` with its declared `resources`
    /// (ignored if `node` is not one of the nodes of [`Placer::new`]).
    pub fn add(&mut self, app: &'a str, process: &'a str, node: &str, resources: Resources) {
        if let Some(slot) = self.nodes.get_mut(node) {
            slot.total += 1;
            slot.used.add(resources);
            *slot.per_process.entry((app, process)).or_default() += 1;
        }
    }

    /// Counts `resources` as used on `node` without counting an instance for spread (a
    /// container being stopped still holds its memory).
    pub fn reserve(&mut self, node: &str, resources: Resources) {
        if let Some(slot) = self.nodes.get_mut(node) {
            slot.used.add(resources);
        }
    }

    /// Records that `node` holds `image` (started there in this pass).
    pub fn add_image(&mut self, node: &str, image: &'a str) {
        if let Some(slot) = self.nodes.get_mut(node) {
            slot.images.insert(image);
        }
    }

    /// What escale has placed on `node` so far.
    pub fn used(&self, node: &str) -> Option<Resources> {
        self.nodes.get(node).map(|s| s.used)
    }

    /// Every node once, by name, with why it cannot take `req`.
    pub fn verdicts(&self, req: &Request<'_>) -> Vec<Verdict<'a>> {
        self.nodes
            .iter()
            .map(|(&node, slot)| Verdict {
                node,
                rejected: judge(slot, req).err(),
            })
            .collect()
    }

    /// The nodes that may take `req`, best first: fewest of this `(app, process)`, then those
    /// holding the image, then fewest instances overall, then name.
    pub fn rank(&self, req: &Request<'_>) -> Vec<&'a str> {
        let mut ranked: Vec<(usize, bool, usize, &'a str)> = self
            .nodes
            .iter()
            .filter(|(_, slot)| judge(slot, req).is_ok())
            .map(|(&node, slot)| {
                let mine = slot
                    .per_process
                    .get(&(req.app, req.process))
                    .copied()
                    .unwrap_or(0);
                let lacks_image = !req.image.is_empty() && !slot.images.contains(req.image);
                (mine, lacks_image, slot.total, node)
            })
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(_, _, _, node)| node).collect()
    }

    /// One line per rejected node: `n2: 200 MiB free, needs 256 MiB`.
    pub fn explain(&self, req: &Request<'_>) -> Vec<String> {
        self.verdicts(req)
            .into_iter()
            .filter_map(|v| v.rejected.map(|r| format!("{}: {r}", v.node)))
            .collect()
    }

    /// Places one instance of `req` on the best node and counts it there (image included);
    /// `Err` with one line per node ([`Placer::explain`]) when no node can take it.
    pub fn place(&mut self, req: &Request<'a>) -> Result<&'a str, Unplaceable> {
        let Some(best) = self.rank(req).into_iter().next() else {
            return Err(Unplaceable {
                reasons: self.explain(req),
            });
        };
        self.add(req.app, req.process, best, req.resources);
        if !req.image.is_empty() {
            self.add_image(best, req.image);
        }
        Ok(best)
    }
}

/// No node can take an instance: one reason per node (`n3: lacks disk=ssd`); empty when there
/// is no node at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaceable {
    pub reasons: Vec<String>,
}

impl std::fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reasons.is_empty() {
            f.write_str("no node")
        } else {
            f.write_str(&self.reasons.join("; "))
        }
    }
}

/// One process of a formation to fit ([`fit`]).
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    pub request: Request<'a>,
    pub instances: u32,
}

/// Whether a whole formation fits on `nodes` (whose [`Placer`] already counts what other apps
/// use): every instance of every process is placed in turn; the first process with an
/// instance no node can take is returned with the reason per node.
pub fn fit<'a>(
    placer: &mut Placer<'a>,
    demands: &[Demand<'a>],
) -> Result<(), (&'a str, Unplaceable)> {
    for d in demands {
        for _ in 0..d.instances {
            placer
                .place(&d.request)
                .map_err(|e| (d.request.process, e))?;
        }
    }
    Ok(())
}

/// A node as a build site: whether it answers, is closed to new work (cordoned or draining),
/// and how many instances it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildCandidate {
    pub node: String,
    pub ready: bool,
    pub closed: bool,
    pub instances: usize,
}

/// Where a build runs: a ready node open to new work, the one with the fewest instances
/// (then by name); `None` when there is none.
pub fn build_node(candidates: &[BuildCandidate]) -> Option<String> {
    candidates
        .iter()
        .filter(|c| c.ready && !c.closed)
        .min_by(|a, b| (a.instances, &a.node).cmp(&(b.instances, &b.node)))
        .map(|c| c.node.clone())
}

#[cfg(test)]
mod tests {
    #[test]
    fn builds_go_to_the_least_busy_ready_open_node() {
        let c = |node: &str, ready: bool, closed: bool, instances: usize| BuildCandidate {
            node: node.into(),
            ready,
            closed,
            instances,
        };
        let nodes = [
            c("local", true, false, 9),
            c("n2", true, true, 0),
            c("n3", false, false, 0),
            c("n4", true, false, 3),
            c("n5", true, false, 3),
        ];
        assert_eq!(
            build_node(&nodes).as_deref(),
            Some("n4"),
            "not the first, not closed, not down"
        );
        assert_eq!(build_node(&nodes[..3]).as_deref(), Some("local"));
        assert_eq!(build_node(&nodes[1..3]), None, "nowhere to build");
    }

    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn node(name: &str) -> NodeState {
        NodeState {
            name: name.into(),
            ready: true,
            ..NodeState::default()
        }
    }

    fn sized(name: &str, cpus: u64, memory_mib: u64) -> NodeState {
        NodeState {
            capacity: Some(Resources {
                nano_cpus: cpus * NANOS_PER_CPU,
                memory_bytes: memory_mib * MIB,
            }),
            ..node(name)
        }
    }

    fn req<'a>(constraints: &'a BTreeMap<String, String>, memory_mib: u64) -> Request<'a> {
        Request {
            app: "shop",
            process: "web",
            resources: Resources {
                nano_cpus: 0,
                memory_bytes: memory_mib * MIB,
            },
            constraints,
            image: "",
            overcommit: false,
        }
    }

    fn none() -> &'static BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        &EMPTY
    }

    #[test]
    fn formats_memory_and_cpus() {
        assert_eq!(mib(256 * MIB), "256 MiB");
        assert_eq!(mib(512 << 10), "512 KiB");
        assert_eq!(cpus(2 * NANOS_PER_CPU), "2");
        assert_eq!(cpus(NANOS_PER_CPU / 2), "0.5");
        assert_eq!(cpus(1_250_000_000), "1.25");
    }

    #[test]
    fn a_duplicate_entry_merges_and_rejections_are_explained_in_order() {
        let mut cordoned = node("c");
        cordoned.cordoned = true;
        let mut draining = node("d");
        draining.draining = true;
        draining.cordoned = true;
        let mut suspect = node("s");
        suspect.suspect = true;
        let mut n = vec![node("a"), node("b"), cordoned, draining, suspect];
        n.push(NodeState {
            ready: false,
            ..node("b")
        });
        let p = Placer::new(&n);
        assert_eq!(p.rank(&req(none(), 0)), ["a"]);
        assert_eq!(
            p.explain(&req(none(), 0)),
            [
                "b: not ready",
                "c: cordoned",
                "d: draining",
                "s: not answering (suspect)"
            ]
        );
    }

    #[test]
    fn labels_must_match_the_constraints() {
        let mut ssd = node("n1");
        ssd.labels.insert("disk".into(), "ssd".into());
        let mut hdd = node("n2");
        hdd.labels.insert("disk".into(), "hdd".into());
        let n = vec![ssd, hdd, node("n3")];
        let want: BTreeMap<String, String> = [("disk".to_string(), "ssd".to_string())].into();
        let p = Placer::new(&n);
        assert_eq!(p.rank(&req(&want, 0)), ["n1"]);
        assert_eq!(
            p.explain(&req(&want, 0)),
            ["n2: lacks disk=ssd", "n3: lacks disk=ssd"]
        );
    }

    #[test]
    fn memory_counts_what_is_placed_and_what_this_pass_starts() {
        let n = vec![sized("n1", 4, 1024), sized("n2", 4, 456)];
        let mut p = Placer::new(&n);
        p.add(
            "blog",
            "web",
            "n2",
            Resources::declared(None, Some(256 * MIB)),
        );
        // n2: 200 MiB free; n1 takes the first three 256 MiB instances... and a fourth.
        let r = req(none(), 256);
        assert_eq!(p.explain(&r), ["n2: 200 MiB free, needs 256 MiB"]);
        for _ in 0..4 {
            assert_eq!(p.place(&r), Ok("n1"));
        }
        let err = p.place(&r).unwrap_err();
        assert_eq!(
            err.reasons,
            [
                "n1: 0 MiB free, needs 256 MiB",
                "n2: 200 MiB free, needs 256 MiB"
            ]
        );
        assert_eq!(
            err.to_string(),
            "n1: 0 MiB free, needs 256 MiB; n2: 200 MiB free, needs 256 MiB"
        );
        // Overcommit: free memory does not reject.
        let over = Request {
            overcommit: true,
            ..r
        };
        assert_eq!(p.place(&over), Ok("n2"));
    }

    #[test]
    fn cpus_count_and_a_request_above_the_node_is_refused_even_with_overcommit() {
        let n = vec![sized("n1", 2, 1024)];
        let mut p = Placer::new(&n);
        let one = Request {
            resources: Resources::declared(Some(NANOS_PER_CPU as i64 * 3 / 2), None),
            ..req(none(), 0)
        };
        assert_eq!(p.place(&one), Ok("n1"));
        assert_eq!(p.explain(&one), ["n1: 0.5 CPU(s) free, needs 1.5"]);
        let huge = Request {
            resources: Resources::declared(Some(4 * NANOS_PER_CPU as i64), None),
            overcommit: true,
            ..req(none(), 0)
        };
        assert_eq!(p.explain(&huge), ["n1: has 2 CPU(s), needs 4"]);
        let big = Request {
            overcommit: true,
            ..req(none(), 2048)
        };
        assert_eq!(p.explain(&big), ["n1: has 1024 MiB in all, needs 2048 MiB"]);
        // Unknown capacity: not judged on resources.
        let unknown = vec![node("n9")];
        assert_eq!(Placer::new(&unknown).rank(&huge), ["n9"]);
    }

    #[test]
    fn rank_spreads_then_prefers_the_image_then_the_least_loaded_then_the_name() {
        let mut with_image = node("c");
        with_image.images.insert("shop:2".into());
        let n = vec![node("a"), node("b"), with_image];
        let mut p = Placer::new(&n);
        p.add("blog", "web", "b", Resources::default());
        p.add("blog", "web", "b", Resources::default());
        let r = Request {
            image: "shop:2",
            ..req(none(), 0)
        };
        // None holds shop/web: c has the image; then a (0 overall) before b (2).
        assert_eq!(p.rank(&r), ["c", "a", "b"]);
        p.add("shop", "web", "c", Resources::default());
        // Spread first: c already has one shop/web.
        assert_eq!(p.rank(&r), ["a", "b", "c"]);
        // A start records the image where it goes.
        assert_eq!(p.place(&r), Ok("a"));
        p.add("shop", "web", "b", Resources::default());
        assert_eq!(p.rank(&r), ["a", "c", "b"]);
        // Not one of the nodes: not counted, never ranked.
        p.add("shop", "web", "zz", Resources::default());
        assert_eq!(p.rank(&r).len(), 3);
    }

    #[test]
    fn fit_names_the_process_and_each_node() {
        let n = vec![sized("n1", 1, 512), sized("n2", 1, 512)];
        let mut p = Placer::new(&n);
        let web = Demand {
            request: req(none(), 256),
            instances: 4,
        };
        assert_eq!(fit(&mut p.clone(), std::slice::from_ref(&web)), Ok(()));
        let worker = Demand {
            request: Request {
                process: "worker",
                ..req(none(), 128)
            },
            instances: 1,
        };
        let (process, why) = fit(&mut p, &[web, worker]).unwrap_err();
        assert_eq!(process, "worker");
        assert_eq!(
            why.reasons,
            [
                "n1: 0 MiB free, needs 128 MiB",
                "n2: 0 MiB free, needs 128 MiB"
            ]
        );
        assert_eq!(fit(&mut Placer::new(&[]), &[]), Ok(()));
    }

    proptest! {
        /// Whatever is placed: never on a rejected node, never beyond a node's memory or CPUs
        /// without overcommit, spread within one instance across equal nodes, and a refusal
        /// names every node.
        #[test]
        fn placements_respect_capacity_and_spread(
            caps in prop::collection::vec((0u64..=4, 0u64..=2048, any::<bool>(), any::<bool>()), 1..=5),
            asks in prop::collection::vec((0u64..=2, 0u64..=512), 1..=12),
        ) {
            let n: Vec<NodeState> = caps
                .iter()
                .enumerate()
                .map(|(k, &(c, m, cordoned, ssd))| {
                    let mut s = sized(&format!("n{k}"), c, m);
                    s.cordoned = cordoned;
                    if ssd {
                        s.labels.insert("disk".into(), "ssd".into());
                    }
                    s
                })
                .collect();
            let want: BTreeMap<String, String> = [("disk".to_string(), "ssd".to_string())].into();
            let mut p = Placer::new(&n);
            let mut placed: BTreeMap<&str, Resources> = BTreeMap::new();
            for &(c, m) in &asks {
                let r = Request {
                    resources: Resources { nano_cpus: c * NANOS_PER_CPU / 2, memory_bytes: m * MIB },
                    ..req(&want, 0)
                };
                match p.place(&r) {
                    Ok(node) => {
                        let s = n.iter().find(|s| s.name == node).unwrap();
                        prop_assert!(!s.cordoned);
                        prop_assert_eq!(s.labels.get("disk").map(String::as_str), Some("ssd"));
                        placed.entry(node).or_default().add(r.resources);
                        let cap = s.capacity.unwrap();
                        let used = placed[node];
                        prop_assert!(cap.memory_bytes == 0 || used.memory_bytes <= cap.memory_bytes);
                        prop_assert!(cap.nano_cpus == 0 || used.nano_cpus <= cap.nano_cpus);
                        prop_assert_eq!(p.used(node), Some(used));
                    }
                    Err(e) => prop_assert_eq!(e.reasons.len(), n.len()),
                }
            }
        }

        /// Equal nodes with no limits get instances of one process spread within one of each other.
        #[test]
        fn equal_nodes_are_spread_evenly(nodes in 1usize..=5, instances in 0usize..=20) {
            let n: Vec<NodeState> = (0..nodes).map(|k| node(&format!("n{k}"))).collect();
            let mut p = Placer::new(&n);
            let mut count: BTreeMap<&str, usize> = BTreeMap::new();
            for _ in 0..instances {
                *count.entry(p.place(&req(none(), 0)).unwrap()).or_default() += 1;
            }
            let max = count.values().max().copied().unwrap_or(0);
            let min = if count.len() < nodes { 0 } else { count.values().min().copied().unwrap_or(0) };
            prop_assert!(max - min <= 1);
        }
    }
}
