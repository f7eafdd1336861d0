//! Nodes: registering the Docker engines escale runs apps on, and keeping the scheduler's
//! pool equal to what is registered.
//!
//! - [`Services::add_node`] issues the node's server certificate (from the installation's CA)
//!   and returns its bundle: the certificates, `daemon.json`, a systemd drop-in and the one
//!   command that installs them on the node. The node is registered at once; it joins the
//!   scheduler's pool when its engine answers over mutual TLS ([`join`] tries every few
//!   seconds, and at once on a change), and shows as `joining` with the reason until then.
//! - [`Services::set_schedulable`]: cordon (nothing new placed there), drain (and move what
//!   runs there), uncordon.
//! - [`Services::remove_node`] refuses while instances run there, naming the drain command.
//! - [`Services::node_list`]: each node's state, address, engine version, capacity, what
//!   escale placed there, labels, certificate expiry and last heartbeat; the engine facts are
//!   asked of each node at once, each bounded, so a silent node does not hold up the list.
//!
//! The local engine (`local`, from the config) is not registered: it is listed with the
//! others, but it is not added, renewed, cordoned, drained or removed here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Result, ServiceError, Services};
use crate::cluster::pki::{self, NodeAddress, NodeBundle, Pki, PkiError};
use crate::registry::{now_ms, Actor, NodeRecord, Schedulable};
use crate::scheduler::placement::NodeMeta;
use crate::scheduler::placement::Resources;
use crate::scheduler::{capacity_resources, NodeStatus, Scheduler};

/// The name of the engine escale runs beside (configured, never registered).
pub const LOCAL_NODE: &str = "local";

/// How long a node may take to answer for the node list or to be reached when joining.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// How often [`join`] tries the registered nodes that are not in the pool yet.
const JOIN_INTERVAL: Duration = Duration::from_secs(3);

/// Warn this many days before a node's server certificate expires.
pub const CERT_WARN_DAYS: i64 = 30;

/// A node to register.
#[derive(Debug, Clone)]
pub struct NodeAdd {
    pub name: String,
    /// `HOST:PORT` of its engine (TLS, usually 2376).
    pub address: String,
    /// The IP its published ports are reached on; by default the address's IP (a host name
    /// is resolved once, now).
    pub advertise: Option<IpAddr>,
    /// `KEY=VALUE` labels, for process constraints.
    pub labels: Vec<String>,
}

/// One file of a node's bundle.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BundleFileView {
    /// The file name (`ca.pem`, `server-cert.pem`, `server-key.pem`, `daemon.json`,
    /// `escale.conf`, `install.sh`).
    pub name: String,
    pub contents: String,
    /// Unix permissions, e.g. 384 (0600) for the key.
    pub mode: u32,
}

/// What `escale nodes add` and `escale nodes renew` hand the operator: the node's bundle (its
/// private key is in it and is kept nowhere else) and what to do with it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeBundleView {
    pub node: String,
    pub address: String,
    /// The certificate's serial number (hex).
    pub serial: String,
    /// When the certificate expires (unix milliseconds).
    pub not_after: i64,
    pub files: Vec<BundleFileView>,
    /// What to run on the node, from the bundle's directory.
    pub install: String,
}

impl From<&NodeBundle> for NodeBundleView {
    fn from(b: &NodeBundle) -> NodeBundleView {
        NodeBundleView {
            node: b.node.clone(),
            address: b.address.to_string(),
            serial: b.cert.serial.clone(),
            not_after: b.cert.not_after,
            files: b
                .files()
                .into_iter()
                .map(|f| BundleFileView {
                    name: f.name.to_string(),
                    contents: f.contents,
                    mode: f.mode,
                })
                .collect(),
            install: "sudo sh install.sh".to_string(),
        }
    }
}

/// A node's server certificate, as the node list shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeCertView {
    pub serial: String,
    /// Unix milliseconds.
    pub not_after: i64,
    /// Whole days left (negative once expired).
    pub days_left: i64,
    /// Fewer than 30 days left: renew it (`escale nodes renew NAME`).
    pub expiring: bool,
}

