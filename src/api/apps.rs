//! Apps, process types, formation, config, releases, domains and their audit events.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, Auth, Json, Path, Query};
use crate::manifest::{Checks, Manifest};
use crate::registry::{
    App, ConfigVar, Domain, Event, HealthKind, ManifestApplied, ProcessPatch, ProcessType, Release,
};
use crate::validate;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppRequest {
    pub name: String,
    /// Owning team; default the caller's. Only an admin may name another team.
    #[serde(default)]
    pub team: Option<String>,
    /// Port of the `web` process; default from the server's `scheduler.default_port`.
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub port: Option<i64>,
}

/// Changes to a process type; absent fields stay as they are.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessUpdate {
    /// argv; an empty list means the image's default command.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub port: Option<i64>,
    /// e.g. `256m`, `1g`; `none` removes the limit.
    #[serde(default)]
    pub memory: Option<String>,
    /// e.g. `0.5`, `2`; `none` removes the limit.
    #[serde(default)]
    pub cpus: Option<String>,
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub surge: Option<i64>,
    #[serde(default, deserialize_with = "crate::http::int::option_object")]
    pub health: Option<HealthUpdate>,
    /// Node labels its instances need, e.g. `{"disk": "ssd"}`; replaces the current ones (`{}`
    /// clears them).
    #[serde(default)]
    pub constraints: Option<BTreeMap<String, String>>,
    /// Its instances may use node memory and CPUs escale already gave to others.
    #[serde(default)]
    pub overcommit: Option<bool>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthUpdate {
    #[serde(default)]
    pub kind: Option<HealthKind>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub interval_ms: Option<i64>,
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub timeout_ms: Option<i64>,
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub grace_ms: Option<i64>,
}

/// Process type -> instances (`3` or `3.0`).
#[derive(Debug, Deserialize)]
pub struct Formation(#[serde(deserialize_with = "crate::http::int::map")] BTreeMap<String, i64>);

/// Sets and unsets config vars in one change: `unset` first, then `set` (a name in both ends
/// set).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
    /// Store the `set` values encrypted and hide them from reads.
    #[serde(default)]
    pub secret: bool,
}

/// The result of a config change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigChanged {
    pub vars: Vec<ConfigVar>,
    /// The release created for the change, when the app had been deployed.
    pub release: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConfigQuery {
    /// Show secret values (admins only).
    #[serde(default)]
    pub reveal: bool,
}

/// Deploys an image: creates a release with the app's current config and rolls it out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub image: String,
    /// Port the `web` process listens on, if it changes.
    #[serde(default, deserialize_with = "crate::http::int::option")]
    pub port: Option<i64>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to roll back to, e.g. `3` or `"v3"`.
    pub version: serde_json::Value,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DomainRequest {
    pub domain: String,
}

/// An `escale.toml` manifest to apply.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManifestRequest {
    /// The TOML text.
    pub manifest: String,
    /// Remove the process types the manifest does not declare (when it declares any);
    /// without, they are listed in `processes_undeclared` and left in place.
    #[serde(default)]
    pub prune: bool,
}

/// An app's current state as an `escale.toml` manifest (secret config vars left out).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ManifestDocument {
    pub app: String,
    /// The TOML text; applying it back changes nothing.
    pub manifest: String,
}

/// A page of events, newest first.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Most events to answer, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<i64>,
    /// The `after` of the previous page's `Link: rel="next"`: the id of its last (oldest) event.
    #[serde(default)]
    pub after: Option<i64>,
}

/// A page of apps, by name.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AppsQuery {
    /// Most apps to answer, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<i64>,
    /// The `after` of the previous page's `Link: rel="next"`: the name of its last app.
    #[serde(default)]
    pub after: Option<String>,
}

/// A page of releases, newest first.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReleasesQuery {
    /// Most releases to answer, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<i64>,
    /// The `after` of the previous page's `Link: rel="next"`: the version of its last
    /// (oldest) release.
    #[serde(default)]
    pub after: Option<i64>,
}

/// The page size asked for: 1 to 1000, default 100.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let n = limit.unwrap_or(100);
    if (1..=1000).contains(&n) {
        Ok(n)
    } else {
        Err(ApiError::Unprocessable(format!(
            "limit {n} is out of range: use 1 to 1000"
        )))
    }
}

