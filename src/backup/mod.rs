//! Backups: an online, consistent, sealed snapshot of everything needed to rebuild the
//! platform, and its restore into a new data dir.
//!
//! What a backup holds: the registry (apps, releases, config, domains, certificates and their
//! keys, the ACME account, the cluster CA and node certificates, users and tokens: all of it
//! lives there, private keys and secret values already sealed by the master key), copied with
//! `VACUUM INTO` while escale serves and deploys; and the apps' git repositories under
//! `data_dir/git`. The whole archive is sealed ([`format`]) with a key derived from the master
//! key, so a stolen backup reveals nothing, not even app names; the master key itself is never
//! in a backup: `escale backup export-key` prints it, to be kept apart.
//!
//! With `[backup.s3]`, each backup is then uploaded to an S3-compatible object store ([`s3`])
//! and the retention applies to this installation's objects there too; `list` shows where
//! each backup is (local, s3, both).
//!
//! Invariants:
//! - The registry copy is one read transaction: every write acknowledged before the backup
//!   started is in it.
//! - Git repositories are copied refs first, objects last: objects are written before the ref
//!   that names them and never rewritten, so every ref copied names objects that are copied
//!   (lock files, temporary packs and push quarantines are skipped).
//! - One backup at a time per server ([`BackupStatus`]); a backup file appears under its
//!   final name only once complete and synced.
//! - A restore goes only into an empty data dir (or one the operator asked to overwrite),
//!   checks the key before writing anything, and the registry with `PRAGMA integrity_check`.
//! - A backup call succeeds only once its file is in the bucket too (when one is set); old
//!   objects are removed from the bucket only after a successful upload, so a store that
//!   fails never loses the copies it has.

pub mod format;
pub mod s3;

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::registry::Registry;
use crate::secrets::MasterKey;

pub use format::Header;

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("this file is not an escale backup")]
    NotABackup,
    #[error("this backup was sealed with another master key (it belongs to installation `{installation}`): give the key exported from that installation with `escale backup export-key`")]
    WrongKey { installation: String },
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("the data dir {path} is not empty: restore into a new, empty directory, or pass --force to replace its registry and repositories")]
    NotEmpty { path: String },
    #[error("the backup has schema version {backup}, newer than this escale knows (up to {known}): restore it with the escale version that made it ({version}) or newer")]
    TooNew {
        backup: i64,
        known: i64,
        version: String,
    },
    #[error("the restored registry fails its integrity check: {0}")]
    Integrity(String),
    #[error("no backup named `{0}`")]
    NotFound(String),
    #[error("a backup is already running")]
    Busy,
    #[error("backup {name} was written to the backup dir, but its upload to {location} failed: {source}")]
    Upload {
        name: String,
        location: String,
        source: s3::S3Error,
    },
    #[error(transparent)]
    S3(#[from] s3::S3Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error("registry: {0}")]
    Database(#[from] sqlx::Error),
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.display().to_string();
    move |source| BackupError::Io { what, path, source }
}

/// Where a backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// In the server's backup dir only.
    Local,
    /// In the bucket (`[backup.s3]`) only.
    S3,
    /// In both.
    Both,
}

/// A backup file as listed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BackupInfo {
    /// File name, e.g. `escale-a1b2c3-20261201T031003Z.backup`.
    pub name: String,
    pub installation_id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Bytes of the sealed file.
    pub size: u64,
    pub schema_version: i64,
    pub escale_version: String,
    /// Where it is: the backup dir, the bucket, or both.
    pub location: Location,
    /// `s3://bucket/prefix/name` when it is in the bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A backup just made.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Created {
    #[serde(flatten)]
    pub info: BackupInfo,
    /// Files archived (the registry and every file of the git repositories).
    pub files: u64,
    /// Bytes archived, before sealing.
    pub bytes: u64,
    /// How long it took, in milliseconds (the upload to the bucket included).
    pub duration_ms: u64,
    /// Older backups removed by the retention (`backup.keep`).
    pub pruned: Vec<String>,
    /// The upload to the bucket (`[backup.s3]`), when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<s3::Uploaded>,
    /// Older backups of this installation removed from the bucket by the retention.
    pub pruned_remote: Vec<String>,
}

/// What the server knows of its backups, for `/metrics`; one backup at a time.
#[derive(Debug, Default)]
pub struct BackupStatus {
    running: tokio::sync::Mutex<()>,
    /// Unix seconds of the last success (0: none since start).
    pub last_success: AtomicI64,
    pub last_failure: AtomicI64,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// Bytes of the last successful backup.
    pub last_size: AtomicU64,
    /// Milliseconds the last successful backup took.
    pub last_duration_ms: AtomicU64,
    /// Unix seconds of the last successful upload to the bucket (0: none since start).
    pub upload_last_success: AtomicI64,
    pub upload_last_failure: AtomicI64,
    pub upload_successes: AtomicU64,
    pub upload_failures: AtomicU64,
    /// Milliseconds the last successful upload took.
    pub upload_last_duration_ms: AtomicU64,
}

