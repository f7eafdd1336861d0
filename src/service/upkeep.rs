//! Node upkeep: what each node really uses (CPU, memory, disk), and the pruning of what escale
//! owns there.
//!
//! [`run`] is a task of `escale serve` with three clocks (`[upkeep]` in the config):
//! - every `usage_interval`, each running instance (as the reconciler's last pass saw it) has
//!   its CPU and memory sampled (the engine's one-shot stats: one read of the cgroup per container, a few at a time per node, each call
//!   bounded); CPU is a rate between two samples of the same container ([`cpu_rate`]),
//!   memory leaves out the page cache the kernel reclaims first ([`memory_used`]);
//! - every `disk_interval`, each node's disk: the images and containers escale owns there (per
//!   node and per app) and, for an engine on this host, the free space of its data root; a
//!   node crossing `disk_warn_percent` or `disk_refuse_builds_percent` (up, or back down)
//!   while escale runs is recorded as a `node.disk` event ([`disk_level`]); a level above
//!   the warning found at start is logged only (a restart is not a change of the disk);
//! - every `prune_interval`, on every node, the images escale built that belong to none of
//!   their app's last `scheduler.keep_releases` releases and that no container uses are
//!   removed ([`images_to_prune`]); an app being deployed is skipped (its deploy lock is
//!   taken for the decision, so a build that has not released yet is never pruned), and when
//!   a node cannot be listed nothing is pruned (an image used there may be needed elsewhere).
//!
//! The decisions are pure functions with unit tests; the task gathers and applies. What it
//! measured is published as a [`UsageView`] (`Services::usage`) that `escale nodes list`,
//! `escale apps info` and `/metrics` read. Builds check their node's disk at the moment they
//! start ([`check_build_disk`]), not the last measurement.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use serde::Serialize;

use super::Services;
use crate::config::UpkeepConfig;
use crate::events::{DiskLevel, Event};
use crate::node::{Filesystem, Node, OwnedDisk, OwnedImage, StatsSample};
use crate::registry::now_ms;

/// How long one engine call of the upkeep may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Stats calls in flight per node.
const STATS_PARALLELISM: usize = 4;

/// What can go wrong in a round of upkeep (logged; the next round tries again).
#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Engine(#[from] crate::node::NodeError),
    #[error("node `{node}`: {what} did not answer within {after:?}")]
    Timeout {
        node: String,
        what: &'static str,
        after: Duration,
    },
    /// A build refused because its node's disk is full.
    #[error(
        "node `{node}`: its engine disk is {used_percent}% full ({free} free of {total} at {path}); \
         builds are refused from {limit}% (upkeep.disk_refuse_builds_percent). Free space there: \
         escale prunes its unused images every upkeep.prune_interval, `docker system prune` on the \
         node removes what escale does not own"
    )]
    DiskFull {
        node: String,
        used_percent: u8,
        limit: u8,
        free: String,
        total: String,
        path: String,
    },
}

/// What one node uses, as last measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeUsage {
    /// CPUs the instances used between the last two samples (e.g. 0.25: a quarter of a core).
    pub cpus: f64,
    /// Memory the instances use, page cache left out.
    pub memory_bytes: u64,
    /// Instances sampled (running ones that answered).
    pub instances: u32,
    /// When (unix milliseconds).
    pub sampled_at: i64,
    /// The node's disk, once measured.
    pub disk: Option<NodeDisk>,
}

/// One node's disk, as last measured.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeDisk {
    /// Images escale owns there (its builds, and images copied there by escale).
    pub images_bytes: u64,
    /// Writable layers of escale's containers there.
    pub containers_bytes: u64,
    /// The filesystem of the engine's data root, when escale can see it (an engine on this
    /// host).
    pub filesystem: Option<FilesystemView>,
    /// `ok`, `warning` or `full` against the `[upkeep]` thresholds; `ok` when the filesystem
    /// is not seen.
    pub level: DiskLevel,
    /// When (unix milliseconds).
    pub measured_at: i64,
}

/// A filesystem's size and use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FilesystemView {
    pub path: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_percent: u8,
}

impl From<&Filesystem> for FilesystemView {
    fn from(f: &Filesystem) -> FilesystemView {
        FilesystemView {
            path: f.path.clone(),
            total_bytes: f.total_bytes,
            available_bytes: f.available_bytes,
            used_percent: f.used_percent(),
        }
    }
}

