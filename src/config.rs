//! Settings: a raw TOML file, overridden by `ESCALE_*` environment variables, validated into
//! [`Config`].
//!
//! Loading is two steps, so every error names its key: [`RawConfig`] is what the file says
//! (every field optional, unknown keys rejected); [`Config::from_raw`] applies environment
//! overrides and defaults and checks each value. The sample `config/escale.toml` documents
//! every key; the table in [`ENV_KEYS`] is the single list of environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What can go wrong while loading settings. Each message names the key and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting `{key}` (env {env}) is invalid: {message}")]
    Invalid {
        key: &'static str,
        env: &'static str,
        message: String,
    },
}

/// The file as written. Every field is optional; defaults are applied by [`Config::from_raw`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<String>,
    pub api_addr: Option<String>,
    pub api_max_connections: Option<u32>,
    pub api_max_connections_per_client: Option<u32>,
    pub login_max_failures: Option<u32>,
    pub login_lockout: Option<String>,
    pub http_addr: Option<String>,
    pub https_addr: Option<String>,
    pub apps_domain: Option<String>,
    pub docker_host: Option<String>,
    pub advertise_ip: Option<String>,
    pub local_reach: Option<String>,
    pub installation_id: Option<String>,
    pub max_instances: Option<u32>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    #[serde(default)]
    pub scheduler: RawScheduler,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub acme: RawAcme,
    #[serde(default)]
    pub webhooks: RawWebhooks,
    #[serde(default)]
    pub git: RawGit,
    #[serde(default)]
    pub backup: RawBackup,
    #[serde(default)]
    pub upkeep: RawUpkeep,
}

/// `[upkeep]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpkeep {
    pub usage_interval: Option<String>,
    pub disk_interval: Option<String>,
    pub prune_interval: Option<String>,
    pub disk_warn_percent: Option<u8>,
    pub disk_refuse_builds_percent: Option<u8>,
}

/// `[upkeep]`, validated: how often escale measures what nodes use and prunes what it owns.
#[derive(Debug, Clone)]
pub struct UpkeepConfig {
    /// How often each running instance's CPU and memory are sampled.
    pub usage_interval: Duration,
    /// How often each node's disk (escale's images and containers, the engine's filesystem)
    /// is measured.
    pub disk_interval: Duration,
    /// How often unused images escale built are pruned on every node.
    pub prune_interval: Duration,
    /// A node's engine disk this full (percent) is announced (log, event, metric).
    pub disk_warn_percent: u8,
    /// Builds are refused on a node whose engine disk is this full (percent).
    pub disk_refuse_builds_percent: u8,
}

/// `[backup]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    pub interval: Option<String>,
    pub keep: Option<u32>,
    pub dir: Option<String>,
    #[serde(default)]
    pub s3: RawBackupS3,
}

/// `[backup.s3]` as written (each key also from `ESCALE_BACKUP_S3_<KEY>`; see
/// [`S3Settings`] for what each means). With no `endpoint` the table is off, and any other of
/// its keys is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackupS3 {
    /// The store's URL (`http(s)://host[:port]`).
    pub endpoint: Option<String>,
    /// The region requests are signed for.
    pub region: Option<String>,
    /// The bucket (it must exist).
    pub bucket: Option<String>,
    /// The objects' name prefix (default: none).
    pub prefix: Option<String>,
    /// The access key id.
    pub access_key_id: Option<String>,
    /// The secret access key (better in the environment or a file).
    pub secret_access_key: Option<String>,
    /// A file holding the secret access key.
    pub secret_access_key_file: Option<String>,
    /// PEM certificates trusted besides the system's roots.
    pub ca_file: Option<String>,
}

/// `[backup]`, validated.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// Time between scheduled backups; `None`: no scheduled backups.
    pub interval: Option<Duration>,
    /// Backups kept in `dir` (older ones of this installation are removed after each backup).
    pub keep: u32,
    /// Where the server writes backups (`None`: `data_dir/backups`).
    pub dir: Option<PathBuf>,
    /// `[backup.s3]`: each backup is also uploaded to this bucket (`None`: local only).
    pub s3: Option<S3Settings>,
}

/// `[backup.s3]`, validated: an S3-compatible object store (Scaleway, OVH, Hetzner, Exoscale,
/// MinIO, Garage, AWS) each backup is uploaded to, addressed path-style
/// (`endpoint/bucket/prefix/name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `http://` or `https://` host and optional port, nothing else, e.g.
    /// `https://s3.fr-par.scw.cloud`.
    pub endpoint: String,
    /// The region the requests are signed for (Signature V4), e.g. `fr-par`.
    pub region: String,
    /// The bucket backups are uploaded to (escale never creates or removes it).
    pub bucket: String,
    /// Empty, or ends with `/`: objects are `prefix + name`.
    pub prefix: String,
    /// The access key id (its key may put, get, list and delete objects in the bucket).
    pub access_key_id: String,
    /// From `secret_access_key`, its environment variable or `secret_access_key_file`.
    pub secret_access_key: SecretString,
    /// PEM certificates trusted besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
}

impl S3Settings {
    /// `s3://bucket/prefix` (where the backups go, for messages).
    pub fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// A secret value kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(pub String);

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"(redacted)\"")
    }
}

impl BackupSettings {
    /// The directory backups go to.
    pub fn dir_for(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("backups"))
    }
}

/// `[git]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGit {
    pub deploy_branch: Option<String>,
    pub dockerfile: Option<String>,
    pub max_context_size: Option<String>,
}

/// `[git]`, validated: how pushed code is built and deployed.
#[derive(Debug, Clone)]
pub struct GitSettings {
    /// Pushes to this branch (and webhook deliveries for it) are built and deployed.
    pub deploy_branch: String,
    /// Path of the Dockerfile inside the repository.
    pub dockerfile: String,
    /// Largest build context (the pushed commit's files, archived) one deploy may send to
    /// the engine, in bytes.
    pub max_context_size: u64,
}

impl GitSettings {
    /// The full ref name of the deploy branch, e.g. `refs/heads/main`.
    pub fn deploy_ref(&self) -> String {
        format!("refs/heads/{}", self.deploy_branch)
    }
}

/// `[webhooks]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhooks {
    pub allow_private_repositories: Option<bool>,
    pub allow_file_repositories: Option<bool>,
}

/// `[acme]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory_url: Option<String>,
    pub email: Option<String>,
    pub renew_before: Option<String>,
    pub ca_root: Option<String>,
    pub challenge: Option<String>,
}