impl BackupStatus {
    /// The Prometheus lines.
    pub fn render(&self, out: &mut String) {
        let r = Ordering::Relaxed;
        out.push_str(&format!(
            "# HELP escale_backup_last_success_timestamp_seconds Unix time of the last successful backup (0: none since start).\n# TYPE escale_backup_last_success_timestamp_seconds gauge\nescale_backup_last_success_timestamp_seconds {}\n\
             # HELP escale_backup_last_failure_timestamp_seconds Unix time of the last failed backup (0: none since start).\n# TYPE escale_backup_last_failure_timestamp_seconds gauge\nescale_backup_last_failure_timestamp_seconds {}\n\
             # HELP escale_backups_total Backups attempted, by outcome.\n# TYPE escale_backups_total counter\nescale_backups_total{{outcome=\"success\"}} {}\nescale_backups_total{{outcome=\"failure\"}} {}\n\
             # HELP escale_backup_last_size_bytes Size of the last successful backup.\n# TYPE escale_backup_last_size_bytes gauge\nescale_backup_last_size_bytes {}\n\
             # HELP escale_backup_last_duration_seconds Time the last successful backup took.\n# TYPE escale_backup_last_duration_seconds gauge\nescale_backup_last_duration_seconds {:.3}\n",
            self.last_success.load(r),
            self.last_failure.load(r),
            self.successes.load(r),
            self.failures.load(r),
            self.last_size.load(r),
            self.last_duration_ms.load(r) as f64 / 1000.0,
        ));
        out.push_str(&format!(
            "# HELP escale_backup_upload_last_success_timestamp_seconds Unix time of the last backup uploaded to the bucket ([backup.s3]; 0: none since start).\n# TYPE escale_backup_upload_last_success_timestamp_seconds gauge\nescale_backup_upload_last_success_timestamp_seconds {}\n\
             # HELP escale_backup_upload_last_failure_timestamp_seconds Unix time of the last failed upload to the bucket (0: none since start).\n# TYPE escale_backup_upload_last_failure_timestamp_seconds gauge\nescale_backup_upload_last_failure_timestamp_seconds {}\n\
             # HELP escale_backup_uploads_total Uploads of backups to the bucket, by outcome.\n# TYPE escale_backup_uploads_total counter\nescale_backup_uploads_total{{outcome=\"success\"}} {}\nescale_backup_uploads_total{{outcome=\"failure\"}} {}\n\
             # HELP escale_backup_upload_last_duration_seconds Time the last successful upload took.\n# TYPE escale_backup_upload_last_duration_seconds gauge\nescale_backup_upload_last_duration_seconds {:.3}\n",
            self.upload_last_success.load(r),
            self.upload_last_failure.load(r),
            self.upload_successes.load(r),
            self.upload_failures.load(r),
            self.upload_last_duration_ms.load(r) as f64 / 1000.0,
        ));
    }

    /// Counts an upload to the bucket: `None` when it failed.
    fn upload_outcome(&self, uploaded: Option<&s3::Uploaded>) {
        let r = Ordering::Relaxed;
        let now = crate::registry::now_ms() / 1000;
        match uploaded {
            Some(u) => {
                self.upload_last_success.store(now, r);
                self.upload_successes.fetch_add(1, r);
                self.upload_last_duration_ms.store(u.duration_ms, r);
            }
            None => {
                self.upload_last_failure.store(now, r);
                self.upload_failures.fetch_add(1, r);
            }
        }
    }
}

pub use crate::config::BackupSettings;

/// True for a name escale gives backup files (and so may list, serve and prune).
pub fn is_backup_name(name: &str) -> bool {
    name.starts_with("escale-")
        && name.ends_with(".backup")
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.contains("..")
}