/// One instance's use, as last sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct InstanceUsage {
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// Everything the upkeep measured, swapped whole after each round.
#[derive(Debug, Clone, Default)]
pub struct UsageView {
    /// By node name.
    pub nodes: BTreeMap<String, NodeUsage>,
    /// By container id.
    pub instances: HashMap<String, InstanceUsage>,
    /// Disk escale uses for each app (images and containers, all nodes), by app name.
    pub apps_disk: BTreeMap<String, u64>,
}

/// The published [`UsageView`] (cheap to read from any request).
#[derive(Debug, Default)]
pub struct Usage(ArcSwap<UsageView>);

impl Usage {
    pub fn view(&self) -> Arc<UsageView> {
        self.0.load_full()
    }

    fn update(&self, f: impl Fn(&mut UsageView)) {
        self.0.rcu(|old| {
            let mut v = (**old).clone();
            f(&mut v);
            v
        });
    }
}

/// CPUs a container used between two samples: its CPU time over the host's, times the
/// host's CPUs. `None` when the samples cannot be compared (the same instant, or counters
/// that went back: a restarted container).
pub fn cpu_rate(prev: &StatsSample, cur: &StatsSample) -> Option<f64> {
    let used = cur.cpu_total_ns.checked_sub(prev.cpu_total_ns)?;
    let system = cur.system_ns.checked_sub(prev.system_ns)?;
    if system == 0 || cur.online_cpus == 0 {
        return None;
    }
    Some(used as f64 / system as f64 * cur.online_cpus as f64)
}

/// Memory a container uses, page cache the kernel reclaims first left out (what
/// `docker stats` shows).
pub fn memory_used(s: &StatsSample) -> u64 {
    s.memory_usage.saturating_sub(s.memory_inactive_file)
}

/// Where a disk `used_percent` full stands against the thresholds.
pub fn disk_level(used_percent: u8, policy: &UpkeepConfig) -> DiskLevel {
    if used_percent >= policy.disk_refuse_builds_percent {
        DiskLevel::Full
    } else if used_percent >= policy.disk_warn_percent {
        DiskLevel::Warning
    } else {
        DiskLevel::Ok
    }
}

/// What pruning keeps of one app (by its uid).
#[derive(Debug, Clone, Default)]
pub struct AppKeep {
    /// Images of its last `keep_releases` releases.
    pub images: HashSet<String>,
    /// A deploy of it runs: nothing of it is pruned this round.
    pub busy: bool,
}

/// The images of `images` (one node's) to remove: built by escale for an app that still
/// exists ([`crate::cleanup`] handles destroyed apps), that app not being deployed, none of
/// its tags among the app's kept releases, and neither a tag nor its id used by any container
/// (`in_use`: the image references of every container of the installation, on every node).
/// Images without escale's build label are never chosen.
pub fn images_to_prune<'a>(
    images: &'a [OwnedImage],
    apps: &HashMap<String, AppKeep>,
    in_use: &HashSet<String>,
) -> Vec<&'a OwnedImage> {
    images
        .iter()
        .filter(|i| {
            let Some(keep) = i.built_for.as_ref().and_then(|uid| apps.get(uid)) else {
                return false;
            };
            !keep.busy
                && !in_use.contains(&i.id)
                && !i
                    .tags
                    .iter()
                    .any(|t| keep.images.contains(t) || in_use.contains(t))
        })
        .collect()
}

/// Disk escale uses per app on one node: its images (each counted once) and its containers.
fn disk_per_app(disk: &OwnedDisk, into: &mut BTreeMap<String, u64>) {
    for i in &disk.images {
        if let Some(app) = &i.app {
            *into.entry(app.clone()).or_default() += i.bytes;
        }
    }
    for c in &disk.containers {
        if let Some(app) = &c.app {
            *into.entry(app.clone()).or_default() += c.bytes;
        }
    }
}

/// Refuses a build on `node` when its engine disk is at or above
/// `upkeep.disk_refuse_builds_percent`, measured now. An engine whose filesystem escale cannot
/// see (another host) is not refused.
pub async fn check_build_disk(node: &Node, policy: &UpkeepConfig) -> Result<(), UpkeepError> {
    let fs = match tokio::time::timeout(CALL_TIMEOUT, node.filesystem()).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(UpkeepError::Timeout {
                node: node.name.clone(),
                what: "reading the engine's info",
                after: CALL_TIMEOUT,
            })
        }
    };
    let Some(fs) = fs else { return Ok(()) };
    let used = fs.used_percent();
    if disk_level(used, policy) == DiskLevel::Full {
        return Err(UpkeepError::DiskFull {
            node: node.name.clone(),
            used_percent: used,
            limit: policy.disk_refuse_builds_percent,
            free: human_bytes(fs.available_bytes),
            total: human_bytes(fs.total_bytes),
            path: fs.path,
        });
    }
    Ok(())
}