/// `[scheduler]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScheduler {
    pub reconcile_interval: Option<String>,
    pub deploy_timeout: Option<String>,
    pub unhealthy_replace_after: Option<String>,
    pub node_down_after: Option<String>,
    pub overcommit: Option<bool>,
    pub drain_grace: Option<String>,
    pub stop_timeout: Option<String>,
    pub default_port: Option<u16>,
    pub log_max_size: Option<String>,
    pub log_max_files: Option<u32>,
    pub keep_releases: Option<u32>,
}

/// `[proxy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub max_body_size: Option<String>,
    pub max_header_size: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub access_log: Option<String>,
    pub workers: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_connections_per_client: Option<u32>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the registry, the master key and git repositories live.
    pub data_dir: PathBuf,
    /// API, git and (later) dashboard listener.
    pub api_addr: SocketAddr,
    /// Open API connections at most (`0`: a sixteenth of the descriptor limit).
    pub api_max_connections: usize,
    /// Open API connections per client address (IPv6: per /64) at most; `0`: no cap.
    pub api_max_connections_per_client: usize,
    /// Failed logins (API and dashboard) one user may have from one address within
    /// `login_lockout` before its logins from there are refused (429) until the window passes.
    pub login_max_failures: u32,
    pub login_lockout: Duration,
    /// Proxy, plain HTTP. `None` when set to `off`.
    pub http_addr: Option<SocketAddr>,
    /// Proxy, HTTPS. `None` when set to `off`.
    pub https_addr: Option<SocketAddr>,
    /// Apps answer at `APP.<apps_domain>`.
    pub apps_domain: String,
    /// The local engine: node `local`; `off` runs apps on registered nodes only.
    pub docker_host: String,
    /// Address at which the local node's published ports are reached by the proxy.
    pub advertise_ip: std::net::IpAddr,
    /// How the proxy and health checks reach the local node's instances: at their bridge
    /// addresses (`bridge`, the default for an engine on a unix socket: it runs on this
    /// host) or at `advertise_ip` and their published ports (`published`, the default for
    /// `tcp://`).
    pub local_reach: crate::node::Reach,
    /// Id written into the registry when it is created (default: random); every container
    /// escale creates is labelled with it.
    pub installation_id: Option<String>,
    /// Largest instance count of one process type.
    pub max_instances: u32,
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `escale=debug`.
    pub log_level: String,
    pub scheduler: SchedulerConfig,
    pub proxy: ProxySettings,
    pub acme: AcmeConfig,
    pub webhooks: WebhooksConfig,
    pub git: GitSettings,
    pub backup: BackupSettings,
    pub upkeep: UpkeepConfig,
}

/// `[webhooks]`, validated.
#[derive(Debug, Clone, Default)]
pub struct WebhooksConfig {
    /// Webhook repository URLs may name hosts that resolve to addresses that are not global
    /// unicast (see `webhooks::is_global`).
    pub allow_private_repositories: bool,
    /// Webhook repository URLs may be `file://` paths on the server.
    pub allow_file_repositories: bool,
}

/// `[acme]`, validated.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The ACME directory; `None` (`off`) disables ordering certificates.
    pub directory_url: Option<String>,
    /// Contact address registered with the CA.
    pub email: Option<String>,
    /// ACME certificates are renewed this long before they expire.
    pub renew_before: Duration,
    /// A PEM CA root trusted for the HTTPS connection to the directory (test CAs such as
    /// Pebble); `None` uses the platform's roots.
    pub ca_root: Option<PathBuf>,
    /// How the CA validates that this host answers for a domain.
    pub challenge: AcmeChallenge,
}

/// The ACME challenge type used to prove control of a domain (`acme.challenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcmeChallenge {
    /// `http-01`: the CA fetches `/.well-known/acme-challenge/<token>` from port 80, answered
    /// by the proxy's HTTP listener (`http_addr`).
    #[default]
    Http01,
    /// `tls-alpn-01` (RFC 8737): the CA opens a TLS connection to port 443 offering ALPN
    /// `acme-tls/1`, answered by the proxy's HTTPS listener (`https_addr`) with a self-signed
    /// validation certificate.
    TlsAlpn01,
}

impl AcmeChallenge {
    /// The name used in the config and by ACME (`http-01`, `tls-alpn-01`).
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// Let's Encrypt's production directory, the default `acme.directory_url`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[scheduler]`, validated.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub reconcile_interval: Duration,
    pub deploy_timeout: Duration,
    /// How long an instance must fail its health checks before it is replaced (it leaves the
    /// routing table at once); one instance of a process at a time, and never the last one
    /// of its process that still accepts connections.
    pub unhealthy_replace_after: Duration,
    /// How long a node may fail to answer before it is down and its instances are replaced
    /// elsewhere; until then it is suspect (a blip): its instances are kept as last seen and
    /// nothing new is placed on it.
    pub node_down_after: Duration,
    /// Place instances whatever memory and CPUs escale already gave out on a node (an
    /// instance larger than a whole node is still refused); off: a node takes an instance only
    /// while its capacity minus the declared resources of what runs there covers it.
    pub overcommit: bool,
    pub drain_grace: Duration,
    pub stop_timeout: Duration,
    pub default_port: u16,
    pub log_max_size: String,
    pub log_max_files: u32,
    /// Built images of an app's last `keep_releases` releases are kept on every node; older
    /// ones are removed after each successful deploy by `git push` or webhook, and every
    /// `upkeep.prune_interval` ([`crate::service::upkeep`]).
    pub keep_releases: u32,
}

/// `[proxy]`, validated.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_timeout: Duration,
    /// Fraction of requests written to the access log, 0.0 (off) to 1.0 (all).
    pub access_log_sample: f64,
    /// Proxy worker threads, each with its own single-threaded runtime (`0` in the file:
    /// one per available core, resolved here).
    pub workers: usize,
    /// Open client connections of the proxy, all listeners together (`0`: a third of the
    /// descriptor limit, resolved at start).
    pub max_connections: usize,
    /// Open proxy connections per client address (IPv6: per /64); `0`: no cap.
    pub max_connections_per_client: usize,
}

