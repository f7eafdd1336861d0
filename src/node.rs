//! Docker engines (nodes) reached through bollard: the local unix socket or mutual TLS.
//!
//! A [`Node`] is one Docker engine. Everything escale does to an engine goes through here:
//! starting and stopping app instances (one container each), listing them back by label,
//! images (pull, build, copy between nodes), logs and events. No other module talks to
//! bollard directly.
//!
//! Every container escale creates carries the labels [`LABEL_INSTALLATION`], [`LABEL_APP`],
//! [`LABEL_PROCESS`], [`LABEL_RELEASE`], [`LABEL_SLOT`] and [`LABEL_INSTANCE`], so the state
//! of a node can always be rebuilt from one labelled list call ([`Node::list_instances`]).
//!
//! Tenants are isolated on the network: every app has its own user-defined bridge network
//! ([`network_name`], labelled [`LABEL_INSTALLATION`], [`LABEL_APP`] and [`LABEL_APP_UID`]),
//! created when one of its instances starts ([`Node::ensure_app_network`]); its containers
//! are attached to it only, never to the default bridge, so an app cannot reach another
//! app's containers directly (Docker drops traffic between bridges), while instances of one
//! app reach each other. Networks of apps that no longer exist are removed by the scheduler
//! ([`Node::list_app_networks`], [`Node::remove_network`]).
//!
//! Addressing: every instance publishes its port on the node's advertise address (an
//! engine-chosen host port), but where the proxy and the health checks reach it depends on
//! the node's [`Reach`]. On the proxy's own host ([`Reach::Bridge`], the local engine) it is
//! the container's address on its app's bridge network and the container port: the host
//! routes to its bridges, and going through the published port would add the engine's
//! userland `docker-proxy` (a process copying every byte, which costs more CPU per request
//! than escale's proxy). On another host ([`Reach::Published`]) it is the node's advertise
//! address and the published port. [`Node::start_instance`] and [`Node::list_instances`]
//! compute the same address from the same facts, so a restarted escale routes exactly as
//! before; a container whose bridge address is unknown falls back to its published port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, EventMessage, HostConfig,
    HostConfigLogConfig, NetworkCreateRequest, PortBinding, PortSummaryTypeEnum, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptions, BuilderVersion, CreateContainerOptions, CreateImageOptions, EventsOptions,
    ImportImageOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions,
    ListImagesOptions, ListNetworksOptions, LogsOptions, RemoveContainerOptions,
    RemoveImageOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::stream::{Stream, StreamExt};

/// Label: the installation (one escale deployment) a container belongs to.
pub const LABEL_INSTALLATION: &str = "escale.installation";
/// Label: the app name.
pub const LABEL_APP: &str = "escale.app";
/// Label: the process type within the app (`web`, `worker`, ...).
pub const LABEL_PROCESS: &str = "escale.process";
/// Label: the release number (decimal).
pub const LABEL_RELEASE: &str = "escale.release";
/// Label: the slot number (decimal) of the instance within its process.
pub const LABEL_SLOT: &str = "escale.slot";
/// Label: the instance id (unique within the installation).
pub const LABEL_INSTANCE: &str = "escale.instance";

/// Label (networks): the id of the app in the registry, so that a network left by a destroyed
/// app is never reused by a new app of the same name (possibly another team's).
pub const LABEL_APP_UID: &str = "escale.app_uid";

/// Label: a hash of the process definition (image, command, port, limits) the instance was
/// started with, so the reconciler can tell stale instances after a change. Optional.
pub const LABEL_SPEC: &str = "escale.spec";

/// Seconds bollard waits for an engine's response headers on ordinary calls.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// What can go wrong talking to a node's Docker engine.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The engine could not be reached or the client could not be configured.
    #[error("cannot connect to the Docker engine of node `{node}` at `{host}`: {source}")]
    Connect {
        node: String,
        host: String,
        #[source]
        source: DockerError,
    },
    /// A TLS file for [`Node::connect_tls`] is missing or unreadable.
    #[error("node `{node}`: cannot read TLS file `{path}`: {reason}")]
    TlsFile {
        node: String,
        path: String,
        reason: String,
    },
    /// An engine call failed; `action` says what escale was doing.
    #[error("node `{node}`: {action} failed: {source}")]
    Engine {
        node: String,
        action: String,
        #[source]
        source: DockerError,
    },
    /// The image is absent and pulling it failed (no registry access, unknown name, ...).
    #[error("image `{image}` is not on node `{node}` and could not be pulled: {reason}")]
    ImageUnavailable {
        node: String,
        image: String,
        reason: String,
    },
    /// `docker build` reported an error.
    #[error("building image `{tag}` on node `{node}` failed: {reason}")]
    BuildFailed {
        node: String,
        tag: String,
        reason: String,
    },
    /// Moving an image from one node to another failed.
    #[error("copying image `{image}` from node `{from}` to node `{to}` failed: {reason}")]
    CopyFailed {
        image: String,
        from: String,
        to: String,
        reason: String,
    },
    /// A container with the instance's name exists but belongs to something else.
    #[error(
        "node `{node}`: a container named `{name}` already exists and is not escale instance \
         `{instance}` of installation `{installation}`; remove it by hand (`docker rm -f {name}`)"
    )]
    NameTaken {
        node: String,
        name: String,
        installation: String,
        instance: String,
    },
    /// The container started but the engine reports no host port for the app's port.
    #[error(
        "node `{node}`: instance `{instance}` started but publishes no host port for {port}/tcp"
    )]
    NoPublishedPort {
        node: String,
        instance: String,
        port: u16,
    },
    /// The container exited before its port could be read; it is left in place for its logs.
    #[error(
        "node `{node}`: instance `{instance}` exited right after starting (exit code \
         {exit_code}); its container `{container_id}` is kept so its logs can be read"
    )]
    ExitedAtStart {
        node: String,
        instance: String,
        container_id: String,
        exit_code: i64,
    },
    /// `docker load` reported an error.
    #[error("node `{node}`: loading an image failed: {reason}")]
    ImageLoad { node: String, reason: String },
    /// The instance spec cannot be turned into a container.
    #[error("invalid instance spec for `{instance}`: {reason}")]
    InvalidSpec { instance: String, reason: String },
}

/// How long [`Node::connect_mtls`]'s transport waits for a TCP connection to the node.
const MTLS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport of [`Node::connect_mtls`]: one TLS connection per request.
struct MtlsTransport {
    host: String,
    port: u16,
    /// `host:port` (IPv6 in brackets), the `Host` header.
    authority: String,
    server_name: rustls::pki_types::ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl MtlsTransport {
    async fn request(
        &self,
        req: bollard::BollardRequest,
    ) -> Result<http::Response<hyper::body::Incoming>, DockerError> {
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        let tcp = tokio::time::timeout(MTLS_CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no TCP connection to {} within {MTLS_CONNECT_TIMEOUT:?}",
                        self.authority
                    ),
                )
            })??;
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("node TLS connection ended: {e}");
            }
        });
        let (mut parts, body) = req.into_parts();
        let origin = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = http::Uri::try_from(origin).map_err(http::Error::from)?;
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&self.authority).map_err(http::Error::from)?,
        );
        Ok(sender
            .send_request(http::Request::from_parts(parts, body))
            .await?)
    }
}

/// Result alias for node operations.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// One Docker engine that runs app instances.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name in the registry (`local` for the engine escale runs beside).
    pub name: String,
    /// The bollard client, version already negotiated (private: bollard stays in this module).
    docker: Docker,
    /// Address the proxy uses to reach ports published on `0.0.0.0`/`::` (127.0.0.1 locally).
    pub advertise_ip: IpAddr,
    /// How the proxy and health checks reach this node's instances.
    pub reach: Reach,
    /// Serialises app network creation on this engine (see [`Node::ensure_app_network`]).
    network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// How the proxy (and the health checks, which follow the same addresses) reach a node's
/// instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// The container's address on its app's bridge network, at the container port: for an
    /// engine on the proxy's own host (the host routes to its bridge networks). No
    /// `docker-proxy` hop.
    Bridge,
    /// The node's advertise address at the published host port: for an engine on another
    /// host.
    #[default]
    Published,
}

impl std::str::FromStr for Reach {
    type Err = String;
    fn from_str(s: &str) -> Result<Reach, String> {
        match s {
            "bridge" => Ok(Reach::Bridge),
            "published" => Ok(Reach::Published),
            other => Err(format!("`{other}`: use `bridge` or `published`")),
        }
    }
}

/// A node's host: CPUs and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// What `escale doctor` checks of an engine besides its version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineFacts {
    /// The storage driver (`overlay2`, `vfs`, ...).
    pub storage_driver: String,
    /// Where the engine keeps images and containers, on its own host.
    pub root_dir: String,
    /// The engine host's clock (RFC 3339), when it says.
    pub system_time: Option<String>,
}

/// One reading of a container's counters ([`Node::instance_stats`]); a rate needs two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSample {
    /// CPU time the container used since it started, in nanoseconds.
    pub cpu_total_ns: u64,
    /// CPU time the whole host used since boot, in nanoseconds (all CPUs).
    pub system_ns: u64,
    pub online_cpus: u32,
    pub memory_usage: u64,
    /// Page cache the kernel reclaims first, included in `memory_usage`.
    pub memory_inactive_file: u64,
}

/// What escale owns on one engine's disk ([`Node::owned_disk`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnedDisk {
    pub images: Vec<OwnedImage>,
    pub containers: Vec<OwnedContainer>,
}

/// An image labelled with escale's installation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnedImage {
    pub id: String,
    pub tags: Vec<String>,
    /// The app it was built for (`escale.app`), if it says.
    pub app: Option<String>,
    /// The uid of that app ([`crate::images::LABEL_BUILT_FOR`]), if it says.
    pub built_for: Option<String>,
    pub bytes: u64,
    /// Unix seconds.
    pub created: i64,
}

/// A container labelled with escale's installation: its writable layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnedContainer {
    pub app: Option<String>,
    pub bytes: u64,
}

/// The size and free space of a filesystem, as `statvfs` says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Filesystem {
    /// The path measured (the engine's data root).
    pub path: String,
    pub total_bytes: u64,
    /// Free for unprivileged writers (what the engine's writes can use).
    pub available_bytes: u64,
    /// Free in all, blocks reserved for root included.
    pub free_bytes: u64,
}

impl Filesystem {
    /// `statvfs` of `path`; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Filesystem> {
        let st = nix::sys::statvfs::statvfs(path).ok()?;
        let frsize = st.fragment_size() as u64;
        Some(Filesystem {
            path: path.display().to_string(),
            total_bytes: st.blocks() as u64 * frsize,
            available_bytes: st.blocks_available() as u64 * frsize,
            free_bytes: st.blocks_free() as u64 * frsize,
        })
    }

    /// Percent used, as `df` counts it: used (total - free) over used + available, rounded
    /// up; blocks reserved for root count neither as used nor as available.
    pub fn used_percent(&self) -> u8 {
        let used = self.total_bytes.saturating_sub(self.free_bytes);
        let usable = used + self.available_bytes;
        if usable == 0 {
            return 0;
        }
        (used * 100).div_ceil(usable).min(100) as u8
    }
}

/// What an engine says of its own version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineVersion {
    pub version: String,
    pub api_version: String,
}

/// Everything needed to start one instance (one container) of an app process.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    pub installation: String,
    pub app: String,
    pub process: String,
    pub release: u32,
    pub slot: u32,
    /// Instance id, unique within the installation; the container name derives from it.
    pub instance: String,
    pub image: String,
    /// Environment; `PORT` is always set to [`InstanceSpec::port`] (a `PORT` here is replaced).
    pub env: Vec<(String, String)>,
    /// Overrides the image's CMD when set.
    pub command: Option<Vec<String>>,
    /// Port the app listens on inside the container; published on an engine-chosen host port.
    pub port: u16,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    /// Host address the port is published on (`0.0.0.0`, `127.0.0.1`, a private interface).
    pub bind_ip: IpAddr,
    /// json-file log rotation: `max-size` (e.g. `10m`).
    pub log_max_size: String,
    /// json-file log rotation: `max-file`.
    pub log_max_files: u32,
    /// Run docker-init (tini) as PID 1 so signals reach apps that install no handler and
    /// zombies are reaped. The engine must have an init binary (Docker's packages ship one).
    pub init: bool,
    /// Extra labels (tests use them); keys starting with `escale.` from the list above are
    /// always overwritten by the spec's own values.
    pub extra_labels: Vec<(String, String)>,
    /// The app's uid (never reused, unlike its registry id): with the installation and app
    /// name, it names the app's own network ([`network_name`]), the only one the container
    /// is attached to; a later app of the same name never joins an earlier one's network.
    pub app_uid: String,
}

impl Default for InstanceSpec {
    fn default() -> Self {
        InstanceSpec {
            installation: String::new(),
            app: String::new(),
            process: "web".into(),
            release: 1,
            slot: 0,
            instance: String::new(),
            image: String::new(),
            env: Vec::new(),
            command: None,
            port: 8080,
            memory_bytes: None,
            nano_cpus: None,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            log_max_size: "10m".into(),
            log_max_files: 3,
            init: true,
            extra_labels: Vec::new(),
            app_uid: String::new(),
        }
    }
}

/// A container started by [`Node::start_instance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedInstance {
    pub container_id: String,
    /// Where the proxy reaches the instance.
    pub addr: SocketAddr,
}

/// Coarse container state as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Created,
    Running,
    Restarting,
    Paused,
    Exited,
    Dead,
    Removing,
    Unknown,
}

/// An escale container found on a node, labels parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInstance {
    pub container_id: String,
    pub app: String,
    pub process: String,
    pub release: u32,
    pub slot: u32,
    pub instance: String,
    /// The container's name as the engine knows it (without Docker's leading `/`): what
    /// `docker inspect` accepts.
    pub name: String,
    pub image: String,
    pub state: InstanceState,
    /// Set for exited (and dead) containers.
    pub exit_code: Option<i64>,
    /// The kernel OOM killer ended it (only looked up for exited containers).
    pub oom_killed: bool,
    /// Published address, when the container is publishing a port.
    pub addr: Option<SocketAddr>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// The [`LABEL_SPEC`] label, if set.
    pub spec: Option<String>,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of container output with the engine's timestamp (RFC 3339, nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    pub time: String,
    pub text: String,
}

/// A container lifecycle event of this installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub container_id: String,
    /// `start`, `die`, `oom`, `kill` or `destroy`.
    pub action: String,
    pub app: Option<String>,
    pub instance: Option<String>,
    /// Set on `die`.
    pub exit_code: Option<i64>,
    /// Seconds since the Unix epoch.
    pub time: i64,
}

/// Container actions [`Node::events`] reports.
pub const EVENT_ACTIONS: [&str; 5] = ["die", "oom", "start", "kill", "destroy"];

/// The container name escale uses for an instance: `escale-<installation>-<instance>`,
/// with characters Docker does not allow in names replaced by `_`.
pub fn container_name(installation: &str, instance: &str) -> String {
    let raw = format!("escale-{installation}-{instance}");
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What escale checks about a local image: its id, the names it is known by, its labels and
/// its `ONBUILD` triggers.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub labels: HashMap<String, String>,
    pub on_build: Vec<String>,
}