/// A numeric cursor (an event id, a release version): 1 to 999999999999.
fn numeric_cursor(after: Option<i64>) -> Result<Option<i64>, ApiError> {
    match after {
        Some(n) if !(1..=MAX_CURSOR).contains(&n) => Err(ApiError::Unprocessable(format!(
            "after {n} is out of range: give the `after` of a `Link: rel=\"next\"` header"
        ))),
        other => Ok(other),
    }
}

/// Largest numeric `after`.
pub const MAX_CURSOR: i64 = 999_999_999_999;

/// One page of a list: the items, and when more may follow, the `Link: <...>; rel="next"`
/// header giving the next page (`path?limit=N&after=CURSOR`). `items` holds up to `limit + 1`
/// rows: the extra one only tells that there is a next page.
pub struct Page<T> {
    items: Vec<T>,
    next: Option<String>,
}

impl<T> Page<T> {
    pub fn new(
        mut items: Vec<T>,
        limit: i64,
        path: &str,
        cursor: impl Fn(&T) -> String,
    ) -> Page<T> {
        let limit = limit as usize;
        let next = (items.len() > limit).then(|| {
            items.truncate(limit);
            let last = items.last().map(&cursor).unwrap_or_default();
            next_link(path, limit as i64, &last)
        });
        Page { items, next }
    }
}

/// The `Link` header value of the page after the item `last`.
fn next_link(path: &str, limit: i64, last: &str) -> String {
    // Cursors are app names, event ids and versions: nothing to escape.
    format!("<{path}?limit={limit}&after={last}>; rel=\"next\"")
}

impl<T: Serialize> axum::response::IntoResponse for Page<T> {
    fn into_response(self) -> axum::response::Response {
        let mut r = Json(self.items).into_response();
        if let Some(link) = self.next.and_then(|l| l.parse().ok()) {
            r.headers_mut().insert(axum::http::header::LINK, link);
        }
        r
    }
}

fn app_name(name: &str) -> Result<(), ApiError> {
    // An invalid name cannot exist: answer 404 as for any unknown app, saying why.
    validate::app_name(name).map_err(|e| ApiError::NotFound(e.0))
}

/// Parses `3` or `v3`.
pub fn parse_version(v: &str) -> Result<u32, ApiError> {
    Ok(validate::version(v)?)
}

/// The apps the caller can see, by name, a page at a time (see `Link`).
#[utoipa::path(get, path = "/api/v1/apps", tag = "apps", security(("token" = [])), params(AppsQuery),
    responses((status = 200, body = [App], headers(("Link" = String, description = "`<...>; rel=\"next\"` when more may follow")))))]
pub async fn list_apps(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Query(q): Query<AppsQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let limit = page_limit(q.limit)?;
    // Built as JSON by the registry in one statement (see `Registry::list_apps_json`).
    let (json, last) = s
        .registry
        .list_apps_json(&actor, q.after.as_deref(), limit)
        .await?;
    let mut r = (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response();
    if let Some(link) = last.and_then(|last| next_link("/api/v1/apps", limit, &last).parse().ok()) {
        r.headers_mut().insert(axum::http::header::LINK, link);
    }
    Ok(r)
}

#[utoipa::path(post, path = "/api/v1/apps", tag = "apps", security(("token" = [])), request_body = CreateAppRequest,
    responses((status = 201, body = App), (status = 409, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn create_app(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Json(req): Json<CreateAppRequest>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    validate::app_name(&req.name)?;
    if let Some(t) = &req.team {
        validate::account_name(t, "team name")?;
    }
    let port = match req.port {
        Some(p) => validate::port(p)?,
        None => s.config.scheduler.default_port,
    };
    let app = s
        .registry
        .create_app(&actor, &req.name, req.team.as_deref(), port)
        .await?;
    Ok((StatusCode::CREATED, Json(app)))
}

#[utoipa::path(get, path = "/api/v1/apps/{app}", tag = "apps", security(("token" = [])), params(("app" = String, Path)),
    responses((status = 200, body = App), (status = 404, body = super::Problem)))]
pub async fn get_app(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<App>, ApiError> {
    app_name(&app)?;
    let mut info = s.registry.app_info(&actor, &app).await?;
    info.disk_bytes = s.usage.view().apps_disk.get(&info.name).copied();
    Ok(Json(info))
}

#[utoipa::path(delete, path = "/api/v1/apps/{app}", tag = "apps", security(("token" = [])), params(("app" = String, Path)),
    responses((status = 204), (status = 404, body = super::Problem)))]