/// `(key in the file, environment variable)` for every setting.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("data_dir", "ESCALE_DATA_DIR"),
    ("api_addr", "ESCALE_API_ADDR"),
    ("api_max_connections", "ESCALE_API_MAX_CONNECTIONS"),
    (
        "api_max_connections_per_client",
        "ESCALE_API_MAX_CONNECTIONS_PER_CLIENT",
    ),
    ("login_max_failures", "ESCALE_LOGIN_MAX_FAILURES"),
    ("login_lockout", "ESCALE_LOGIN_LOCKOUT"),
    ("http_addr", "ESCALE_HTTP_ADDR"),
    ("https_addr", "ESCALE_HTTPS_ADDR"),
    ("apps_domain", "ESCALE_APPS_DOMAIN"),
    ("docker_host", "ESCALE_DOCKER_HOST"),
    ("advertise_ip", "ESCALE_ADVERTISE_IP"),
    ("local_reach", "ESCALE_LOCAL_REACH"),
    ("installation_id", "ESCALE_INSTALLATION_ID"),
    ("max_instances", "ESCALE_MAX_INSTANCES"),
    ("log_format", "ESCALE_LOG_FORMAT"),
    ("log_level", "ESCALE_LOG_LEVEL"),
    (
        "scheduler.reconcile_interval",
        "ESCALE_SCHEDULER_RECONCILE_INTERVAL",
    ),
    (
        "scheduler.deploy_timeout",
        "ESCALE_SCHEDULER_DEPLOY_TIMEOUT",
    ),
    (
        "scheduler.unhealthy_replace_after",
        "ESCALE_SCHEDULER_UNHEALTHY_REPLACE_AFTER",
    ),
    (
        "scheduler.node_down_after",
        "ESCALE_SCHEDULER_NODE_DOWN_AFTER",
    ),
    ("scheduler.overcommit", "ESCALE_SCHEDULER_OVERCOMMIT"),
    ("scheduler.drain_grace", "ESCALE_SCHEDULER_DRAIN_GRACE"),
    ("scheduler.stop_timeout", "ESCALE_SCHEDULER_STOP_TIMEOUT"),
    ("scheduler.default_port", "ESCALE_SCHEDULER_DEFAULT_PORT"),
    ("scheduler.log_max_size", "ESCALE_SCHEDULER_LOG_MAX_SIZE"),
    ("scheduler.log_max_files", "ESCALE_SCHEDULER_LOG_MAX_FILES"),
    ("scheduler.keep_releases", "ESCALE_SCHEDULER_KEEP_RELEASES"),
    ("proxy.max_body_size", "ESCALE_PROXY_MAX_BODY_SIZE"),
    ("proxy.max_header_size", "ESCALE_PROXY_MAX_HEADER_SIZE"),
    (
        "proxy.header_read_timeout",
        "ESCALE_PROXY_HEADER_READ_TIMEOUT",
    ),
    ("proxy.idle_timeout", "ESCALE_PROXY_IDLE_TIMEOUT"),
    ("proxy.upstream_timeout", "ESCALE_PROXY_UPSTREAM_TIMEOUT"),
    ("proxy.access_log", "ESCALE_PROXY_ACCESS_LOG"),
    ("proxy.workers", "ESCALE_PROXY_WORKERS"),
    ("proxy.max_connections", "ESCALE_PROXY_MAX_CONNECTIONS"),
    (
        "proxy.max_connections_per_client",
        "ESCALE_PROXY_MAX_CONNECTIONS_PER_CLIENT",
    ),
    ("acme.directory_url", "ESCALE_ACME_DIRECTORY_URL"),
    ("acme.email", "ESCALE_ACME_EMAIL"),
    ("acme.renew_before", "ESCALE_ACME_RENEW_BEFORE"),
    ("acme.ca_root", "ESCALE_ACME_CA_ROOT"),
    ("acme.challenge", "ESCALE_ACME_CHALLENGE"),
    (
        "webhooks.allow_private_repositories",
        "ESCALE_WEBHOOKS_ALLOW_PRIVATE_REPOSITORIES",
    ),
    (
        "webhooks.allow_file_repositories",
        "ESCALE_WEBHOOKS_ALLOW_FILE_REPOSITORIES",
    ),
    ("git.deploy_branch", "ESCALE_GIT_DEPLOY_BRANCH"),
    ("git.dockerfile", "ESCALE_GIT_DOCKERFILE"),
    ("git.max_context_size", "ESCALE_GIT_MAX_CONTEXT_SIZE"),
    ("backup.interval", "ESCALE_BACKUP_INTERVAL"),
    ("backup.keep", "ESCALE_BACKUP_KEEP"),
    ("backup.dir", "ESCALE_BACKUP_DIR"),
    ("backup.s3.endpoint", "ESCALE_BACKUP_S3_ENDPOINT"),
    ("backup.s3.region", "ESCALE_BACKUP_S3_REGION"),
    ("backup.s3.bucket", "ESCALE_BACKUP_S3_BUCKET"),
    ("backup.s3.prefix", "ESCALE_BACKUP_S3_PREFIX"),
    ("backup.s3.access_key_id", "ESCALE_BACKUP_S3_ACCESS_KEY_ID"),
    (
        "backup.s3.secret_access_key",
        "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY",
    ),
    (
        "backup.s3.secret_access_key_file",
        "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY_FILE",
    ),
    ("backup.s3.ca_file", "ESCALE_BACKUP_S3_CA_FILE"),
    ("upkeep.usage_interval", "ESCALE_UPKEEP_USAGE_INTERVAL"),
    ("upkeep.disk_interval", "ESCALE_UPKEEP_DISK_INTERVAL"),
    ("upkeep.prune_interval", "ESCALE_UPKEEP_PRUNE_INTERVAL"),
    (
        "upkeep.disk_warn_percent",
        "ESCALE_UPKEEP_DISK_WARN_PERCENT",
    ),
    (
        "upkeep.disk_refuse_builds_percent",
        "ESCALE_UPKEEP_DISK_REFUSE_BUILDS_PERCENT",
    ),
];

/// Where `escale serve` looks for a config file when `--config` is not given.
pub const DEFAULT_PATHS: &[&str] = &["config/escale.toml", "/etc/escale/escale.toml"];