/// `1.5 GiB`, `200 MiB`, `12 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 10.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The upkeep task: samples, measures and prunes on its clocks until `shutdown`.
pub async fn run(services: Services, shutdown: impl std::future::Future<Output = ()>) {
    let Some(sched) = services.scheduler.clone() else {
        return;
    };
    tokio::pin!(shutdown);
    let policy = services.config.upkeep.clone();
    let mut usage_tick = tokio::time::interval(policy.usage_interval);
    let mut disk_tick = tokio::time::interval(policy.disk_interval);
    // The first prune waits one interval: a server just started has deploys to resume.
    let mut prune_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + policy.prune_interval,
        policy.prune_interval,
    );
    for t in [&mut usage_tick, &mut disk_tick, &mut prune_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut samples: HashMap<String, StatsSample> = HashMap::new();
    let mut levels: HashMap<String, DiskLevel> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = usage_tick.tick() => sample_usage(&services, &sched, &mut samples).await,
            _ = disk_tick.tick() => measure_disks(&services, &sched, &mut levels).await,
            _ = prune_tick.tick() => {
                if let Err(e) = prune(&services, PruneScope::All).await {
                    tracing::warn!(error = %e, "image pruning skipped this round");
                }
            }
        }
    }
}

/// One round of CPU and memory samples on every node.
async fn sample_usage(
    services: &Services,
    sched: &crate::scheduler::Scheduler,
    samples: &mut HashMap<String, StatsSample>,
) {
    // The running containers as the reconciler's last pass saw them: no list call of our own.
    let view = sched.view.load_full();
    let nodes = sched.docker_nodes();
    let rounds = nodes.iter().map(|node| {
        let running: Vec<String> = view
            .instances
            .iter()
            .filter(|i| {
                i.node == node.name
                    && i.state == crate::events::InstanceStatus::Running
                    && !i.container_id.is_empty()
            })
            .map(|i| i.container_id.clone())
            .collect();
        async move {
            let stats: Vec<(String, StatsSample)> = futures_util::stream::iter(running)
                .map(|id| async move {
                    match tokio::time::timeout(CALL_TIMEOUT, node.instance_stats(&id)).await {
                        Ok(Ok(Some(s))) => Some((id, s)),
                        _ => None,
                    }
                })
                .buffer_unordered(STATS_PARALLELISM)
                .filter_map(|x| async move { x })
                .collect()
                .await;
            (node.name.clone(), stats)
        }
    });
    let results = futures_util::future::join_all(rounds).await;
    let now = now_ms();
    let mut seen: HashSet<String> = HashSet::new();
    let mut per_node: BTreeMap<String, NodeUsage> = BTreeMap::new();
    let mut instances: HashMap<String, InstanceUsage> = HashMap::new();
    for (node, stats) in results {
        let mut u = NodeUsage {
            sampled_at: now,
            ..Default::default()
        };
        for (id, s) in stats {
            let cpus = samples
                .get(&id)
                .and_then(|prev| cpu_rate(prev, &s))
                .unwrap_or(0.0);
            let memory = memory_used(&s);
            u.cpus += cpus;
            u.memory_bytes += memory;
            u.instances += 1;
            instances.insert(
                id.clone(),
                InstanceUsage {
                    cpus,
                    memory_bytes: memory,
                },
            );
            seen.insert(id.clone());
            samples.insert(id, s);
        }
        per_node.insert(node, u);
    }
    samples.retain(|id, _| seen.contains(id));
    // Nodes that left the pool are dropped.
    let names: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    services.usage.update(|v| {
        v.nodes.retain(|n, _| names.contains(n));
        for (name, u) in &per_node {
            let disk = v.nodes.get(name).and_then(|o| o.disk.clone());
            v.nodes
                .insert(name.clone(), NodeUsage { disk, ..u.clone() });
        }
        v.instances = instances.clone();
    });
}

