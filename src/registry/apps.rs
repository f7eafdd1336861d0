//! Apps, their process types (formation, resources, health checks), config vars and domains.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::{
    audit, conflict_if_unique, insert_release, not_found, now_ms, Actor, Registry, RegistryError,
    Result,
};

pub use crate::model::{App, ConfigVar, HealthCheck, HealthKind, ProcessPatch, ProcessType};

/// A custom domain of an app.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Domain {
    pub domain: String,
    pub app: String,
    pub created_at: i64,
}

/// An app row with its id, for use inside the registry and by the scheduler.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppRef {
    pub id: i64,
    /// The app's identity outside the database (git repository, built images): random, never
    /// reused, unlike `id`.
    pub uid: String,
    pub name: String,
    pub team_id: i64,
    pub team: String,
    pub target_release: Option<i64>,
    pub created_at: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ProcessRow {
    name: String,
    command: Option<String>,
    port: i64,
    instances: i64,
    memory_bytes: Option<i64>,
    nano_cpus: Option<i64>,
    surge: i64,
    health_kind: String,
    health_path: String,
    health_interval_ms: i64,
    health_timeout_ms: i64,
    health_grace_ms: i64,
    constraints: String,
    overcommit: bool,
}

impl From<ProcessRow> for ProcessType {
    fn from(r: ProcessRow) -> ProcessType {
        ProcessType {
            name: r.name,
            command: r.command.and_then(|c| serde_json::from_str(&c).ok()),
            port: r.port as u16,
            instances: r.instances as u32,
            memory_bytes: r.memory_bytes.map(|m| m as u64),
            nano_cpus: r.nano_cpus,
            surge: r.surge as u32,
            health: HealthCheck {
                kind: HealthKind::parse(&r.health_kind),
                path: r.health_path,
                interval_ms: r.health_interval_ms as u32,
                timeout_ms: r.health_timeout_ms as u32,
                grace_ms: r.health_grace_ms as u32,
            },
            // Written by escale only, as a JSON object; anything else reads as none.
            constraints: serde_json::from_str(&r.constraints).unwrap_or_default(),
            overcommit: r.overcommit,
        }
    }
}

const APP_COLUMNS: &str = "SELECT a.id, a.uid, a.name, a.team_id, t.name AS team, a.target_release, a.created_at FROM apps a JOIN teams t ON t.id = a.team_id";

/// The app list's cache (see [`Registry::list_apps_json`]).
#[derive(Default)]
pub(crate) struct AppsCache {
    index: arc_swap::ArcSwapOption<AppsIndex>,
    building: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AppsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let index = self.index.load();
        f.debug_struct("AppsCache")
            .field("version", &index.as_ref().map(|i| i.version))
            .field("apps", &index.as_ref().map(|i| i.apps.len()))
            .finish()
    }
}

/// Every app's JSON as the API lists it, sorted by name, as of an app list version.
struct AppsIndex {
    version: i64,
    apps: Vec<CachedApp>,
}

struct CachedApp {
    name: String,
    team_id: i64,
    json: Box<str>,
}

/// A new app uid: 128 random bits, lowercase hex.
fn new_app_uid() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Where a config var's sealed value is bound (associated data).
pub fn config_place(app: &str, key: &str) -> String {
    format!("config/{app}/{key}")
}

