//! The registry: SQLite-backed desired state (apps, process types, config, releases, domains,
//! nodes, users, teams, tokens) and the audit log.
//!
//! Invariants:
//! - Every change and its audit event are written in one transaction (`BEGIN IMMEDIATE`), so a
//!   crash leaves either both or neither. The database runs in WAL mode with
//!   `synchronous=FULL`: a write acknowledged to a client survives power loss.
//! - Releases are immutable but for their status; versions of an app are 1, 2, 3, ... with no gap.
//! - Secret config values and private keys are stored sealed by [`MasterKey`]; this module never
//!   returns them opened unless asked through [`Registry::open_secret`].
//! - Access is scoped here, not only in the API: app lookups take the [`Actor`] and answer
//!   "not found" for an app of another team, so a handler cannot forget the check.

mod accounts;
mod apps;
mod cluster;
mod deploys;
mod nodes;
mod releases;
mod sessions;
mod webhooks;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

pub use accounts::*;
pub use apps::*;
pub use cluster::*;
pub use nodes::*;
pub use releases::*;
pub use webhooks::*;

use crate::secrets::MasterKey;

/// Registry failures. `NotFound`, `Conflict` and `Invalid` are the caller's to fix; `Database`
/// is ours.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} `{name}` not found")]
    NotFound { what: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
    /// Something the request names (not its path) does not exist; the message says what
    /// does.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database was migrated by a newer escale than this one.
    #[error("the registry {path} has schema version {database}, newer than this escale knows (up to {known}): it was upgraded by a newer escale. Run that version (or newer), or restore a backup taken before the upgrade; escale never migrates backwards")]
    TooNew {
        path: String,
        database: i64,
        known: i64,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// A release row whose frozen config does not decode: nothing is done with it (no
    /// rollback to it, no instance started from it), so a bad row never becomes an empty config.
    #[error("release v{version} of {app} has a frozen config that cannot be read ({message}): nothing was changed")]
    UnreadableRelease {
        app: String,
        version: u32,
        message: String,
    },
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

pub(crate) fn not_found(what: &'static str, name: impl Into<String>) -> RegistryError {
    RegistryError::NotFound {
        what,
        name: name.into(),
    }
}

/// A handle on the registry; cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    pool: SqlitePool,
    key: MasterKey,
    installation_id: String,
    /// Where committed changes are announced (see [`Write::commit`]).
    bus: crate::events::Bus,
    /// The app list as the API answers it (see [`Registry::list_apps_json`]).
    apps_cache: Arc<apps::AppsCache>,
}

/// A write transaction (`BEGIN IMMEDIATE`) that remembers the audit records written in it and
/// publishes them on the bus once, and only if, it commits.
pub(crate) struct Write {
    tx: Transaction<'static, Sqlite>,
    bus: crate::events::Bus,
    events: Vec<crate::events::Event>,
}

impl std::ops::Deref for Write {
    type Target = sqlx::SqliteConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for Write {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Write {
    /// Commits, then publishes what the transaction recorded.
    pub(crate) async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        for e in self.events {
            self.bus.publish(e);
        }
        Ok(())
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The migrations this escale knows, in order (forward-only: none is ever edited or removed).
pub fn migrations() -> &'static [sqlx::migrate::Migration] {
    &MIGRATOR.migrations
}

/// The newest schema version this escale knows (the version of its last migration).
pub fn schema_version() -> i64 {
    MIGRATOR.migrations.last().map_or(0, |m| m.version)
}

/// Refuses a database migrated by a newer escale: an older binary would otherwise run on a
/// schema it does not understand (or sqlx would fail with a bare "migration N was previously
/// applied but is missing").
async fn check_schema_not_newer(pool: &SqlitePool, path: &Path) -> Result<()> {
    let exists: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_optional(pool)
    .await?;
    if exists.is_none() {
        return Ok(());
    }
    let newest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(pool)
            .await?;
    let known = schema_version();
    match newest {
        Some(v) if v > known => Err(RegistryError::TooNew {
            path: path.display().to_string(),
            database: v,
            known,
        }),
        _ => Ok(()),
    }
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An audit event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Event {
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub actor: String,
    pub app: Option<String>,
    pub action: String,
    pub detail: String,
}

impl Registry {
    /// Opens (creating if needed) the database at `path`, applies migrations and makes sure the
    /// installation id and the default team exist.
    pub async fn open(path: &Path, key: MasterKey) -> Result<Registry> {
        Registry::open_with(path, key, None).await
    }

    /// Like [`Registry::open`], with the installation id to use if the registry is new. An
    /// existing registry with another id is an error.
    pub async fn open_with(
        path: &Path,
        key: MasterKey,
        installation_id: Option<&str>,
    ) -> Result<Registry> {
        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(opts)
            .await?;
        check_schema_not_newer(&pool, path).await?;
        MIGRATOR.run(&pool).await?;
        let mut reg = Registry {
            pool,
            key,
            installation_id: String::new(),
            bus: crate::events::Bus::new(),
            apps_cache: Arc::default(),
        };
        let mut tx = reg.write().await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT installation_id FROM installation WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await?;
        let id = match existing {
            Some(id) => {
                if let Some(want) = installation_id.filter(|w| *w != id) {
                    return Err(RegistryError::Invalid(format!(
                        "installation_id `{want}` is configured but this registry belongs to installation `{id}`; remove the setting or fix the data dir"
                    )));
                }
                id
            }
            None => {
                let id = installation_id
                    .map(str::to_string)
                    .unwrap_or_else(|| crate::auth::random_hex(6));
                sqlx::query(
                    "INSERT INTO installation (id, installation_id, created_at) VALUES (1, ?, ?)",
                )
                .bind(&id)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                id
            }
        };
        sqlx::query("INSERT OR IGNORE INTO teams (name, created_at) VALUES ('default', ?)")
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        reg.installation_id = id;
        Ok(reg)
    }

    /// This installation's id, carried by every container label so that several escale
    /// installations can share an engine.
    pub fn installation_id(&self) -> &str {
        &self.installation_id
    }

    /// The master key, for sealing values outside the registry (certificates).
    pub fn master_key(&self) -> &MasterKey {
        &self.key
    }

    /// Writes a consistent copy of the whole database to `dest` (which must not exist) with
    /// `VACUUM INTO`: one read transaction, so writers go on and the copy is the state of one
    /// instant, never a file copied under load.
    pub async fn snapshot_to(&self, dest: &Path) -> Result<()> {
        let dest = dest.to_str().ok_or_else(|| {
            RegistryError::Invalid(format!("{} is not a UTF-8 path", dest.display()))
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(dest)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The raw pool, for read-only diagnostics (integrity checks in tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write transaction that takes the write lock at once (no upgrade deadlocks).
    pub(crate) async fn write(&self) -> Result<Write> {
        Ok(Write {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            bus: self.bus.clone(),
            events: Vec::new(),
        })
    }

    /// The bus on which committed changes are published.
    pub fn bus(&self) -> &crate::events::Bus {
        &self.bus
    }

    /// Records something escale did on its own (an instance replaced, a rollout failed, a
    /// node lost) in the audit log, as actor `escale`, and publishes `event` after commit.
    pub async fn record(
        &self,
        app: Option<&str>,
        action: &str,
        detail: &str,
        event: crate::events::Event,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        insert_audit(&mut tx, "escale", app, action, detail).await?;
        tx.events.push(event);
        tx.commit().await
    }

    /// Opens a sealed value stored at `place`.
    pub fn open_secret(&self, place: &str, sealed: &str) -> Result<String> {
        Ok(self.key.open_string(place, sealed)?)
    }

    /// Audit events, newest first; for a member only those of its team's apps.
    ///
    /// Events name their app, and a destroyed app's name can be taken again (by another team):
    /// an app's events are those since its latest `app.create`, so a new app does not show the
    /// history of an earlier one of the same name.
    ///
    /// A page is at most `limit` events older than the event id `before` (keyset on the id).
    pub async fn events(
        &self,
        actor: &Actor,
        app: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let limit = limit.clamp(1, 1001);
        let before = before.unwrap_or(i64::MAX);
        if let Some(app) = app {
            self.app(actor, app).await?;
            return Ok(sqlx::query_as(
                "SELECT id, at, actor, app, action, detail FROM events WHERE app = ?1
                 AND id >= COALESCE((SELECT MAX(id) FROM events WHERE app = ?1 AND action = 'app.create'), 0)
                 AND id < ?3 ORDER BY id DESC LIMIT ?2",
            )
            .bind(app)
            .bind(limit)
            .bind(before)
            .fetch_all(&self.pool)
            .await?);
        }
        if actor.is_admin() {
            Ok(sqlx::query_as(
                "SELECT id, at, actor, app, action, detail FROM events WHERE id < ? ORDER BY id DESC LIMIT ?",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
        } else {
            Ok(sqlx::query_as(
                "SELECT e.id, e.at, e.actor, e.app, e.action, e.detail FROM events e
                 JOIN apps a ON a.name = e.app WHERE a.team_id = ?
                 AND e.id >= COALESCE((SELECT MAX(c.id) FROM events c WHERE c.app = e.app AND c.action = 'app.create'), 0)
                 AND e.id < ? ORDER BY e.id DESC LIMIT ?",
            )
            .bind(actor.team_id)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
        }
    }
}

/// Writes an audit event inside the caller's transaction.
pub(crate) async fn audit(
    tx: &mut Write,
    actor: &str,
    app: Option<&str>,
    action: &str,
    detail: &str,
) -> Result<()> {
    insert_audit(tx, actor, app, action, detail).await?;
    tx.events.push(crate::events::Event::Changed {
        app: app.map(str::to_string),
        action: action.to_string(),
        actor: actor.to_string(),
        detail: detail.to_string(),
    });
    Ok(())
}

async fn insert_audit(
    tx: &mut Write,
    actor: &str,
    app: Option<&str>,
    action: &str,
    detail: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO events (at, actor, app, action, detail) VALUES (?, ?, ?, ?, ?)")
        .bind(now_ms())
        .bind(actor)
        .bind(app)
        .bind(action)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Maps a UNIQUE constraint violation to [`RegistryError::Conflict`] with `message`; any other
/// error stays a database error.
pub(crate) fn conflict_if_unique(
    message: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> RegistryError {
    move |e| {
        if is_unique_violation(&e) {
            RegistryError::Conflict(message())
        } else {
            e.into()
        }
    }
}

/// True when a sqlx error is a UNIQUE constraint violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[cfg(test)]
mod schema_tests;
