//! Releases: immutable, numbered snapshots of image + config, and their rollout status.

use serde::{Deserialize, Serialize};

use super::{
    audit, config_place, not_found, now_ms, Actor, AppRef, Registry, RegistryError, Result,
};

/// Where a release is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseStatus {
    /// Being rolled out.
    Deploying,
    /// Serving.
    Active,
    /// Its rollout failed; see `status_reason`.
    Failed,
    /// Replaced by a later release.
    Superseded,
}

impl ReleaseStatus {
    fn parse(s: &str) -> ReleaseStatus {
        match s {
            "active" => ReleaseStatus::Active,
            "failed" => ReleaseStatus::Failed,
            "superseded" => ReleaseStatus::Superseded,
            _ => ReleaseStatus::Deploying,
        }
    }
}

/// A release as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Release {
    pub version: u32,
    pub image: String,
    /// Names of the config vars frozen in this release (values are not shown here).
    pub config_keys: Vec<String>,
    pub source: String,
    pub description: String,
    pub created_by: String,
    pub created_at: i64,
    pub status: ReleaseStatus,
    pub status_reason: Option<String>,
}

/// One frozen config var inside a release (secret values stay sealed).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FrozenVar {
    key: String,
    value: String,
    secret: bool,
}

#[derive(sqlx::FromRow)]
struct ReleaseRow {
    version: i64,
    image: String,
    config: String,
    source: String,
    description: String,
    created_by: String,
    created_at: i64,
    status: String,
    status_reason: Option<String>,
}

/// Decodes the frozen config of release `version` of `app`; a row that does not decode is an
/// error naming the release, never an empty config.
fn frozen_vars(app: &str, version: u32, config: &str) -> Result<Vec<FrozenVar>> {
    serde_json::from_str(config).map_err(|e| RegistryError::UnreadableRelease {
        app: app.to_string(),
        version,
        message: e.to_string(),
    })
}

impl ReleaseRow {
    fn into_release(self, app: &str) -> Result<Release> {
        let r = self;
        let vars = frozen_vars(app, r.version as u32, &r.config)?;
        Ok(Release {
            version: r.version as u32,
            image: r.image,
            config_keys: vars.into_iter().map(|v| v.key).collect(),
            source: r.source,
            description: r.description,
            created_by: r.created_by,
            created_at: r.created_at,
            status: ReleaseStatus::parse(&r.status),
            status_reason: r.status_reason,
        })
    }
}

const RELEASE_COLUMNS: &str =
    "SELECT version, image, config, source, description, created_by, created_at, status, status_reason FROM releases";

/// Creates the next release of `app` with the app's current config, makes it the target, and
/// returns its version.
pub(crate) async fn insert_release(
    tx: &mut super::Write,
    app: &AppRef,
    image: &str,
    source: &str,
    description: &str,
    actor: &str,
    build_log: Option<&str>,
) -> Result<u32> {
    let rows: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT key, value, secret FROM config_vars WHERE app_id = ? ORDER BY key")
            .bind(app.id)
            .fetch_all(&mut **tx)
            .await?;
    let frozen: Vec<FrozenVar> = rows
        .into_iter()
        .map(|(key, value, secret)| FrozenVar { key, value, secret })
        .collect();
    let version: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app_id = ?")
            .bind(app.id)
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query(
        "INSERT INTO releases (app_id, version, image, config, source, description, created_by, created_at, status, build_log)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'deploying', ?)",
    )
    .bind(app.id)
    .bind(version)
    .bind(image)
    .bind(serde_json::to_string(&frozen).expect("config serialises"))
    .bind(source)
    .bind(description)
    .bind(actor)
    .bind(now_ms())
    .bind(build_log)
    .execute(&mut **tx)
    .await?;
    // A rollout in progress that is overtaken by this one is superseded.
    sqlx::query("UPDATE releases SET status = 'superseded', deadline_ms = NULL WHERE app_id = ? AND status = 'deploying' AND version < ?")
        .bind(app.id)
        .bind(version)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE apps SET target_release = ? WHERE id = ?")
        .bind(version)
        .bind(app.id)
        .execute(&mut **tx)
        .await?;
    audit(
        tx,
        actor,
        Some(&app.name),
        "release.create",
        &format!("v{version}: {description} ({image})"),
    )
    .await?;
    Ok(version as u32)
}