/// One node, as `escale nodes list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub name: String,
    /// `HOST:PORT`, or `local` for the engine escale runs beside.
    pub address: String,
    pub state: NodeStatus,
    /// Why it is not ready (the last failed call), if it is not.
    pub error: Option<String>,
    /// Nothing new is placed on it.
    pub cordoned: bool,
    /// Its instances are being moved away.
    pub draining: bool,
    pub labels: BTreeMap<String, String>,
    /// The engine's version (when it answered).
    pub engine_version: Option<String>,
    /// What the engine has (when it answered).
    pub capacity: Option<Resources>,
    /// The declared limits of the instances escale runs there (instances without a limit
    /// count for nothing).
    pub placed: Resources,
    /// What its instances really use (CPU and memory, sampled every
    /// `upkeep.usage_interval`) and its disk (every `upkeep.disk_interval`); `None` until
    /// first measured.
    pub used: Option<super::upkeep::NodeUsage>,
    pub instances: u32,
    /// Its server certificate (none for `local`).
    pub certificate: Option<NodeCertView>,
    /// When it last answered (unix milliseconds).
    pub last_heartbeat: Option<i64>,
}

fn pki_error(e: PkiError) -> ServiceError {
    match e {
        PkiError::InvalidNodeName(_) | PkiError::InvalidAddress { .. } => {
            ServiceError::Invalid(e.to_string())
        }
        PkiError::Registry(e) => ServiceError::Registry(e),
        other => ServiceError::Cluster(other.to_string()),
    }
}

/// The [`NodeCertView`] of a certificate expiring at `not_after` (ms), at `now` (ms).
pub fn cert_view(serial: &str, not_after: i64, now: i64) -> NodeCertView {
    let days_left = (not_after - now).div_euclid(86_400_000);
    NodeCertView {
        serial: serial.to_string(),
        not_after,
        days_left,
        expiring: days_left < CERT_WARN_DAYS,
    }
}

impl Services {
    /// Registers node `add.name` and returns its bundle (see the module docs).
    pub async fn add_node(&self, actor: &Actor, add: NodeAdd) -> Result<NodeBundleView> {
        actor.require_admin("adding nodes")?;
        pki::validate_node_name(&add.name).map_err(pki_error)?;
        if add.name == LOCAL_NODE {
            return Err(ServiceError::Invalid(format!(
                "`{LOCAL_NODE}` names the engine escale runs beside (`docker_host` in the config): choose another name"
            )));
        }
        let address = NodeAddress::parse(&add.address).map_err(pki_error)?;
        let mut labels = BTreeMap::new();
        for l in &add.labels {
            let (k, v) = crate::validate::node_label(l).map_err(|e| ServiceError::Invalid(e.0))?;
            labels.insert(k, v);
        }
        let advertise = match add.advertise {
            Some(ip) => ip,
            None => resolve(&address).await?,
        };
        if advertise.is_unspecified() || advertise.is_multicast() {
            return Err(ServiceError::Invalid(format!(
                "advertise address {advertise} cannot be reached: give the node's own IP with --advertise"
            )));
        }
        let pki = Pki::load_or_create(&self.registry)
            .await
            .map_err(pki_error)?;
        let (bundle, cert) = pki
            .issue_bundle(&add.name, &add.address)
            .map_err(pki_error)?;
        let record = NodeRecord {
            name: add.name.clone(),
            address: address.to_string(),
            advertise: advertise.to_string(),
            labels,
            cordoned: false,
            draining: false,
            created_at: now_ms(),
        };
        self.registry.add_node(&actor.name, &record, &cert).await?;
        if let Some(s) = &self.scheduler {
            s.set_joining(
                &add.name,
                Some("waiting for its engine: install the bundle on the node".into()),
            );
        }
        Ok(NodeBundleView::from(&bundle))
    }