fn stamp(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    // 2026-12-01T03:10:03.123Z -> 20261201T031003123Z
    humantime::format_rfc3339_millis(t)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// The parts of a backup's name: installation, time stamp, and the number after it (1 when
/// none); `None` for a name escale did not give.
pub fn name_parts(name: &str) -> Option<(&str, &str, u32)> {
    if !is_backup_name(name) {
        return None;
    }
    let body = name.strip_prefix("escale-")?.strip_suffix(".backup")?;
    let is_stamp = |s: &str| {
        s.len() == 19
            && s.as_bytes()[8] == b'T'
            && s.ends_with('Z')
            && s.bytes()
                .enumerate()
                .all(|(i, b)| i == 8 || i == 18 || b.is_ascii_digit())
    };
    let (rest, n) = match body.rsplit_once('-') {
        Some((rest, n))
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() < 6 =>
        {
            (rest, n.parse().ok()?)
        }
        _ => (body, 1),
    };
    let (inst, stamp) = rest.rsplit_once('-')?;
    (is_stamp(stamp) && !inst.is_empty()).then_some((inst, stamp, n))
}

/// Takes a backup of the registry and the git repositories under `data_dir` into the backup
/// dir, then keeps the newest `keep` backups of this installation there (`keep` 0: all); with
/// `[backup.s3]`, uploads it and applies the same retention in the bucket.
pub async fn create(
    registry: &Registry,
    data_dir: &Path,
    settings: &BackupSettings,
    status: &BackupStatus,
) -> Result<Created> {
    let dir = settings.dir_for(data_dir);
    let dir = dir.as_path();
    let keep = settings.keep;
    let _one = status.running.try_lock().map_err(|_| BackupError::Busy)?;
    let started = Instant::now();
    let result = create_unlocked(registry, data_dir, dir, keep, started).await;
    let r = Ordering::Relaxed;
    match &result {
        Ok(c) => {
            status
                .last_success
                .store(crate::registry::now_ms() / 1000, r);
            status.successes.fetch_add(1, r);
            status.last_size.store(c.info.size, r);
            status.last_duration_ms.store(c.duration_ms, r);
            tracing::info!(backup = %c.info.name, size = c.info.size, files = c.files, ms = c.duration_ms, "backup written");
        }
        Err(e) => {
            status
                .last_failure
                .store(crate::registry::now_ms() / 1000, r);
            status.failures.fetch_add(1, r);
            tracing::error!(error = %e, dir = %dir.display(), "backup failed");
        }
    }
    let mut created = result?;
    if let Some(s3) = &settings.s3 {
        let (uploaded, pruned) = upload(
            s3,
            dir,
            &created.info.name,
            registry.installation_id(),
            keep,
            status,
        )
        .await?;
        created.info.location = Location::Both;
        created.info.url = Some(uploaded.url.clone());
        created.uploaded = Some(uploaded);
        created.pruned_remote = pruned;
        created.duration_ms = started.elapsed().as_millis() as u64;
    }
    Ok(created)
}

/// Uploads the backup `name` of `dir` to the bucket, then keeps the newest `keep` objects of
/// installation `inst` there (`keep` 0: all); counted in `status`.
pub async fn upload(
    s3: &crate::config::S3Settings,
    dir: &Path,
    name: &str,
    inst: &str,
    keep: u32,
    status: &BackupStatus,
) -> Result<(s3::Uploaded, Vec<String>)> {
    let failed = |source| BackupError::Upload {
        name: name.to_string(),
        location: s3.location(),
        source,
    };
    let result = match s3::Store::new(s3) {
        Ok(store) => store
            .upload(&dir.join(name), name)
            .await
            .map(|u| (store, u)),
        Err(e) => Err(e),
    };
    status.upload_outcome(result.as_ref().ok().map(|(_, u)| u));
    let (store, uploaded) = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, backup = name, "upload to the bucket failed");
            return Err(failed(e));
        }
    };
    tracing::info!(backup = name, url = %uploaded.url, size = uploaded.size, parts = uploaded.parts, ms = uploaded.duration_ms, "backup uploaded");
    // The upload went: a retention that fails now is said, and tried again after the next
    // backup; it does not fail this one.
    let pruned = if keep > 0 {
        match prune_remote(&store, inst, keep as usize).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "backup uploaded, but removing older backups from the bucket (backup.keep) failed");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    Ok((uploaded, pruned))
}

/// Keeps the newest `keep` objects of installation `inst` in the bucket; the names removed.
async fn prune_remote(
    store: &s3::Store,
    inst: &str,
    keep: usize,
) -> Result<Vec<String>, s3::S3Error> {
    let mut mine: Vec<(String, u32, String)> = store
        .list()
        .await?
        .into_iter()
        .filter_map(|o| {
            let (i, stamp, n) = name_parts(&o.name)?;
            (i == inst).then(|| (stamp.to_string(), n, o.name.clone()))
        })
        .collect();
    mine.sort_by(|a, b| b.cmp(a));
    let mut removed = Vec::new();
    for (_, _, name) in mine.into_iter().skip(keep) {
        store.delete(&name).await?;
        tracing::info!(backup = %name, "old backup removed from the bucket (backup.keep)");
        removed.push(name);
    }
    Ok(removed)
}

/// The backups in `dir` and, with `[backup.s3]`, in the bucket, newest first, each with where
/// it is. A backup only in the bucket is described from its header (a ranged read).
pub async fn list_everywhere(
    dir: &Path,
    s3: Option<&crate::config::S3Settings>,
) -> Result<Vec<BackupInfo>> {
    let d = dir.to_path_buf();
    let mut all = tokio::task::spawn_blocking(move || list(&d))
        .await
        .map_err(|e| BackupError::Damaged(format!("listing backups failed: {e}")))??;
    let Some(s3) = s3 else {
        return Ok(all);
    };
    let store = s3::Store::new(s3)?;
    for o in store.list().await? {
        if let Some(local) = all.iter_mut().find(|b| b.name == o.name) {
            local.location = Location::Both;
            local.url = Some(store.url_of(&o.name));
            continue;
        }
        match remote_info(&store, &o).await {
            Ok(info) => all.push(info),
            Err(e) => {
                tracing::warn!(error = %e, object = %o.name, "a backup in the bucket could not be read; left out")
            }
        }
    }
    all.sort_by(|a, b| (b.created_at, &b.name).cmp(&(a.created_at, &a.name)));
    Ok(all)
}