/// One round of disk measurements on every node; thresholds crossed are announced.
async fn measure_disks(
    services: &Services,
    sched: &crate::scheduler::Scheduler,
    levels: &mut HashMap<String, DiskLevel>,
) {
    let installation = services.registry.installation_id().to_string();
    let policy = &services.config.upkeep;
    let nodes = sched.docker_nodes();
    let measures = nodes.iter().map(|node| {
        let installation = installation.clone();
        async move {
            let owned = tokio::time::timeout(CALL_TIMEOUT, node.owned_disk(&installation)).await;
            let fs = tokio::time::timeout(CALL_TIMEOUT, node.filesystem()).await;
            match (owned, fs) {
                (Ok(Ok(owned)), Ok(Ok(fs))) => Some((node.name.clone(), owned, fs)),
                (Ok(Err(e)), _) | (_, Ok(Err(e))) => {
                    tracing::debug!(node = %node.name, error = %e, "disk: cannot measure");
                    None
                }
                _ => None,
            }
        }
    });
    let results: Vec<_> = futures_util::future::join_all(measures)
        .await
        .into_iter()
        .flatten()
        .collect();
    let now = now_ms();
    let mut apps_disk = BTreeMap::new();
    let mut disks = BTreeMap::new();
    for (node, owned, fs) in results {
        disk_per_app(&owned, &mut apps_disk);
        let view = fs.as_ref().map(FilesystemView::from);
        let level = view
            .as_ref()
            .map_or(DiskLevel::Ok, |f| disk_level(f.used_percent, policy));
        let used = view.as_ref().map_or(0, |f| f.used_percent);
        match levels.insert(node.clone(), level) {
            // A change: recorded (audit log, bus) and logged.
            Some(before) if before != level => {
                announce_disk(services, &node, used, level, view.as_ref()).await
            }
            Some(_) => {}
            // The first measurement since start: logged when not ok, not recorded again (a
            // restart is not a change of the disk; `nodes list`, `/metrics` and `escale
            // doctor` show the level).
            None if level != DiskLevel::Ok => {
                tracing::warn!(%node, used_percent = used, level = ?level, "node disk above the warning threshold at start")
            }
            None => {}
        }
        disks.insert(
            node,
            NodeDisk {
                images_bytes: owned.images.iter().map(|i| i.bytes).sum(),
                containers_bytes: owned.containers.iter().map(|c| c.bytes).sum(),
                filesystem: view,
                level,
                measured_at: now,
            },
        );
    }
    services.usage.update(|v| {
        for (name, d) in &disks {
            v.nodes.entry(name.clone()).or_default().disk = Some(d.clone());
        }
        v.apps_disk = apps_disk.clone();
    });
}

async fn announce_disk(
    services: &Services,
    node: &str,
    used_percent: u8,
    level: DiskLevel,
    fs: Option<&FilesystemView>,
) {
    let free = fs.map_or_else(String::new, |f| {
        format!(
            " ({} free of {} at {})",
            human_bytes(f.available_bytes),
            human_bytes(f.total_bytes),
            f.path
        )
    });
    match level {
        DiskLevel::Ok => {
            tracing::info!(%node, used_percent, "node disk back under the warning threshold")
        }
        DiskLevel::Warning => {
            tracing::warn!(%node, used_percent, "node disk filling up{free}")
        }
        DiskLevel::Full => {
            tracing::warn!(%node, used_percent, "node disk full{free}: builds there are refused")
        }
    }
    let event = Event::NodeDisk {
        node: node.to_string(),
        used_percent,
        level,
    };
    let detail = format!("{}{free}", event.summary());
    if let Err(e) = services
        .registry
        .record(None, "node.disk", &detail, event)
        .await
    {
        tracing::warn!(%node, error = %e, "cannot record the disk level");
    }
}

/// What one prune round removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// By node: (images removed, bytes freed).
    pub nodes: BTreeMap<String, (u32, u64)>,
}

/// Which apps a prune looks at.
#[derive(Debug, Clone, Copy)]
pub enum PruneScope<'a> {
    /// Every app that is not being deployed (their deploy locks are taken for the round).
    All,
    /// One app whose deploy lock the caller holds (after its deploy succeeded).
    Held(&'a crate::registry::AppRef),
}

