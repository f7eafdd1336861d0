//! `escale doctor`: checks the host escale runs on, offline (no server needed), and says for
//! each problem what to fix.
//!
//! Checks: the Docker engine (reachable, version, storage driver, its clock against this
//! host's), the listening ports (free, or held by the escale serving this data dir), the apps
//! domain's wildcard DNS record, free disk on the data dir and on the local engine's root dir,
//! the registry (integrity, schema version), certificate expiries (apps, the cluster CA,
//! escale's client certificate, node certificates), the registered nodes (their engine's
//! port answering) and the bucket backups go to (`[backup.s3]`: a one-object listing with
//! the configured credentials). It only reads: the registry is opened read-only, nothing is bound for
//! longer than the check.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

/// Doctor failures (of the doctor itself; what it finds is in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot print the report: {0}")]
    Output(#[from] serde_json::Error),
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. `engine`, `disk: data dir`, `port: http_addr`.
    pub check: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no check failed.
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn push(&mut self, check: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            check: check.into(),
            status,
            detail: detail.into(),
            fix: None,
        });
    }

    fn fail(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.with_fix(check, Status::Fail, detail, fix);
    }

    fn warn(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.with_fix(check, Status::Warn, detail, fix);
    }

    fn with_fix(
        &mut self,
        check: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.checks.push(Check {
            check: check.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }
}

/// Below this share of free space (or [`DISK_MIN_FREE`]) a disk check fails; below
/// [`DISK_WARN`] it warns.
const DISK_FAIL: f64 = 0.05;
const DISK_WARN: f64 = 0.20;
const DISK_MIN_FREE: u64 = 512 << 20;
/// A certificate closer than this to its expiry is a warning.
const CERT_WARN_DAYS: i64 = 14;
/// Clocks further apart than this fail the check.
const CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Bound on every network step.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check for `config`.
pub async fn run(config: &Config) -> Report {
    let mut r = Report { checks: Vec::new() };
    engine(config, &mut r).await;
    data_dir(config, &mut r);
    for (what, addr) in [
        ("api_addr", Some(config.api_addr)),
        ("http_addr", config.http_addr),
        ("https_addr", config.https_addr),
    ] {
        match addr {
            Some(a) => port(config, what, a, &mut r),
            None => r.push(format!("port: {what}"), Status::Ok, "off"),
        }
    }
    dns(config, &mut r).await;
    registry(config, &mut r).await;
    backup_bucket(config, &mut r).await;
    r
}

async fn backup_bucket(config: &Config, r: &mut Report) {
    let Some(s3) = &config.backup.s3 else {
        r.push("backups: bucket", Status::Ok, "off ([backup.s3] not set)");
        return;
    };
    let check = async { crate::backup::s3::Store::new(s3)?.check().await };
    match tokio::time::timeout(TIMEOUT * 3, check).await {
        Ok(Ok(())) => r.push(
            "backups: bucket",
            Status::Ok,
            format!("{} at {} answers", s3.location(), s3.endpoint),
        ),
        Ok(Err(e)) => r.fail(
            "backups: bucket",
            e.to_string(),
            "fix [backup.s3] in the config (or the ESCALE_BACKUP_S3_* variables): backups fail until the bucket answers",
        ),
        Err(_) => r.fail(
            "backups: bucket",
            format!("{} did not answer within {:?}", s3.endpoint, TIMEOUT * 3),
            "check backup.s3.endpoint and the network",
        ),
    }
}

async fn engine(config: &Config, r: &mut Report) {
    if config.docker_host == "off" {
        r.push(
            "engine",
            Status::Ok,
            "docker_host is off: apps run on the registered nodes only",
        );
        return;
    }
    let fix = "start the Docker engine (`systemctl start docker`), or point `docker_host` \
               (ESCALE_DOCKER_HOST) at its socket; escale needs read-write access to it";
    let node = match tokio::time::timeout(
        TIMEOUT,
        crate::node::Node::connect_local("local", &config.docker_host),
    )
    .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            r.fail(
                "engine",
                format!(
                    "cannot reach the Docker engine at {}: {e}",
                    config.docker_host
                ),
                fix,
            );
            return;
        }
        Err(_) => {
            r.fail(
                "engine",
                format!(
                    "the Docker engine at {} did not answer within {TIMEOUT:?}",
                    config.docker_host
                ),
                fix,
            );
            return;
        }
    };
    let version = match tokio::time::timeout(TIMEOUT, node.version()).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            r.fail(
                "engine",
                format!("the Docker engine at {} fails: {e}", config.docker_host),
                fix,
            );
            return;
        }
        Err(_) => {
            r.fail(
                "engine",
                format!("the Docker engine at {} hangs", config.docker_host),
                fix,
            );
            return;
        }
    };
    let major: u32 = version
        .version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        r.warn(
            "engine",
            format!(
                "Docker {} (API {}) at {}",
                version.version, version.api_version, config.docker_host
            ),
            "escale is tested with Docker 20.10 and newer: upgrade the engine",
        );
    } else {
        r.push(
            "engine",
            Status::Ok,
            format!(
                "Docker {} (API {}) at {}",
                version.version, version.api_version, config.docker_host
            ),
        );
    }
    let facts = match tokio::time::timeout(TIMEOUT, node.facts()).await {
        Ok(Ok(f)) => f,
        _ => {
            r.warn(
                "engine: storage driver",
                "the engine did not say",
                "check `docker info`",
            );
            return;
        }
    };
    match facts.storage_driver.as_str() {
        "vfs" => r.warn(
            "engine: storage driver",
            "vfs: every layer is a full copy (slow builds, disk filled fast)",
            "configure overlay2 in /etc/docker/daemon.json (`\"storage-driver\": \"overlay2\"`)",
        ),
        "" => r.warn("engine: storage driver", "unknown", "check `docker info`"),
        d => r.push("engine: storage driver", Status::Ok, d.to_string()),
    }
    clock("clock: local engine", facts.system_time.as_deref(), r);
    // The engine's disk, when it is on this host (a unix socket).
    if config.docker_host.starts_with("unix://") || config.docker_host.starts_with('/') {
        if facts.root_dir.is_empty() {
            return;
        }
        disk("disk: engine", Path::new(&facts.root_dir), r);
    }
}