impl Registry {
    /// Creates an app owned by `team` (default: the actor's team; only an admin may pick
    /// another), with a `web` process type listening on `port`, no instance yet.
    pub async fn create_app(
        &self,
        actor: &Actor,
        name: &str,
        team: Option<&str>,
        port: u16,
    ) -> Result<App> {
        let mut tx = self.write().await?;
        let team_id = match team {
            Some(t) if t != actor.team => {
                actor.require_admin("creating an app for another team")?;
                sqlx::query_scalar::<_, i64>("SELECT id FROM teams WHERE name = ?")
                    .bind(t)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| not_found("team", t))?
            }
            _ => actor.team_id,
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO apps (name, uid, team_id, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(new_app_uid())
        .bind(team_id)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict_if_unique(|| {
            format!("an app named `{name}` already exists; pick another name")
        }))?;
        sqlx::query(
            "INSERT INTO process_types (app_id, name, port, instances) VALUES (?, 'web', ?, 1)",
        )
        .bind(id)
        .bind(port as i64)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            &actor.name,
            Some(name),
            "app.create",
            &format!("app `{name}` created"),
        )
        .await?;
        tx.commit().await?;
        self.app_info(actor, name).await
    }

    /// The app, or "not found" when it does not exist or belongs to another team (for a member).
    pub async fn app(&self, actor: &Actor, name: &str) -> Result<AppRef> {
        let row: Option<AppRef> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{APP_COLUMNS} WHERE a.name = ?"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(a) if actor.is_admin() || a.team_id == actor.team_id => Ok(a),
            _ => Err(not_found("app", name)),
        }
    }

    /// Every app (for the scheduler).
    pub async fn all_apps(&self) -> Result<Vec<AppRef>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{APP_COLUMNS} ORDER BY a.name"
        )))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Apps the actor can see.
    pub async fn list_apps(
        &self,
        actor: &Actor,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<App>> {
        // Keyset on the (unique) name: a page is the next `limit` names after the cursor, so
        // apps created or removed between pages neither repeat nor hide the others.
        // Two statements rather than `(admin OR team)`: each then walks the name index from
        // the cursor instead of scanning every app.
        let rows: Vec<AppRef> = if actor.is_admin() {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{APP_COLUMNS} WHERE a.name > ?1 ORDER BY a.name LIMIT ?2"
            )))
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
        } else {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{APP_COLUMNS} WHERE a.team_id = ?1 AND a.name > ?2 ORDER BY a.name LIMIT ?3"
            )))
            .bind(actor.team_id)
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
        };
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(Vec::new());
        };
        // Two more queries, over the page's apps only (a name range of the name index).
        #[derive(sqlx::FromRow)]
        struct Row {
            app_id: i64,
            #[sqlx(flatten)]
            p: ProcessRow,
        }
        let procs: Vec<Row> = sqlx::query_as(
            "SELECT p.app_id, p.name, p.command, p.port, p.instances, p.memory_bytes, p.nano_cpus, p.surge,
                    p.health_kind, p.health_path, p.health_interval_ms, p.health_timeout_ms,
                    p.health_grace_ms, p.constraints, p.overcommit
             FROM apps a JOIN process_types p ON p.app_id = a.id
             WHERE a.name >= ?1 AND a.name <= ?2 ORDER BY p.app_id, p.name",
        )
        .bind(&first.name)
        .bind(&last.name)
        .fetch_all(&self.pool)
        .await?;
        let mut processes: std::collections::HashMap<i64, Vec<ProcessType>> = Default::default();
        for r in procs {
            processes.entry(r.app_id).or_default().push(r.p.into());
        }
        let mut domains: std::collections::HashMap<i64, Vec<String>> = Default::default();
        let all: Vec<(i64, String)> = sqlx::query_as(
            "SELECT d.app_id, d.domain FROM apps a JOIN domains d ON d.app_id = a.id
             WHERE a.name >= ?1 AND a.name <= ?2 ORDER BY d.domain",
        )
        .bind(&first.name)
        .bind(&last.name)
        .fetch_all(&self.pool)
        .await?;
        for (id, d) in all {
            domains.entry(id).or_default().push(d);
        }
        Ok(rows
            .into_iter()
            .map(|r| App {
                processes: processes.remove(&r.id).unwrap_or_default(),
                domains: domains.remove(&r.id).unwrap_or_default(),
                name: r.name,
                team: r.team,
                release: r.target_release.map(|v| v as u32),
                created_at: r.created_at,
                disk_bytes: None,
            })
            .collect())
    }

    /// A page of [`Registry::list_apps`] as the JSON array the API answers (`[App]`, without
    /// `disk_bytes`), and the cursor of the next page when more follow.
    ///
    /// Served from an index of every app's JSON, sorted by name, kept while the app list's
    /// version (`app_list_version`, bumped by triggers in the transaction of any change to
    /// apps, process types, domains or team names, migration 0009) has not moved: a page is
    /// one small query, a binary search and the objects joined, so 1,000 apps cost what
    /// copying their bytes costs. The first list after such a change rebuilds the index in
    /// one read transaction (the cost of listing every app uncached); other writes (config,
    /// releases, events) leave it. `list_apps_json_is_list_apps` keeps it equal to
    /// [`Registry::list_apps`].
    pub async fn list_apps_json(
        &self,
        actor: &Actor,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(String, Option<String>)> {
        let index = self.apps_index().await?;
        let start = after.map_or(0, |a| index.apps.partition_point(|x| x.name.as_str() <= a));
        let limit = limit.max(0) as usize;
        let mut visible = index.apps[start..]
            .iter()
            .filter(|x| actor.is_admin() || x.team_id == actor.team_id);
        let page: Vec<&CachedApp> = visible.by_ref().take(limit).collect();
        let mut json =
            String::with_capacity(2 + page.iter().map(|a| a.json.len() + 1).sum::<usize>());
        json.push('[');
        for (i, app) in page.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&app.json);
        }
        json.push(']');
        let next = match (page.last(), visible.next()) {
            (Some(last), Some(_)) => Some(last.name.clone()),
            _ => None,
        };
        Ok((json, next))
    }

    /// The current index of [`Registry::list_apps_json`], rebuilt when the app list's
    /// version moved since it was built (one rebuild at a time; the others wait for it).
    async fn apps_index(&self) -> Result<Arc<AppsIndex>> {
        const VERSION: &str = "SELECT version FROM app_list_version WHERE id = 1";
        let current = |v: i64| self.apps_cache.index.load_full().filter(|i| i.version == v);
        let version: i64 = sqlx::query_scalar(VERSION).fetch_one(&self.pool).await?;
        if let Some(i) = current(version) {
            return Ok(i);
        }
        let _one = self.apps_cache.building.lock().await;
        // The version and the apps from one snapshot (a read transaction).
        let mut tx = self.pool.begin().await?;
        let version: i64 = sqlx::query_scalar(VERSION).fetch_one(&mut *tx).await?;
        if let Some(i) = current(version) {
            return Ok(i);
        }
        let rows: Vec<AppRef> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{APP_COLUMNS} ORDER BY a.name"
        )))
        .fetch_all(&mut *tx)
        .await?;
        #[derive(sqlx::FromRow)]
        struct Row {
            app_id: i64,
            #[sqlx(flatten)]
            p: ProcessRow,
        }
        let procs: Vec<Row> = sqlx::query_as(
            "SELECT app_id, name, command, port, instances, memory_bytes, nano_cpus, surge,
                    health_kind, health_path, health_interval_ms, health_timeout_ms,
                    health_grace_ms, constraints, overcommit
             FROM process_types ORDER BY app_id, name",
        )
        .fetch_all(&mut *tx)
        .await?;
        let all_domains: Vec<(i64, String)> =
            sqlx::query_as("SELECT app_id, domain FROM domains ORDER BY domain")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let mut processes: HashMap<i64, Vec<ProcessType>> = HashMap::new();
        for r in procs {
            processes.entry(r.app_id).or_default().push(r.p.into());
        }
        let mut domains: HashMap<i64, Vec<String>> = HashMap::new();
        for (id, d) in all_domains {
            domains.entry(id).or_default().push(d);
        }
        let apps = rows
            .into_iter()
            .map(|r| {
                let team_id = r.team_id;
                let app = App {
                    processes: processes.remove(&r.id).unwrap_or_default(),
                    domains: domains.remove(&r.id).unwrap_or_default(),
                    name: r.name,
                    team: r.team,
                    release: r.target_release.map(|v| v as u32),
                    created_at: r.created_at,
                    disk_bytes: None,
                };
                let json = serde_json::to_string(&app)
                    .expect("an app serialises")
                    .into_boxed_str();
                CachedApp {
                    name: app.name,
                    team_id,
                    json,
                }
            })
            .collect();
        let index = Arc::new(AppsIndex { version, apps });
        self.apps_cache.index.store(Some(index.clone()));
        Ok(index)
    }

    /// One app with its process types and domains.
    pub async fn app_info(&self, actor: &Actor, name: &str) -> Result<App> {
        let r = self.app(actor, name).await?;
        self.describe(r).await
    }

    async fn describe(&self, r: AppRef) -> Result<App> {
        let processes = self.processes_of(r.id).await?;
        let domains =
            sqlx::query_scalar("SELECT domain FROM domains WHERE app_id = ? ORDER BY domain")
                .bind(r.id)
                .fetch_all(&self.pool)
                .await?;
        Ok(App {
            name: r.name,
            team: r.team,
            release: r.target_release.map(|v| v as u32),
            created_at: r.created_at,
            processes,
            domains,
            disk_bytes: None,
        })
    }

    /// Process types of an app by id.
    pub async fn processes_of(&self, app_id: i64) -> Result<Vec<ProcessType>> {
        let rows: Vec<ProcessRow> = sqlx::query_as(
            "SELECT name, command, port, instances, memory_bytes, nano_cpus, surge, health_kind, health_path,
                    health_interval_ms, health_timeout_ms, health_grace_ms, constraints, overcommit
             FROM process_types WHERE app_id = ? ORDER BY name",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ProcessType::from).collect())
    }

    /// Process types of every app, by app id (for the scheduler).
    pub async fn all_processes(&self) -> Result<std::collections::HashMap<i64, Vec<ProcessType>>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            app_id: i64,
            #[sqlx(flatten)]
            p: ProcessRow,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT app_id, name, command, port, instances, memory_bytes, nano_cpus, surge, health_kind, health_path,
                    health_interval_ms, health_timeout_ms, health_grace_ms, constraints, overcommit
             FROM process_types ORDER BY app_id, name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: std::collections::HashMap<i64, Vec<ProcessType>> = Default::default();
        for r in rows {
            out.entry(r.app_id).or_default().push(r.p.into());
        }
        Ok(out)
    }

    /// Deletes an app and everything it owns in the registry (releases with their build logs,
    /// config, domains, webhook settings and deliveries cascade); returns the deleted row so
    /// the caller can remove what lives outside the database, keyed by its `uid` (the git
    /// repository, built images; see [`crate::cleanup`]). Its containers are removed by the
    /// reconciler, which sees them as orphans.
    pub async fn destroy_app(&self, actor: &Actor, name: &str) -> Result<AppRef> {
        let app = self.app(actor, name).await?;
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM apps WHERE id = ?")
            .bind(app.id)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            &actor.name,
            Some(name),
            "app.destroy",
            &format!("app `{name}` destroyed"),
        )
        .await?;
        tx.commit().await?;
        Ok(app)
    }

    /// Records in the audit log that removing what a destroyed app left outside the database
    /// did not finish (the collection retries it).
    pub async fn note_cleanup_pending(&self, actor: &str, app: &str, detail: &str) -> Result<()> {
        let mut tx = self.write().await?;
        audit(&mut tx, actor, Some(app), "app.cleanup_pending", detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The uids of every app: what [`crate::cleanup`] keeps.
    pub async fn app_uids(&self) -> Result<std::collections::HashSet<String>> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT uid FROM apps")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Creates or changes a process type.
    pub async fn upsert_process(
        &self,
        actor: &Actor,
        app: &str,
        process: &str,
        patch: &ProcessPatch,
        default_port: u16,
        create: bool,
    ) -> Result<ProcessType> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        if !create {
            let known = process_names(&mut tx, a.id).await?;
            if !known.iter().any(|k| k == process) {
                return Err(missing_process(app, process, &known));
            }
        }
        upsert_process_in(&mut tx, &a, &actor.name, process, patch, default_port).await?;
        tx.commit().await?;
        self.processes_of(a.id)
            .await?
            .into_iter()
            .find(|x| x.name == process)
            .ok_or_else(|| not_found("process type", process))
    }
}