impl Config {
    /// Reads `path` (or the first of [`DEFAULT_PATHS`] that exists, or nothing), applies the
    /// process environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = match path {
            Some(p) => RawConfig::from_file(p)?,
            None => match DEFAULT_PATHS.iter().map(Path::new).find(|p| p.is_file()) {
                Some(p) => RawConfig::from_file(p)?,
                None => RawConfig::default(),
            },
        };
        Config::from_raw(raw, &|k| std::env::var(k).ok())
    }

    /// Defaults only, with `data_dir` set: what tests start from.
    pub fn for_data_dir(data_dir: &Path) -> Config {
        let mut c = Config::from_raw(RawConfig::default(), &|_| None).expect("defaults are valid");
        c.data_dir = data_dir.to_path_buf();
        c
    }

    /// Applies environment overrides (looked up through `env`) and defaults, and validates.
    pub fn from_raw(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let s = Settings { env };
        let sc = &raw.scheduler;
        let px = &raw.proxy;
        let ac = &raw.acme;
        let directory_url = match s
            .get("acme.directory_url", ac.directory_url.clone())
            .unwrap_or_else(|| LETS_ENCRYPT.into())
        {
            v if v == "off" => None,
            v if v.starts_with("https://") || v.starts_with("http://") => Some(v),
            v => {
                return Err(invalid(
                    "acme.directory_url",
                    format!("`{v}`: write an https:// URL or `off`"),
                ))
            }
        };
        let email = s
            .get("acme.email", ac.email.clone())
            .filter(|e| !e.is_empty());
        if let Some(e) = &email {
            if !e.contains('@') || e.contains(char::is_whitespace) {
                return Err(invalid(
                    "acme.email",
                    format!("`{e}` is not an email address"),
                ));
            }
        }
        let challenge = match s
            .get("acme.challenge", ac.challenge.clone())
            .as_deref()
            .map(str::trim)
            .unwrap_or("http-01")
        {
            "http-01" => AcmeChallenge::Http01,
            "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
            other => {
                return Err(invalid(
                    "acme.challenge",
                    format!("`{other}`: use `http-01` or `tls-alpn-01`"),
                ))
            }
        };
        let docker_host = s
            .get("docker_host", raw.docker_host.clone())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let local_reach = match s.get("local_reach", raw.local_reach.clone()) {
            Some(v) => v
                .trim()
                .parse::<crate::node::Reach>()
                .map_err(|e| invalid("local_reach", e))?,
            None if docker_host.starts_with("tcp://") || docker_host.starts_with("http://") => {
                crate::node::Reach::Published
            }
            None => crate::node::Reach::Bridge,
        };
        let log_format = match s
            .get("log_format", raw.log_format.clone())
            .as_deref()
            .unwrap_or("human")
        {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("`{other}`: use `human` or `json`"),
                ))
            }
        };
        let max_instances = s.parse_num("max_instances", raw.max_instances, 100u32)?;
        if max_instances == 0 || max_instances > 10_000 {
            return Err(invalid(
                "max_instances",
                "must be between 1 and 10000".into(),
            ));
        }
        let apps_domain = s
            .get("apps_domain", raw.apps_domain.clone())
            .unwrap_or_else(|| "localhost".into())
            .to_ascii_lowercase();
        crate::validate::domain(&apps_domain).map_err(|e| invalid("apps_domain", e.to_string()))?;
        let access_log = s
            .get("proxy.access_log", px.access_log.clone())
            .unwrap_or_else(|| "off".into());
        let access_log_sample = match access_log.as_str() {
            "off" => 0.0,
            "on" | "all" => 1.0,
            v => match v.parse::<f64>() {
                Ok(f) if (0.0..=1.0).contains(&f) => f,
                _ => {
                    return Err(invalid(
                        "proxy.access_log",
                        format!("`{v}`: use `off`, `on`, or a sample rate between 0.0 and 1.0"),
                    ))
                }
            },
        };
        let backup = BackupSettings {
            interval: match s
                .get("backup.interval", raw.backup.interval.clone())
                .as_deref()
                .map(str::trim)
            {
                None | Some("off") | Some("") => None,
                Some(v) => {
                    let d = humantime::parse_duration(v).map_err(|e| {
                        invalid(
                            "backup.interval",
                            format!("`{v}`: {e}; write a duration such as `24h`, or `off`"),
                        )
                    })?;
                    if d < Duration::from_secs(60) {
                        return Err(invalid(
                            "backup.interval",
                            format!("`{v}`: back up at most once a minute"),
                        ));
                    }
                    Some(d)
                }
            },
            keep: s.parse_num("backup.keep", raw.backup.keep, 7u32)?,
            dir: s
                .get("backup.dir", raw.backup.dir.clone())
                .filter(|d| !d.trim().is_empty())
                .map(PathBuf::from),
            s3: s3_settings(&s, &raw.backup.s3)?,
        };
        let config = Config {
            backup,
            data_dir: PathBuf::from(
                s.get("data_dir", raw.data_dir.clone())
                    .unwrap_or_else(|| "./data".into()),
            ),
            api_addr: s
                .addr("api_addr", raw.api_addr.clone(), "127.0.0.1:7300")?
                .ok_or_else(|| invalid("api_addr", "the API cannot be turned off".into()))?,
            api_max_connections: s.parse_num(
                "api_max_connections",
                raw.api_max_connections,
                0u32,
            )? as usize,
            api_max_connections_per_client: s.parse_num(
                "api_max_connections_per_client",
                raw.api_max_connections_per_client,
                64u32,
            )? as usize,
            login_max_failures: {
                let n = s.parse_num("login_max_failures", raw.login_max_failures, 5u32)?;
                if n == 0 {
                    return Err(invalid(
                        "login_max_failures",
                        "`0` would refuse every login: give at least 1".into(),
                    ));
                }
                n
            },
            login_lockout: s.duration("login_lockout", raw.login_lockout.clone(), "5m")?,
            http_addr: s.addr("http_addr", raw.http_addr.clone(), "0.0.0.0:80")?,
            https_addr: s.addr("https_addr", raw.https_addr.clone(), "0.0.0.0:443")?,
            apps_domain,
            docker_host,
            local_reach,
            advertise_ip: s
                .get("advertise_ip", raw.advertise_ip.clone())
                .unwrap_or_else(|| "127.0.0.1".into())
                .parse()
                .map_err(|_| invalid("advertise_ip", "expected an IP address".into()))?,
            installation_id: match s.get("installation_id", raw.installation_id.clone()) {
                None => None,
                Some(id) => {
                    let ok = !id.is_empty()
                        && id.len() <= 32
                        && id
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                    if !ok {
                        return Err(invalid(
                            "installation_id",
                            format!("`{id}`: use 1 to 32 lowercase letters, digits or `-`"),
                        ));
                    }
                    Some(id)
                }
            },
            max_instances,
            log_format,
            log_level: s
                .get("log_level", raw.log_level.clone())
                .unwrap_or_else(|| "info".into()),
            scheduler: SchedulerConfig {
                reconcile_interval: s.duration(
                    "scheduler.reconcile_interval",
                    sc.reconcile_interval.clone(),
                    "2s",
                )?,
                deploy_timeout: s.duration(
                    "scheduler.deploy_timeout",
                    sc.deploy_timeout.clone(),
                    "120s",
                )?,
                unhealthy_replace_after: s.duration(
                    "scheduler.unhealthy_replace_after",
                    sc.unhealthy_replace_after.clone(),
                    "60s",
                )?,
                node_down_after: s.duration(
                    "scheduler.node_down_after",
                    sc.node_down_after.clone(),
                    "10s",
                )?,
                overcommit: s.flag("scheduler.overcommit", sc.overcommit)?,
                drain_grace: s.duration("scheduler.drain_grace", sc.drain_grace.clone(), "1s")?,
                stop_timeout: s.duration(
                    "scheduler.stop_timeout",
                    sc.stop_timeout.clone(),
                    "10s",
                )?,
                default_port: s.parse_num("scheduler.default_port", sc.default_port, 8080u16)?,
                log_max_size: {
                    let v = s
                        .get("scheduler.log_max_size", sc.log_max_size.clone())
                        .unwrap_or_else(|| "10m".into());
                    crate::validate::memory(&v)
                        .map_err(|e| invalid("scheduler.log_max_size", e.to_string()))?;
                    v
                },
                log_max_files: s.parse_num("scheduler.log_max_files", sc.log_max_files, 3u32)?,
                keep_releases: {
                    let n = s.parse_num("scheduler.keep_releases", sc.keep_releases, 5u32)?;
                    if n == 0 || n > 1000 {
                        return Err(invalid(
                            "scheduler.keep_releases",
                            format!("`{n}`: keep between 1 and 1000 releases' images"),
                        ));
                    }
                    n
                },
            },
            proxy: ProxySettings {
                max_body_bytes: s.size("proxy.max_body_size", px.max_body_size.clone(), "100m")?,
                max_header_bytes: s.size(
                    "proxy.max_header_size",
                    px.max_header_size.clone(),
                    "64k",
                )? as usize,
                header_read_timeout: s.duration(
                    "proxy.header_read_timeout",
                    px.header_read_timeout.clone(),
                    "10s",
                )?,
                idle_timeout: s.duration("proxy.idle_timeout", px.idle_timeout.clone(), "60s")?,
                upstream_timeout: s.duration(
                    "proxy.upstream_timeout",
                    px.upstream_timeout.clone(),
                    "60s",
                )?,
                access_log_sample,
                workers: match s.parse_num("proxy.workers", px.workers, 0u32)? {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n if n <= 256 => n as usize,
                    n => {
                        return Err(invalid(
                            "proxy.workers",
                            format!("`{n}`: use 0 (one per core) or 1 to 256 threads"),
                        ))
                    }
                },
                max_connections: s.parse_num("proxy.max_connections", px.max_connections, 0u32)?
                    as usize,
                max_connections_per_client: s.parse_num(
                    "proxy.max_connections_per_client",
                    px.max_connections_per_client,
                    1000u32,
                )? as usize,
            },
            acme: AcmeConfig {
                directory_url,
                email,
                renew_before: s.duration("acme.renew_before", ac.renew_before.clone(), "30days")?,
                ca_root: s
                    .get("acme.ca_root", ac.ca_root.clone())
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from),
                challenge,
            },
            webhooks: WebhooksConfig {
                allow_private_repositories: s.flag(
                    "webhooks.allow_private_repositories",
                    raw.webhooks.allow_private_repositories,
                )?,
                allow_file_repositories: s.flag(
                    "webhooks.allow_file_repositories",
                    raw.webhooks.allow_file_repositories,
                )?,
            },
            git: GitSettings {
                deploy_branch: {
                    let b = s
                        .get("git.deploy_branch", raw.git.deploy_branch.clone())
                        .unwrap_or_else(|| "main".into());
                    if !crate::validate::git_ref(&format!("refs/heads/{b}")) {
                        return Err(invalid(
                            "git.deploy_branch",
                            format!("`{b}` is not a branch name: use letters, digits, `.`, `_`, `-` and `/`"),
                        ));
                    }
                    b
                },
                dockerfile: {
                    let d = s
                        .get("git.dockerfile", raw.git.dockerfile.clone())
                        .unwrap_or_else(|| "Dockerfile".into());
                    let ok = !d.is_empty()
                        && d.len() <= 255
                        && !d.starts_with(['/', '-', '.'])
                        && d.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                        && d.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
                    if !ok {
                        return Err(invalid(
                            "git.dockerfile",
                            format!("`{d}` is not a path inside the repository, e.g. `Dockerfile` or `deploy/Dockerfile`"),
                        ));
                    }
                    d
                },
                max_context_size: {
                    let n = s.size(
                        "git.max_context_size",
                        raw.git.max_context_size.clone(),
                        "256m",
                    )?;
                    if !(1 << 10..=64 << 30).contains(&n) {
                        return Err(invalid(
                            "git.max_context_size",
                            format!("`{n}` bytes: give a size between 1k and 64g, e.g. `256m`"),
                        ));
                    }
                    n
                },
            },
            upkeep: {
                let u = &raw.upkeep;
                let positive = |key: &'static str, d: Duration| {
                    if d.is_zero() {
                        Err(invalid(
                            key,
                            "must be longer than 0s, e.g. `30s`".to_string(),
                        ))
                    } else {
                        Ok(d)
                    }
                };
                let warn = s.parse_num("upkeep.disk_warn_percent", u.disk_warn_percent, 80u8)?;
                let refuse = s.parse_num(
                    "upkeep.disk_refuse_builds_percent",
                    u.disk_refuse_builds_percent,
                    95u8,
                )?;
                if !(1..=100).contains(&warn) {
                    return Err(invalid(
                        "upkeep.disk_warn_percent",
                        format!("`{warn}`: give a percentage between 1 and 100"),
                    ));
                }
                if !(warn..=100).contains(&refuse) {
                    return Err(invalid(
                        "upkeep.disk_refuse_builds_percent",
                        format!(
                            "`{refuse}`: give a percentage between upkeep.disk_warn_percent ({warn}) and 100"
                        ),
                    ));
                }
                UpkeepConfig {
                    usage_interval: positive(
                        "upkeep.usage_interval",
                        s.duration("upkeep.usage_interval", u.usage_interval.clone(), "30s")?,
                    )?,
                    disk_interval: positive(
                        "upkeep.disk_interval",
                        s.duration("upkeep.disk_interval", u.disk_interval.clone(), "5m")?,
                    )?,
                    prune_interval: positive(
                        "upkeep.prune_interval",
                        s.duration("upkeep.prune_interval", u.prune_interval.clone(), "1h")?,
                    )?,
                    disk_warn_percent: warn,
                    disk_refuse_builds_percent: refuse,
                }
            },
        };
        if config.acme.directory_url.is_some()
            && config.acme.challenge == AcmeChallenge::TlsAlpn01
            && config.https_addr.is_none()
        {
            return Err(invalid(
                "acme.challenge",
                "`tls-alpn-01` is answered by the HTTPS listener, but `https_addr` is `off`: \
                 turn it on, use `http-01`, or set `acme.directory_url = \"off\"`"
                    .into(),
            ));
        }
        Ok(config)
    }

    /// The registry database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("escale.db")
    }
}