pub async fn destroy_app(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    app_name(&app)?;
    let gone = s.registry.destroy_app(&actor, &app).await?;
    // Its git repository and built images: removed now, or by the next collection.
    crate::cleanup::destroyed(&s, &actor.name, &gone).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/apps/{app}/processes", tag = "apps", security(("token" = [])), params(("app" = String, Path)),
    responses((status = 200, body = [ProcessType])))]
pub async fn list_processes(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<Vec<ProcessType>>, ApiError> {
    app_name(&app)?;
    let a = s.registry.app(&actor, &app).await?;
    Ok(Json(s.registry.processes_of(a.id).await?))
}

/// Validates a process update into a registry patch.
pub fn process_patch(u: &ProcessUpdate) -> Result<ProcessPatch, ApiError> {
    let ms = |what: &str, v: Option<i64>| -> Result<Option<u32>, ApiError> {
        Ok(v.map(|n| validate::health_ms(what, n)).transpose()?)
    };
    if let Some(cmd) = &u.command {
        validate::command(cmd)?;
    }
    let h = u.health.as_ref();
    if let Some(p) = h.and_then(|h| h.path.as_deref()) {
        validate::health_path(p)?;
    }
    for (k, v) in u.constraints.iter().flatten() {
        validate::node_label(&format!("{k}={v}"))?;
    }
    Ok(ProcessPatch {
        command: u
            .command
            .clone()
            .map(|c| if c.is_empty() { None } else { Some(c) }),
        port: u.port.map(validate::port).transpose()?,
        memory_bytes: u
            .memory
            .as_deref()
            .map(validate::api_memory_limit)
            .transpose()?,
        nano_cpus: u.cpus.as_deref().map(validate::api_cpus).transpose()?,
        surge: u.surge.map(validate::surge).transpose()?,
        health_kind: h.and_then(|h| h.kind),
        health_path: h.and_then(|h| h.path.clone()),
        health_interval_ms: ms("interval", h.and_then(|h| h.interval_ms))?,
        health_timeout_ms: ms("timeout", h.and_then(|h| h.timeout_ms))?,
        health_grace_ms: ms("grace", h.and_then(|h| h.grace_ms))?,
        constraints: u.constraints.clone(),
        overcommit: u.overcommit,
    })
}

/// Defines a process type, or changes it when it exists (absent fields keep their value, or
/// take their default for a new one).
#[utoipa::path(put, path = "/api/v1/apps/{app}/processes/{process}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("process" = String, Path)), request_body = ProcessUpdate,
    responses((status = 200, body = ProcessType)))]
pub async fn define_process(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, process)): Path<(String, String)>,
    Json(req): Json<ProcessUpdate>,
) -> Result<Json<ProcessType>, ApiError> {
    app_name(&app)?;
    validate::process_name(&process)?;
    let patch = process_patch(&req)?;
    Ok(Json(
        s.services
            .define_process(&actor, &app, &process, &patch)
            .await?,
    ))
}

/// Removes a process type: its instances are stopped.
#[utoipa::path(delete, path = "/api/v1/apps/{app}/processes/{process}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("process" = String, Path)), responses((status = 204)))]
pub async fn remove_process(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, process)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app_name(&app)?;
    validate::process_name(&process)?;
    s.services.remove_process(&actor, &app, &process).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes an existing process type (404 naming the ones the app has otherwise).
#[utoipa::path(patch, path = "/api/v1/apps/{app}/processes/{process}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("process" = String, Path)), request_body = ProcessUpdate,
    responses((status = 200, body = ProcessType)))]
pub async fn update_process(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, process)): Path<(String, String)>,
    Json(req): Json<ProcessUpdate>,
) -> Result<Json<ProcessType>, ApiError> {
    app_name(&app)?;
    validate::process_name(&process)?;
    let patch = process_patch(&req)?;
    Ok(Json(
        s.services
            .update_process(&actor, &app, &process, &patch)
            .await?,
    ))
}

#[utoipa::path(patch, path = "/api/v1/apps/{app}/formation", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body(content = BTreeMap<String, i64>, description = "process type -> instances, e.g. {\"web\": 7}"),
    responses((status = 200, body = [ProcessType])))]