impl Registry {
    /// Removes a process type of `app`: its instances are stopped by the next reconcile.
    pub async fn remove_process(&self, actor: &Actor, app: &str, process: &str) -> Result<()> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let known = process_names(&mut tx, a.id).await?;
        if !known.iter().any(|k| k == process) {
            return Err(missing_process(app, process, &known));
        }
        sqlx::query("DELETE FROM process_types WHERE app_id = ? AND name = ?")
            .bind(a.id)
            .bind(process)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            &actor.name,
            Some(app),
            "process.remove",
            &format!("process type {process} removed"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The process type names of an app, by name.
async fn process_names(tx: &mut super::Write, app_id: i64) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT name FROM process_types WHERE app_id = ? ORDER BY name")
            .bind(app_id)
            .fetch_all(&mut **tx)
            .await?,
    )
}

/// An unknown process type of `app`, with the ones it has (as `scale` says it).
fn missing_process(app: &str, name: &str, known: &[String]) -> RegistryError {
    RegistryError::Missing(format!(
        "app `{app}` has no process type `{name}` (it has: {}); define it first with `escale processes set {app} {name} --command ...`",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    ))
}

/// [`Registry::upsert_process`] inside the caller's transaction.
pub(crate) async fn upsert_process_in(
    tx: &mut super::Write,
    a: &AppRef,
    actor: &str,
    process: &str,
    patch: &ProcessPatch,
    default_port: u16,
) -> Result<()> {
    let app = a.name.as_str();
    {
        sqlx::query("INSERT OR IGNORE INTO process_types (app_id, name, port, instances) VALUES (?, ?, ?, 0)")
            .bind(a.id)
            .bind(process)
            .bind(patch.port.unwrap_or(default_port) as i64)
            .execute(&mut **tx)
            .await?;
        let p = patch;
        sqlx::query(
            "UPDATE process_types SET
                command = CASE WHEN ?1 THEN ?2 ELSE command END,
                port = COALESCE(?3, port),
                memory_bytes = CASE WHEN ?4 THEN ?5 ELSE memory_bytes END,
                nano_cpus = CASE WHEN ?6 THEN ?7 ELSE nano_cpus END,
                surge = COALESCE(?8, surge),
                health_kind = COALESCE(?9, health_kind),
                health_path = COALESCE(?10, health_path),
                health_interval_ms = COALESCE(?11, health_interval_ms),
                health_timeout_ms = COALESCE(?12, health_timeout_ms),
                health_grace_ms = COALESCE(?13, health_grace_ms),
                constraints = COALESCE(?16, constraints),
                overcommit = COALESCE(?17, overcommit)
             WHERE app_id = ?14 AND name = ?15",
        )
        .bind(p.command.is_some())
        .bind(
            p.command
                .clone()
                .flatten()
                .map(|c| serde_json::to_string(&c).expect("argv serialises")),
        )
        .bind(p.port.map(i64::from))
        .bind(p.memory_bytes.is_some())
        .bind(p.memory_bytes.flatten().map(|m| m as i64))
        .bind(p.nano_cpus.is_some())
        .bind(p.nano_cpus.flatten())
        .bind(p.surge.map(i64::from))
        .bind(p.health_kind.map(HealthKind::as_str))
        .bind(p.health_path.clone())
        .bind(p.health_interval_ms.map(i64::from))
        .bind(p.health_timeout_ms.map(i64::from))
        .bind(p.health_grace_ms.map(i64::from))
        .bind(a.id)
        .bind(process)
        .bind(p.constraints.as_ref().map(constraints_json))
        .bind(p.overcommit)
        .execute(&mut **tx)
        .await?;
        audit(
            tx,
            actor,
            Some(app),
            "process.update",
            &describe_patch(process, p),
        )
        .await?;
        Ok(())
    }
}

