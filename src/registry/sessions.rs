//! Dashboard sessions: stored by the SHA-256 of their id, bound to a user, with an absolute
//! expiry. Logging in creates one (and sweeps expired ones), logging out deletes it.

use super::{audit, now_ms, Actor, ActorRow, Registry, Result};

impl Registry {
    /// Stores a new session for `actor` (its id's hash), valid until `expires_at` (unix ms),
    /// and removes expired sessions of every user.
    pub async fn create_session(&self, actor: &Actor, hash: &str, expires_at: i64) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM web_sessions WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO web_sessions (hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(actor.user_id)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            &actor.name,
            None,
            "session.create",
            "dashboard login",
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The actor of a live (not expired) session.
    pub async fn actor_for_session(&self, hash: &str) -> Result<Option<Actor>> {
        let row: Option<ActorRow> = sqlx::query_as(
            "SELECT u.id, u.name, u.role, u.team_id, t.name AS team FROM web_sessions s
             JOIN users u ON u.id = s.user_id JOIN teams t ON t.id = u.team_id
             WHERE s.hash = ? AND s.expires_at > ?",
        )
        .bind(hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Actor::from))
    }

    /// Ends a session (logout). Ending one that is already gone is not an error.
    pub async fn delete_session(&self, actor: &Actor, hash: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM web_sessions WHERE hash = ?")
            .bind(hash)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            audit(
                &mut tx,
                &actor.name,
                None,
                "session.delete",
                "dashboard logout",
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