/// How to build an image ([`Node::build_image_stream`]).
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    pub tag: String,
    pub build_args: Vec<(String, String)>,
    pub labels: Vec<(String, String)>,
    /// The only images whose layers the build may reuse (the classic builder's `cache-from`:
    /// the local cache is not consulted beyond them). Empty: no cache at all.
    pub cache_from: Vec<String>,
}

/// The bridge network of one app: `escale-<installation>-<app>-<app uid>`, same characters as
/// [`container_name`].
pub fn network_name(installation: &str, app: &str, app_uid: &str) -> String {
    container_name(installation, &format!("{app}-{app_uid}"))
}

/// An app network found on a node, labels parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppNetwork {
    pub id: String,
    pub name: String,
    pub app: String,
    pub app_uid: String,
}

/// A published port as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    /// The host address it is bound to (`None` or unspecified: every address).
    host_ip: Option<IpAddr>,
    host_port: u16,
    /// The port inside the container (the app's).
    container_port: u16,
}

/// Where the proxy and the health checks reach an instance (see [`Reach`]): with
/// [`Reach::Bridge`] its `bridge` address at the container port, if it has one; otherwise
/// its published port, at the address it is bound to (`advertise_ip` when bound to every
/// address). `None` when neither is known (a stopped container publishes nothing).
fn instance_addr(
    reach: Reach,
    advertise_ip: IpAddr,
    bridge: Option<IpAddr>,
    binding: Option<Binding>,
) -> Option<SocketAddr> {
    let binding = binding?;
    if let (Reach::Bridge, Some(ip)) = (reach, bridge) {
        return Some(SocketAddr::new(ip, binding.container_port));
    }
    let ip = match binding.host_ip {
        Some(ip) if !ip.is_unspecified() => ip,
        _ => advertise_ip,
    };
    Some(SocketAddr::new(ip, binding.host_port))
}

/// The start of the names of `app`'s networks in `installation` (see [`network_name`]).
fn app_network_prefix(installation: &str, app: &str) -> String {
    container_name(installation, &format!("{app}-"))
}

/// A container's IPv4 address on its app's network, from the engine's per-network settings
/// (keyed by network name). A container of escale's is attached to its app's network only;
/// should someone have attached it to more, the network named like its app's
/// (`preferred_prefix`) wins, then the first name.
fn bridge_ip(
    networks: Option<&HashMap<String, bollard::models::EndpointSettings>>,
    preferred_prefix: &str,
) -> Option<IpAddr> {
    networks?
        .iter()
        .filter_map(|(name, endpoint)| {
            let ip = endpoint.ip_address.as_deref()?.parse::<IpAddr>().ok()?;
            (!ip.is_unspecified()).then_some((!name.starts_with(preferred_prefix), name, ip))
        })
        .min()
        .map(|(_, _, ip)| ip)
}

/// An engine list filter on labels (`key=value`, all of them must match).
fn label_filter(labels: Vec<String>) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), labels)])
}