impl Registry {
    /// Sets instance counts of existing process types, all or nothing.
    pub async fn set_formation(
        &self,
        actor: &Actor,
        app: &str,
        counts: &BTreeMap<String, u32>,
    ) -> Result<Vec<ProcessType>> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let known = process_names(&mut tx, a.id).await?;
        for name in counts.keys() {
            if !known.contains(name) {
                return Err(missing_process(app, name, &known));
            }
        }
        for (name, n) in counts {
            sqlx::query("UPDATE process_types SET instances = ? WHERE app_id = ? AND name = ?")
                .bind(*n as i64)
                .bind(a.id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let detail = counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        audit(&mut tx, &actor.name, Some(app), "scale", &detail).await?;
        tx.commit().await?;
        self.processes_of(a.id).await
    }

    /// Config vars of an app; secret values only when `reveal` (admins only).
    pub async fn config(&self, actor: &Actor, app: &str, reveal: bool) -> Result<Vec<ConfigVar>> {
        if reveal {
            actor.require_admin("revealing secret config values")?;
        }
        let a = self.app(actor, app).await?;
        let rows = self.config_rows(a.id).await?;
        rows.into_iter()
            .map(|(key, value, secret)| {
                let value = match (secret, reveal) {
                    (false, _) => Some(value),
                    (true, true) => Some(self.open_secret(&config_place(app, &key), &value)?),
                    (true, false) => None,
                };
                Ok(ConfigVar { key, value, secret })
            })
            .collect()
    }

    pub(crate) async fn config_rows(&self, app_id: i64) -> Result<Vec<(String, String, bool)>> {
        Ok(sqlx::query_as(
            "SELECT key, value, secret FROM config_vars WHERE app_id = ? ORDER BY key",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sets and unsets config vars in one step. When the app has been deployed, a new release
    /// is created with the new config (as on Heroku) and its version returned.
    pub async fn update_config(
        &self,
        actor: &Actor,
        app: &str,
        set: &[(String, String)],
        secret: bool,
        unset: &[String],
    ) -> Result<Option<u32>> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        for key in unset {
            let n = sqlx::query("DELETE FROM config_vars WHERE app_id = ? AND key = ?")
                .bind(a.id)
                .bind(key)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(not_found("config var", key.clone()));
            }
        }
        for (key, value) in set {
            // A secret stays secret when its value changes, even without `secret` this time:
            // turning it into plain text silently would show it to everyone.
            let was_secret: bool =
                sqlx::query_scalar("SELECT secret FROM config_vars WHERE app_id = ? AND key = ?")
                    .bind(a.id)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?
                    .unwrap_or(false);
            let secret = secret || was_secret;
            let stored = if secret {
                self.key.seal(&config_place(app, key), value.as_bytes())
            } else {
                value.clone()
            };
            sqlx::query(
                "INSERT INTO config_vars (app_id, key, value, secret) VALUES (?, ?, ?, ?)
                 ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value, secret = excluded.secret",
            )
            .bind(a.id)
            .bind(key)
            .bind(stored)
            .bind(secret)
            .execute(&mut *tx)
            .await?;
        }
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM config_vars WHERE app_id = ?")
            .bind(a.id)
            .fetch_one(&mut *tx)
            .await?;
        if count as usize > crate::validate::MAX_VARS {
            return Err(RegistryError::Invalid(format!(
                "app `{app}` would have {count} config vars; the limit is {}",
                crate::validate::MAX_VARS
            )));
        }
        let keys: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        let mut description = String::new();
        if !keys.is_empty() {
            description.push_str(&format!("Set {}", keys.join(", ")));
        }
        if !unset.is_empty() {
            if !description.is_empty() {
                description.push_str("; ");
            }
            description.push_str(&format!("Unset {}", unset.join(", ")));
        }
        audit(
            &mut tx,
            &actor.name,
            Some(app),
            "config.update",
            &description,
        )
        .await?;
        // Read inside the transaction: a deploy committed since `self.app()` moved the target.
        let target: Option<i64> =
            sqlx::query_scalar("SELECT target_release FROM apps WHERE id = ?")
                .bind(a.id)
                .fetch_one(&mut *tx)
                .await?;
        let release = match target {
            Some(v) => {
                let image: String = sqlx::query_scalar(
                    "SELECT image FROM releases WHERE app_id = ? AND version = ?",
                )
                .bind(a.id)
                .bind(v)
                .fetch_one(&mut *tx)
                .await?;
                Some(
                    insert_release(
                        &mut tx,
                        &a,
                        &image,
                        "config",
                        &description,
                        &actor.name,
                        None,
                    )
                    .await?,
                )
            }
            None => None,
        };
        tx.commit().await?;
        Ok(release)
    }

    /// Adds a custom domain (normalised by the caller, and checked against the apps domain
    /// with [`crate::validate::custom_domain`]) to an app; see [`Registry::check_domains`].
    pub async fn add_domain(&self, actor: &Actor, app: &str, domain: &str) -> Result<Domain> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        domain_available(&mut tx, &a, domain).await?;
        let now = now_ms();
        sqlx::query("INSERT INTO domains (domain, app_id, created_at) VALUES (?, ?, ?)")
            .bind(domain)
            .bind(a.id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(conflict_if_unique(|| {
                format!("domain `{domain}` is already a domain of app `{app}`")
            }))?;
        audit(&mut tx, &actor.name, Some(app), "domain.add", domain).await?;
        tx.commit().await?;
        Ok(Domain {
            domain: domain.into(),
            app: app.into(),
            created_at: now,
        })
    }

    /// Removes a custom domain from an app.
    pub async fn remove_domain(&self, actor: &Actor, app: &str, domain: &str) -> Result<()> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM domains WHERE domain = ? AND app_id = ?")
            .bind(domain)
            .bind(a.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(not_found("domain", domain));
        }
        audit(&mut tx, &actor.name, Some(app), "domain.remove", domain).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Custom domains of an app.
    pub async fn domains(&self, actor: &Actor, app: &str) -> Result<Vec<Domain>> {
        let a = self.app(actor, app).await?;
        Ok(sqlx::query_as(
            "SELECT domain, ? AS app, created_at FROM domains WHERE app_id = ? ORDER BY domain",
        )
        .bind(app)
        .bind(a.id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Refuses, as adding them would, domains `app` may not have because of other apps: one
    /// attached to another app, or one above or below a domain of another team's app (the
    /// tree of names under a domain belongs to the team holding it; see
    /// [`domain_available`]). For callers that want to refuse before expensive work (a build);
    /// the adding transaction checks again.
    pub async fn check_domains(&self, actor: &Actor, app: &str, domains: &[String]) -> Result<()> {
        let a = self.app(actor, app).await?;
        let mut conn = self.pool.acquire().await?;
        for d in domains {
            domain_available(&mut conn, &a, d).await?;
        }
        Ok(())
    }

    /// Every `(domain, app)` pair (for the routing table).
    pub async fn all_domains(&self) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as("SELECT d.domain, a.name FROM domains d JOIN apps a ON a.id = d.app_id ORDER BY d.domain")
            .fetch_all(&self.pool)
            .await?)
    }
}

/// Fails with a conflict when `domain` may not be added to app `a`: it is attached to another
/// app, or another team holds a name above it (`shop.example.eu` over `www.shop.example.eu`)
/// or below it (`example.eu` over `shop.example.eu`: taking the parent would put the other
/// team's subtree under it, and block that team from names of its own). Within one team,
/// nesting is free. The answer is the same whoever holds the name, and never names the team
/// or the app.
async fn domain_available(
    conn: &mut sqlx::SqliteConnection,
    a: &AppRef,
    domain: &str,
) -> Result<()> {
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM domains d JOIN apps a ON a.id = d.app_id
           WHERE (d.domain = ? AND d.app_id != ?)
              OR (a.team_id != ? AND (
                   (length(?) > length(d.domain) AND substr(?, -length(d.domain) - 1) = '.' || d.domain)
                OR (length(d.domain) > length(?) AND substr(d.domain, -length(?) - 1) = '.' || ?))))",
    )
    .bind(domain)
    .bind(a.id)
    .bind(a.team_id)
    .bind(domain)
    .bind(domain)
    .bind(domain)
    .bind(domain)
    .bind(domain)
    .fetch_one(&mut *conn)
    .await?;
    if taken {
        return Err(RegistryError::Conflict(format!(
            "domain `{domain}` is not available: it, a name above it or a name below it is held by another app; pick another domain"
        )));
    }
    Ok(())
}

fn describe_patch(process: &str, p: &ProcessPatch) -> String {
    let mut parts = vec![format!("process `{process}`")];
    if let Some(c) = &p.command {
        parts.push(match c {
            Some(argv) => format!("command={}", argv.join(" ")),
            None => "command=(image default)".into(),
        });
    }
    if let Some(port) = p.port {
        parts.push(format!("port={port}"));
    }
    if let Some(m) = p.memory_bytes {
        parts.push(format!(
            "memory={}",
            m.map(|m| m.to_string())
                .unwrap_or_else(|| "unlimited".into())
        ));
    }
    if let Some(c) = p.nano_cpus {
        parts.push(format!(
            "cpus={}",
            c.map(|c| format!("{}", c as f64 / 1e9))
                .unwrap_or_else(|| "unlimited".into())
        ));
    }
    if let Some(k) = p.health_kind {
        parts.push(format!("health={}", k.as_str()));
    }
    if let Some(c) = &p.constraints {
        parts.push(format!("constraints={}", constraints_text(c)));
    }
    if let Some(o) = p.overcommit {
        parts.push(format!("overcommit={o}"));
    }
    if let Some(path) = &p.health_path {
        parts.push(format!("health_path={path}"));
    }
    parts.join(" ")
}

/// What applying a manifest changed; all empty when the app already matched it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ManifestApplied {
    /// One line per change, e.g. `process web: memory 256m -> 512m`.
    pub changes: Vec<String>,
    pub processes_created: Vec<String>,
    pub processes_updated: Vec<String>,
    /// Process types the manifest does not declare, removed because `prune` was asked.
    #[serde(default)]
    pub processes_removed: Vec<String>,
    /// Process types the manifest does not declare, left in place (apply with `prune` to
    /// remove them).
    #[serde(default)]
    pub processes_undeclared: Vec<String>,
    pub domains_added: Vec<String>,
    pub domains_removed: Vec<String>,
    pub env_set: Vec<String>,
    pub env_unset: Vec<String>,
    /// The release created because the config changed, when the app had been deployed.
    pub release: Option<u32>,
}