/// Compares an engine's clock with this host's.
fn clock(check: &str, engine_time: Option<&str>, r: &mut Report) {
    let Some(t) = engine_time else {
        r.warn(
            check,
            "the engine did not say its time",
            "check `docker info`",
        );
        return;
    };
    let Ok(theirs) = humantime::parse_rfc3339_weak(t.trim()) else {
        r.warn(
            check,
            format!("the engine's time `{t}` does not parse"),
            "check `docker info`",
        );
        return;
    };
    let ours = std::time::SystemTime::now();
    let skew = ours
        .duration_since(theirs)
        .or_else(|_| theirs.duration_since(ours))
        .unwrap_or_default();
    if skew > CLOCK_SKEW {
        r.fail(
            check,
            format!(
                "this host's clock and the engine's differ by {:.1}s",
                skew.as_secs_f64()
            ),
            "run NTP on both hosts (systemd-timesyncd or chrony): certificates, health \
             deadlines and logs depend on agreeing clocks",
        );
    } else {
        r.push(
            check,
            Status::Ok,
            format!(
                "within {:.0} ms of the engine's",
                skew.as_secs_f64() * 1000.0
            ),
        );
    }
}

fn data_dir(config: &Config, r: &mut Report) {
    let dir = &config.data_dir;
    if !dir.exists() {
        r.push(
            "data dir",
            Status::Ok,
            format!(
                "{} does not exist yet (the first start creates it)",
                dir.display()
            ),
        );
        if let Some(parent) = dir.parent().filter(|p| p.exists()) {
            disk("disk: data dir", parent, r);
        }
        return;
    }
    // Writable: a file is created and removed.
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    match std::fs::write(&probe, b"escale doctor") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            r.push(
                "data dir",
                Status::Ok,
                format!("{} is writable", dir.display()),
            );
        }
        Err(e) => {
            let _ = std::fs::remove_file(&probe);
            r.fail(
                "data dir",
                format!("cannot write in {}: {e}", dir.display()),
                format!(
                    "free space on its filesystem, or give the user escale runs as write \
                     access (`chown -R escale: {}`)",
                    dir.display()
                ),
            );
        }
    }
    disk("disk: data dir", dir, r);
}

