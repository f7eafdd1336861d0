//! Push webhooks of apps: the repository and branch to deploy from, the shared secret (sealed
//! by the master key, bound to `webhook/<app_id>`), and the delivery ids already seen.

use serde::Serialize;

use super::{audit, is_unique_violation, now_ms, Actor, Registry, RegistryError, Result};

/// Deliveries older than this are forgotten (providers do not redeliver that late).
const DELIVERY_RETENTION_MS: i64 = 90 * 24 * 3600 * 1000;

/// Where an app's webhook secret is sealed.
fn secret_place(app_id: i64) -> String {
    format!("webhook/{app_id}")
}

/// An app's webhook settings, as the API shows them (never the secret).
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Webhook {
    pub app: String,
    /// The repository fetched on a push event.
    pub repository: String,
    /// The branch whose pushes deploy.
    pub branch: String,
    /// Who configured it.
    pub created_by: String,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// An app's webhook with its secret, for verifying a delivery.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub app: super::AppRef,
    pub hook: Webhook,
    pub secret: String,
}

impl Registry {
    /// Sets (creates or replaces) the webhook of `app`.
    pub async fn set_webhook(
        &self,
        actor: &Actor,
        app: &str,
        repository: &str,
        branch: &str,
        secret: &str,
    ) -> Result<Webhook> {
        let a = self.app(actor, app).await?;
        let sealed = self
            .master_key()
            .seal(&secret_place(a.id), secret.as_bytes());
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO webhooks (app_id, repo_url, branch, secret_sealed, created_by, updated_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (app_id) DO UPDATE SET repo_url = excluded.repo_url, branch = excluded.branch,
                secret_sealed = excluded.secret_sealed, created_by = excluded.created_by,
                updated_at = excluded.updated_at",
        )
        .bind(a.id)
        .bind(repository)
        .bind(branch)
        .bind(&sealed)
        .bind(&actor.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            &actor.name,
            Some(&a.name),
            "webhook.set",
            &format!("repository={repository} branch={branch}"),
        )
        .await?;
        tx.commit().await?;
        Ok(Webhook {
            app: a.name,
            repository: repository.into(),
            branch: branch.into(),
            created_by: actor.name.clone(),
            updated_at: now,
        })
    }

    /// The webhook of `app` (not found when it has none).
    pub async fn webhook(&self, actor: &Actor, app: &str) -> Result<Webhook> {
        let a = self.app(actor, app).await?;
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT repo_url, branch, created_by, updated_at FROM webhooks WHERE app_id = ?",
        )
        .bind(a.id)
        .fetch_optional(&self.pool)
        .await?;
        let (repository, branch, created_by, updated_at) =
            row.ok_or_else(|| super::not_found("webhook of app", app))?;
        Ok(Webhook {
            app: a.name,
            repository,
            branch,
            created_by,
            updated_at,
        })
    }

    /// Removes the webhook of `app` and its seen deliveries.
    pub async fn remove_webhook(&self, actor: &Actor, app: &str) -> Result<()> {
        let a = self.app(actor, app).await?;
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM webhooks WHERE app_id = ?")
            .bind(a.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(super::not_found("webhook of app", app));
        }
        sqlx::query("DELETE FROM webhook_deliveries WHERE app_id = ?")
            .bind(a.id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, &actor.name, Some(&a.name), "webhook.remove", "").await?;
        tx.commit().await?;
        Ok(())
    }

    /// The webhook of `app` with its secret, for an unauthenticated delivery; `None` when the
    /// app does not exist or has no webhook.
    pub async fn webhook_target(&self, app: &str) -> Result<Option<WebhookTarget>> {
        let Some(a) = self.all_apps().await?.into_iter().find(|a| a.name == app) else {
            return Ok(None);
        };
        let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT repo_url, branch, secret_sealed, created_by, updated_at FROM webhooks WHERE app_id = ?",
        )
        .bind(a.id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((repository, branch, sealed, created_by, updated_at)) = row else {
            return Ok(None);
        };
        let secret = self.open_secret(&secret_place(a.id), &sealed)?;
        Ok(Some(WebhookTarget {
            hook: Webhook {
                app: a.name.clone(),
                repository,
                branch,
                created_by,
                updated_at,
            },
            app: a,
            secret,
        }))
    }

    /// Records a delivery of `app_id`: its id and the digest of its body. A conflict when
    /// either was seen before: a replay, under its own id or under a new one (the id header
    /// is not covered by the providers' signatures, the body is).
    pub async fn record_delivery(
        &self,
        app_id: i64,
        app: &str,
        delivery: &str,
        body_sha256: &str,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE received_at < ?")
            .bind(now - DELIVERY_RETENTION_MS)
            .execute(&mut *tx)
            .await?;
        let body_key = format!("body:{body_sha256}");
        for (key, what) in [
            (delivery, format!("delivery `{delivery}`")),
            (
                body_key.as_str(),
                "this payload (under another delivery id)".to_string(),
            ),
        ] {
            let r = sqlx::query(
                "INSERT INTO webhook_deliveries (app_id, delivery_id, received_at) VALUES (?, ?, ?)",
            )
            .bind(app_id)
            .bind(key)
            .bind(now)
            .execute(&mut *tx)
            .await;
            match r {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(RegistryError::Conflict(format!(
                        "{what} of app `{app}` was already received; replays are refused"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        audit(
            &mut tx,
            "webhook",
            Some(app),
            "webhook.delivery",
            &format!("delivery={delivery}"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the outcome of a webhook deploy that did not go live (a failed fetch or build
    /// creates no release, so the app's events are where it shows).
    pub async fn webhook_deploy_failed(&self, app: &str, actor: &str, detail: &str) -> Result<()> {
        let mut tx = self.write().await?;
        audit(&mut tx, actor, Some(app), "webhook.deploy_failed", detail).await?;
        tx.commit().await?;
        Ok(())
    }
}