impl Registry {
    /// Creates a release of `image` with the app's current config: a deploy.
    pub async fn create_release(
        &self,
        actor: &Actor,
        app: &str,
        image: &str,
        source: &str,
        description: &str,
    ) -> Result<u32> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let v = insert_release(&mut tx, &a, image, source, description, &actor.name, None).await?;
        tx.commit().await?;
        Ok(v)
    }

    /// The version the next release of an app will get (for naming a build before it exists).
    pub async fn next_release_version(&self, app_id: i64) -> Result<u32> {
        let v: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app_id = ?",
        )
        .bind(app_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(v as u32)
    }

    /// The build output kept with a release, if escale built its image.
    pub async fn release_build_log(
        &self,
        actor: &Actor,
        app: &str,
        version: u32,
    ) -> Result<Option<String>> {
        let a = self.app(actor, app).await?;
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT build_log FROM releases WHERE app_id = ? AND version = ?")
                .bind(a.id)
                .bind(version as i64)
                .fetch_optional(&self.pool)
                .await?;
        row.ok_or_else(|| not_found("release", format!("v{version} of {app}")))
    }

    /// Releases of an app, newest first.
    /// Releases of `app`, newest first: at most `limit` of them older than version `before`
    /// (keyset on the version).
    pub async fn releases(
        &self,
        actor: &Actor,
        app: &str,
        before: Option<u32>,
        limit: i64,
    ) -> Result<Vec<Release>> {
        let a = self.app(actor, app).await?;
        let rows: Vec<ReleaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{RELEASE_COLUMNS} WHERE app_id = ? AND version < ? ORDER BY version DESC LIMIT ?"
        )))
        .bind(a.id)
        .bind(before.map(i64::from).unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| r.into_release(app)).collect()
    }

    /// One release.
    pub async fn release(&self, actor: &Actor, app: &str, version: u32) -> Result<Release> {
        let a = self.app(actor, app).await?;
        self.release_of(a.id, app, version)
            .await?
            .ok_or_else(|| not_found("release", format!("v{version} of {app}")))
    }

    pub(crate) async fn release_by_id(&self, app_id: i64, version: u32) -> Result<Option<Release>> {
        let name: Option<String> = sqlx::query_scalar("SELECT name FROM apps WHERE id = ?")
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await?;
        let name = name.unwrap_or_else(|| format!("app #{app_id}"));
        self.release_of(app_id, &name, version).await
    }

    async fn release_of(&self, app_id: i64, app: &str, version: u32) -> Result<Option<Release>> {
        let row: Option<ReleaseRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{RELEASE_COLUMNS} WHERE app_id = ? AND version = ?"
        )))
        .bind(app_id)
        .bind(version as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.into_release(app)).transpose()
    }

    /// Makes a new release with the image and config of `version`; the app's config vars are
    /// restored to that release's, as on Heroku.
    pub async fn rollback(&self, actor: &Actor, app: &str, version: u32) -> Result<u32> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT image, config FROM releases WHERE app_id = ? AND version = ?")
                .bind(a.id)
                .bind(version as i64)
                .fetch_optional(&mut *tx)
                .await?;
        let (image, config) =
            row.ok_or_else(|| not_found("release", format!("v{version} of {app}")))?;
        if a.target_release == Some(version as i64) {
            return Err(RegistryError::Conflict(format!(
                "v{version} is already the current release of `{app}`"
            )));
        }
        // Decoded before anything is touched: a bad row must not wipe the app's config.
        let vars = frozen_vars(app, version, &config)?;
        sqlx::query("DELETE FROM config_vars WHERE app_id = ?")
            .bind(a.id)
            .execute(&mut *tx)
            .await?;
        for v in vars {
            sqlx::query("INSERT INTO config_vars (app_id, key, value, secret) VALUES (?, ?, ?, ?)")
                .bind(a.id)
                .bind(v.key)
                .bind(v.value)
                .bind(v.secret)
                .execute(&mut *tx)
                .await?;
        }
        let new = insert_release(
            &mut tx,
            &a,
            &image,
            &format!("rollback v{version}"),
            &format!("Rollback to v{version}"),
            &actor.name,
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// The environment of a release with secrets opened, for starting its instances.
    pub async fn release_env(&self, app: &AppRef, version: u32) -> Result<Vec<(String, String)>> {
        let config: String =
            sqlx::query_scalar("SELECT config FROM releases WHERE app_id = ? AND version = ?")
                .bind(app.id)
                .bind(version as i64)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| not_found("release", format!("v{version} of {}", app.name)))?;
        let vars = frozen_vars(&app.name, version, &config)?;
        vars.into_iter()
            .map(|v| {
                let value = if v.secret {
                    self.open_secret(&config_place(&app.name, &v.key), &v.value)?
                } else {
                    v.value
                };
                Ok((v.key, value))
            })
            .collect()
    }

    /// The images of each app's last `keep` releases (newest first), by app id: what image
    /// pruning keeps.
    pub async fn recent_release_images(
        &self,
        keep: u32,
    ) -> Result<std::collections::HashMap<i64, Vec<String>>> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT app_id, image FROM (SELECT app_id, image, version, ROW_NUMBER() OVER \
             (PARTITION BY app_id ORDER BY version DESC) AS n FROM releases) \
             WHERE n <= ? ORDER BY app_id, version DESC",
        )
        .bind(keep as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out: std::collections::HashMap<i64, Vec<String>> = Default::default();
        for (app, image) in rows {
            out.entry(app).or_default().push(image);
        }
        Ok(out)
    }

    /// The image of a release.
    pub async fn release_image(&self, app_id: i64, version: u32) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT image FROM releases WHERE app_id = ? AND version = ?")
                .bind(app_id)
                .bind(version as i64)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The rollout deadline of a deploying release, set on first call to `now + timeout`.
    pub async fn rollout_deadline(
        &self,
        app_id: i64,
        version: u32,
        timeout_ms: i64,
    ) -> Result<Option<i64>> {
        let mut tx = self.write().await?;
        let row: Option<(String, Option<i64>)> = sqlx::query_as(
            "SELECT status, deadline_ms FROM releases WHERE app_id = ? AND version = ?",
        )
        .bind(app_id)
        .bind(version as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let out = match row {
            Some((s, Some(d))) if s == "deploying" => Some(d),
            Some((s, None)) if s == "deploying" => {
                let d = now_ms() + timeout_ms;
                sqlx::query("UPDATE releases SET deadline_ms = ? WHERE app_id = ? AND version = ?")
                    .bind(d)
                    .bind(app_id)
                    .bind(version as i64)
                    .execute(&mut *tx)
                    .await?;
                Some(d)
            }
            _ => None,
        };
        tx.commit().await?;
        Ok(out)
    }

    /// Marks a rollout done: the release is active, the previous active one superseded.
    pub async fn rollout_succeeded(&self, app: &AppRef, version: u32) -> Result<()> {
        let mut tx = self.write().await?;
        let n = sqlx::query("UPDATE releases SET status = 'active', deadline_ms = NULL WHERE app_id = ? AND version = ? AND status = 'deploying'")
            .bind(app.id)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            sqlx::query("UPDATE releases SET status = 'superseded' WHERE app_id = ? AND status = 'active' AND version <> ?")
                .bind(app.id)
                .bind(version as i64)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                "scheduler",
                Some(&app.name),
                "release.active",
                &format!("v{version} is serving"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks a rollout failed with its reason and points the app back at its last active
    /// release (if any), so the old release keeps serving. The stored reason says which case
    /// it is (appended to its first line, before any log lines): the previous release keeps
    /// serving, or there is none (a first deploy: nothing of the app runs). Returns that
    /// previous release.
    pub async fn rollout_failed(
        &self,
        app: &AppRef,
        version: u32,
        reason: &str,
    ) -> Result<Option<u32>> {
        let mut tx = self.write().await?;
        let previous: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(version) FROM releases WHERE app_id = ? AND status = 'active'",
        )
        .bind(app.id)
        .fetch_one(&mut *tx)
        .await?;
        let case = match previous {
            Some(p) => format!("the previous release keeps serving (v{p})"),
            None => "no earlier release was ever active, so nothing of the app runs until a deploy succeeds".to_string(),
        };
        let reason = match reason.split_once('\n') {
            Some((first, rest)) => format!("{first}; {case}\n{rest}"),
            None => format!("{reason}; {case}"),
        };
        let n = sqlx::query("UPDATE releases SET status = 'failed', status_reason = ?, deadline_ms = NULL WHERE app_id = ? AND version = ? AND status = 'deploying'")
            .bind(&reason)
            .bind(app.id)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            sqlx::query("UPDATE apps SET target_release = ? WHERE id = ? AND target_release = ?")
                .bind(previous)
                .bind(app.id)
                .bind(version as i64)
                .execute(&mut *tx)
                .await?;
            audit(
                &mut tx,
                "scheduler",
                Some(&app.name),
                "release.failed",
                &format!("v{version} failed: {reason}"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(previous.map(|v| v as u32))
    }
}

/// What the scheduler needs of one app, read in one pass.
#[derive(Debug, Clone)]
pub struct DesiredApp {
    pub app: AppRef,
    /// Target release: version, image, status and rollout deadline.
    pub release: Option<(u32, String, ReleaseStatus, Option<i64>)>,
    pub processes: Vec<super::ProcessType>,
}

impl Registry {
    /// Every app with its target release and process types: two queries, whatever the size.
    pub async fn desired_state(&self) -> Result<Vec<DesiredApp>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            uid: String,
            name: String,
            team_id: i64,
            team: String,
            target_release: Option<i64>,
            created_at: i64,
            image: Option<String>,
            status: Option<String>,
            deadline_ms: Option<i64>,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT a.id, a.uid, a.name, a.team_id, t.name AS team, a.target_release, a.created_at, r.image, r.status, r.deadline_ms
             FROM apps a JOIN teams t ON t.id = a.team_id
             LEFT JOIN releases r ON r.app_id = a.id AND r.version = a.target_release ORDER BY a.name",
        )
        .fetch_all(&self.pool)
        .await?;
        let procs = self.all_processes().await?;
        Ok(rows
            .into_iter()
            .map(|r| DesiredApp {
                processes: procs.get(&r.id).cloned().unwrap_or_default(),
                release: match (r.target_release, r.image, r.status) {
                    (Some(v), Some(img), Some(st)) => {
                        Some((v as u32, img, ReleaseStatus::parse(&st), r.deadline_ms))
                    }
                    _ => None,
                },
                app: AppRef {
                    id: r.id,
                    uid: r.uid,
                    name: r.name,
                    team_id: r.team_id,
                    team: r.team,
                    target_release: r.target_release,
                    created_at: r.created_at,
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A corrupt frozen config is an error naming the release; rollback changes nothing and
    /// no environment is made up for an instance.
    #[tokio::test]
    async fn an_unreadable_frozen_config_fails_rollback_and_release_env_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(
            &dir.path().join("escale.db"),
            crate::secrets::MasterKey::random(),
        )
        .await
        .unwrap();
        let admin = reg.host_admin().await.unwrap();
        reg.create_app(&admin, "shop", None, 8080).await.unwrap();
        let set = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        reg.update_config(&admin, "shop", &set("A", "1"), false, &[])
            .await
            .unwrap();
        let v1 = reg
            .create_release(&admin, "shop", "img:1", "test", "first")
            .await
            .unwrap();
        let v2 = reg
            .update_config(&admin, "shop", &set("B", "2"), false, &[])
            .await
            .unwrap()
            .expect("a deployed app gets a release per config change");
        let config_before = reg.config(&admin, "shop", true).await.unwrap();
        assert_eq!(config_before.len(), 2);

        sqlx::query("UPDATE releases SET config = '{not json' WHERE version = ?")
            .bind(v1 as i64)
            .execute(reg.pool())
            .await
            .unwrap();

        let e = reg.rollback(&admin, "shop", v1).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::UnreadableRelease { .. }),
            "{e:?}"
        );
        assert!(
            msg.contains(&format!("release v{v1} of shop")) && msg.contains("nothing was changed"),
            "{msg}"
        );
        let config_after = reg.config(&admin, "shop", true).await.unwrap();
        let keys = |c: &[crate::registry::ConfigVar]| -> Vec<String> {
            c.iter()
                .map(|v| format!("{}={:?}", v.key, v.value))
                .collect()
        };
        assert_eq!(
            keys(&config_after),
            keys(&config_before),
            "config untouched"
        );
        let app = reg.app(&admin, "shop").await.unwrap();
        assert_eq!(app.target_release, Some(v2 as i64), "no release made");

        let e = reg.release_env(&app, v1).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!("release v{v1} of shop")),
            "{e}"
        );
        // The good release still works.
        let env = reg.release_env(&app, v2).await.unwrap();
        assert_eq!(env.len(), 2);
        // Reading the bad release names it too, instead of showing no config keys.
        let e = reg.release(&admin, "shop", v1).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!("release v{v1} of shop")),
            "{e}"
        );
    }
}

/// An app's latest release, for the dashboard's overview.
#[derive(Debug, Clone)]
pub struct LatestRelease {
    pub version: u32,
    pub status: ReleaseStatus,
    pub status_reason: Option<String>,
    pub created_at: i64,
    pub created_by: String,
}

impl Registry {
    /// The latest release of every app the actor can see, by app name (one query).
    pub async fn latest_releases(
        &self,
        actor: &Actor,
    ) -> Result<std::collections::HashMap<String, LatestRelease>> {
        let rows: Vec<(String, i64, String, Option<String>, i64, String)> = sqlx::query_as(
            "SELECT a.name, r.version, r.status, r.status_reason, r.created_at, r.created_by
             FROM apps a JOIN releases r ON r.app_id = a.id
             WHERE (? OR a.team_id = ?)
               AND r.version = (SELECT MAX(version) FROM releases WHERE app_id = a.id)",
        )
        .bind(actor.is_admin())
        .bind(actor.team_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(app, version, status, status_reason, created_at, created_by)| {
                    (
                        app,
                        LatestRelease {
                            version: version as u32,
                            status: ReleaseStatus::parse(&status),
                            status_reason,
                            created_at,
                            created_by,
                        },
                    )
                },
            )
            .collect())
    }
}