impl RawConfig {
    /// Parses a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// `[backup.s3]`: `None` when no endpoint is set (and no other key of the table either).
fn s3_settings(s: &Settings<'_>, raw: &RawBackupS3) -> Result<Option<S3Settings>, ConfigError> {
    let get = |key: &'static str, file: &Option<String>| {
        s.get(key, file.clone())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let endpoint = get("backup.s3.endpoint", &raw.endpoint);
    let region = get("backup.s3.region", &raw.region);
    let bucket = get("backup.s3.bucket", &raw.bucket);
    let prefix = get("backup.s3.prefix", &raw.prefix);
    let access_key_id = get("backup.s3.access_key_id", &raw.access_key_id);
    let secret = get("backup.s3.secret_access_key", &raw.secret_access_key);
    let secret_file = get(
        "backup.s3.secret_access_key_file",
        &raw.secret_access_key_file,
    );
    let ca_file = get("backup.s3.ca_file", &raw.ca_file);
    let Some(endpoint) = endpoint else {
        let set = [
            &region,
            &bucket,
            &prefix,
            &access_key_id,
            &secret,
            &secret_file,
            &ca_file,
        ]
        .iter()
        .any(|v| v.is_some());
        if set {
            return Err(invalid(
                "backup.s3.endpoint",
                "missing: the other backup.s3 keys are set; give the store's URL, e.g. \
                 `https://s3.fr-par.scw.cloud`, or remove [backup.s3]"
                    .into(),
            ));
        }
        return Ok(None);
    };
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let parsed: http::Uri = endpoint.parse().map_err(|e| {
        invalid(
            "backup.s3.endpoint",
            format!("`{endpoint}` is not a URL ({e}); write e.g. `https://s3.fr-par.scw.cloud`"),
        )
    })?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    let plain = parsed.path_and_query().is_none_or(|p| p.as_str() == "/");
    if !scheme_ok || parsed.host().is_none_or(str::is_empty) || !plain || endpoint.contains('@') {
        return Err(invalid(
            "backup.s3.endpoint",
            format!(
                "`{endpoint}`: write the store's https:// (or http://) URL with a host and an \
                 optional port, no path (the bucket is addressed path-style), e.g. \
                 `https://s3.gra.io.cloud.ovh.net`"
            ),
        ));
    }
    let region = region.ok_or_else(|| {
        invalid(
            "backup.s3.region",
            "missing: the region requests are signed for, e.g. `fr-par` (Scaleway), `gra` \
             (OVH), `fsn1` (Hetzner), `ch-gva-2` (Exoscale), `us-east-1` (MinIO)"
                .into(),
        )
    })?;
    if region.len() > 64
        || !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            "backup.s3.region",
            format!("`{region}`: use letters, digits, `-` and `_`, e.g. `fr-par`"),
        ));
    }
    let bucket = bucket.ok_or_else(|| {
        invalid(
            "backup.s3.bucket",
            "missing: the bucket backups are uploaded to (create it first)".into(),
        )
    })?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !bucket.contains("..");
    if !bucket_ok {
        return Err(invalid(
            "backup.s3.bucket",
            format!(
                "`{bucket}` is not a bucket name: 3 to 63 lowercase letters, digits, `-` and \
                 `.`, starting and ending with a letter or digit"
            ),
        ));
    }
    let prefix = prefix.unwrap_or_default();
    let trimmed = prefix.trim_matches('/');
    let prefix_ok = trimmed.len() <= 512
        && trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && trimmed.split('/').all(|c| c != "." && c != "..")
        && !trimmed.contains("//");
    if !prefix_ok {
        return Err(invalid(
            "backup.s3.prefix",
            format!(
                "`{prefix}`: use letters, digits, `-`, `_`, `.` and `/` between parts, e.g. \
                 `escale/prod`"
            ),
        ));
    }
    let prefix = if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    };
    let access_key_id = access_key_id.ok_or_else(|| {
        invalid(
            "backup.s3.access_key_id",
            "missing: the access key id of a key allowed to read, write, list and delete in the bucket"
                .into(),
        )
    })?;
    let secret_access_key =
        match (secret, secret_file) {
            (Some(_), Some(_)) => return Err(invalid(
                "backup.s3.secret_access_key_file",
                "set either backup.s3.secret_access_key (ESCALE_BACKUP_S3_SECRET_ACCESS_KEY) or \
                 backup.s3.secret_access_key_file, not both"
                    .into(),
            )),
            (Some(v), None) => v,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "backup.s3.secret_access_key_file",
                        format!("cannot read `{path}`: {e}"),
                    )
                })?;
                let v = text.trim().to_string();
                if v.is_empty() {
                    return Err(invalid(
                        "backup.s3.secret_access_key_file",
                        format!("`{path}` is empty: write the secret access key in it"),
                    ));
                }
                v
            }
            (None, None) => {
                return Err(invalid(
                    "backup.s3.secret_access_key",
                    "missing: set ESCALE_BACKUP_S3_SECRET_ACCESS_KEY in escale's environment, or \
                 backup.s3.secret_access_key_file to a file holding it (0600)"
                        .into(),
                ))
            }
        };
    let ca_file = match ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| invalid("backup.s3.ca_file", format!("cannot read `{path}`: {e}")))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("backup.s3.ca_file", format!("`{path}`: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(
                    "backup.s3.ca_file",
                    format!("`{path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                ));
            }
            Some(PathBuf::from(path))
        }
    };
    Ok(Some(S3Settings {
        endpoint,
        region,
        bucket,
        prefix,
        access_key_id,
        secret_access_key: SecretString(secret_access_key),
        ca_file,
    }))
}