/// Free space of the filesystem holding `path`.
fn disk(check: &str, path: &Path, r: &mut Report) {
    let st = match nix::sys::statvfs::statvfs(path) {
        Ok(s) => s,
        Err(e) => {
            r.warn(
                check,
                format!("cannot read the free space of {}: {e}", path.display()),
                "check it with `df -h`",
            );
            return;
        }
    };
    let block = st.fragment_size() as u64;
    let total = st.blocks() as u64 * block;
    let free = st.blocks_available() as u64 * block;
    let share = if total == 0 {
        0.0
    } else {
        free as f64 / total as f64
    };
    let detail = format!(
        "{}: {} free of {} ({:.0}%)",
        path.display(),
        human(free),
        human(total),
        share * 100.0
    );
    let fix = format!(
        "free space on the filesystem of {} (old backups, images: `docker image prune`), or \
         grow it: escale stops writing its registry when it is full",
        path.display()
    );
    if share < DISK_FAIL || free < DISK_MIN_FREE {
        r.fail(check, detail, fix);
    } else if share < DISK_WARN {
        r.warn(check, detail, fix);
    } else {
        r.push(check, Status::Ok, detail);
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// True when the escale serving `data_dir` (asked on its handover socket) listens on `addr`.
fn held_by_escale(data_dir: &Path, addr: SocketAddr) -> bool {
    crate::handover::addresses(data_dir).is_some_and(|held| held.contains(&addr))
}

fn port(config: &Config, what: &str, addr: SocketAddr, r: &mut Report) {
    let check = format!("port: {what}");
    match std::net::TcpListener::bind(addr) {
        Ok(_) => r.push(check, Status::Ok, format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if held_by_escale(&config.data_dir, addr) {
                r.push(
                    check,
                    Status::Ok,
                    format!("{addr} is held by the escale serving {}", config.data_dir.display()),
                );
            } else {
                r.fail(
                    check,
                    format!("{addr} is taken by another program"),
                    format!(
                        "find it with `ss -ltnp 'sport = :{}'` and stop it, or set `{what}` to \
                         another address",
                        addr.port()
                    ),
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.fail(
            check,
            format!("binding {addr} is not allowed: {e}"),
            "ports under 1024 need root or CAP_NET_BIND_SERVICE (the shipped systemd unit grants it)",
        ),
        Err(e) => r.fail(
            check,
            format!("cannot bind {addr}: {e}"),
            format!("check that this host has the address of `{what}`"),
        ),
    }
}

async fn dns(config: &Config, r: &mut Report) {
    let domain = &config.apps_domain;
    if domain == "localhost" || domain.ends_with(".localhost") {
        r.warn(
            "dns: apps domain",
            format!("apps_domain is `{domain}`: apps answer only on this machine"),
            "set apps_domain to a domain with a wildcard record `*.DOMAIN A <this host's IP>`",
        );
        return;
    }
    let probe = format!("escale-doctor-check.{domain}:80");
    match tokio::time::timeout(TIMEOUT, tokio::net::lookup_host(probe.clone())).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            r.push(
                "dns: apps domain",
                Status::Ok,
                format!("*.{domain} resolves to {}", addrs.join(", ")),
            );
        }
        Ok(Err(e)) => r.fail(
            "dns: apps domain",
            format!("*.{domain} does not resolve ({e})"),
            format!("add a wildcard DNS record `*.{domain} A <this host's public IP>`"),
        ),
        Err(_) => r.fail(
            "dns: apps domain",
            format!("resolving *.{domain} timed out"),
            "check /etc/resolv.conf and the network",
        ),
    }
}

async fn registry(config: &Config, r: &mut Report) {
    use sqlx::ConnectOptions;
    let db = config.database_path();
    if !db.exists() {
        r.push(
            "registry",
            Status::Ok,
            format!(
                "{} does not exist yet (the first start creates it)",
                db.display()
            ),
        );
        return;
    }
    let conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await;
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "registry",
                format!("cannot open {}: {e}", db.display()),
                "check its owner and mode (the user escale runs as reads and writes it)",
            );
            return;
        }
    };
    let check: Result<Vec<String>, _> = sqlx::query_scalar("PRAGMA quick_check")
        .fetch_all(&mut conn)
        .await;
    let version: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&mut conn)
            .await;
    match (check, version) {
        (Ok(c), Ok(v)) if c == ["ok"] => {
            let v = v.unwrap_or(0);
            if v > crate::registry::schema_version() {
                r.fail(
                    "registry",
                    format!(
                        "schema version {v} is newer than this escale knows ({})",
                        crate::registry::schema_version()
                    ),
                    "run the escale version that upgraded it (or newer)",
                );
            } else {
                r.push(
                    "registry",
                    Status::Ok,
                    format!("{}: integrity ok, schema version {v}", db.display()),
                );
            }
        }
        (Ok(c), _) if c != ["ok"] => r.fail(
            "registry",
            format!(
                "{} fails its integrity check: {}",
                db.display(),
                c.join("; ")
            ),
            "stop escale and restore the latest backup (`escale backup restore`)",
        ),
        (Err(e), _) | (_, Err(e)) => r.fail(
            "registry",
            format!("cannot read {}: {e}", db.display()),
            "check the file, or restore the latest backup",
        ),
        _ => {}
    }
    certificates(&mut conn, r).await;
    nodes(&mut conn, r).await;
}