/// `true` when the engine answered "not found" (404).
fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_conflict(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// Adds `:latest` to a reference without tag or digest, so a pull never fetches all tags.
fn normalize_ref(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || image.contains('@') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

impl Node {
    /// Connects to a local engine: `unix:///var/run/docker.sock`, a bare socket path, or
    /// `tcp://host:2375` (plain HTTP, for engines on a trusted link). Negotiates the API version.
    /// An engine on a unix socket runs on this host: its instances are reached at their
    /// bridge addresses ([`Reach::Bridge`]); one over TCP at its published ports (change
    /// either with [`Node::with_reach`]).
    pub async fn connect_local(name: &str, socket_path_or_docker_host: &str) -> Result<Node> {
        let host = socket_path_or_docker_host;
        let connect_err = |source| NodeError::Connect {
            node: name.to_string(),
            host: host.to_string(),
            source,
        };
        let tcp = host.starts_with("tcp://") || host.starts_with("http://");
        let docker = if tcp {
            Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else {
            let path = host.strip_prefix("unix://").unwrap_or(host);
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        .map_err(connect_err)?;
        let docker = docker.negotiate_version().await.map_err(connect_err)?;
        Ok(Node {
            name: name.to_string(),
            docker,
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            reach: if tcp { Reach::Published } else { Reach::Bridge },
            network_lock: Default::default(),
        })
    }

    /// Connects to a remote engine over mutual TLS (`tcp://host:2376`), trusting `ca_pem_path`
    /// in addition to the system roots and presenting the client cert/key. Negotiates the API
    /// version. `advertise_ip` defaults to the host's address when it is an IP literal, else
    /// unspecified (`0.0.0.0`): set it before placing instances.
    pub async fn connect_tls(
        name: &str,
        docker_host: &str,
        ca_pem_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Node> {
        for p in [ca_pem_path, cert_path, key_path] {
            if let Err(e) = std::fs::metadata(p) {
                return Err(NodeError::TlsFile {
                    node: name.to_string(),
                    path: p.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }
        let connect_err = |source| NodeError::Connect {
            node: name.to_string(),
            host: docker_host.to_string(),
            source,
        };
        let docker = Docker::connect_with_ssl(
            docker_host,
            key_path,
            cert_path,
            ca_pem_path,
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(connect_err)?;
        let docker = docker.negotiate_version().await.map_err(connect_err)?;
        let advertise_ip = docker_host
            .trim_start_matches("tcp://")
            .trim_start_matches("https://")
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Ok(Node {
            name: name.to_string(),
            docker,
            advertise_ip,
            reach: Reach::Published,
            network_lock: Default::default(),
        })
    }

    /// Connects to a remote engine at `host:port` over mutual TLS with `config`: its verifier
    /// alone decides which server certificates are accepted (no system roots unless it adds
    /// them) and its client certificate is presented; the node's certificate is checked
    /// against `server_name`. Negotiates the API version. Each request opens its own
    /// connection, as bollard's own TLS transport does (no idle pool). A refusal by the
    /// verifier stays in the error's source chain.
    pub async fn connect_mtls(
        name: &str,
        host: &str,
        port: u16,
        server_name: rustls::pki_types::ServerName<'static>,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Node> {
        let ip = host.parse::<IpAddr>().ok();
        let authority = match ip {
            Some(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let connect_err = |source| NodeError::Connect {
            node: name.to_string(),
            host: format!("tcp://{authority}"),
            source,
        };
        let transport = std::sync::Arc::new(MtlsTransport {
            host: host.to_string(),
            port,
            authority: authority.clone(),
            server_name,
            connector: tokio_rustls::TlsConnector::from(config),
        });
        let docker = Docker::connect_with_custom_transport(
            move |req: bollard::BollardRequest| {
                let t = transport.clone();
                async move { t.request(req).await }
            },
            Some(format!("https://{authority}")),
            REQUEST_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(connect_err)?;
        let docker = docker.negotiate_version().await.map_err(connect_err)?;
        Ok(Node {
            name: name.to_string(),
            docker,
            advertise_ip: ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            reach: Reach::Published,
            network_lock: Default::default(),
        })
    }

    /// Sets the address the proxy uses for this node's published ports.
    pub fn with_advertise_ip(mut self, ip: IpAddr) -> Node {
        self.advertise_ip = ip;
        self
    }

    /// Sets how the proxy reaches this node's instances: [`Reach::Bridge`] only for an engine
    /// on the proxy's own host.
    pub fn with_reach(mut self, reach: Reach) -> Node {
        self.reach = reach;
        self
    }

    fn engine_err(&self, action: impl Into<String>) -> impl FnOnce(DockerError) -> NodeError {
        let node = self.name.clone();
        let action = action.into();
        move |source| NodeError::Engine {
            node,
            action,
            source,
        }
    }

    /// Checks that the engine answers.
    /// What the engine's host has: CPUs and memory.
    pub async fn capacity(&self) -> Result<Capacity> {
        let info = self
            .docker
            .info()
            .await
            .map_err(self.engine_err("reading the engine's info"))?;
        Ok(Capacity {
            cpus: info.ncpu.unwrap_or(0).max(0) as u32,
            memory_bytes: info.mem_total.unwrap_or(0).max(0) as u64,
        })
    }

    /// The engine's version and API version (`escale nodes list` shows them).
    pub async fn version(&self) -> Result<EngineVersion> {
        let v = self
            .docker
            .version()
            .await
            .map_err(self.engine_err("reading the version"))?;
        Ok(EngineVersion {
            version: v.version.unwrap_or_default(),
            api_version: v.api_version.unwrap_or_default(),
        })
    }

    /// Storage driver, root dir and clock of the engine (for `escale doctor`).
    pub async fn facts(&self) -> Result<EngineFacts> {
        let info = self
            .docker
            .info()
            .await
            .map_err(self.engine_err("reading the engine's info"))?;
        Ok(EngineFacts {
            storage_driver: info.driver.unwrap_or_default(),
            root_dir: info.docker_root_dir.unwrap_or_default(),
            system_time: info.system_time,
        })
    }

    pub async fn ping(&self) -> Result<()> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(self.engine_err("ping"))
    }

    fn container_body(&self, spec: &InstanceSpec, network: &str) -> ContainerCreateBody {
        let port_key = format!("{}/tcp", spec.port);
        let mut env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| k != "PORT")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!("PORT={}", spec.port));

        let mut labels: HashMap<String, String> = spec.extra_labels.iter().cloned().collect();
        labels.insert(LABEL_INSTALLATION.into(), spec.installation.clone());
        labels.insert(LABEL_APP.into(), spec.app.clone());
        labels.insert(LABEL_PROCESS.into(), spec.process.clone());
        labels.insert(LABEL_RELEASE.into(), spec.release.to_string());
        labels.insert(LABEL_SLOT.into(), spec.slot.to_string());
        labels.insert(LABEL_INSTANCE.into(), spec.instance.clone());

        let port_bindings = HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(spec.bind_ip.to_string()),
                // Empty host port: the engine picks a free one.
                host_port: Some(String::new()),
            }]),
        )]);

        ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(env),
            cmd: spec.command.clone(),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(HostConfig {
                memory: spec.memory_bytes,
                // Same as memory: no swap, so a memory limit really is one.
                memory_swap: spec.memory_bytes,
                nano_cpus: spec.nano_cpus,
                init: Some(spec.init),
                port_bindings: Some(port_bindings),
                // The app's own bridge, not the default one shared by every container.
                network_mode: Some(network.to_string()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_string(), spec.log_max_size.clone()),
                        ("max-file".to_string(), spec.log_max_files.to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn validate(spec: &InstanceSpec) -> Result<()> {
        let bad = |reason: &str| {
            Err(NodeError::InvalidSpec {
                instance: spec.instance.clone(),
                reason: reason.to_string(),
            })
        };
        if spec.installation.is_empty() || spec.instance.is_empty() || spec.app.is_empty() {
            return bad("installation, app and instance must not be empty");
        }
        if spec.image.is_empty() {
            return bad("image must not be empty");
        }
        if spec.port == 0 {
            return bad("port must not be 0");
        }
        if spec.log_max_files == 0 {
            return bad("log_max_files must be at least 1");
        }
        Ok(())
    }

    /// Creates and starts the container of one instance and returns where it listens.
    ///
    /// The container is named [`container_name`]`(installation, instance)`. If a container of
    /// that name exists already (left by a crashed earlier attempt) and carries the same
    /// installation and instance labels, it is removed and created afresh: the spec may have
    /// changed and the old one was never reported as started. A container of that name that
    /// is not this instance is left alone ([`NodeError::NameTaken`]). If starting fails the
    /// created container is removed again.
    pub async fn start_instance(&self, spec: &InstanceSpec) -> Result<StartedInstance> {
        Self::validate(spec)?;
        let network = self
            .ensure_app_network(&spec.installation, &spec.app, &spec.app_uid)
            .await?;
        let name = container_name(&spec.installation, &spec.instance);
        let body = self.container_body(spec, &network);
        let create = |body: ContainerCreateBody| {
            self.docker.create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
        };

        let created = match create(body.clone()).await {
            Ok(c) => c,
            Err(e) if is_conflict(&e) => {
                self.clear_leftover(&name, spec).await?;
                create(body)
                    .await
                    .map_err(self.engine_err(format!("creating container `{name}`")))?
            }
            Err(e) if is_not_found(&e) => {
                return Err(NodeError::ImageUnavailable {
                    node: self.name.clone(),
                    image: spec.image.clone(),
                    reason: format!("{e} (call ensure_image or copy_image first)"),
                })
            }
            Err(e) => return Err(self.engine_err(format!("creating container `{name}`"))(e)),
        };
        for w in &created.warnings {
            tracing::warn!(node = %self.name, container = %name, "engine warning: {w}");
        }
        let id = created.id;

        if let Err(e) = self
            .docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
        {
            let _ = self.remove_instance(&id).await;
            return Err(self.engine_err(format!("starting container `{name}`"))(e));
        }

        let inspect = self
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .map_err(self.engine_err(format!("inspecting container `{name}`")))?;
        if let Some(state) = inspect.state.as_ref().filter(|s| s.running == Some(false)) {
            return Err(NodeError::ExitedAtStart {
                node: self.name.clone(),
                instance: spec.instance.clone(),
                container_id: id,
                exit_code: state.exit_code.unwrap_or(-1),
            });
        }
        let port_key = format!("{}/tcp", spec.port);
        let settings = inspect.network_settings.unwrap_or_default();
        let published = settings
            .ports
            .unwrap_or_default()
            .remove(&port_key)
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|b| {
                let port = b.host_port?.parse::<u16>().ok()?;
                let ip = b.host_ip.and_then(|ip| ip.parse::<IpAddr>().ok());
                Some((ip, port))
            })
            // Prefer the IPv4 binding when the engine reports both families.
            .min_by_key(|(ip, _)| matches!(ip, Some(IpAddr::V6(_))));
        let bridge = bridge_ip(
            settings.networks.as_ref(),
            &app_network_prefix(&spec.installation, &spec.app),
        );
        let binding = published.map(|(host_ip, host_port)| Binding {
            host_ip: host_ip.or(Some(spec.bind_ip)),
            host_port,
            container_port: spec.port,
        });
        let Some(addr) = instance_addr(self.reach, self.advertise_ip, bridge, binding) else {
            return Err(NodeError::NoPublishedPort {
                node: self.name.clone(),
                instance: spec.instance.clone(),
                port: spec.port,
            });
        };
        Ok(StartedInstance {
            container_id: id,
            addr,
        })
    }

    /// Removes a same-named leftover of this very instance, refuses anything else.
    async fn clear_leftover(&self, name: &str, spec: &InstanceSpec) -> Result<()> {
        let existing = match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c,
            // Gone in the meantime: nothing to clear.
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(self.engine_err(format!("inspecting container `{name}`"))(e)),
        };
        let labels = existing.config.and_then(|c| c.labels).unwrap_or_default();
        let ours = labels.get(LABEL_INSTALLATION) == Some(&spec.installation)
            && labels.get(LABEL_INSTANCE) == Some(&spec.instance);
        if !ours {
            return Err(NodeError::NameTaken {
                node: self.name.clone(),
                name: name.to_string(),
                installation: spec.installation.clone(),
                instance: spec.instance.clone(),
            });
        }
        tracing::warn!(
            node = %self.name, container = %name,
            "removing leftover container of instance {} from an earlier attempt", spec.instance
        );
        self.remove_instance(existing.id.as_deref().unwrap_or(name))
            .await
    }

    /// Lists this installation's containers (running or not) with **one** labelled list call;
    /// exited containers are inspected for their exit code and OOM flag. Containers whose
    /// labels do not parse are skipped with a warning.
    pub async fn list_instances(&self, installation: &str) -> Result<Vec<ContainerInstance>> {
        let filters = label_filter(vec![format!("{LABEL_INSTALLATION}={installation}")]);
        let summaries = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing containers"))?;

        let mut out = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(mut instance) = self.parse_summary(&summary) else {
                continue;
            };
            if matches!(instance.state, InstanceState::Exited | InstanceState::Dead) {
                match self
                    .docker
                    .inspect_container(&instance.container_id, None::<InspectContainerOptions>)
                    .await
                {
                    Ok(details) => {
                        if let Some(state) = details.state {
                            instance.oom_killed = state.oom_killed.unwrap_or(false);
                            if state.exit_code.is_some() {
                                instance.exit_code = state.exit_code;
                            }
                        }
                    }
                    // Removed between list and inspect: it is gone, leave it out.
                    Err(e) if is_not_found(&e) => continue,
                    Err(e) => {
                        return Err(self.engine_err(format!(
                            "inspecting container `{}`",
                            instance.container_id
                        ))(e))
                    }
                }
            }
            out.push(instance);
        }
        Ok(out)
    }

    fn parse_summary(&self, s: &ContainerSummary) -> Option<ContainerInstance> {
        let id = s.id.clone().unwrap_or_default();
        let empty = HashMap::new();
        let labels = s.labels.as_ref().unwrap_or(&empty);
        let get = |key: &str| -> Option<String> {
            match labels.get(key) {
                Some(v) if !v.is_empty() => Some(v.clone()),
                _ => {
                    tracing::warn!(node = %self.name, container = %id,
                        "skipping container: label `{key}` missing or empty");
                    None
                }
            }
        };
        let num = |key: &str| -> Option<u32> {
            let v = get(key)?;
            match v.parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!(node = %self.name, container = %id,
                        "skipping container: label `{key}={v}` is not a number");
                    None
                }
            }
        };
        if id.is_empty() {
            tracing::warn!(node = %self.name, "skipping container without id in list");
            return None;
        }
        let app = get(LABEL_APP)?;
        let process = get(LABEL_PROCESS)?;
        let instance = get(LABEL_INSTANCE)?;
        let release = num(LABEL_RELEASE)?;
        let slot = num(LABEL_SLOT)?;

        let state = match s.state {
            Some(ContainerSummaryStateEnum::CREATED) => InstanceState::Created,
            Some(ContainerSummaryStateEnum::RUNNING) => InstanceState::Running,
            Some(ContainerSummaryStateEnum::RESTARTING) => InstanceState::Restarting,
            Some(ContainerSummaryStateEnum::PAUSED) => InstanceState::Paused,
            Some(ContainerSummaryStateEnum::EXITED) => InstanceState::Exited,
            Some(ContainerSummaryStateEnum::DEAD) => InstanceState::Dead,
            Some(ContainerSummaryStateEnum::REMOVING) => InstanceState::Removing,
            _ => InstanceState::Unknown,
        };
        let exit_code = match state {
            InstanceState::Exited | InstanceState::Dead => {
                s.status.as_deref().and_then(parse_exit_code)
            }
            _ => None,
        };
        // The published port (the only one escale publishes: the app's) and the port the
        // app listens on, which the bridge address is reached at.
        let binding = s
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|p| matches!(p.typ, Some(PortSummaryTypeEnum::TCP) | None))
            .filter_map(|p| {
                let host_port = p.public_port.filter(|&port| port != 0)?;
                let host_ip = p.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
                Some(Binding {
                    host_ip,
                    host_port,
                    container_port: p.private_port,
                })
            })
            .min_by_key(|b| matches!(b.host_ip, Some(IpAddr::V6(_))));
        let bridge = bridge_ip(
            s.network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref()),
            &app_network_prefix(labels.get(LABEL_INSTALLATION).map_or("", |v| v), &app),
        );
        let addr = instance_addr(self.reach, self.advertise_ip, bridge, binding);

        Some(ContainerInstance {
            container_id: id,
            app,
            process,
            release,
            slot,
            instance,
            name: s
                .names
                .as_deref()
                .unwrap_or_default()
                .first()
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default(),
            image: s.image.clone().unwrap_or_default(),
            state,
            exit_code,
            oom_killed: false,
            addr,
            created: s.created.unwrap_or(0),
            spec: labels.get(LABEL_SPEC).cloned(),
        })
    }

    /// Stops a container: SIGTERM (or the image's stop signal), then SIGKILL after `timeout`.
    /// Stopping a stopped or missing container succeeds.
    pub async fn stop_instance(&self, container_id: &str, timeout: Duration) -> Result<()> {
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        // The HTTP call lasts as long as the grace period: give it room.
        let docker = self
            .docker
            .clone()
            .with_timeout(timeout + Duration::from_secs(REQUEST_TIMEOUT_SECS));
        match docker
            .stop_container(
                container_id,
                Some(StopContainerOptions {
                    t: Some(secs),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self
                .engine_err(format!("stopping container `{container_id}`"))(
                e
            )),
        }
    }

    /// Sends a signal (`KILL`, `TERM`, ...) to a container's main process.
    pub async fn kill_instance(&self, container_id: &str, signal: &str) -> Result<()> {
        self.docker
            .kill_container(
                container_id,
                Some(KillContainerOptions {
                    signal: signal.to_string(),
                }),
            )
            .await
            .map_err(self.engine_err(format!("sending {signal} to container `{container_id}`")))
    }

    /// Removes a container (forced, with its anonymous volumes). "No such container" is success.
    pub async fn remove_instance(&self, container_id: &str) -> Result<()> {
        match self
            .docker
            .remove_container(
                container_id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // Already being removed by someone else: it is going away.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self
                .engine_err(format!("removing container `{container_id}`"))(
                e
            )),
        }
    }

    /// Makes sure the app's bridge network exists (created with the installation, app and app
    /// uid labels); returns its id, which containers are attached by (an engine may hold two
    /// networks of one name; creation is serialised per node so escale never makes two).
    pub async fn ensure_app_network(
        &self,
        installation: &str,
        app: &str,
        app_uid: &str,
    ) -> Result<String> {
        let name = network_name(installation, app, app_uid);
        let _serial = self.network_lock.lock().await;
        let filters = label_filter(vec![
            format!("{LABEL_INSTALLATION}={installation}"),
            format!("{LABEL_APP}={app}"),
            format!("{LABEL_APP_UID}={app_uid}"),
        ]);
        let existing = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(self.engine_err(format!("listing networks of app `{app}`")))?;
        let mut ids: Vec<String> = existing
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name.as_str()))
            .filter_map(|n| n.id)
            .collect();
        ids.sort();
        if let Some(id) = ids.into_iter().next() {
            return Ok(id);
        }
        let labels = HashMap::from([
            (LABEL_INSTALLATION.to_string(), installation.to_string()),
            (LABEL_APP.to_string(), app.to_string()),
            (LABEL_APP_UID.to_string(), app_uid.to_string()),
        ]);
        let created = self
            .docker
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map_err(self.engine_err(format!("creating network `{name}`")))?;
        tracing::info!(node = %self.name, network = %name, "app network created");
        Ok(created.id)
    }

    /// The app networks of the installation on this node (one labelled list call).
    pub async fn list_app_networks(&self, installation: &str) -> Result<Vec<AppNetwork>> {
        let filters = label_filter(vec![format!("{LABEL_INSTALLATION}={installation}")]);
        let list = self
            .docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(self.engine_err("listing networks"))?;
        Ok(list
            .into_iter()
            .filter_map(|n| {
                let labels = n.labels.unwrap_or_default();
                Some(AppNetwork {
                    id: n.id?,
                    name: n.name?,
                    app: labels.get(LABEL_APP)?.clone(),
                    app_uid: labels.get(LABEL_APP_UID)?.clone(),
                })
            })
            .collect())
    }

    /// Removes a network (by id or name). "No such network" is success; a network that still has containers
    /// attached is an error (try again once they are gone).
    pub async fn remove_network(&self, name: &str) -> Result<()> {
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(format!("removing network `{name}`"))(e)),
        }
    }

    /// Removes every container of the installation on this node, then its app networks;
    /// returns how many containers.
    pub async fn remove_all(&self, installation: &str) -> Result<usize> {
        let filters = label_filter(vec![format!("{LABEL_INSTALLATION}={installation}")]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing containers"))?;
        let mut n = 0;
        for c in list {
            if let Some(id) = c.id {
                self.remove_instance(&id).await?;
                n += 1;
            }
        }
        for net in self.list_app_networks(installation).await? {
            self.remove_network(&net.id).await?;
        }
        Ok(n)
    }

    /// Whether the image (name:tag, digest or id) is present on this node.
    pub async fn image_exists(&self, image: &str) -> Result<bool> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.engine_err(format!("inspecting image `{image}`"))(e)),
        }
    }

    /// What escale checks about a local image (see [`crate::images`]), or `None` when the
    /// engine has nothing under that reference.
    pub async fn image_facts(&self, image: &str) -> Result<Option<ImageFacts>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => {
                let config = i.config.unwrap_or_default();
                Ok(Some(ImageFacts {
                    id: i.id.unwrap_or_default(),
                    repo_tags: i.repo_tags.unwrap_or_default(),
                    repo_digests: i.repo_digests.unwrap_or_default(),
                    labels: config.labels.unwrap_or_default(),
                    on_build: config.on_build.unwrap_or_default(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine_err(format!("inspecting image `{image}`"))(e)),
        }
    }

    /// The local images an image was built on (its parent chain, nearest first, without the
    /// image itself): the ids of its history that the engine has.
    pub async fn image_ancestors(&self, image: &str) -> Result<Vec<ImageFacts>> {
        let history = self
            .docker
            .image_history(image)
            .await
            .map_err(self.engine_err(format!("reading the history of image `{image}`")))?;
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for h in history.iter().skip(1) {
            if !h.id.starts_with("sha256:") || !seen.insert(h.id.clone()) {
                continue;
            }
            if let Some(f) = self.image_facts(&h.id).await? {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Makes sure the image is on this node: present is fine, absent is pulled. A failed pull
    /// is [`NodeError::ImageUnavailable`].
    pub async fn ensure_image(&self, image: &str) -> Result<()> {
        if self.image_exists(image).await? {
            return Ok(());
        }
        let unavailable = |reason: String| NodeError::ImageUnavailable {
            node: self.name.clone(),
            image: image.to_string(),
            reason,
        };
        let reference = normalize_ref(image);
        let mut pull = self.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(reference),
                ..Default::default()
            }),
            None,
            None,
        );
        while let Some(item) = pull.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail {
                        return Err(unavailable(detail.message.unwrap_or_default()));
                    }
                }
                Err(e) => return Err(unavailable(e.to_string())),
            }
        }
        if self.image_exists(image).await? {
            Ok(())
        } else {
            Err(unavailable(
                "the pull finished but the image is still absent".into(),
            ))
        }
    }

    /// `image` as a tar stream (`docker save`).
    pub fn save_image(&self, image: &str) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let node = self.name.clone();
        let action = format!("saving image `{image}`");
        self.docker.export_image(image).map(move |r| {
            r.map_err(|source| NodeError::Engine {
                node: node.clone(),
                action: action.clone(),
                source,
            })
        })
    }

    /// Loads a tar stream made by `docker save` (`docker load`); an error of the stream or
    /// of the engine fails the load.
    pub async fn load_image<E>(
        &self,
        tar: impl Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let mut load = self.docker.import_image_stream(
            ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            tar,
            None,
        );
        while let Some(item) = load.next().await {
            let info = item.map_err(self.engine_err("loading an image"))?;
            if let Some(detail) = info.error_detail {
                return Err(NodeError::ImageLoad {
                    node: self.name.clone(),
                    reason: detail.message.unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    /// Copies an image from node `from` to node `to` by streaming `docker save` into
    /// `docker load`; nothing is buffered in memory. Skips the copy if `to` has it already.
    pub async fn copy_image(from: &Node, to: &Node, image: &str) -> Result<()> {
        let failed = |reason: String| NodeError::CopyFailed {
            image: image.to_string(),
            from: from.name.clone(),
            to: to.name.clone(),
            reason,
        };
        if to.image_exists(image).await? {
            return Ok(());
        }
        if !from.image_exists(image).await? {
            return Err(failed(format!("it is not on node `{}`", from.name)));
        }
        let export = from.docker.export_image(image);
        let mut load = to.docker.import_image_stream(
            ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            export,
            None,
        );
        while let Some(item) = load.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail {
                        return Err(failed(detail.message.unwrap_or_default()));
                    }
                }
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        if to.image_exists(image).await? {
            Ok(())
        } else {
            Err(failed("the load finished but the image is absent".into()))
        }
    }

    /// Builds an image with the classic builder from a tar build context (with a `Dockerfile`
    /// at its root), tags it `tag`, and returns the image id. Each line of builder output is
    /// passed to `on_progress` as it arrives (without trailing newline).
    pub async fn build_image(
        &self,
        context_tar: Bytes,
        tag: &str,
        build_args: &[(String, String)],
        labels: &[(String, String)],
        on_progress: impl FnMut(&str) + Send,
    ) -> Result<String> {
        self.build_image_with(
            "Dockerfile",
            context_tar,
            tag,
            build_args,
            labels,
            on_progress,
        )
        .await
    }

    /// [`Node::build_image`] with the Dockerfile at `dockerfile` inside the context.
    pub async fn build_image_with(
        &self,
        dockerfile: &str,
        context_tar: Bytes,
        tag: &str,
        build_args: &[(String, String)],
        labels: &[(String, String)],
        on_progress: impl FnMut(&str) + Send,
    ) -> Result<String> {
        let options = BuildImageOptions {
            dockerfile: dockerfile.into(),
            t: Some(tag.to_string()),
            rm: true,
            forcerm: true,
            buildargs: Some(build_args.iter().cloned().collect()),
            labels: Some(labels.iter().cloned().collect()),
            version: BuilderVersion::BuilderV1,
            ..Default::default()
        };
        let stream = self
            .docker
            .build_image(options, None, Some(bollard::body_full(context_tar)));
        self.run_build(stream, tag, on_progress).await
    }

    /// Builds `spec` with the classic builder from a tar build context streamed from
    /// `context` (nothing is buffered here), reusing cached layers of `spec.cache_from` only.
    /// Returns the image id.
    pub async fn build_image_stream(
        &self,
        spec: &BuildSpec,
        context: impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + 'static,
        on_progress: impl FnMut(&str) + Send,
    ) -> Result<String> {
        let options = BuildImageOptions {
            dockerfile: spec.dockerfile.clone(),
            t: Some(spec.tag.clone()),
            rm: true,
            forcerm: true,
            nocache: spec.cache_from.is_empty(),
            cachefrom: (!spec.cache_from.is_empty()).then(|| spec.cache_from.clone()),
            buildargs: Some(spec.build_args.iter().cloned().collect()),
            labels: Some(spec.labels.iter().cloned().collect()),
            version: BuilderVersion::BuilderV1,
            ..Default::default()
        };
        let stream =
            self.docker
                .build_image(options, None, Some(bollard::body_try_stream(context)));
        self.run_build(stream, &spec.tag, on_progress).await
    }

    async fn run_build(
        &self,
        stream: impl Stream<Item = std::result::Result<bollard::models::BuildInfo, DockerError>>,
        tag: &str,
        mut on_progress: impl FnMut(&str) + Send,
    ) -> Result<String> {
        let failed = |reason: String| NodeError::BuildFailed {
            node: self.name.clone(),
            tag: tag.to_string(),
            reason,
        };
        // A build lasts as long as its steps; the timeout only covers the response headers,
        // which the engine sends once it has the context.
        let mut stream = std::pin::pin!(stream);
        let mut image_id = None;
        let mut last_line = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| failed(e.to_string()))?;
            if let Some(detail) = info.error_detail {
                let msg = detail.message.unwrap_or_default();
                on_progress(msg.trim_end());
                return Err(failed(msg.trim_end().to_string()));
            }
            if let Some(text) = info.stream.as_deref().or(info.status.as_deref()) {
                for line in text.lines() {
                    on_progress(line);
                    last_line = line.to_string();
                }
            }
            if let Some(id) = info.aux.and_then(|a| a.id) {
                image_id = Some(id);
            }
        }
        match image_id {
            Some(id) => Ok(id),
            // Old engines print only "Successfully built <id>".
            None => match last_line.strip_prefix("Successfully tagged ") {
                Some(_) => self
                    .docker
                    .inspect_image(tag)
                    .await
                    .map(|i| i.id.unwrap_or_default())
                    .map_err(self.engine_err(format!("inspecting image `{tag}`"))),
                None => Err(failed(format!(
                    "the builder ended without an image id (last output: {last_line})"
                ))),
            },
        }
    }

    /// Removes an image tag (and the image if nothing else uses it). Absent is success; an
    /// image used by a container is an error.
    /// Tags of the images on this engine that carry every one of `labels` (`key=value`), e.g.
    /// the images escale built for one app of one installation.
    pub async fn list_labelled_images(&self, labels: &[String]) -> Result<Vec<String>> {
        let filters = label_filter(labels.to_vec());
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing images"))?;
        Ok(images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| t != "<none>:<none>")
            .collect())
    }

    /// Every image on this engine labelled with `installation` (what escale built): id, tags
    /// and labels.
    pub async fn list_installation_images(&self, installation: &str) -> Result<Vec<ImageFacts>> {
        let filters = label_filter(vec![format!("{LABEL_INSTALLATION}={installation}")]);
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing images"))?;
        Ok(images
            .into_iter()
            .map(|i| ImageFacts {
                id: i.id,
                repo_tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                repo_digests: i.repo_digests,
                labels: i.labels,
                on_build: Vec::new(),
            })
            .collect())
    }

    pub async fn remove_image(&self, image: &str) -> Result<()> {
        match self
            .docker
            .remove_image(image, None::<RemoveImageOptions>, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine_err(format!("removing image `{image}`"))(e)),
        }
    }

    /// One sample of a container's CPU and memory counters (the engine's one-shot stats: one
    /// read of the cgroup, no second sample waited for). `None` when the container is gone.
    pub async fn instance_stats(&self, container_id: &str) -> Result<Option<StatsSample>> {
        use bollard::query_parameters::StatsOptions;
        let mut stream = Box::pin(self.docker.stats(
            container_id,
            Some(StatsOptions {
                stream: false,
                one_shot: true,
            }),
        ));
        match stream.next().await {
            None => Ok(None),
            Some(Err(e)) if is_not_found(&e) => Ok(None),
            Some(Err(e)) => Err(self
                .engine_err(format!("reading stats of `{container_id}`"))(
                e
            )),
            Some(Ok(stats)) => {
                let cpu = stats.cpu_stats.unwrap_or_default();
                let memory = stats.memory_stats.unwrap_or_default();
                let counters = memory.stats.unwrap_or_default();
                Ok(Some(StatsSample {
                    cpu_total_ns: cpu.cpu_usage.and_then(|u| u.total_usage).unwrap_or(0),
                    system_ns: cpu.system_cpu_usage.unwrap_or(0),
                    online_cpus: cpu.online_cpus.unwrap_or(0),
                    memory_usage: memory.usage.unwrap_or(0),
                    // The page cache the kernel reclaims first: what `docker stats` leaves out
                    // (cgroup v2 names it `inactive_file`, v1 `total_inactive_file`).
                    memory_inactive_file: counters
                        .get("inactive_file")
                        .or_else(|| counters.get("total_inactive_file"))
                        .copied()
                        .unwrap_or(0),
                }))
            }
        }
    }

    /// What escale owns on this engine's disk: the images and containers labelled with
    /// `installation`, with their sizes and apps (containers' writable layers are measured,
    /// which costs the engine a walk of each: call this rarely).
    pub async fn owned_disk(&self, installation: &str) -> Result<OwnedDisk> {
        let label = format!("{LABEL_INSTALLATION}={installation}");
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                all: false,
                filters: Some(label_filter(vec![label.clone()])),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing images"))?;
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                size: true,
                filters: Some(label_filter(vec![label])),
                ..Default::default()
            }))
            .await
            .map_err(self.engine_err("listing containers with their sizes"))?;
        Ok(OwnedDisk {
            images: images
                .into_iter()
                .map(|i| OwnedImage {
                    app: i.labels.get(LABEL_APP).cloned(),
                    built_for: i.labels.get(crate::images::LABEL_BUILT_FOR).cloned(),
                    tags: i
                        .repo_tags
                        .into_iter()
                        .filter(|t| t != "<none>:<none>")
                        .collect(),
                    id: i.id,
                    bytes: i.size.max(0) as u64,
                    created: i.created,
                })
                .collect(),
            containers: containers
                .into_iter()
                .map(|c| OwnedContainer {
                    app: c.labels.as_ref().and_then(|l| l.get(LABEL_APP).cloned()),
                    bytes: c.size_rw.unwrap_or(0).max(0) as u64,
                })
                .collect(),
        })
    }

    /// The filesystem holding the engine's data (`DockerRootDir`), measured from this host:
    /// only for an engine on this host (its unix socket, or a loopback address), whose data
    /// root this process can see. `None` otherwise, or when the path is not visible (escale
    /// in a container without the engine's data mounted).
    pub async fn filesystem(&self) -> Result<Option<Filesystem>> {
        let on_this_host = self.reach == Reach::Bridge || self.advertise_ip.is_loopback();
        if !on_this_host {
            return Ok(None);
        }
        let info = self
            .docker
            .info()
            .await
            .map_err(self.engine_err("reading the engine's info"))?;
        let Some(root) = info.docker_root_dir.filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        Ok(Filesystem::of(Path::new(&root)))
    }

    /// A container's output (stdout and stderr), with engine timestamps. `tail` limits to the
    /// last n lines; `follow` keeps the stream open for new output until the container ends.
    pub fn logs(
        &self,
        container_id: &str,
        follow: bool,
        tail: Option<usize>,
    ) -> impl Stream<Item = Result<LogLine>> + Send + 'static {
        let node = self.name.clone();
        let action = format!("reading logs of container `{container_id}`");
        self.docker
            .logs(
                container_id,
                Some(LogsOptions {
                    follow,
                    stdout: true,
                    stderr: true,
                    timestamps: true,
                    tail: tail.map_or_else(|| "all".to_string(), |n| n.to_string()),
                    ..Default::default()
                }),
            )
            .filter_map(move |item| {
                let out = match item {
                    Ok(LogOutput::StdOut { message }) => {
                        Some(Ok(parse_log_line(LogStream::Stdout, &message)))
                    }
                    Ok(LogOutput::StdErr { message }) => {
                        Some(Ok(parse_log_line(LogStream::Stderr, &message)))
                    }
                    Ok(LogOutput::Console { message }) => {
                        Some(Ok(parse_log_line(LogStream::Stdout, &message)))
                    }
                    Ok(LogOutput::StdIn { .. }) => None,
                    Err(source) => Some(Err(NodeError::Engine {
                        node: node.clone(),
                        action: action.clone(),
                        source,
                    })),
                };
                std::future::ready(out)
            })
    }

    /// This installation's container events (`die`, `oom`, `start`, `kill`, `destroy`) from now on.
    pub fn events(
        &self,
        installation: &str,
    ) -> impl Stream<Item = Result<NodeEvent>> + Send + 'static {
        self.events_since(installation, None)
    }

    /// Like [`Node::events`] but replays events since `since` first (the engine keeps a
    /// bounded history), so a caller can subscribe after acting without missing anything.
    pub fn events_since(
        &self,
        installation: &str,
        since: Option<SystemTime>,
    ) -> impl Stream<Item = Result<NodeEvent>> + Send + 'static {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "label".to_string(),
                vec![format!("{LABEL_INSTALLATION}={installation}")],
            ),
            (
                "event".to_string(),
                EVENT_ACTIONS.iter().map(|s| s.to_string()).collect(),
            ),
        ]);
        let since = since.map(|t| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
        });
        let node = self.name.clone();
        // Events are streamed for as long as the caller listens; no request timeout applies
        // once the engine has answered.
        self.docker
            .events(Some(EventsOptions {
                since,
                until: None,
                filters: Some(filters),
            }))
            .filter_map(move |item| {
                let out = match item {
                    Ok(msg) => parse_event(msg).map(Ok),
                    Err(source) => Some(Err(NodeError::Engine {
                        node: node.clone(),
                        action: "reading events".into(),
                        source,
                    })),
                };
                std::future::ready(out)
            })
    }
}

