//! Pure domain types shared by the registry, the manifest, the scheduler and the API: an app,
//! its process types (resources, health checks) and config vars. No database, no engine: the
//! registry stores them, the manifest reads and writes them, the scheduler runs them.

use std::collections::BTreeMap;

use serde::Serialize;

/// An app as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct App {
    pub name: String,
    pub team: String,
    /// The release the scheduler converges to; `None` before the first deploy.
    pub release: Option<u32>,
    pub created_at: i64,
    pub processes: Vec<ProcessType>,
    pub domains: Vec<String>,
    /// Disk its images and containers take on all nodes, as last measured
    /// (`upkeep.disk_interval`); absent until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// How an instance's health is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// `GET path` must answer 2xx or 3xx.
    Http,
    /// A TCP connection to the port must succeed.
    Tcp,
    /// No check: routable once running.
    None,
}

impl HealthKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthKind::Http => "http",
            HealthKind::Tcp => "tcp",
            HealthKind::None => "none",
        }
    }
    pub(crate) fn parse(s: &str) -> HealthKind {
        match s {
            "tcp" => HealthKind::Tcp,
            "none" => HealthKind::None,
            _ => HealthKind::Http,
        }
    }
}

/// A process type's health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub path: String,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Time after start during which failures do not count.
    pub grace_ms: u32,
}

/// A process type of an app (`web`, `worker`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProcessType {
    pub name: String,
    /// argv; `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    /// The port the process listens on (given to it as `$PORT`).
    pub port: u16,
    pub instances: u32,
    pub memory_bytes: Option<u64>,
    /// CPU limit in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    /// Extra instances allowed during a rolling deploy.
    pub surge: u32,
    pub health: HealthCheck,
    /// Node labels an instance needs (`disk = "ssd"`); empty: any node.
    pub constraints: BTreeMap<String, String>,
    /// Its instances may use node memory and CPUs that escale already gave to others.
    pub overcommit: bool,
}

/// A validated change to a process type; `None` fields are left as they are.
#[derive(Debug, Clone, Default)]
pub struct ProcessPatch {
    pub command: Option<Option<Vec<String>>>,
    pub port: Option<u16>,
    pub memory_bytes: Option<Option<u64>>,
    pub nano_cpus: Option<Option<i64>>,
    pub surge: Option<u32>,
    pub health_kind: Option<HealthKind>,
    pub health_path: Option<String>,
    pub health_interval_ms: Option<u32>,
    pub health_timeout_ms: Option<u32>,
    pub health_grace_ms: Option<u32>,
    /// Replaces the constraints (an empty map clears them).
    pub constraints: Option<BTreeMap<String, String>>,
    pub overcommit: Option<bool>,
}

/// A config var. `value` is `None` for a secret unless revealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ConfigVar {
    pub key: String,
    pub value: Option<String>,
    pub secret: bool,
}