/// Constraints as stored: a JSON object.
fn constraints_json(c: &BTreeMap<String, String>) -> String {
    serde_json::to_string(c).expect("a string map serialises")
}

/// Constraints as shown: `disk=ssd,zone=a`, or `none`.
pub fn constraints_text(c: &BTreeMap<String, String>) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

const PROCESS_SELECT: &str = "SELECT name, command, port, instances, memory_bytes, nano_cpus, surge, health_kind, health_path,
        health_interval_ms, health_timeout_ms, health_grace_ms, constraints, overcommit
 FROM process_types WHERE app_id = ? ORDER BY name";

impl Registry {
    /// Makes the app match a manifest in one transaction: process types in it are created or
    /// changed (formation included), domains and non-secret config vars are made to match
    /// when the manifest has them, and a release is created when the config changed and the
    /// app has been deployed. On any error nothing is changed; when nothing differs nothing is
    /// written (no event, no release).
    pub async fn apply_manifest(
        &self,
        actor: &Actor,
        app: &str,
        m: &crate::manifest::Manifest,
        default_port: u16,
        prune: bool,
    ) -> Result<ManifestApplied> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let out = apply_manifest_in(&mut tx, &a, actor, m, default_port, true, prune).await?;
        if !out.changes.is_empty() {
            tx.commit().await?;
        }
        Ok(out)
    }
}