    /// Issues node `name` a new server certificate (for `address` when given, else for its
    /// address) and returns the new bundle. The node keeps working with the old one until
    /// the new one is installed.
    pub async fn renew_node(
        &self,
        actor: &Actor,
        name: &str,
        address: Option<&str>,
    ) -> Result<NodeBundleView> {
        actor.require_admin("renewing node certificates")?;
        pki::validate_node_name(name).map_err(pki_error)?;
        let node = self.registry.node(name).await?;
        let address = address.unwrap_or(&node.address);
        NodeAddress::parse(address).map_err(pki_error)?;
        let pki = Pki::load_or_create(&self.registry)
            .await
            .map_err(pki_error)?;
        let (bundle, cert) = pki.issue_bundle(name, address).map_err(pki_error)?;
        self.registry.renew_node(&actor.name, &cert).await?;
        Ok(NodeBundleView::from(&bundle))
    }

    /// Cordons, drains or uncordons node `name`; returns whether anything changed.
    pub async fn set_schedulable(
        &self,
        actor: &Actor,
        name: &str,
        to: Schedulable,
    ) -> Result<bool> {
        actor.require_admin("cordoning and draining nodes")?;
        pki::validate_node_name(name).map_err(pki_error)?;
        if name == LOCAL_NODE {
            return Err(ServiceError::Invalid(format!(
                "`{LOCAL_NODE}` is the engine escale runs beside: it cannot be cordoned or drained (register the machines that run apps as nodes instead)"
            )));
        }
        Ok(self
            .registry
            .set_node_schedulable(&actor.name, name, to)
            .await?)
    }

    /// Removes node `name`; refused while escale's instances run there (drain it first).
    pub async fn remove_node(&self, actor: &Actor, name: &str) -> Result<()> {
        actor.require_admin("removing nodes")?;
        pki::validate_node_name(name).map_err(pki_error)?;
        if name == LOCAL_NODE {
            return Err(ServiceError::Invalid(format!(
                "`{LOCAL_NODE}` is the engine escale runs beside: it is configured (`docker_host`), not registered, so it cannot be removed"
            )));
        }
        let node = self.registry.node(name).await?;
        if let Some(s) = &self.scheduler {
            let running = s
                .view
                .load()
                .instances
                .iter()
                .filter(|i| i.node == name)
                .count();
            if running > 0 {
                let how = if node.draining {
                    "it is draining: wait until they have moved"
                } else {
                    "drain it first: escale nodes drain"
                };
                return Err(ServiceError::Conflict(format!(
                    "node `{name}` runs {running} instance(s): {how} {name}"
                )));
            }
        }
        self.registry.remove_node(&actor.name, name).await?;
        if let Some(s) = &self.scheduler {
            s.remove_node(name);
            s.set_joining(name, None);
        }
        Ok(())
    }

    /// Every node (the local engine first, then the registered ones by name).
    pub async fn node_list(&self, actor: &Actor) -> Result<Vec<NodeInfo>> {
        actor.require_admin("listing nodes")?;
        let now = now_ms();
        let records = self.registry.nodes().await?;
        let certs: HashMap<String, crate::registry::NodeCertRecord> = self
            .registry
            .node_certs()
            .await?
            .into_iter()
            .map(|c| (c.node.clone(), c))
            .collect();
        let Some(sched) = &self.scheduler else {
            return Ok(records
                .into_iter()
                .map(|r| NodeInfo {
                    certificate: certs
                        .get(&r.name)
                        .map(|c| cert_view(&c.serial, c.not_after, now)),
                    name: r.name,
                    address: r.address,
                    state: NodeStatus::Joining,
                    error: Some("this server runs no scheduler".into()),
                    cordoned: r.cordoned,
                    draining: r.draining,
                    labels: r.labels,
                    engine_version: None,
                    capacity: None,
                    placed: Resources::default(),
                    used: None,
                    instances: 0,
                    last_heartbeat: None,
                })
                .collect());
        };
        let view = sched.view.load_full();
        let facts = engine_facts(sched).await;
        let placed = sched.placed();
        let usage = self.usage.view();
        let mut names: Vec<String> = view.nodes.iter().map(|n| n.name.clone()).collect();
        names.extend(records.iter().map(|r| r.name.clone()));
        names.sort_by(|a, b| (a != LOCAL_NODE, a).cmp(&(b != LOCAL_NODE, b)));
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let seen = view.nodes.iter().find(|n| n.name == name);
            let record = records.iter().find(|r| r.name == name);
            if record.is_none() && !sched.has_node(&name) {
                continue;
            }
            let mut on_node = Resources::default();
            for p in placed.iter().filter(|p| p.node == name) {
                on_node.add(p.resources);
            }
            let instances = view.instances.iter().filter(|i| i.node == name).count() as u32;
            let (version, capacity) = facts.get(&name).cloned().unwrap_or_default();
            out.push(NodeInfo {
                address: record
                    .map(|r| r.address.clone())
                    .unwrap_or_else(|| LOCAL_NODE.to_string()),
                state: seen.map(|n| n.state).unwrap_or(NodeStatus::Joining),
                error: seen.and_then(|n| n.error.clone()),
                cordoned: record.is_some_and(|r| r.cordoned),
                draining: record.is_some_and(|r| r.draining),
                labels: record.map(|r| r.labels.clone()).unwrap_or_default(),
                engine_version: version,
                capacity,
                placed: on_node,
                used: usage.nodes.get(&name).cloned(),
                instances,
                certificate: certs
                    .get(&name)
                    .map(|c| cert_view(&c.serial, c.not_after, now)),
                last_heartbeat: seen.and_then(|n| n.last_heartbeat),
                name,
            });
        }
        Ok(out)
    }
}