pub async fn update_formation(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(Formation(req)): Json<Formation>,
) -> Result<Json<Vec<ProcessType>>, ApiError> {
    app_name(&app)?;
    if req.is_empty() {
        return Err(ApiError::Unprocessable(
            "give at least one process type and count, e.g. {\"web\": 3}".into(),
        ));
    }
    let mut counts = BTreeMap::new();
    for (name, n) in &req {
        validate::process_name(name)?;
        counts.insert(
            name.clone(),
            validate::instances(name, *n, s.config.max_instances)?,
        );
    }
    let out = s.services.scale(&actor, &app, &counts).await?;
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/apps/{app}/config", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ConfigQuery), responses((status = 200, body = [ConfigVar])))]
pub async fn get_config(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Query(q): Query<ConfigQuery>,
) -> Result<Json<Vec<ConfigVar>>, ApiError> {
    app_name(&app)?;
    Ok(Json(s.registry.config(&actor, &app, q.reveal).await?))
}

#[utoipa::path(patch, path = "/api/v1/apps/{app}/config", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = ConfigUpdate, responses((status = 200, body = ConfigChanged)))]
pub async fn update_config(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<ConfigUpdate>,
) -> Result<Json<ConfigChanged>, ApiError> {
    app_name(&app)?;
    if req.set.is_empty() && req.unset.is_empty() {
        return Err(ApiError::Unprocessable(
            "nothing to change: give `set` and/or `unset`".into(),
        ));
    }
    for (k, v) in &req.set {
        validate::env_key(k)?;
        validate::env_value(k, v)?;
    }
    for k in &req.unset {
        validate::env_key(k)?;
    }
    // Unset first, then set: a name in both ends set.
    let unset: Vec<String> = req
        .unset
        .into_iter()
        .filter(|k| !req.set.contains_key(k))
        .collect();
    let set: Vec<(String, String)> = req.set.into_iter().collect();
    let release = s
        .registry
        .update_config(&actor, &app, &set, req.secret, &unset)
        .await?;
    Ok(Json(ConfigChanged {
        vars: s.registry.config(&actor, &app, false).await?,
        release,
    }))
}

/// Releases, newest first, a page at a time (see `Link`).
#[utoipa::path(get, path = "/api/v1/apps/{app}/releases", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ReleasesQuery),
    responses((status = 200, body = [Release], headers(("Link" = String, description = "`<...>; rel=\"next\"` when more may follow")))))]
pub async fn list_releases(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Query(q): Query<ReleasesQuery>,
) -> Result<Page<Release>, ApiError> {
    app_name(&app)?;
    let limit = page_limit(q.limit)?;
    let before = numeric_cursor(q.after)?.map(|v| v.min(u32::MAX as i64) as u32);
    let releases = s.registry.releases(&actor, &app, before, limit + 1).await?;
    Ok(Page::new(
        releases,
        limit,
        &format!("/api/v1/apps/{app}/releases"),
        |r| r.version.to_string(),
    ))
}

#[utoipa::path(get, path = "/api/v1/apps/{app}/releases/{version}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("version" = String, Path, description = "`3` or `v3`")), responses((status = 200, body = Release)))]
pub async fn get_release(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, version)): Path<(String, String)>,
) -> Result<Json<Release>, ApiError> {
    app_name(&app)?;
    let v = parse_version(&version)?;
    Ok(Json(s.registry.release(&actor, &app, v).await?))
}

#[utoipa::path(post, path = "/api/v1/apps/{app}/releases", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = DeployRequest, responses((status = 201, body = Release)))]
pub async fn create_release(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<DeployRequest>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    app_name(&app)?;
    validate::image_ref(&req.image)?;
    crate::images::refuse_id(&req.image).map_err(|e| {
        ApiError::Unprocessable(format!(
            "cannot deploy `{}`: {e}; nothing was changed",
            req.image
        ))
    })?;
    let port = req.port.map(validate::port).transpose()?;
    let description = req
        .description
        .unwrap_or_else(|| format!("Deploy {}", req.image));
    if description.chars().count() > 500 || description.contains('\0') {
        return Err(ApiError::Unprocessable(
            "description must be at most 500 characters without NUL".into(),
        ));
    }
    // Fails before anything changes when the app is unknown or not the caller's, when another
    // deploy of it is in progress, or when the image cannot be had on any node.
    let req = crate::service::ImageDeploy {
        image: req.image,
        port,
        description,
    };
    let release = s.deploy_image(&actor, &app, &req).await?;
    Ok((StatusCode::CREATED, Json(release)))
}