/// A backup in the bucket, from its header.
pub async fn remote_info(store: &s3::Store, o: &s3::Object) -> Result<BackupInfo> {
    let start = store
        .read_start(
            &o.name,
            (format::MAGIC.len() + format::MAX_HEADER + 1) as u64,
        )
        .await?;
    let (h, _) = format::read_header(&mut start.as_slice())?;
    Ok(BackupInfo {
        name: o.name.clone(),
        installation_id: h.installation_id,
        created_at: h.created_at,
        size: o.size,
        schema_version: h.schema_version,
        escale_version: h.escale_version,
        location: Location::S3,
        url: Some(store.url_of(&o.name)),
    })
}

async fn create_unlocked(
    registry: &Registry,
    data_dir: &Path,
    dir: &Path,
    keep: u32,
    started: Instant,
) -> Result<Created> {
    std::fs::create_dir_all(dir).map_err(io_err("cannot create the backup dir", dir))?;
    set_mode(dir, 0o700);
    let inst = registry.installation_id().to_string();
    let mut name = format!("escale-{inst}-{}.backup", stamp(crate::registry::now_ms()));
    let mut n = 1;
    while dir.join(&name).exists() {
        n += 1;
        name = format!(
            "escale-{inst}-{}-{n}.backup",
            stamp(crate::registry::now_ms())
        );
    }
    let snapshot = dir.join(format!(".{name}.db"));
    let partial = dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_file(&snapshot);
    let cleanup = Cleanup(vec![snapshot.clone(), partial.clone()]);
    registry.snapshot_to(&snapshot).await?;
    let key = registry.master_key().clone();
    let git = data_dir.join("git");
    let (final_path, files, bytes) = {
        let (partial, snapshot, dir, name, inst) = (
            partial.clone(),
            snapshot.clone(),
            dir.to_path_buf(),
            name.clone(),
            inst.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<(PathBuf, u64, u64)> {
            let file = crate::secrets::create_private(&partial)
                .map_err(io_err("cannot create", &partial))?;
            let mut w = format::SealWriter::new(
                BufWriter::new(file),
                &key,
                &inst,
                crate::registry::schema_version(),
            )
            .map_err(io_err("cannot write", &partial))?;
            let mut counter = Counter::default();
            archive_file(&mut w, &snapshot, "escale.db", &mut counter)
                .map_err(io_err("cannot archive the registry snapshot", &snapshot))?;
            if git.is_dir() {
                archive_tree(&mut w, &git, "git", &mut counter)
                    .map_err(io_err("cannot archive the repositories", &git))?;
            }
            format::write_end(&mut w).map_err(io_err("cannot write", &partial))?;
            let file = w
                .finish()
                .map_err(io_err("cannot write", &partial))?
                .into_inner()
                .map_err(|e| e.into_error())
                .map_err(io_err("cannot write", &partial))?;
            file.sync_all().map_err(io_err("cannot sync", &partial))?;
            let final_path = dir.join(&name);
            std::fs::rename(&partial, &final_path).map_err(io_err("cannot rename", &partial))?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok((final_path, counter.files, counter.bytes))
        })
        .await
        .map_err(|e| BackupError::Damaged(format!("the backup task failed: {e}")))??
    };
    drop(cleanup);
    let info = info_of(&final_path)?;
    let pruned = if keep > 0 {
        prune(dir, &inst, keep as usize)?
    } else {
        Vec::new()
    };
    Ok(Created {
        info,
        files,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        pruned,
        uploaded: None,
        pruned_remote: Vec::new(),
    })
}

/// Removes its paths when dropped (temporary files of a backup, whatever happened).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[derive(Default)]
struct Counter {
    files: u64,
    bytes: u64,
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o700
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        0o600
    }
}

/// Archives one file: exactly the length it had when opened (git never rewrites a file it
/// finished; a file that vanished meanwhile is skipped).
fn archive_file(
    w: &mut impl Write,
    path: &Path,
    name: &str,
    counter: &mut Counter,
) -> std::io::Result<()> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "escale.db" => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let size = meta.len();
    format::write_file_head(w, name, mode_of(&meta) | 0o600, size)?;
    let copied = std::io::copy(&mut BufReader::new(file).take(size), w)?;
    if copied != size {
        return Err(std::io::Error::other(format!(
            "{name} shrank while it was archived"
        )));
    }
    counter.files += 1;
    counter.bytes += size;
    Ok(())
}