async fn certificates(conn: &mut sqlx::SqliteConnection, r: &mut Report) {
    let now = crate::registry::now_ms();
    let mut rows: Vec<(String, i64, String)> = Vec::new();
    if let Ok(certs) = sqlx::query_as::<_, (String, i64, String)>(
        "SELECT domain, not_after, source FROM certificates",
    )
    .fetch_all(&mut *conn)
    .await
    {
        for (domain, not_after, source) in certs {
            let fix = if source == "acme" {
                "escale renews ACME certificates 30 days ahead: see `escale certs list APP` for its last error (DNS, port 80/443 reachable)".to_string()
            } else {
                format!("upload a new certificate: `escale certs add APP {domain} --cert ... --key ...`")
            };
            rows.push((format!("certificate {domain}"), not_after, fix));
        }
    }
    if let Ok(Some(ca)) = sqlx::query_scalar::<_, i64>("SELECT not_after FROM cluster_ca")
        .fetch_optional(&mut *conn)
        .await
    {
        rows.push((
            "cluster CA".into(),
            ca,
            "the CA lasts 10 years: plan a new cluster CA and reissue node bundles".into(),
        ));
    }
    if let Ok(nodes) =
        sqlx::query_as::<_, (String, i64)>("SELECT node, not_after FROM cluster_node_certs")
            .fetch_all(&mut *conn)
            .await
    {
        for (node, not_after) in nodes {
            rows.push((
                format!("node certificate {node}"),
                not_after,
                format!("`escale nodes renew {node}` and install the new bundle on the node"),
            ));
        }
    }
    if rows.is_empty() {
        r.push("certificates", Status::Ok, "none yet");
        return;
    }
    for (what, not_after, fix) in rows {
        let days = (not_after - now).div_euclid(86_400_000);
        if not_after <= now {
            r.fail(
                format!("expiry: {what}"),
                format!("expired {} days ago", -days),
                fix,
            );
        } else if days < CERT_WARN_DAYS {
            r.warn(
                format!("expiry: {what}"),
                format!("expires in {days} days"),
                fix,
            );
        } else {
            r.push(
                format!("expiry: {what}"),
                Status::Ok,
                format!("{days} days left"),
            );
        }
    }
}

async fn nodes(conn: &mut sqlx::SqliteConnection, r: &mut Report) {
    let Ok(nodes) = sqlx::query_as::<_, (String, String, i64, i64)>(
        "SELECT name, docker_host, cordoned, draining FROM nodes ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return;
    };
    for (name, host, cordoned, draining) in nodes {
        let addr = host
            .trim_start_matches("tcp://")
            .trim_start_matches("https://")
            .to_string();
        let state = match (cordoned != 0, draining != 0) {
            (_, true) => " (draining)",
            (true, false) => " (cordoned)",
            _ => "",
        };
        match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr.clone())).await {
            Ok(Ok(_)) => r.push(
                format!("node {name}"),
                Status::Ok,
                format!("its engine's port {addr} answers{state}"),
            ),
            Ok(Err(e)) => r.fail(
                format!("node {name}"),
                format!("its engine at {addr} does not answer: {e}{state}"),
                format!(
                    "on the node: `systemctl status docker` (the bundle's daemon.json listens on \
                     {addr} with TLS), and open the port from this host; or `escale nodes remove {name}`"
                ),
            ),
            Err(_) => r.fail(
                format!("node {name}"),
                format!("its engine at {addr} did not answer within {TIMEOUT:?}{state}"),
                "check the network path (firewall) between this host and the node",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_fails_and_agreement_passes() {
        let mut r = Report { checks: Vec::new() };
        let now = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        clock("clock", Some(&now), &mut r);
        let late = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - Duration::from_secs(90),
        )
        .to_string();
        clock("clock", Some(&late), &mut r);
        assert_eq!(r.checks[0].status, Status::Ok, "{:?}", r.checks[0]);
        assert_eq!(r.checks[1].status, Status::Fail, "{:?}", r.checks[1]);
        assert!(r.checks[1].fix.as_deref().unwrap().contains("NTP"));
        assert!(!r.healthy());
    }

    #[test]
    fn a_port_taken_by_another_program_fails_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = Config::for_data_dir(dir.path());
        let mut r = Report { checks: Vec::new() };
        port(&config, "http_addr", addr, &mut r);
        assert_eq!(r.checks[0].status, Status::Fail);
        assert!(r.checks[0].detail.contains(&addr.to_string()));
        assert!(r.checks[0]
            .fix
            .as_deref()
            .unwrap()
            .contains(&format!(":{}", addr.port())));
        drop(taken);
        let mut r = Report { checks: Vec::new() };
        port(&config, "http_addr", addr, &mut r);
        assert_eq!(r.checks[0].status, Status::Ok);
    }
}
