//! Users, teams, API tokens and the one-time setup token.

use serde::{Deserialize, Serialize};

use super::{audit, conflict_if_unique, not_found, now_ms, Registry, RegistryError, Result};

/// What a user may do: an admin everything, a member its team's apps only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::Member
        }
    }
}

/// The authenticated caller of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user_id: i64,
    pub name: String,
    pub role: Role,
    pub team_id: i64,
    pub team: String,
}

impl Actor {
    /// The identity a webhook delivery of `app` deploys under: a member of the app's team,
    /// named after the provider and whoever set the webhook up, as the audit log shows it
    /// (`webhook:github (set up by alice)`).
    pub fn webhook(app: &super::AppRef, provider: &str, set_up_by: &str) -> Actor {
        Actor {
            user_id: 0,
            name: format!("webhook:{provider} (set up by {set_up_by})"),
            role: Role::Member,
            team_id: app.team_id,
            team: app.team.clone(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Fails unless the actor is an admin.
    pub fn require_admin(&self, what: &str) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(RegistryError::Forbidden(format!(
                "{what} needs the admin role"
            )))
        }
    }
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub team: String,
    pub created_at: i64,
}

/// A team.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Team {
    pub name: String,
    pub created_at: i64,
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct TokenInfo {
    pub name: String,
    /// The first characters of the token, to recognise it.
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// A new token to store: only its hash and display prefix.
pub struct NewToken<'a> {
    pub name: &'a str,
    pub prefix: &'a str,
    pub hash: &'a str,
}

#[derive(sqlx::FromRow)]
pub(super) struct ActorRow {
    id: i64,
    name: String,
    role: String,
    team_id: i64,
    team: String,
}

impl From<ActorRow> for Actor {
    fn from(r: ActorRow) -> Actor {
        Actor {
            user_id: r.id,
            name: r.name,
            role: Role::parse(&r.role),
            team_id: r.team_id,
            team: r.team,
        }
    }
}

fn setup_refused() -> RegistryError {
    RegistryError::Forbidden(
        "the setup token is invalid or was already used; the first admin exists or a newer token was printed by `escale serve`".into(),
    )
}

impl Registry {
    /// Number of users; zero means the installation still waits for its first admin.
    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Replaces any unused setup token by this one (only its hash is stored).
    pub async fn store_setup_token(&self, hash: &str) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM setup_tokens WHERE used_at IS NULL")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO setup_tokens (hash, created_at) VALUES (?, ?)")
            .bind(hash)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Fails as [`Registry::complete_setup`] would when the setup token is unknown or used, or
    /// when a user exists; changes nothing. Lets the API refuse before hashing a password.
    pub async fn check_setup_token(&self, setup_hash: &str) -> Result<()> {
        let ok: bool = sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM users)
               AND EXISTS (SELECT 1 FROM setup_tokens WHERE hash = ? AND used_at IS NULL)",
        )
        .bind(setup_hash)
        .fetch_one(&self.pool)
        .await?;
        if ok {
            Ok(())
        } else {
            Err(setup_refused())
        }
    }

    /// Consumes the setup token and creates the first admin with its first API token, all in
    /// one transaction. Fails if the token is unknown or used, or if any user exists.
    pub async fn complete_setup(
        &self,
        setup_hash: &str,
        name: &str,
        password_hash: &str,
        token: NewToken<'_>,
    ) -> Result<Actor> {
        let mut tx = self.write().await?;
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&mut *tx)
            .await?;
        let used =
            sqlx::query("UPDATE setup_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL")
                .bind(now_ms())
                .bind(setup_hash)
                .execute(&mut *tx)
                .await?;
        if users > 0 || used.rows_affected() != 1 {
            return Err(setup_refused());
        }
        let team_id: i64 = sqlx::query_scalar("SELECT id FROM teams WHERE name = 'default'")
            .fetch_one(&mut *tx)
            .await?;
        let user_id: i64 = sqlx::query_scalar(
            "INSERT INTO users (name, password_hash, role, team_id, created_at) VALUES (?, ?, 'admin', ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(password_hash)
        .bind(team_id)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        insert_token(&mut tx, user_id, &token).await?;
        audit(
            &mut tx,
            name,
            None,
            "setup",
            &format!("first admin `{name}` created"),
        )
        .await?;
        tx.commit().await?;
        Ok(Actor {
            user_id,
            name: name.into(),
            role: Role::Admin,
            team_id,
            team: "default".into(),
        })
    }

    /// Creates a user in `team`.
    pub async fn create_user(
        &self,
        actor: &Actor,
        name: &str,
        password_hash: Option<&str>,
        role: Role,
        team: &str,
    ) -> Result<User> {
        actor.require_admin("creating users")?;
        let mut tx = self.write().await?;
        let team_id: i64 = sqlx::query_scalar("SELECT id FROM teams WHERE name = ?")
            .bind(team)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| not_found("team", team))?;
        let now = now_ms();
        sqlx::query("INSERT INTO users (name, password_hash, role, team_id, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(name)
            .bind(password_hash)
            .bind(role.as_str())
            .bind(team_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(conflict_if_unique(|| format!("user `{name}` already exists")))?;
        audit(
            &mut tx,
            &actor.name,
            None,
            "user.create",
            &format!("user `{name}` ({}) in team `{team}`", role.as_str()),
        )
        .await?;
        tx.commit().await?;
        Ok(User {
            name: name.into(),
            role,
            team: team.into(),
            created_at: now,
        })
    }

    /// All users (admin only).
    pub async fn list_users(&self, actor: &Actor) -> Result<Vec<User>> {
        actor.require_admin("listing users")?;
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT u.name, u.role, t.name, u.created_at FROM users u JOIN teams t ON t.id = u.team_id ORDER BY u.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, role, team, created_at)| User {
                name,
                role: Role::parse(&role),
                team,
                created_at,
            })
            .collect())
    }

    /// Removes a user and its tokens. The last admin cannot be removed, nor can the actor
    /// remove itself.
    pub async fn delete_user(&self, actor: &Actor, name: &str) -> Result<()> {
        actor.require_admin("removing users")?;
        let mut tx = self.write().await?;
        let role: String = sqlx::query_scalar("SELECT role FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| not_found("user", name))?;
        if role == "admin" {
            let admins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin'")
                .fetch_one(&mut *tx)
                .await?;
            if admins <= 1 {
                return Err(RegistryError::Conflict(format!(
                    "`{name}` is the last admin; create another admin first"
                )));
            }
        }
        // Removing oneself ends one's own session mid-way and is rarely meant: another admin
        // does it.
        if name == actor.name {
            return Err(RegistryError::Conflict(format!(
                "`{name}` is your own account: another admin can remove it"
            )));
        }
        sqlx::query("DELETE FROM users WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            &actor.name,
            None,
            "user.delete",
            &format!("user `{name}` removed"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates a team (admin only).
    pub async fn create_team(&self, actor: &Actor, name: &str) -> Result<Team> {
        actor.require_admin("creating teams")?;
        let mut tx = self.write().await?;
        let now = now_ms();
        sqlx::query("INSERT INTO teams (name, created_at) VALUES (?, ?)")
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(conflict_if_unique(|| {
                format!("team `{name}` already exists")
            }))?;
        audit(
            &mut tx,
            &actor.name,
            None,
            "team.create",
            &format!("team `{name}`"),
        )
        .await?;
        tx.commit().await?;
        Ok(Team {
            name: name.into(),
            created_at: now,
        })
    }

    /// Teams the actor can see: all for an admin, its own for a member.
    pub async fn list_teams(&self, actor: &Actor) -> Result<Vec<Team>> {
        Ok(
            sqlx::query_as("SELECT name, created_at FROM teams WHERE ? OR id = ? ORDER BY name")
                .bind(actor.is_admin())
                .bind(actor.team_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The actor owning a token hash, updating its last use.
    pub async fn actor_for_token(&self, hash: &str) -> Result<Option<Actor>> {
        let row: Option<ActorRow> = sqlx::query_as(
            "SELECT u.id, u.name, u.role, u.team_id, t.name AS team FROM api_tokens k
             JOIN users u ON u.id = k.user_id JOIN teams t ON t.id = u.team_id WHERE k.hash = ?",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        if row.is_some() {
            // Best effort and coarse (once a minute) so reads do not turn into writes.
            let now = now_ms();
            sqlx::query("UPDATE api_tokens SET last_used_at = ? WHERE hash = ? AND (last_used_at IS NULL OR last_used_at < ?)")
                .bind(now)
                .bind(hash)
                .bind(now - 60_000)
                .execute(&self.pool)
                .await?;
        }
        Ok(row.map(Actor::from))
    }

    /// A user and its password hash, for login.
    pub async fn user_credentials(&self, name: &str) -> Result<Option<(Actor, Option<String>)>> {
        let row: Option<(i64, String, String, i64, String, Option<String>)> = sqlx::query_as(
            "SELECT u.id, u.name, u.role, u.team_id, t.name, u.password_hash FROM users u
             JOIN teams t ON t.id = u.team_id WHERE u.name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, name, role, team_id, team, hash)| {
            (
                Actor {
                    user_id: id,
                    name,
                    role: Role::parse(&role),
                    team_id,
                    team,
                },
                hash,
            )
        }))
    }

    /// Sets a user's password hash (the user itself or an admin).
    pub async fn set_password(&self, actor: &Actor, name: &str, password_hash: &str) -> Result<()> {
        if actor.name != name {
            actor.require_admin("changing another user's password")?;
        }
        let mut tx = self.write().await?;
        let n = sqlx::query("UPDATE users SET password_hash = ? WHERE name = ?")
            .bind(password_hash)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(not_found("user", name));
        }
        audit(
            &mut tx,
            &actor.name,
            None,
            "user.password",
            &format!("password of `{name}` changed"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a new token for the actor. Token names are unique per user.
    pub async fn create_token(&self, actor: &Actor, token: NewToken<'_>) -> Result<TokenInfo> {
        let mut tx = self.write().await?;
        insert_token(&mut tx, actor.user_id, &token).await?;
        audit(
            &mut tx,
            &actor.name,
            None,
            "token.create",
            &format!("token `{}`", token.name),
        )
        .await?;
        tx.commit().await?;
        Ok(TokenInfo {
            name: token.name.into(),
            prefix: token.prefix.into(),
            created_at: now_ms(),
            last_used_at: None,
        })
    }

    /// The actor's tokens.
    pub async fn list_tokens(&self, actor: &Actor) -> Result<Vec<TokenInfo>> {
        Ok(sqlx::query_as(
            "SELECT name, prefix, created_at, last_used_at FROM api_tokens WHERE user_id = ? ORDER BY name",
        )
        .bind(actor.user_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Revokes one of the actor's tokens.
    pub async fn delete_token(&self, actor: &Actor, name: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM api_tokens WHERE user_id = ? AND name = ?")
            .bind(actor.user_id)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(not_found("token", name));
        }
        audit(
            &mut tx,
            &actor.name,
            None,
            "token.delete",
            &format!("token `{name}` revoked"),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// For `escale tokens create` on the host: the first admin, or a new admin `root` when the
    /// installation has none yet (whoever can read the data dir already owns the installation).
    pub async fn host_admin(&self) -> Result<Actor> {
        let mut tx = self.write().await?;
        let existing: Option<ActorRow> = sqlx::query_as(
            "SELECT u.id, u.name, u.role, u.team_id, t.name AS team FROM users u JOIN teams t ON t.id = u.team_id
             WHERE u.role = 'admin' ORDER BY u.id LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let actor = match existing {
            Some(r) => r.into(),
            None => {
                let team_id: i64 =
                    sqlx::query_scalar("SELECT id FROM teams WHERE name = 'default'")
                        .fetch_one(&mut *tx)
                        .await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO users (name, password_hash, role, team_id, created_at) VALUES ('root', NULL, 'admin', ?, ?) RETURNING id",
                )
                .bind(team_id)
                .bind(now_ms())
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM setup_tokens WHERE used_at IS NULL")
                    .execute(&mut *tx)
                    .await?;
                audit(
                    &mut tx,
                    "host",
                    None,
                    "user.create",
                    "admin `root` created on the host",
                )
                .await?;
                Actor {
                    user_id: id,
                    name: "root".into(),
                    role: Role::Admin,
                    team_id,
                    team: "default".into(),
                }
            }
        };
        tx.commit().await?;
        Ok(actor)
    }
}

async fn insert_token(tx: &mut super::Write, user_id: i64, token: &NewToken<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (user_id, name, prefix, hash, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(user_id)
    .bind(token.name)
    .bind(token.prefix)
    .bind(token.hash)
    .bind(now_ms())
    .execute(&mut **tx)
    .await
    .map_err(conflict_if_unique(|| {
        format!(
            "a token named `{}` exists already; revoke it or pick another name",
            token.name
        )
    }))?;
    Ok(())
}