type Facts = (Option<String>, Option<Resources>);

/// Each pool node's engine version and capacity, asked of all at once, each bounded.
async fn engine_facts(sched: &Scheduler) -> HashMap<String, Facts> {
    let asks = sched.docker_nodes().into_iter().map(|n| async move {
        let asked = tokio::time::timeout(ASK_TIMEOUT, async {
            let version = n.version().await.ok().map(|v| v.version);
            let capacity = n.capacity().await.ok().map(capacity_resources);
            (version, capacity)
        })
        .await
        .unwrap_or_default();
        (n.name.clone(), asked)
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .collect()
}

/// The IP of `address` (resolved once when it is a host name).
async fn resolve(address: &NodeAddress) -> Result<IpAddr> {
    let host = match &address.host {
        pki::NodeHost::Ip(ip) => return Ok(*ip),
        pki::NodeHost::Dns(d) => d.clone(),
    };
    let found = tokio::time::timeout(
        ASK_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), address.port)),
    )
    .await;
    match found {
        Ok(Ok(mut addrs)) => addrs.next().map(|a| a.ip()).ok_or_else(|| {
            ServiceError::Invalid(format!(
                "`{host}` resolves to no address: give the node's IP with --advertise"
            ))
        }),
        _ => Err(ServiceError::Invalid(format!(
            "`{host}` cannot be resolved from here: give the node's IP with --advertise"
        ))),
    }
}

/// Keeps `sched`'s pool equal to the registered nodes until `shutdown`: connects (over mutual
/// TLS, trusting the installation's CA only) each registered node that is not in the pool,
/// at once after a node change and every few seconds, and takes out of the pool the nodes no
/// longer registered. A node that cannot be reached yet is shown as `joining` with why. Once a
/// day it warns (log) of node certificates that expire within [`CERT_WARN_DAYS`] days.
pub async fn join(
    registry: crate::registry::Registry,
    sched: Arc<Scheduler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut events = registry.bus().subscribe();
    // name -> (address, advertise) of what joined.
    let mut joined: HashMap<String, (String, String)> = HashMap::new();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        if let Err(e) = join_once(&registry, &sched, &mut joined).await {
            tracing::warn!(error = %e, "cannot bring the registered nodes into the pool");
        }
        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(86_400)) {
            if let Ok(certs) = registry.node_certs().await {
                warn_expiring(&certs, now_ms());
                warned = Some(std::time::Instant::now());
            }
        }
        let wait = tokio::time::sleep(JOIN_INTERVAL);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = &mut wait => break,
                e = events.recv() => match e {
                    Ok(e) => {
                        if let crate::events::Event::Changed { action, .. } = &e.event {
                            if action.starts_with("node.") {
                                break;
                            }
                        }
                    }
                    Err(_) => break,
                },
            }
        }
    }
}