/// `Exited (3) 5 seconds ago` -> 3.
fn parse_exit_code(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    let end = rest.find(')')?;
    rest[..end].parse().ok()
}

/// Splits `2024-01-01T00:00:00.123456789Z text\n` into timestamp and text.
fn parse_log_line(stream: LogStream, message: &[u8]) -> LogLine {
    let raw = String::from_utf8_lossy(message);
    let raw = raw.strip_suffix('\n').unwrap_or(&raw);
    let raw = raw.strip_suffix('\r').unwrap_or(raw);
    let (time, text) = match raw.split_once(' ') {
        Some((t, rest)) if t.len() >= 20 && t.as_bytes()[4] == b'-' => (t, rest),
        _ => ("", raw),
    };
    LogLine {
        stream,
        time: time.to_string(),
        text: text.to_string(),
    }
}

fn parse_event(msg: EventMessage) -> Option<NodeEvent> {
    let action = msg.action?;
    // `exec_die`, `health_status: ...` and the like never pass the filter; be strict anyway.
    let action = action
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if !EVENT_ACTIONS.contains(&action.as_str()) {
        return None;
    }
    let actor = msg.actor?;
    let container_id = actor.id?;
    let mut attrs = actor.attributes.unwrap_or_default();
    Some(NodeEvent {
        container_id,
        action,
        app: attrs.remove(LABEL_APP),
        instance: attrs.remove(LABEL_INSTANCE),
        exit_code: attrs.get("exitCode").and_then(|c| c.parse().ok()),
        time: msg.time.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_docker_safe() {
        assert_eq!(container_name("prod", "web-1"), "escale-prod-web-1");
        assert_eq!(container_name("p", "a/b c"), "escale-p-a_b_c");
    }

    #[test]
    fn refs_get_a_tag() {
        assert_eq!(normalize_ref("foo"), "foo:latest");
        assert_eq!(normalize_ref("foo:1"), "foo:1");
        assert_eq!(normalize_ref("reg:5000/foo"), "reg:5000/foo:latest");
        assert_eq!(normalize_ref("foo@sha256:ab"), "foo@sha256:ab");
    }

    #[test]
    fn exit_codes_parse_from_status() {
        assert_eq!(parse_exit_code("Exited (3) 5 seconds ago"), Some(3));
        assert_eq!(
            parse_exit_code("Exited (137) About a minute ago"),
            Some(137)
        );
        assert_eq!(parse_exit_code("Up 3 minutes"), None);
        assert_eq!(parse_exit_code("Exited (x"), None);
    }

    #[test]
    fn log_lines_split_timestamp() {
        let l = parse_log_line(LogStream::Stdout, b"2024-01-01T00:00:00.1Z GET / 200\n");
        assert_eq!(l.time, "2024-01-01T00:00:00.1Z");
        assert_eq!(l.text, "GET / 200");
        let l = parse_log_line(LogStream::Stderr, b"no timestamp");
        assert_eq!(l.time, "");
        assert_eq!(l.text, "no timestamp");
    }

    #[test]
    fn instances_are_reached_at_their_bridge_address_only_on_a_bridge_node() {
        let advertise: IpAddr = "10.0.0.7".parse().unwrap();
        let bridge: IpAddr = "172.18.0.2".parse().unwrap();
        let on = |host_ip: &str| Binding {
            host_ip: Some(host_ip.parse().unwrap()),
            host_port: 32768,
            container_port: 8080,
        };
        let addr = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        // The proxy's own host: the container's address and port, whatever is published.
        assert_eq!(
            instance_addr(
                Reach::Bridge,
                advertise,
                Some(bridge),
                Some(on("127.0.0.1"))
            ),
            addr("172.18.0.2:8080")
        );
        // No bridge address known: the published port is the fallback.
        assert_eq!(
            instance_addr(Reach::Bridge, advertise, None, Some(on("127.0.0.1"))),
            addr("127.0.0.1:32768")
        );
        // Another host: the published port, at the bound address or the advertised one.
        assert_eq!(
            instance_addr(
                Reach::Published,
                advertise,
                Some(bridge),
                Some(on("10.0.0.7"))
            ),
            addr("10.0.0.7:32768")
        );
        assert_eq!(
            instance_addr(
                Reach::Published,
                advertise,
                Some(bridge),
                Some(on("0.0.0.0"))
            ),
            addr("10.0.0.7:32768")
        );
        let unbound = Binding {
            host_ip: None,
            ..on("0.0.0.0")
        };
        assert_eq!(
            instance_addr(Reach::Published, advertise, None, Some(unbound)),
            addr("10.0.0.7:32768")
        );
        // A container that publishes nothing (stopped) has no address.
        assert_eq!(
            instance_addr(Reach::Bridge, advertise, Some(bridge), None),
            None
        );
        assert_eq!(instance_addr(Reach::Published, advertise, None, None), None);
    }

    #[test]
    fn bridge_ip_prefers_the_app_network() {
        use bollard::models::EndpointSettings;
        let ep = |ip: &str| EndpointSettings {
            ip_address: Some(ip.into()),
            ..Default::default()
        };
        let prefix = app_network_prefix("inst", "shop");
        assert_eq!(prefix, "escale-inst-shop-");
        let own = network_name("inst", "shop", "u1");
        let nets = HashMap::from([
            ("aaa-extra".to_string(), ep("172.30.0.5")),
            (own.clone(), ep("172.18.0.2")),
        ]);
        assert_eq!(
            bridge_ip(Some(&nets), &prefix),
            Some("172.18.0.2".parse().unwrap())
        );
        // Stopped containers report empty addresses; no networks at all is no address.
        let stopped = HashMap::from([(own, ep(""))]);
        assert_eq!(bridge_ip(Some(&stopped), &prefix), None);
        assert_eq!(bridge_ip(None, &prefix), None);
        let other = HashMap::from([("bridge".to_string(), ep("172.17.0.3"))]);
        assert_eq!(
            bridge_ip(Some(&other), &prefix),
            Some("172.17.0.3".parse().unwrap())
        );
    }

    #[test]
    fn reach_parses() {
        assert_eq!("bridge".parse::<Reach>(), Ok(Reach::Bridge));
        assert_eq!("published".parse::<Reach>(), Ok(Reach::Published));
        assert!("nat".parse::<Reach>().unwrap_err().contains("bridge"));
    }
}