fn env_name(key: &'static str) -> &'static str {
    ENV_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, e)| *e)
        .expect("every key is listed in ENV_KEYS")
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key,
        env: env_name(key),
        message,
    }
}

struct Settings<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Settings<'_> {
    fn get(&self, key: &'static str, file: Option<String>) -> Option<String> {
        (self.env)(env_name(key)).or(file)
    }

    fn parse_num<T: std::str::FromStr + ToString>(
        &self,
        key: &'static str,
        file: Option<T>,
        default: T,
    ) -> Result<T, ConfigError> {
        match (self.env)(env_name(key)) {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| invalid(key, format!("`{v}` is not a valid number"))),
            None => Ok(file.unwrap_or(default)),
        }
    }

    /// A boolean, `false` by default; the environment takes `true`/`false`/`1`/`0`.
    fn flag(&self, key: &'static str, file: Option<bool>) -> Result<bool, ConfigError> {
        match (self.env)(env_name(key)) {
            Some(v) => match v.trim() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(invalid(key, format!("`{v}`: write `true` or `false`"))),
            },
            None => Ok(file.unwrap_or(false)),
        }
    }

    fn duration(
        &self,
        key: &'static str,
        file: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let v = self.get(key, file).unwrap_or_else(|| default.into());
        humantime::parse_duration(v.trim()).map_err(|e| {
            invalid(
                key,
                format!("`{v}` is not a duration ({e}); write e.g. `500ms`, `10s`, `2m`"),
            )
        })
    }

    fn size(
        &self,
        key: &'static str,
        file: Option<String>,
        default: &str,
    ) -> Result<u64, ConfigError> {
        let v = self.get(key, file).unwrap_or_else(|| default.into());
        crate::validate::memory(&v).map_err(|e| invalid(key, e.to_string()))
    }

    fn addr(
        &self,
        key: &'static str,
        file: Option<String>,
        default: &str,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let v = self.get(key, file).unwrap_or_else(|| default.into());
        if v == "off" {
            return Ok(None);
        }
        v.parse().map(Some).map_err(|_| {
            invalid(
                key,
                format!("`{v}` is not an address; write e.g. `0.0.0.0:80`, `[::]:443` or `off`"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_raw(RawConfig::default(), &move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_work_on_one_machine() {
        let c = with_env(&[]).unwrap();
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:7300");
        assert_eq!(c.http_addr.unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(c.docker_host, "unix:///var/run/docker.sock");
        assert_eq!(c.max_instances, 100);
        assert_eq!(c.apps_domain, "localhost");
    }

    #[test]
    fn env_overrides_file() {
        let raw: RawConfig =
            toml::from_str("apps_domain = \"a.example\"\n[scheduler]\ndeploy_timeout = \"30s\"")
                .unwrap();
        let c = Config::from_raw(raw, &|k| {
            (k == "ESCALE_APPS_DOMAIN").then(|| "b.example".to_string())
        })
        .unwrap();
        assert_eq!(c.apps_domain, "b.example");
        assert_eq!(c.scheduler.deploy_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_setting_names_key_and_env() {
        let e = with_env(&[("ESCALE_API_ADDR", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api_addr") && e.contains("ESCALE_API_ADDR") && e.contains("nowhere"),
            "{e}"
        );
        let e = with_env(&[("ESCALE_SCHEDULER_DEPLOY_TIMEOUT", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheduler.deploy_timeout"), "{e}");
        let e = with_env(&[("ESCALE_APPS_DOMAIN", "bad domain")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps_domain"), "{e}");
        for (env, bad) in [
            ("ESCALE_GIT_DEPLOY_BRANCH", "-x"),
            ("ESCALE_GIT_DEPLOY_BRANCH", "a..b"),
            ("ESCALE_GIT_DOCKERFILE", "../Dockerfile"),
            ("ESCALE_GIT_DOCKERFILE", "/etc/passwd"),
            ("ESCALE_GIT_DOCKERFILE", "a b"),
            ("ESCALE_GIT_MAX_CONTEXT_SIZE", "lots"),
            ("ESCALE_GIT_MAX_CONTEXT_SIZE", "10"),
            ("ESCALE_GIT_MAX_CONTEXT_SIZE", "100g"),
        ] {
            let e = with_env(&[(env, bad)]).unwrap_err().to_string();
            assert!(e.contains(env), "{env}={bad}: {e}");
        }
        assert_eq!(
            with_env(&[("ESCALE_GIT_MAX_CONTEXT_SIZE", "64m")])
                .unwrap()
                .git
                .max_context_size,
            64 << 20
        );
        assert_eq!(with_env(&[]).unwrap().git.max_context_size, 256 << 20);
        let e = with_env(&[("ESCALE_MAX_INSTANCES", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_instances"), "{e}");
    }

    #[test]
    fn local_reach_defaults_to_the_bridge_for_a_socket_and_is_checked() {
        use crate::node::Reach;
        assert_eq!(with_env(&[]).unwrap().local_reach, Reach::Bridge);
        let tcp = with_env(&[("ESCALE_DOCKER_HOST", "tcp://10.0.0.2:2375")]).unwrap();
        assert_eq!(tcp.local_reach, Reach::Published);
        let set = with_env(&[("ESCALE_LOCAL_REACH", "published")]).unwrap();
        assert_eq!(set.local_reach, Reach::Published);
        let e = with_env(&[("ESCALE_LOCAL_REACH", "nat")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("local_reach") && e.contains("`bridge`"), "{e}");
    }

    #[test]
    fn proxy_listeners_can_be_turned_off() {
        let c = with_env(&[("ESCALE_HTTP_ADDR", "off"), ("ESCALE_HTTPS_ADDR", "off")]).unwrap();
        assert!(c.http_addr.is_none() && c.https_addr.is_none());
    }

    #[test]
    fn acme_defaults_and_off() {
        let c = with_env(&[]).unwrap();
        assert_eq!(c.acme.directory_url.as_deref(), Some(LETS_ENCRYPT));
        assert_eq!(c.acme.renew_before, Duration::from_secs(30 * 86400));
        let c = with_env(&[
            ("ESCALE_ACME_DIRECTORY_URL", "off"),
            ("ESCALE_ACME_RENEW_BEFORE", "10d"),
        ])
        .unwrap();
        assert!(c.acme.directory_url.is_none());
        assert_eq!(c.acme.renew_before, Duration::from_secs(10 * 86400));
        let e = with_env(&[("ESCALE_ACME_EMAIL", "nobody")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("acme.email"), "{e}");
    }

    #[test]
    fn acme_challenge_is_http01_by_default_and_checked() {
        assert_eq!(with_env(&[]).unwrap().acme.challenge, AcmeChallenge::Http01);
        let c = with_env(&[("ESCALE_ACME_CHALLENGE", "tls-alpn-01")]).unwrap();
        assert_eq!(c.acme.challenge, AcmeChallenge::TlsAlpn01);
        let raw: RawConfig = toml::from_str("[acme]\nchallenge = \"tls-alpn-01\"").unwrap();
        let c = Config::from_raw(raw, &|_| None).unwrap();
        assert_eq!(c.acme.challenge, AcmeChallenge::TlsAlpn01);

        let e = with_env(&[("ESCALE_ACME_CHALLENGE", "dns-01")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("acme.challenge")
                && e.contains("ESCALE_ACME_CHALLENGE")
                && e.contains("dns-01")
                && e.contains("`http-01` or `tls-alpn-01`"),
            "{e}"
        );
        // TLS-ALPN-01 needs the HTTPS listener, unless ACME is off.
        let e = with_env(&[
            ("ESCALE_ACME_CHALLENGE", "tls-alpn-01"),
            ("ESCALE_HTTPS_ADDR", "off"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("acme.challenge") && e.contains("https_addr"),
            "{e}"
        );
        with_env(&[
            ("ESCALE_ACME_CHALLENGE", "tls-alpn-01"),
            ("ESCALE_HTTPS_ADDR", "off"),
            ("ESCALE_ACME_DIRECTORY_URL", "off"),
        ])
        .unwrap();
    }

    #[test]
    fn unknown_keys_in_file_are_rejected() {
        let e = toml::from_str::<RawConfig>("datadir = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("datadir"), "{e}");
    }

    #[test]
    fn proxy_workers_default_to_one_per_core_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(with_env(&[]).unwrap().proxy.workers, cores);
        assert_eq!(
            with_env(&[("ESCALE_PROXY_WORKERS", "0")])
                .unwrap()
                .proxy
                .workers,
            cores
        );
        assert_eq!(
            with_env(&[("ESCALE_PROXY_WORKERS", "3")])
                .unwrap()
                .proxy
                .workers,
            3
        );
        for bad in ["257", "-1", "many"] {
            let e = with_env(&[("ESCALE_PROXY_WORKERS", bad)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("proxy.workers"), "{bad}: {e}");
        }
    }

    #[test]
    fn login_lockout_settings_are_checked() {
        let c = with_env(&[
            ("ESCALE_LOGIN_MAX_FAILURES", "20"),
            ("ESCALE_LOGIN_LOCKOUT", "1m"),
        ])
        .unwrap();
        assert_eq!(c.login_max_failures, 20);
        assert_eq!(c.login_lockout, Duration::from_secs(60));
        let d = with_env(&[]).unwrap();
        assert_eq!((d.login_max_failures, d.login_lockout.as_secs()), (5, 300));
        for (key, bad) in [
            ("ESCALE_LOGIN_MAX_FAILURES", "0"),
            ("ESCALE_LOGIN_MAX_FAILURES", "many"),
            ("ESCALE_LOGIN_LOCKOUT", "soon"),
        ] {
            let e = with_env(&[(key, bad)]).unwrap_err().to_string();
            assert!(e.contains("login_"), "{key}={bad}: {e}");
        }
    }

    #[test]
    fn backup_s3_settings_are_checked_and_the_secret_stays_out_of_debug() {
        assert!(with_env(&[]).unwrap().backup.s3.is_none(), "off by default");
        let base = [
            ("ESCALE_BACKUP_S3_ENDPOINT", "https://s3.fr-par.scw.cloud/"),
            ("ESCALE_BACKUP_S3_REGION", "fr-par"),
            ("ESCALE_BACKUP_S3_BUCKET", "escale-backups"),
            ("ESCALE_BACKUP_S3_PREFIX", "/prod/eu/"),
            ("ESCALE_BACKUP_S3_ACCESS_KEY_ID", "SCWEXAMPLE"),
            ("ESCALE_BACKUP_S3_SECRET_ACCESS_KEY", "very-secret-value"),
        ];
        let s3 = with_env(&base).unwrap().backup.s3.expect("on");
        assert_eq!(s3.endpoint, "https://s3.fr-par.scw.cloud");
        assert_eq!(s3.prefix, "prod/eu/");
        assert_eq!(s3.location(), "s3://escale-backups/prod/eu/");
        assert_eq!(s3.secret_access_key.0, "very-secret-value");
        assert!(!format!("{s3:?}").contains("very-secret-value"));

        let with = |k: &str, v: &str| {
            let mut vars: Vec<(&str, &str)> =
                base.iter().filter(|(n, _)| *n != k).copied().collect();
            if !v.is_empty() {
                vars.push((k, v));
            }
            with_env(&vars)
                .map(|c| c.backup.s3)
                .map_err(|e| e.to_string())
        };
        for (k, v, says) in [
            ("ESCALE_BACKUP_S3_ENDPOINT", "ftp://x", "backup.s3.endpoint"),
            (
                "ESCALE_BACKUP_S3_ENDPOINT",
                "https://s3.example/bucket",
                "no path",
            ),
            ("ESCALE_BACKUP_S3_REGION", "", "backup.s3.region"),
            ("ESCALE_BACKUP_S3_BUCKET", "Bad_Bucket", "not a bucket name"),
            ("ESCALE_BACKUP_S3_BUCKET", "", "backup.s3.bucket"),
            ("ESCALE_BACKUP_S3_PREFIX", "a/../b", "backup.s3.prefix"),
            (
                "ESCALE_BACKUP_S3_ACCESS_KEY_ID",
                "",
                "backup.s3.access_key_id",
            ),
            (
                "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY",
                "",
                "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY",
            ),
            (
                "ESCALE_BACKUP_S3_CA_FILE",
                "/nonexistent/ca.pem",
                "backup.s3.ca_file",
            ),
        ] {
            let e = with(k, v).unwrap_err();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
        // Another key without an endpoint is a mistake, named.
        let e = with_env(&[("ESCALE_BACKUP_S3_BUCKET", "b-1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("backup.s3.endpoint"), "{e}");

        // The secret from a file; not from both places.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let path = f.to_str().unwrap();
        let mut vars: Vec<(&str, &str)> = base[..5].to_vec();
        vars.push(("ESCALE_BACKUP_S3_SECRET_ACCESS_KEY_FILE", path));
        let s3 = with_env(&vars).unwrap().backup.s3.unwrap();
        assert_eq!(s3.secret_access_key.0, "from-a-file");
        vars.push(("ESCALE_BACKUP_S3_SECRET_ACCESS_KEY", "x"));
        let e = with_env(&vars).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        // A CA file must hold a certificate.
        let e = with("ESCALE_BACKUP_S3_CA_FILE", path).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn sample_config_parses_and_lists_every_key() {
        let text = include_str!("../config/escale.toml");
        let raw: RawConfig = toml::from_str(text).expect("sample config parses");
        Config::from_raw(raw, &|_| None).expect("sample config is valid");
        for (key, env) in ENV_KEYS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(leaf),
                "sample config does not document `{key}`"
            );
            assert!(text.contains(env), "sample config does not name {env}");
        }
    }
}