/// [`Registry::apply_manifest`] inside the caller's transaction. With `release_config`, a
/// config change of a deployed app creates a release; without, the caller releases next (a
/// push) and that release carries the new config. Process types the manifest does not
/// declare are removed with `prune` (when it declares any), else listed as undeclared.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply_manifest_in(
    tx: &mut super::Write,
    a: &AppRef,
    actor: &Actor,
    m: &crate::manifest::Manifest,
    default_port: u16,
    release_config: bool,
    prune: bool,
) -> Result<ManifestApplied> {
    let app = a.name.as_str();
    {
        // Read inside the transaction: a deploy in between must not be lost.
        let target: Option<i64> =
            sqlx::query_scalar("SELECT target_release FROM apps WHERE id = ?")
                .bind(a.id)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or_else(|| not_found("app", app))?;
        let mut out = ManifestApplied::default();

        let current: Vec<ProcessType> = sqlx::query_as::<_, ProcessRow>(PROCESS_SELECT)
            .bind(a.id)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(ProcessType::from)
            .collect();
        for (name, spec) in &m.processes {
            let old = current.iter().find(|p| &p.name == name);
            let want = ProcessType {
                name: name.clone(),
                command: spec.command.clone(),
                port: spec.port.or(old.map(|o| o.port)).unwrap_or(default_port),
                instances: spec.instances.or(old.map(|o| o.instances)).unwrap_or(0),
                memory_bytes: spec.memory_bytes,
                nano_cpus: spec.nano_cpus,
                surge: spec.surge,
                health: spec.health.clone(),
                constraints: spec.constraints.clone(),
                overcommit: spec.overcommit,
            };
            let diff = match old {
                Some(o) => process_diff(o, &want),
                None => vec![format!("created ({})", process_summary(&want))],
            };
            if diff.is_empty() {
                continue;
            }
            let h = &want.health;
            sqlx::query(
                "INSERT INTO process_types (app_id, name, command, port, instances, memory_bytes, nano_cpus, surge,
                    health_kind, health_path, health_interval_ms, health_timeout_ms, health_grace_ms,
                    constraints, overcommit)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (app_id, name) DO UPDATE SET command = excluded.command, port = excluded.port,
                    instances = excluded.instances, memory_bytes = excluded.memory_bytes,
                    nano_cpus = excluded.nano_cpus, surge = excluded.surge, health_kind = excluded.health_kind,
                    health_path = excluded.health_path, health_interval_ms = excluded.health_interval_ms,
                    health_timeout_ms = excluded.health_timeout_ms, health_grace_ms = excluded.health_grace_ms,
                    constraints = excluded.constraints, overcommit = excluded.overcommit",
            )
            .bind(a.id)
            .bind(name)
            .bind(
                want.command
                    .as_ref()
                    .map(|c| serde_json::to_string(c).expect("argv serialises")),
            )
            .bind(i64::from(want.port))
            .bind(i64::from(want.instances))
            .bind(want.memory_bytes.map(|b| b as i64))
            .bind(want.nano_cpus)
            .bind(i64::from(want.surge))
            .bind(h.kind.as_str())
            .bind(&h.path)
            .bind(i64::from(h.interval_ms))
            .bind(i64::from(h.timeout_ms))
            .bind(i64::from(h.grace_ms))
            .bind(constraints_json(&want.constraints))
            .bind(want.overcommit)
            .execute(&mut **tx)
            .await?;
            if old.is_some() {
                out.processes_updated.push(name.clone());
            } else {
                out.processes_created.push(name.clone());
            }
            out.changes
                .extend(diff.into_iter().map(|d| format!("process {name}: {d}")));
        }
        // A manifest without process types leaves them alone, prune or not.
        for p in current
            .iter()
            .filter(|p| !m.processes.is_empty() && !m.processes.contains_key(&p.name))
        {
            if !prune {
                out.processes_undeclared.push(p.name.clone());
                continue;
            }
            sqlx::query("DELETE FROM process_types WHERE app_id = ? AND name = ?")
                .bind(a.id)
                .bind(&p.name)
                .execute(&mut **tx)
                .await?;
            out.processes_removed.push(p.name.clone());
            out.changes.push(format!(
                "process {}: removed (not in the manifest; it ran {} instance{})",
                p.name,
                p.instances,
                if p.instances == 1 { "" } else { "s" }
            ));
        }

        if let Some(domains) = &m.domains {
            let have: Vec<String> =
                sqlx::query_scalar("SELECT domain FROM domains WHERE app_id = ? ORDER BY domain")
                    .bind(a.id)
                    .fetch_all(&mut **tx)
                    .await?;
            for d in have.iter().filter(|d| !domains.contains(d)) {
                sqlx::query("DELETE FROM domains WHERE domain = ? AND app_id = ?")
                    .bind(d)
                    .bind(a.id)
                    .execute(&mut **tx)
                    .await?;
                out.domains_removed.push(d.clone());
                out.changes.push(format!("domain {d} removed"));
            }
            for d in domains.iter().filter(|d| !have.contains(d)) {
                domain_available(tx, a, d).await.map_err(|e| match e {
                    RegistryError::Conflict(m) => {
                        RegistryError::Conflict(format!("{m}; nothing was applied"))
                    }
                    other => other,
                })?;
                sqlx::query("INSERT INTO domains (domain, app_id, created_at) VALUES (?, ?, ?)")
                    .bind(d)
                    .bind(a.id)
                    .bind(now_ms())
                    .execute(&mut **tx)
                    .await
                    .map_err(conflict_if_unique(|| {
                        format!(
                            "domain `{d}` is already attached to another app; nothing was applied"
                        )
                    }))?;
                out.domains_added.push(d.clone());
                out.changes.push(format!("domain {d} added"));
            }
        }

        if let Some(env) = &m.env {
            let have: Vec<(String, String, bool)> = sqlx::query_as(
                "SELECT key, value, secret FROM config_vars WHERE app_id = ? ORDER BY key",
            )
            .bind(a.id)
            .fetch_all(&mut **tx)
            .await?;
            for (key, value) in env {
                match have.iter().find(|(k, _, _)| k == key) {
                    Some((_, _, true)) => {
                        return Err(RegistryError::Conflict(format!(
                            "`{key}` is a secret config var of `{app}`; a manifest holds only non-secret values: remove it from [env], or first unset the secret with `escale config unset {app} {key}`; nothing was applied"
                        )))
                    }
                    Some((_, v, false)) if v == value => continue,
                    _ => {}
                }
                sqlx::query(
                    "INSERT INTO config_vars (app_id, key, value, secret) VALUES (?, ?, ?, 0)
                     ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value",
                )
                .bind(a.id)
                .bind(key)
                .bind(value)
                .execute(&mut **tx)
                .await?;
                out.env_set.push(key.clone());
            }
            for (key, _, secret) in &have {
                if !secret && !env.contains_key(key) {
                    sqlx::query("DELETE FROM config_vars WHERE app_id = ? AND key = ?")
                        .bind(a.id)
                        .bind(key)
                        .execute(&mut **tx)
                        .await?;
                    out.env_unset.push(key.clone());
                }
            }
            let count: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM config_vars WHERE app_id = ?")
                    .bind(a.id)
                    .fetch_one(&mut **tx)
                    .await?;
            if count as usize > crate::validate::MAX_VARS {
                return Err(RegistryError::Invalid(format!(
                    "app `{app}` would have {count} config vars (secrets included); the limit is {}",
                    crate::validate::MAX_VARS
                )));
            }
        }
        let mut config_change = Vec::new();
        if !out.env_set.is_empty() {
            config_change.push(format!("Set {}", out.env_set.join(", ")));
        }
        if !out.env_unset.is_empty() {
            config_change.push(format!("Unset {}", out.env_unset.join(", ")));
        }
        let config_change = config_change.join("; ");
        if !config_change.is_empty() {
            out.changes.push(format!("config: {config_change}"));
        }

        if out.changes.is_empty() {
            // Nothing differs: write nothing (the caller does not commit).
            return Ok(out);
        }
        audit(
            tx,
            &actor.name,
            Some(app),
            "manifest.apply",
            &out.changes.join("; "),
        )
        .await?;
        if let (Some(v), false, true) = (target, config_change.is_empty(), release_config) {
            let image: String =
                sqlx::query_scalar("SELECT image FROM releases WHERE app_id = ? AND version = ?")
                    .bind(a.id)
                    .bind(v)
                    .fetch_one(&mut **tx)
                    .await?;
            let release = insert_release(
                tx,
                a,
                &image,
                "config",
                &format!("Manifest: {config_change}"),
                &actor.name,
                None,
            )
            .await?;
            out.release = Some(release);
        }
        Ok(out)
    }
}

