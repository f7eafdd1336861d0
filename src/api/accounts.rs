//! Setup, login, users, teams and API tokens.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, AppState, Auth, Json, Path};
use crate::auth::{generate_token, token_hash};
use crate::registry::{NewToken, Role, Team, TokenInfo, User};
use crate::validate;

/// Binds the first admin, with the one-time token printed by `escale serve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    pub setup_token: String,
    pub name: String,
    pub password: String,
}

/// Exchanges a user name and password for a new API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
    /// Name of the token to create; default `login-<unix time>-<random>`.
    #[serde(default)]
    pub token_name: Option<String>,
}

/// A token, shown once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewTokenResponse {
    pub name: String,
    /// The secret: store it now, it is not shown again.
    pub token: String,
    pub user: String,
    pub role: Role,
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub name: String,
    pub role: Role,
    pub team: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub name: String,
    /// Optional: a user without password logs in with tokens an admin creates.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_role")]
    pub role: Role,
    /// Default `default`.
    #[serde(default)]
    pub team: Option<String>,
}

fn default_role() -> Role {
    Role::Member
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub name: String,
}

#[utoipa::path(post, path = "/api/v1/setup", tag = "accounts", request_body = SetupRequest,
    responses((status = 201, body = NewTokenResponse), (status = 403, body = super::Problem),
        (status = 503, body = super::Problem)))]
pub async fn setup(
    State(s): State<AppState>,
    Json(req): Json<SetupRequest>,
) -> Result<(StatusCode, Json<NewTokenResponse>), ApiError> {
    validate::account_name(&req.name, "user name")?;
    // The token first: a caller without it must not make the server hash anything.
    let setup_hash = token_hash(req.setup_token.trim());
    s.registry.check_setup_token(&setup_hash).await?;
    let password_hash = s.hashing.hash(&req.password).await?;
    let token = generate_token();
    let actor = s
        .registry
        .complete_setup(
            &setup_hash,
            &req.name,
            &password_hash,
            NewToken {
                name: "setup",
                prefix: &token.prefix,
                hash: &token.hash,
            },
        )
        .await?;
    tracing::info!(user = %actor.name, "first admin created");
    Ok((
        StatusCode::CREATED,
        Json(NewTokenResponse {
            name: "setup".into(),
            token: token.secret,
            user: actor.name,
            role: actor.role,
        }),
    ))
}

#[utoipa::path(post, path = "/api/v1/login", tag = "accounts", request_body = LoginRequest,
    responses((status = 201, body = NewTokenResponse), (status = 401, body = super::Problem), (status = 429, body = super::Problem),
        (status = 503, body = super::Problem)))]
pub async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<LoginRequest>,
) -> Result<(StatusCode, Json<NewTokenResponse>), ApiError> {
    let user = req.name.chars().take(64).collect::<String>();
    if let Err(wait) = s.limiter.check(&user, peer.ip()) {
        return Err(ApiError::TooManyRequests(wait.as_secs().max(1)));
    }
    let creds = s.registry.user_credentials(&user).await?;
    let stored = creds.as_ref().and_then(|(_, h)| h.clone());
    // Bounded, off the async workers; an unknown user is checked against a dummy hash.
    let ok = s.hashing.verify(&req.password, stored).await?;
    let actor = match (ok, creds) {
        (true, Some((actor, _))) => actor,
        _ => {
            s.limiter.failed(&user, peer.ip());
            return Err(ApiError::Unauthorized("wrong user name or password".into()));
        }
    };
    s.limiter.succeeded(&user, peer.ip());
    let name = req.token_name.unwrap_or_else(|| {
        format!(
            "login-{}-{}",
            crate::registry::now_ms() / 1000,
            crate::auth::random_hex(3)
        )
    });
    validate::token_name(&name)?;
    issue_token(&s, actor, name).await
}

#[utoipa::path(get, path = "/api/v1/me", tag = "accounts", security(("token" = [])), responses((status = 200, body = Me)))]
pub async fn me(Auth(actor): Auth) -> Json<Me> {
    Json(Me {
        name: actor.name,
        role: actor.role,
        team: actor.team,
    })
}

#[utoipa::path(get, path = "/api/v1/users", tag = "accounts", security(("token" = [])), responses((status = 200, body = [User])))]
pub async fn list_users(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(s.registry.list_users(&actor).await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "accounts", security(("token" = [])), request_body = CreateUserRequest,
    responses((status = 201, body = User)))]
pub async fn create_user(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Json(req): Json<CreateUserRequest>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    actor.require_admin("creating users")?;
    validate::account_name(&req.name, "user name")?;
    let team = req.team.unwrap_or_else(|| "default".into());
    validate::account_name(&team, "team name")?;
    let hash = match &req.password {
        Some(p) => Some(s.hashing.hash(p).await?),
        None => None,
    };
    let user = s
        .registry
        .create_user(&actor, &req.name, hash.as_deref(), req.role, &team)
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

#[utoipa::path(delete, path = "/api/v1/users/{name}", tag = "accounts", security(("token" = [])),
    params(("name" = String, Path)), responses((status = 204)))]
pub async fn delete_user(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_user(&actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/teams", tag = "accounts", security(("token" = [])), responses((status = 200, body = [Team])))]
pub async fn list_teams(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<Json<Vec<Team>>, ApiError> {
    Ok(Json(s.registry.list_teams(&actor).await?))
}

#[utoipa::path(post, path = "/api/v1/teams", tag = "accounts", security(("token" = [])), request_body = CreateTeamRequest,
    responses((status = 201, body = Team)))]
pub async fn create_team(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Json(req): Json<CreateTeamRequest>,
) -> Result<(StatusCode, Json<Team>), ApiError> {
    actor.require_admin("creating teams")?;
    validate::account_name(&req.name, "team name")?;
    Ok((
        StatusCode::CREATED,
        Json(s.registry.create_team(&actor, &req.name).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "accounts", security(("token" = [])), responses((status = 200, body = [TokenInfo])))]
pub async fn list_tokens(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(s.registry.list_tokens(&actor).await?))
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "accounts", security(("token" = [])), request_body = CreateTokenRequest,
    responses((status = 201, body = NewTokenResponse)))]
pub async fn create_token(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Json(req): Json<CreateTokenRequest>,
) -> Result<(StatusCode, Json<NewTokenResponse>), ApiError> {
    validate::token_name(&req.name)?;
    issue_token(&s, actor, req.name).await
}

/// Mints a token for `actor`, stores its hash under `name`, and returns the secret once.
async fn issue_token(
    s: &AppState,
    actor: crate::registry::Actor,
    name: String,
) -> Result<(StatusCode, Json<NewTokenResponse>), ApiError> {
    let token = generate_token();
    s.registry
        .create_token(
            &actor,
            NewToken {
                name: &name,
                prefix: &token.prefix,
                hash: &token.hash,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewTokenResponse {
            name,
            token: token.secret,
            user: actor.name,
            role: actor.role,
        }),
    ))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "accounts", security(("token" = [])),
    params(("name" = String, Path)), responses((status = 204)))]
pub async fn delete_token(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.registry.delete_token(&actor, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