async fn join_once(
    registry: &crate::registry::Registry,
    sched: &Arc<Scheduler>,
    joined: &mut HashMap<String, (String, String)>,
) -> Result<()> {
    let records = registry.nodes().await?;
    // Nodes no longer registered leave the pool.
    let gone: Vec<String> = joined
        .keys()
        .filter(|n| !records.iter().any(|r| &r.name == *n))
        .cloned()
        .collect();
    for name in gone {
        joined.remove(&name);
        sched.remove_node(&name);
        sched.set_joining(&name, None);
        sched.set_node_meta(&name, NodeMeta::default());
    }
    // Labels, cordon and drain as registered, for placement (a change wakes a pass).
    for r in &records {
        let meta = NodeMeta {
            labels: r.labels.clone(),
            cordoned: r.cordoned,
            draining: r.draining,
        };
        if sched.node_meta(&r.name) != meta {
            sched.set_node_meta(&r.name, meta);
        }
    }
    let waiting: Vec<&NodeRecord> = records
        .iter()
        .filter(|r| {
            joined.get(&r.name) != Some(&(r.address.clone(), r.advertise.clone()))
                || !sched.has_node(&r.name)
        })
        .collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let pki = Pki::load_or_create(registry).await.map_err(pki_error)?;
    let tries = waiting.iter().map(|r| {
        let pki = &pki;
        async move {
            let tried = async {
                let address = NodeAddress::parse(&r.address)?;
                let node = tokio::time::timeout(ASK_TIMEOUT, pki.connect(&r.name, &address))
                    .await
                    .map_err(|_| {
                        PkiError::Refused(format!("no answer within {ASK_TIMEOUT:?}"))
                    })??;
                Ok::<_, PkiError>(node)
            }
            .await;
            (*r, tried)
        }
    });
    for (r, tried) in futures_util::future::join_all(tries).await {
        match tried {
            Ok(node) => {
                let advertise = r.advertise.parse().unwrap_or(node.advertise_ip);
                sched.add_node(Arc::new(node.with_advertise_ip(advertise)));
                joined.insert(r.name.clone(), (r.address.clone(), r.advertise.clone()));
                tracing::info!(node = %r.name, address = %r.address, "node joined");
            }
            Err(e) => {
                let was_in = joined.remove(&r.name).is_some();
                if was_in {
                    sched.remove_node(&r.name);
                }
                tracing::debug!(node = %r.name, error = %e, "node not reachable yet");
                sched.set_joining(&r.name, Some(e.to_string()));
            }
        }
    }
    Ok(())
}

/// Logs a warning for each node certificate that expires within [`CERT_WARN_DAYS`] days;
/// returns how many.
pub fn warn_expiring(certs: &[crate::registry::NodeCertRecord], now: i64) -> usize {
    let mut n = 0;
    for c in certs {
        let v = cert_view(&c.serial, c.not_after, now);
        if v.expiring {
            n += 1;
            tracing::warn!(
                node = %c.node,
                days_left = v.days_left,
                "the node's server certificate expires soon: run `escale nodes renew {}` and install the new bundle on it",
                c.node
            );
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn a_certificate_is_expiring_under_thirty_days() {
        let now = 1_800_000_000_000;
        let v = cert_view("ab", now + 31 * DAY, now);
        assert_eq!((v.days_left, v.expiring), (31, false));
        let v = cert_view("ab", now + 30 * DAY - 1, now);
        assert_eq!((v.days_left, v.expiring), (29, true));
        let v = cert_view("ab", now - 1, now);
        assert_eq!((v.days_left, v.expiring), (-1, true));
    }

    #[test]
    fn expiring_certificates_are_counted_for_the_warning() {
        let now = 1_800_000_000_000;
        let cert = |node: &str, days: i64| crate::registry::NodeCertRecord {
            node: node.into(),
            address: "10.0.0.2:2376".into(),
            serial: "01".into(),
            cert_pem: String::new(),
            not_after: now + days * DAY,
            issued_at: now - DAY,
        };
        assert_eq!(
            warn_expiring(&[cert("n2", 400), cert("n3", 10), cert("n4", -2)], now),
            2
        );
    }
}