/// A process type in a few words, for the change list.
fn process_summary(p: &ProcessType) -> String {
    let mut parts = vec![
        format!("port {}", p.port),
        format!("instances {}", p.instances),
    ];
    if let Some(c) = &p.command {
        parts.push(format!("command {}", c.join(" ")));
    }
    parts.join(", ")
}

/// Field-by-field differences `old -> new` of a process type.
fn process_diff(old: &ProcessType, new: &ProcessType) -> Vec<String> {
    use crate::manifest::{cpus_text, duration_text, memory_text};
    fn show<T: std::fmt::Debug>(v: &T) -> String {
        format!("{v:?}")
    }
    let limit = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} {a} -> {b}"));
        }
    };
    let cmd = |c: &Option<Vec<String>>| {
        c.as_ref()
            .map(show)
            .unwrap_or_else(|| "(image default)".into())
    };
    field("command", cmd(&old.command), cmd(&new.command));
    field("port", old.port.to_string(), new.port.to_string());
    field(
        "instances",
        old.instances.to_string(),
        new.instances.to_string(),
    );
    field(
        "memory",
        limit(old.memory_bytes.map(memory_text)),
        limit(new.memory_bytes.map(memory_text)),
    );
    field(
        "cpus",
        limit(old.nano_cpus.map(cpus_text)),
        limit(new.nano_cpus.map(cpus_text)),
    );
    field("surge", old.surge.to_string(), new.surge.to_string());
    field(
        "constraints",
        constraints_text(&old.constraints),
        constraints_text(&new.constraints),
    );
    field(
        "overcommit",
        old.overcommit.to_string(),
        new.overcommit.to_string(),
    );
    let (oh, nh) = (&old.health, &new.health);
    field(
        "health kind",
        oh.kind.as_str().into(),
        nh.kind.as_str().into(),
    );
    field("health path", oh.path.clone(), nh.path.clone());
    field(
        "health interval",
        duration_text(oh.interval_ms),
        duration_text(nh.interval_ms),
    );
    field(
        "health timeout",
        duration_text(oh.timeout_ms),
        duration_text(nh.timeout_ms),
    );
    field(
        "health grace",
        duration_text(oh.grace_ms),
        duration_text(nh.grace_ms),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page the API answers, built by SQLite, is the page [`Registry::list_apps`] builds
    /// and serde serialises, field for field: for apps with and without releases, process
    /// types with every optional field set or not, constraints, overcommit, domains, and
    /// names that need escaping in JSON; for an admin and a member; page by page.
    #[tokio::test]
    async fn list_apps_json_is_list_apps() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            &dir.path().join("escale.db"),
            crate::secrets::MasterKey::random(),
        )
        .await
        .unwrap();
        let admin = reg.host_admin().await.unwrap();
        reg.create_team(&admin, "blue").await.unwrap();
        for (i, name) in ["alpha", "beta", "gamma", "delta", "e-1", "zz"]
            .iter()
            .enumerate()
        {
            let team = (i % 2 == 1).then_some("blue");
            reg.create_app(&admin, name, team, 8000 + i as u16)
                .await
                .unwrap();
        }
        reg.create_release(&admin, "beta", "img:1", "test", "first")
            .await
            .unwrap();
        let patch = ProcessPatch {
            command: Some(Some(vec!["/bin/run".into(), "--say=\"hi\"\n\\é".into()])),
            memory_bytes: Some(Some(256 << 20)),
            nano_cpus: Some(Some(1_500_000_000)),
            surge: Some(2),
            health_kind: Some(HealthKind::Tcp),
            constraints: Some(BTreeMap::from([
                ("disk".to_string(), "ssd".to_string()),
                ("zone".to_string(), "fr-par-1".to_string()),
            ])),
            overcommit: Some(true),
            ..Default::default()
        };
        reg.upsert_process(&admin, "beta", "worker", &patch, 8080, true)
            .await
            .unwrap();
        reg.upsert_process(&admin, "gamma", "web", &patch, 8080, false)
            .await
            .unwrap();
        reg.add_domain(&admin, "beta", "b.example.org")
            .await
            .unwrap();
        reg.add_domain(&admin, "beta", "a.example.org")
            .await
            .unwrap();
        let member = Actor {
            user_id: 0,
            name: "bob".into(),
            role: crate::registry::Role::Member,
            team_id: sqlx::query_scalar("SELECT id FROM teams WHERE name = 'blue'")
                .fetch_one(reg.pool())
                .await
                .unwrap(),
            team: "blue".into(),
        };
        for actor in [&admin, &member] {
            for limit in [1, 2, 4, 100] {
                let mut after: Option<String> = None;
                let mut seen = 0;
                loop {
                    let (json, next) = reg
                        .list_apps_json(actor, after.as_deref(), limit)
                        .await
                        .unwrap();
                    let mut want = reg
                        .list_apps(actor, after.as_deref(), limit + 1)
                        .await
                        .unwrap();
                    let more = want.len() > limit as usize;
                    want.truncate(limit as usize);
                    let got: serde_json::Value = serde_json::from_str(&json).unwrap();
                    assert_eq!(
                        got,
                        serde_json::to_value(&want).unwrap(),
                        "{} limit {limit} after {after:?}",
                        actor.name
                    );
                    seen += want.len();
                    assert_eq!(
                        next,
                        more.then(|| want.last().unwrap().name.clone()),
                        "next cursor"
                    );
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                assert_eq!(seen, if actor.is_admin() { 6 } else { 3 });
            }
        }
        // Every kind of write shows in the very next list (the cache is rebuilt).
        let same = |reg: &Registry| {
            let reg = reg.clone();
            let admin = admin.clone();
            async move {
                let (json, _) = reg.list_apps_json(&admin, None, 100).await.unwrap();
                let want = reg.list_apps(&admin, None, 100).await.unwrap();
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&json).unwrap(),
                    serde_json::to_value(&want).unwrap()
                );
                want
            }
        };
        same(&reg).await;
        reg.add_domain(&admin, "alpha", "alpha.example.org")
            .await
            .unwrap();
        let apps = same(&reg).await;
        assert_eq!(apps[0].domains, ["alpha.example.org"]);
        reg.set_formation(&admin, "beta", &BTreeMap::from([("web".to_string(), 7)]))
            .await
            .unwrap();
        let apps = same(&reg).await;
        assert_eq!(apps[1].processes[0].instances, 7);
        reg.create_release(&admin, "alpha", "img:2", "test", "second")
            .await
            .unwrap();
        assert!(same(&reg).await[0].release.is_some());
        reg.create_app(&admin, "aaa", None, 8080).await.unwrap();
        assert_eq!(same(&reg).await[0].name, "aaa");
        reg.destroy_app(&admin, "aaa").await.unwrap();
        assert_eq!(same(&reg).await[0].name, "alpha");
        // Whatever path writes (here plain SQL), the triggers move the version.
        sqlx::query("UPDATE process_types SET instances = 3 WHERE name = 'worker'")
            .execute(reg.pool())
            .await
            .unwrap();
        assert_eq!(same(&reg).await[1].processes[1].instances, 3);
        // A write to anything else leaves the list's version (and its cache) alone.
        let version = || async {
            sqlx::query_scalar::<_, i64>("SELECT version FROM app_list_version")
                .fetch_one(reg.pool())
                .await
                .unwrap()
        };
        let before = version().await;
        reg.update_config(&admin, "gamma", &[("K".into(), "v".into())], false, &[])
            .await
            .unwrap();
        assert_eq!(version().await, before);

        // Past the end: an empty array, no cursor.
        let (json, next) = reg.list_apps_json(&admin, Some("zzz"), 10).await.unwrap();
        assert_eq!((json.as_str(), next), ("[]", None));
    }
}