/// What git writes and renames or removes by itself: never archived.
fn transient(name: &str) -> bool {
    name.ends_with(".lock")
        || name.starts_with("tmp_")
        || name.starts_with("incoming-")
        || name.starts_with(".tmp")
}

/// Archives a directory tree: plain files and directories only (symbolic links and other
/// kinds are skipped); in each directory `objects` goes last (see the module invariants).
fn archive_tree(
    w: &mut impl Write,
    dir: &Path,
    name: &str,
    counter: &mut Counter,
) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    format::write_dir(w, name, mode_of(&meta) | 0o700)?;
    let mut entries: Vec<(String, std::fs::FileType)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Some(n) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if transient(&n) {
            continue;
        }
        if let Ok(t) = e.file_type() {
            entries.push((n, t));
        }
    }
    entries.sort_by(|a, b| (a.0 == "objects", &a.0).cmp(&(b.0 == "objects", &b.0)));
    for (n, t) in entries {
        let child = format!("{name}/{n}");
        if format::check_path(&child).is_err() {
            continue;
        }
        if t.is_dir() {
            archive_tree(w, &dir.join(&n), &child, counter)?;
        } else if t.is_file() {
            archive_file(w, &dir.join(&n), &child, counter)?;
        }
    }
    Ok(())
}

/// Reads the header of the backup at `path`.
pub fn info_of(path: &Path) -> Result<BackupInfo> {
    let mut f = std::fs::File::open(path).map_err(io_err("cannot open", path))?;
    let size = f.metadata().map_err(io_err("cannot read", path))?.len();
    let (h, _) = format::read_header(&mut f)?;
    Ok(BackupInfo {
        name: path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string(),
        installation_id: h.installation_id,
        created_at: h.created_at,
        size,
        schema_version: h.schema_version,
        escale_version: h.escale_version,
        location: Location::Local,
        url: None,
    })
}

/// The backups in `dir`, newest first (files that are not backups are left out).
pub fn list(dir: &Path) -> Result<Vec<BackupInfo>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("cannot read", dir)(e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_backup_name(&name) {
            if let Ok(i) = info_of(&e.path()) {
                out.push(i);
            }
        }
    }
    out.sort_by(|a, b| (b.created_at, &b.name).cmp(&(a.created_at, &a.name)));
    Ok(out)
}

/// Keeps the newest `keep` backups of installation `inst` in `dir`; returns the names removed.
pub fn prune(dir: &Path, inst: &str, keep: usize) -> Result<Vec<String>> {
    let mine: Vec<BackupInfo> = list(dir)?
        .into_iter()
        .filter(|b| b.installation_id == inst)
        .collect();
    let mut removed = Vec::new();
    for old in mine.into_iter().skip(keep) {
        let p = dir.join(&old.name);
        std::fs::remove_file(&p).map_err(io_err("cannot remove", &p))?;
        tracing::info!(backup = %old.name, "old backup removed (backup.keep)");
        removed.push(old.name);
    }
    Ok(removed)
}