/// Removes, on every node, the images escale built that no app keeps and no container uses.
pub async fn prune(services: &Services, scope: PruneScope<'_>) -> Result<Pruned, UpkeepError> {
    let Some(sched) = services.scheduler.as_ref() else {
        return Ok(Pruned::default());
    };
    let keep_n = services.config.scheduler.keep_releases;
    let installation = services.registry.installation_id().to_string();
    // Locks first, then the releases: a deploy that started before holds its lock (its app
    // is skipped); one that starts after cannot have built anything yet.
    let apps = match scope {
        PruneScope::All => services.registry.all_apps().await?,
        PruneScope::Held(app) => vec![app.clone()],
    };
    let mut guards = Vec::new();
    let mut keep: HashMap<String, AppKeep> = HashMap::new();
    let mut by_id: HashMap<i64, String> = HashMap::new();
    for app in &apps {
        let busy = match scope {
            PruneScope::Held(_) => false,
            PruneScope::All => match services
                .locks
                .try_lock_background(app, "pruning images".into())
            {
                Ok(g) => {
                    guards.push(g);
                    false
                }
                Err(_) => true,
            },
        };
        by_id.insert(app.id, app.uid.clone());
        keep.insert(
            app.uid.clone(),
            AppKeep {
                images: HashSet::new(),
                busy,
            },
        );
    }
    for (app_id, images) in services.registry.recent_release_images(keep_n).await? {
        if let Some(k) = by_id.get(&app_id).and_then(|uid| keep.get_mut(uid)) {
            k.images.extend(images);
        }
    }
    let nodes = sched.docker_nodes();
    let mut in_use: HashSet<String> = HashSet::new();
    for node in &nodes {
        let list = tokio::time::timeout(CALL_TIMEOUT, node.list_instances(&installation))
            .await
            .map_err(|_| UpkeepError::Timeout {
                node: node.name.clone(),
                what: "listing containers",
                after: CALL_TIMEOUT,
            })??;
        in_use.extend(list.into_iter().map(|i| i.image));
    }
    let mut pruned = Pruned::default();
    for node in &nodes {
        let owned = match tokio::time::timeout(CALL_TIMEOUT, node.owned_disk(&installation)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                tracing::warn!(node = %node.name, error = %e, "image pruning: cannot list images");
                continue;
            }
            Err(_) => continue,
        };
        let (mut count, mut bytes) = (0u32, 0u64);
        for image in images_to_prune(&owned.images, &keep, &in_use) {
            let refs: Vec<&str> = if image.tags.is_empty() {
                vec![image.id.as_str()]
            } else {
                image.tags.iter().map(String::as_str).collect()
            };
            let mut ok = true;
            for r in refs {
                if let Err(e) = node.remove_image(r).await {
                    tracing::info!(node = %node.name, image = %r, error = %e, "image pruning: not removed");
                    ok = false;
                }
            }
            if ok {
                count += 1;
                bytes += image.bytes;
            }
        }
        if count > 0 {
            let event = Event::ImagesPruned {
                node: node.name.clone(),
                images: count,
                bytes,
            };
            let detail = event.summary();
            tracing::info!(node = %node.name, images = count, bytes, "unused images pruned");
            if let Err(e) = services
                .registry
                .record(None, "node.prune", &detail, event)
                .await
            {
                tracing::warn!(node = %node.name, error = %e, "cannot record the prune");
            }
            pruned.nodes.insert(node.name.clone(), (count, bytes));
        }
    }
    drop(guards);
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> UpkeepConfig {
        UpkeepConfig {
            usage_interval: Duration::from_secs(30),
            disk_interval: Duration::from_secs(300),
            prune_interval: Duration::from_secs(3600),
            disk_warn_percent: 80,
            disk_refuse_builds_percent: 95,
        }
    }

    fn sample(cpu: u64, system: u64) -> StatsSample {
        StatsSample {
            cpu_total_ns: cpu,
            system_ns: system,
            online_cpus: 4,
            memory_usage: 0,
            memory_inactive_file: 0,
        }
    }

    #[test]
    fn cpu_rate_is_a_share_of_the_host_times_its_cpus() {
        // 1 s of CPU while the 4-CPU host counted 4 s: one core.
        let r = cpu_rate(&sample(0, 0), &sample(1_000_000_000, 4_000_000_000)).unwrap();
        assert!((r - 1.0).abs() < 1e-9, "{r}");
        let r = cpu_rate(&sample(5, 10), &sample(5 + 250, 10 + 4000)).unwrap();
        assert!((r - 0.25).abs() < 1e-9, "{r}");
        // Same instant, counters reset (restarted container): no rate.
        assert_eq!(cpu_rate(&sample(5, 10), &sample(6, 10)), None);
        assert_eq!(cpu_rate(&sample(500, 10), &sample(100, 20)), None);
    }

    #[test]
    fn memory_leaves_out_reclaimable_cache() {
        let s = StatsSample {
            memory_usage: 100 << 20,
            memory_inactive_file: 30 << 20,
            ..Default::default()
        };
        assert_eq!(memory_used(&s), 70 << 20);
        let odd = StatsSample {
            memory_usage: 1,
            memory_inactive_file: 5,
            ..Default::default()
        };
        assert_eq!(memory_used(&odd), 0);
    }

    #[test]
    fn disk_levels_follow_the_thresholds() {
        let p = policy();
        assert_eq!(disk_level(0, &p), DiskLevel::Ok);
        assert_eq!(disk_level(79, &p), DiskLevel::Ok);
        assert_eq!(disk_level(80, &p), DiskLevel::Warning);
        assert_eq!(disk_level(94, &p), DiskLevel::Warning);
        assert_eq!(disk_level(95, &p), DiskLevel::Full);
        assert_eq!(disk_level(100, &p), DiskLevel::Full);
    }

    #[test]
    fn filesystem_percent_counts_as_df_does() {
        let f = Filesystem {
            path: "/".into(),
            total_bytes: 1000,
            available_bytes: 51,
            free_bytes: 51,
        };
        assert_eq!(f.used_percent(), 95);
        // Blocks reserved for root are neither used nor available (here: the machine's
        // /var/lib/docker, which `df` shows 52 % used).
        let reserved = Filesystem {
            path: "/var/lib/docker".into(),
            total_bytes: 66_053_021 * 4096,
            available_bytes: 11_485_089 * 4096,
            free_bytes: 53_716_638 * 4096,
        };
        assert_eq!(reserved.used_percent(), 52);
        let empty = Filesystem {
            path: "/".into(),
            total_bytes: 0,
            available_bytes: 0,
            free_bytes: 0,
        };
        assert_eq!(empty.used_percent(), 0);
    }

    fn image(id: &str, tags: &[&str], uid: Option<&str>) -> OwnedImage {
        OwnedImage {
            id: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            app: Some("shop".into()),
            built_for: uid.map(str::to_string),
            bytes: 10,
            created: 0,
        }
    }

    #[test]
    fn prune_takes_only_unkept_unused_images_of_idle_live_apps() {
        let images = vec![
            image("sha256:1", &["shop:v1-a"], Some("u1")), // old release: pruned
            image("sha256:2", &["shop:v2-b"], Some("u1")), // kept release
            image("sha256:3", &["shop:v3-c"], Some("u1")), // used by a container
            image("sha256:4", &[], Some("u1")),            // untagged, used by id
            image("sha256:5", &[], Some("u1")),            // untagged, unused: pruned
            image("sha256:6", &["other:v1"], None),        // not built by escale
            image("sha256:7", &["gone:v1"], Some("u-gone")), // destroyed app: cleanup's
            image("sha256:8", &["blog:v1"], Some("u2")),   // app being deployed
        ];
        let apps: HashMap<String, AppKeep> = [
            (
                "u1".to_string(),
                AppKeep {
                    images: ["shop:v2-b".to_string()].into(),
                    busy: false,
                },
            ),
            (
                "u2".to_string(),
                AppKeep {
                    images: HashSet::new(),
                    busy: true,
                },
            ),
        ]
        .into();
        let in_use: HashSet<String> = ["shop:v3-c".to_string(), "sha256:4".to_string()].into();
        let ids: Vec<&str> = images_to_prune(&images, &apps, &in_use)
            .iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(ids, ["sha256:1", "sha256:5"]);
    }

    #[test]
    fn disk_per_app_sums_images_and_containers() {
        let disk = OwnedDisk {
            images: vec![image("a", &["shop:v1"], Some("u1"))],
            containers: vec![
                crate::node::OwnedContainer {
                    app: Some("shop".into()),
                    bytes: 5,
                },
                crate::node::OwnedContainer {
                    app: Some("blog".into()),
                    bytes: 7,
                },
            ],
        };
        let mut per = BTreeMap::new();
        disk_per_app(&disk, &mut per);
        disk_per_app(&disk, &mut per);
        assert_eq!(per["shop"], 30);
        assert_eq!(per["blog"], 14);
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 << 20), "200 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