#[utoipa::path(post, path = "/api/v1/apps/{app}/rollback", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = RollbackRequest, responses((status = 201, body = Release)))]
pub async fn rollback(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    app_name(&app)?;
    let v = match &req.version {
        serde_json::Value::Number(n) => match crate::http::int::integer(n) {
            Some(i) => parse_version(&i.to_string())?,
            None => parse_version(&n.to_string())?,
        },
        serde_json::Value::String(t) => parse_version(t)?,
        _ => {
            return Err(ApiError::Unprocessable(
                "`version` must be a number or a string like \"v3\"".into(),
            ))
        }
    };
    Ok((
        StatusCode::CREATED,
        Json(s.rollback(&actor, &app, v).await?),
    ))
}

/// A custom domain with the state of its TLS certificate.
#[derive(Debug, Serialize, ToSchema)]
pub struct DomainView {
    pub domain: String,
    pub app: String,
    pub created_at: i64,
    pub certificate: crate::certs::CertState,
}

#[utoipa::path(get, path = "/api/v1/apps/{app}/domains", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), responses((status = 200, body = [DomainView])))]
pub async fn list_domains(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<Vec<DomainView>>, ApiError> {
    app_name(&app)?;
    let domains = s.registry.domains(&actor, &app).await?;
    let mut states = crate::certs::store::states(&s.registry).await?;
    Ok(Json(
        domains
            .into_iter()
            .map(|d| DomainView {
                certificate: states
                    .remove(&d.domain)
                    .unwrap_or_else(|| crate::certs::CertState::none(&d.domain)),
                domain: d.domain,
                app: d.app,
                created_at: d.created_at,
            })
            .collect(),
    ))
}

/// A domain added, and what happens next about its certificate.
#[derive(Debug, Serialize, ToSchema)]
pub struct DomainAdded {
    #[serde(flatten)]
    pub domain: Domain,
    /// e.g. "a certificate will be requested from https://acme-v02.api.letsencrypt.org/directory
    /// over http-01 (...)" or "no ACME configured: add a certificate with `escale certs add`".
    pub next: String,
}

/// What happens after a domain is added, as the server's ACME settings say.
fn certificate_next(config: &crate::config::Config, app: &str, domain: &str) -> String {
    use crate::config::AcmeChallenge;
    match &config.acme.directory_url {
        Some(url) => {
            let how = match config.acme.challenge {
                AcmeChallenge::Http01 => "the CA fetches http://DOMAIN/.well-known/acme-challenge/... on port 80",
                AcmeChallenge::TlsAlpn01 => "the CA connects to port 443 with TLS ALPN acme-tls/1",
            };
            format!(
                "a certificate will be requested from {url} over {} ({how}): point {domain}'s DNS at this server; `escale certs list {app}` shows its state",
                config.acme.challenge.as_str()
            )
        }
        None => format!(
            "no ACME configured: add a certificate with `escale certs add {app} {domain} --cert CERT.pem --key KEY.pem`"
        ),
    }
}

#[utoipa::path(post, path = "/api/v1/apps/{app}/domains", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = DomainRequest, responses((status = 201, body = DomainAdded)))]
pub async fn add_domain(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<DomainRequest>,
) -> Result<(StatusCode, Json<DomainAdded>), ApiError> {
    app_name(&app)?;
    let domain = validate::api_domain(&req.domain)?;
    let apps_domain = &s.config.apps_domain;
    validate::custom_domain(&domain, &app, apps_domain).map_err(|e| {
        // The apps domain (and above) is not a domain one can have; another app's names are
        // taken.
        if validate::is_apps_domain_or_above(&domain, apps_domain) {
            ApiError::Unprocessable(e.0)
        } else {
            ApiError::Conflict(e.0)
        }
    })?;
    let d = s.registry.add_domain(&actor, &app, &domain).await?;
    s.certs.wake_acme();
    let next = certificate_next(&s.config, &app, &domain);
    Ok((StatusCode::CREATED, Json(DomainAdded { domain: d, next })))
}

#[utoipa::path(delete, path = "/api/v1/apps/{app}/domains/{domain}", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), ("domain" = String, Path)), responses((status = 204)))]
pub async fn remove_domain(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path((app, domain)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app_name(&app)?;
    let domain = validate::api_domain(&domain)?;
    s.registry.remove_domain(&actor, &app, &domain).await?;
    s.certs.forget(&domain).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Exports the app as an `escale.toml` manifest.
#[utoipa::path(get, path = "/api/v1/apps/{app}/manifest", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), responses((status = 200, body = ManifestDocument), (status = 404, body = super::Problem)))]
pub async fn get_manifest(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
) -> Result<Json<ManifestDocument>, ApiError> {
    app_name(&app)?;
    let info = s.registry.app_info(&actor, &app).await?;
    let config = s.registry.config(&actor, &app, false).await?;
    let secrets: Vec<&str> = config
        .iter()
        .filter(|v| v.secret)
        .map(|v| v.key.as_str())
        .collect();
    let mut text =
        format!("# escale manifest of app `{app}`; apply with: escale apply -f escale.toml\n");
    if !secrets.is_empty() {
        text.push_str(&format!(
            "# Secret config vars are not exported (set them with `escale config set --secret`): {}\n",
            secrets.join(", ")
        ));
    }
    text.push_str(&Manifest::from_app(&info, &config).to_toml());
    Ok(Json(ManifestDocument {
        app,
        manifest: text,
    }))
}

/// Applies an `escale.toml` manifest in one transaction: process types, formation, domains
/// and non-secret config vars. Nothing is changed when any part is refused.
#[utoipa::path(put, path = "/api/v1/apps/{app}/manifest", tag = "apps", security(("token" = [])),
    params(("app" = String, Path)), request_body = ManifestRequest,
    responses((status = 200, body = ManifestApplied), (status = 404, body = super::Problem),
        (status = 409, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn apply_manifest(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Json(req): Json<ManifestRequest>,
) -> Result<Json<ManifestApplied>, ApiError> {
    app_name(&app)?;
    // Another team's app is "not found" before anything about the manifest is said.
    s.registry.app(&actor, &app).await?;
    let checks = Checks {
        app: Some(&app),
        max_instances: Some(s.config.max_instances),
        apps_domain: Some(&s.config.apps_domain),
    };
    let m = Manifest::parse_with(&req.manifest, &checks)
        .map_err(|e| ApiError::Unprocessable(format!("invalid manifest: {e}")))?;
    let out = s
        .services
        .apply_manifest(&actor, &app, &m, req.prune)
        .await?;
    Ok(Json(out))
}

/// Audit events of an app, newest first, a page at a time (see `Link`).
#[utoipa::path(get, path = "/api/v1/apps/{app}/events", tag = "apps", security(("token" = [])),
    params(("app" = String, Path), EventsQuery),
    responses((status = 200, body = [Event], headers(("Link" = String, description = "`<...>; rel=\"next\"` when more may follow")))))]
pub async fn list_events(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(app): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Page<Event>, ApiError> {
    app_name(&app)?;
    let limit = page_limit(q.limit)?;
    let events = s
        .registry
        .events(&actor, Some(&app), numeric_cursor(q.after)?, limit + 1)
        .await?;
    Ok(Page::new(
        events,
        limit,
        &format!("/api/v1/apps/{app}/events"),
        |e| e.id.to_string(),
    ))
}

/// Audit events of everything the caller can see, newest first, a page at a time (see `Link`).
#[utoipa::path(get, path = "/api/v1/events", tag = "apps", security(("token" = [])),
    params(EventsQuery),
    responses((status = 200, body = [Event], headers(("Link" = String, description = "`<...>; rel=\"next\"` when more may follow")))))]
pub async fn list_all_events(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Query(q): Query<EventsQuery>,
) -> Result<Page<Event>, ApiError> {
    let limit = page_limit(q.limit)?;
    let events = s
        .registry
        .events(&actor, None, numeric_cursor(q.after)?, limit + 1)
        .await?;
    Ok(Page::new(events, limit, "/api/v1/events", |e| {
        e.id.to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_a_domain_says_which_ca_and_challenge_or_how_to_upload() {
        let mut c = crate::config::Config::for_data_dir(std::path::Path::new("/tmp"));
        let next = certificate_next(&c, "shop", "shop.example.eu");
        assert!(
            next.contains(crate::config::LETS_ENCRYPT) && next.contains("http-01"),
            "the default CA: {next}"
        );
        c.acme.challenge = crate::config::AcmeChallenge::TlsAlpn01;
        assert!(certificate_next(&c, "shop", "shop.example.eu").contains("tls-alpn-01"));
        c.acme.directory_url = None;
        assert_eq!(
            certificate_next(&c, "shop", "shop.example.eu"),
            "no ACME configured: add a certificate with `escale certs add shop shop.example.eu --cert CERT.pem --key KEY.pem`"
        );
    }
}