/// What a restore brought back.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub installation_id: String,
    pub created_at: i64,
    pub apps: i64,
    pub releases: i64,
    pub domains: i64,
    pub certificates: i64,
    pub nodes: i64,
    pub users: i64,
    pub repositories: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Restores the backup `file` into `data_dir` with `key`: offline (no escale may run on that
/// data dir). The data dir must be empty or absent unless `force`, which replaces its
/// registry, repositories and master key. Writes `master.key` (0600) so that `escale serve`
/// on the data dir opens the sealed values.
pub async fn restore(
    file: &Path,
    key: &MasterKey,
    data_dir: &Path,
    force: bool,
) -> Result<Restored> {
    let (file, key, dir) = (file.to_path_buf(), key.clone(), data_dir.to_path_buf());
    let (header, counter, repos) =
        tokio::task::spawn_blocking(move || restore_files(&file, &key, &dir, force))
            .await
            .map_err(|e| BackupError::Damaged(format!("the restore task failed: {e}")))??;
    let db = data_dir.join("escale.db");
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await?;
    let check: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await?;
    if check != ["ok"] {
        return Err(BackupError::Integrity(check.join("; ")));
    }
    let mut n = Vec::new();
    for q in [
        "SELECT COUNT(*) FROM apps",
        "SELECT COUNT(*) FROM releases",
        "SELECT COUNT(*) FROM domains",
        "SELECT COUNT(*) FROM certificates",
        "SELECT COUNT(*) FROM nodes",
        "SELECT COUNT(*) FROM users",
    ] {
        n.push(sqlx::query_scalar::<_, i64>(q).fetch_one(&mut conn).await?);
    }
    Ok(Restored {
        installation_id: header.installation_id,
        created_at: header.created_at,
        apps: n[0],
        releases: n[1],
        domains: n[2],
        certificates: n[3],
        nodes: n[4],
        users: n[5],
        repositories: repos,
        files: counter.files,
        bytes: counter.bytes,
    })
}

/// What a restore may replace in a data dir (with `--force`).
const RESTORED: &[&str] = &[
    "escale.db",
    "escale.db-wal",
    "escale.db-shm",
    "git",
    "master.key",
];

fn restore_files(
    file: &Path,
    key: &MasterKey,
    data_dir: &Path,
    force: bool,
) -> Result<(Header, Counter, u64)> {
    let input = std::fs::File::open(file).map_err(io_err("cannot open", file))?;
    let (header, mut r) = format::OpenReader::new(BufReader::new(input), key)?;
    if header.schema_version > crate::registry::schema_version() {
        return Err(BackupError::TooNew {
            backup: header.schema_version,
            known: crate::registry::schema_version(),
            version: header.escale_version.clone(),
        });
    }
    let non_empty = std::fs::read_dir(data_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if non_empty && !force {
        return Err(BackupError::NotEmpty {
            path: data_dir.display().to_string(),
        });
    }
    std::fs::create_dir_all(data_dir).map_err(io_err("cannot create", data_dir))?;
    set_mode(data_dir, 0o700);
    // Unpacked beside, moved into place once complete.
    let staging = data_dir.join(".restore-partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io_err("cannot create", &staging))?;
    let result = unpack(&mut r, &staging);
    let counter = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    for name in RESTORED {
        let p = data_dir.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(io_err("cannot replace", &p))?;
        } else if p.exists() {
            std::fs::remove_file(&p).map_err(io_err("cannot replace", &p))?;
        }
    }
    let db = data_dir.join("escale.db");
    std::fs::rename(staging.join("escale.db"), &db).map_err(io_err("cannot move", &db))?;
    let git = data_dir.join("git");
    let mut repos = 0;
    if staging.join("git").is_dir() {
        std::fs::rename(staging.join("git"), &git).map_err(io_err("cannot move", &git))?;
        repos = std::fs::read_dir(git.join("apps"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
    }
    let _ = std::fs::remove_dir_all(&staging);
    let key_path = data_dir.join("master.key");
    let mut f =
        crate::secrets::create_private(&key_path).map_err(io_err("cannot write", &key_path))?;
    f.write_all(key.to_hex().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("cannot write", &key_path))?;
    Ok((header, counter, repos))
}

fn unpack(r: &mut impl Read, into: &Path) -> Result<Counter> {
    let damaged = |e: std::io::Error| BackupError::Damaged(e.to_string());
    let mut counter = Counter::default();
    let mut saw_db = false;
    loop {
        match format::read_entry(r).map_err(damaged)? {
            format::Entry::End => break,
            format::Entry::Dir { path, .. } => {
                let p = into.join(&path);
                std::fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
                set_mode(&p, 0o700);
            }
            format::Entry::File { path, mode, size } => {
                let p = into.join(&path);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(io_err("cannot create", &p))?;
                let copied = std::io::copy(&mut r.take(size), &mut f).map_err(damaged)?;
                if copied != size {
                    return Err(BackupError::Damaged(format!("{path} is cut short")));
                }
                f.sync_all().map_err(io_err("cannot sync", &p))?;
                set_mode(&p, (mode & 0o700) | 0o600);
                saw_db |= path == "escale.db";
                counter.files += 1;
                counter.bytes += size;
            }
        }
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(damaged)? != 0 {
        return Err(BackupError::Damaged("data follows the end mark".into()));
    }
    if !saw_db {
        return Err(BackupError::Damaged("it holds no registry".into()));
    }
    Ok(counter)
}

fn set_mode(p: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = (p, mode);
}

/// The first wait before a scheduled backup's failed upload is tried again (then doubled, up
/// to 15 minutes).
const UPLOAD_RETRY: Duration = if cfg!(test) {
    Duration::from_millis(200)
} else {
    Duration::from_secs(60)
};

/// Scheduled backups: every `interval` (counted from the newest backup of this installation
/// in the directory, so a restart does not delay or repeat one), until `stop`.
pub async fn run_schedule(
    registry: Registry,
    data_dir: PathBuf,
    settings: BackupSettings,
    status: std::sync::Arc<BackupStatus>,
    stop: impl std::future::Future<Output = ()>,
) {
    let Some(interval) = settings.interval else {
        return;
    };
    let dir = settings.dir_for(&data_dir);
    tokio::pin!(stop);
    loop {
        let newest = list(&dir)
            .ok()
            .and_then(|l| {
                l.into_iter()
                    .find(|b| b.installation_id == registry.installation_id())
            })
            .map(|b| b.created_at);
        let now = crate::registry::now_ms();
        let wait = match newest {
            Some(t) => Duration::from_millis((t + interval.as_millis() as i64 - now).max(0) as u64),
            None => Duration::ZERO,
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
        match create(&registry, &data_dir, &settings, &status).await {
            Ok(_) => {}
            Err(BackupError::Upload { name, .. }) => {
                // The backup is on disk: try its upload again (1, 2, 4... up to 15 minutes
                // apart) until it goes or the next backup is due, rather than taking more.
                let (Some(s3), due) = (&settings.s3, Instant::now() + interval) else {
                    continue;
                };
                let mut wait = UPLOAD_RETRY;
                loop {
                    if Instant::now() + wait >= due {
                        break;
                    }
                    tracing::warn!(backup = %name, "the upload will be tried again in {}", humantime::format_duration(wait));
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    if !dir.join(&name).is_file() {
                        break;
                    }
                    let _one = status.running.lock().await;
                    if upload(
                        s3,
                        &dir,
                        &name,
                        registry.installation_id(),
                        settings.keep,
                        &status,
                    )
                    .await
                    .is_ok()
                    {
                        break;
                    }
                    wait = (wait * 2).min(Duration::from_secs(900));
                }
            }
            Err(e) => {
                // Logged and counted by `create`; try again after a while, not in a loop.
                tracing::warn!(error = %e, "scheduled backup failed; next try in a minute");
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(Duration::from_secs(60).min(interval)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names() {
        assert!(is_backup_name("escale-a1-20261201T031003123Z.backup"));
        for bad in [
            "../escale-a.backup",
            "escale-a/b.backup",
            "x.backup",
            "escale-a.db",
            "escale-..backup",
        ] {
            assert!(!is_backup_name(bad), "{bad}");
        }
        assert_eq!(stamp(0), "19700101T000000000Z");
        assert_eq!(
            name_parts("escale-a-b-20261201T031003123Z.backup"),
            Some(("a-b", "20261201T031003123Z", 1))
        );
        assert_eq!(
            name_parts("escale-a-20261201T031003123Z-3.backup"),
            Some(("a", "20261201T031003123Z", 3))
        );
        assert_eq!(name_parts("escale-a.backup"), None);
        assert_eq!(name_parts("escale-20261201T031003123Z.backup"), None);
    }

    #[tokio::test]
    async fn create_list_prune_restore_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("git/apps/u1.git/refs/heads")).unwrap();
        std::fs::create_dir_all(data.join("git/apps/u1.git/objects/ab")).unwrap();
        std::fs::write(data.join("git/apps/u1.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(data.join("git/apps/u1.git/objects/ab/cdef"), b"object").unwrap();
        std::fs::write(data.join("git/apps/u1.git/index.lock"), b"transient").unwrap();
        let key = MasterKey::random();
        let reg = Registry::open(&data.join("escale.db"), key.clone())
            .await
            .unwrap();
        let backups = dir.path().join("backups");
        let status = BackupStatus::default();
        let settings = BackupSettings {
            interval: None,
            keep: 2,
            dir: Some(backups.clone()),
            s3: None,
        };
        let mut names = Vec::new();
        for _ in 0..3 {
            let c = create(&reg, &data, &settings, &status).await.unwrap();
            assert!(c.uploaded.is_none() && c.info.location == Location::Local);
            assert!(c.files >= 3, "{c:?}");
            names.push(c.info.name);
        }
        let listed: Vec<String> = list(&backups)
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(listed, vec![names[2].clone(), names[1].clone()], "keep = 2");
        assert_eq!(status.successes.load(Ordering::Relaxed), 3);
        assert!(status.last_success.load(Ordering::Relaxed) > 0);
        let file = backups.join(&names[2]);

        // Into a new dir.
        let target = dir.path().join("restored");
        let r = restore(&file, &key, &target, false).await.unwrap();
        assert_eq!(r.installation_id, reg.installation_id());
        assert_eq!(r.repositories, 1);
        assert_eq!(
            std::fs::read(target.join("git/apps/u1.git/objects/ab/cdef")).unwrap(),
            b"object"
        );
        assert!(!target.join("git/apps/u1.git/index.lock").exists());
        assert_eq!(
            std::fs::read_to_string(target.join("master.key")).unwrap(),
            key.to_hex()
        );
        let again = Registry::open(&target.join("escale.db"), key.clone())
            .await
            .unwrap();
        assert_eq!(again.installation_id(), reg.installation_id());

        // Not over a non-empty dir unless forced; not with another key.
        let e = restore(&file, &key, &target, false).await.unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");
        drop(again);
        restore(&file, &key, &target, true).await.unwrap();
        let e = restore(
            &file,
            &MasterKey::random(),
            &dir.path().join("other"),
            false,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("another master key"), "{e}");
        assert!(
            !dir.path().join("other").exists(),
            "nothing written with a wrong key"
        );
        // The temporary files are gone.
        let leftovers: Vec<_> = std::fs::read_dir(&backups)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A scheduled backup whose upload is refused is uploaded again once the store accepts
    /// it, and no other backup is taken meanwhile.
    #[tokio::test]
    async fn a_scheduled_backup_whose_upload_failed_is_uploaded_again() {
        // The first PUT is refused (403 AccessDenied), the next one goes.
        let (port, seen) = s3::fake::serve(|what, tries| match (what, tries) {
            ("PUT ", 1) => (403, "<Error><Code>AccessDenied</Code></Error>", ""),
            ("PUT ", _) => (200, "", "\"e\""),
            _ => (200, "", ""),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let reg = Registry::open(&data.join("escale.db"), MasterKey::random())
            .await
            .unwrap();
        let backups = dir.path().join("backups");
        let settings = BackupSettings {
            interval: Some(Duration::from_secs(3600)),
            keep: 0,
            dir: Some(backups.clone()),
            s3: Some(s3::fake::settings(port)),
        };
        let status = std::sync::Arc::new(BackupStatus::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_schedule(
            reg.clone(),
            data.clone(),
            settings,
            status.clone(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while status.upload_successes.load(Ordering::Relaxed) < 1 {
            assert!(
                Instant::now() < deadline,
                "never uploaded: {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(());
        task.await.unwrap();
        assert_eq!(status.upload_failures.load(Ordering::Relaxed), 1);
        assert_eq!(
            status.successes.load(Ordering::Relaxed),
            1,
            "one backup taken"
        );
        assert_eq!(list(&backups).unwrap().len(), 1);
        let puts = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.as_str() == "PUT ")
            .count();
        assert_eq!(puts, 2, "the same file, uploaded again");
    }

    /// `scripts/bench-backup`: a registry of APPS (1,000) apps with 5 config vars (one
    /// secret) each and RELEASES_PER_APP (10) image releases each, plus a git repository per
    /// app; times a backup and a restore and prints the sizes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: scripts/bench-backup"]
    async fn bench_backup() {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let (apps, per_app) = (env("APPS", 1000), env("RELEASES_PER_APP", 10));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let key = MasterKey::random();
        let reg = Registry::open(&data.join("escale.db"), key.clone())
            .await
            .unwrap();
        let admin = crate::registry::Actor {
            user_id: 0,
            name: "bench".into(),
            role: crate::registry::Role::Admin,
            team_id: 1,
            team: "default".into(),
        };
        let t = Instant::now();
        for i in 0..apps {
            let name = format!("app{i}");
            reg.create_app(&admin, &name, None, 8080).await.unwrap();
            let vars: Vec<(String, String)> = (0..4)
                .map(|k| {
                    (
                        format!("VAR{k}"),
                        format!("value-{i}-{k}-{}", "x".repeat(40)),
                    )
                })
                .collect();
            reg.update_config(&admin, &name, &vars, false, &[])
                .await
                .unwrap();
            reg.update_config(
                &admin,
                &name,
                &[(
                    "DATABASE_URL".into(),
                    format!("postgres://u:secret{i}@db/app{i}"),
                )],
                true,
                &[],
            )
            .await
            .unwrap();
            let app = reg.app(&admin, &name).await.unwrap();
            for v in 0..per_app {
                reg.deploy_image(
                    &admin,
                    &app,
                    &format!("registry.example.eu/app{i}:{v}"),
                    "bench",
                    None,
                )
                .await
                .unwrap();
            }
            // A small bare repository per app.
            let repo = data.join("git/apps").join(format!("{}.git", app.uid));
            std::fs::create_dir_all(repo.join("objects/ab")).unwrap();
            std::fs::create_dir_all(repo.join("refs/heads")).unwrap();
            std::fs::write(repo.join("HEAD"), "ref: refs/heads/main\n").unwrap();
            std::fs::write(repo.join("objects/ab/cdef0123"), vec![7u8; 4096]).unwrap();
        }
        let releases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM releases")
            .fetch_one(reg.pool())
            .await
            .unwrap();
        let db_size = std::fs::metadata(data.join("escale.db")).unwrap().len();
        eprintln!(
            "bench-backup: filled {apps} apps, {releases} releases in {:.1}s; registry {} bytes (+ WAL)",
            t.elapsed().as_secs_f64(),
            db_size
        );
        let status = BackupStatus::default();
        let t = Instant::now();
        let settings = BackupSettings {
            interval: None,
            keep: 0,
            dir: Some(dir.path().join("backups")),
            s3: None,
        };
        let c = create(&reg, &data, &settings, &status).await.unwrap();
        let took = t.elapsed();
        eprintln!(
            "bench-backup: backup {} bytes sealed ({} files, {} bytes archived) in {:.3}s",
            c.info.size,
            c.files,
            c.bytes,
            took.as_secs_f64()
        );
        let file = dir.path().join("backups").join(&c.info.name);
        let t = Instant::now();
        let r = restore(&file, &key, &dir.path().join("restored"), false)
            .await
            .unwrap();
        eprintln!(
            "bench-backup: restore (unseal, unpack, integrity check) in {:.3}s: {} apps, {} releases, {} repositories",
            t.elapsed().as_secs_f64(),
            r.apps,
            r.releases,
            r.repositories
        );
        assert_eq!(r.apps as usize, apps);
        assert_eq!(r.releases, releases);
    }
}
