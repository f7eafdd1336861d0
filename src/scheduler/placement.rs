//! Placement: which node a new instance starts on. Pure, like the planner that calls it.
//!
//! Two steps: [`feasible`] says which nodes may take an instance at all (ready; later,
//! resources), then [`rank`] orders those by spread: the fewest live instances of the same
//! `(app, process)`, then the fewest live instances overall, then the smallest name.
//! [`explain`] says, node by node, why one was rejected (`n2: not ready`), for messages such as
//! "no node can run web". The planner calls [`place`] once per pass for all its starts.

use std::collections::BTreeMap;

use super::plan::NodeState;

/// Placement never fails as such; this names why a node cannot take an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The node's engine did not answer (or one of its entries says so).
    #[error("not ready")]
    NotReady,
    /// The node stopped answering a moment ago: kept, but given nothing new.
    #[error("not answering (suspect)")]
    Suspect,
}

/// A node's verdict in [`feasible`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub node: &'a str,
    /// `None`: the node may take the instance.
    pub rejected: Option<Rejection>,
}

/// Every node once (sorted by name), with why it cannot take an instance. A name listed
/// several times is ready only if every entry says so.
pub fn feasible(nodes: &[NodeState]) -> Vec<Verdict<'_>> {
    let mut ready: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for node in nodes {
        let e = ready.entry(node.name.as_str()).or_insert((true, false));
        e.0 &= node.ready;
        e.1 |= node.suspect;
    }
    ready
        .into_iter()
        .map(|(node, (ok, suspect))| Verdict {
            node,
            rejected: if !ok {
                Some(Rejection::NotReady)
            } else if suspect {
                Some(Rejection::Suspect)
            } else {
                None
            },
        })
        .collect()
}

/// One line per rejected node: `n2: not ready`.
pub fn explain(nodes: &[NodeState]) -> Vec<String> {
    feasible(nodes)
        .into_iter()
        .filter_map(|v| v.rejected.map(|r| format!("{}: {r}", v.node)))
        .collect()
}

/// Live instances per node, overall and per `(app, process)`, of the feasible nodes.
#[derive(Debug, Clone, Default)]
pub struct Load<'a> {
    total: BTreeMap<&'a str, usize>,
    per_process: BTreeMap<(&'a str, &'a str, &'a str), usize>,
}

impl<'a> Load<'a> {
    /// No instance yet on `nodes`.
    pub fn new(nodes: impl IntoIterator<Item = &'a str>) -> Load<'a> {
        Load {
            total: nodes.into_iter().map(|n| (n, 0)).collect(),
            per_process: BTreeMap::new(),
        }
    }

    /// Counts one live instance of `(app, process)` on `node` (ignored if `node` is not one
    /// of the nodes of [`Load::new`]).
    pub fn add(&mut self, app: &'a str, process: &'a str, node: &'a str) {
        if let Some(count) = self.total.get_mut(node) {
            *count += 1;
            *self.per_process.entry((app, process, node)).or_default() += 1;
        }
    }
}

/// The nodes of `load`, best first for an instance of `(app, process)`: fewest of this
/// `(app, process)`, then fewest overall, then name.
pub fn rank<'a>(load: &Load<'a>, app: &str, process: &str) -> Vec<&'a str> {
    let mut ranked: Vec<(usize, usize, &'a str)> = load
        .total
        .iter()
        .map(|(&node, &total)| {
            let mine = load
                .per_process
                .get(&(app, process, node))
                .copied()
                .unwrap_or(0);
            (mine, total, node)
        })
        .collect();
    ranked.sort();
    ranked.into_iter().map(|(_, _, node)| node).collect()
}

/// Places `starts` (app, process), in order, given the `live` instances (app, process, node):
/// each start goes to the best-ranked feasible node and counts for the next ones. `None` for a
/// start no node can take.
pub fn place<'a>(
    nodes: &'a [NodeState],
    live: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    starts: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<Option<&'a str>> {
    let ok = feasible(nodes)
        .into_iter()
        .filter(|v| v.rejected.is_none())
        .map(|v| v.node);
    let mut load = Load::new(ok);
    for (app, process, node) in live {
        load.add(app, process, node);
    }
    starts
        .into_iter()
        .map(|(app, process)| {
            let best = rank(&load, app, process).into_iter().next()?;
            load.add(app, process, best);
            Some(best)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, bool)]) -> Vec<NodeState> {
        list.iter()
            .map(|&(name, ready)| NodeState {
                name: name.into(),
                suspect: false,
                ready,
            })
            .collect()
    }

    #[test]
    fn feasible_keeps_ready_nodes_and_explains_the_others() {
        let n = nodes(&[("n1", true), ("n2", false), ("n3", true), ("n3", false)]);
        let ok: Vec<&str> = feasible(&n)
            .into_iter()
            .filter(|v| v.rejected.is_none())
            .map(|v| v.node)
            .collect();
        assert_eq!(ok, ["n1"]);
        assert_eq!(explain(&n), ["n2: not ready", "n3: not ready"]);
    }

    #[test]
    fn rank_spreads_by_process_then_total_then_name() {
        let mut load = Load::new(["a", "b", "c"]);
        load.add("shop", "web", "a");
        load.add("blog", "web", "b");
        load.add("blog", "web", "b");
        // Fewest shop/web: b and c (0); then fewest overall: c (0) before b (2).
        assert_eq!(rank(&load, "shop", "web"), ["c", "b", "a"]);
        // Not a feasible node: not counted, never ranked.
        load.add("shop", "web", "zz");
        assert_eq!(rank(&load, "shop", "web"), ["c", "b", "a"]);
    }

    #[test]
    fn place_counts_earlier_starts_and_skips_when_nothing_is_ready() {
        let n = nodes(&[("a", true), ("b", true)]);
        let placed = place(
            &n,
            [("shop", "web", "a")],
            [("shop", "web"), ("shop", "web")],
        );
        assert_eq!(placed, [Some("b"), Some("a")]);
        let down = nodes(&[("a", false)]);
        assert_eq!(place(&down, [], [("shop", "web")]), [None]);
    }
}
