//! The REST API under `/api/v1`: a [`Router`] value built by [`router`], testable with
//! `tower::ServiceExt::oneshot` without sockets.
//!
//! Invariants: every route but `GET /api/v1/health`, `POST /api/v1/setup` and
//! `POST /api/v1/login` requires a token ([`Auth`]); input is validated here, at the edge, with
//! [`crate::validate`]; every error is `application/problem+json` ([`ApiError`]); no input
//! yields a 500.

mod accounts;
mod apps;
mod backups;
mod certs;
mod cluster;
mod nodes;
mod stream;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{delete, get, patch, post};
use axum::Router;
use utoipa::OpenApi;

pub use crate::http::{ApiError, Auth, Json, Path, Problem, Query};

use crate::auth::{Hashing, LoginLimiter};
use crate::config::Config;
use crate::registry::Registry;
use crate::service::Services;

/// What handlers share: the [`Services`] every surface uses (reachable through `Deref`:
/// `s.registry`, `s.config`, `s.scheduler`), and what only the API needs.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub limiter: Arc<LoginLimiter>,
    /// The bound on password hashing: every hash and check goes through it.
    pub hashing: Arc<Hashing>,
    /// The proxy's counters, rendered at `/metrics`.
    pub metrics: Arc<crate::proxy::ProxyMetrics>,
    /// Certificates: registry rows and the proxy's certificate store.
    pub certs: Arc<crate::certs::CertManager>,
    /// The dashboard's request and error rates per app (`escale serve` samples them).
    pub rates: Arc<crate::web::rates::Rates>,
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl std::ops::DerefMut for AppState {
    fn deref_mut(&mut self) -> &mut Services {
        &mut self.services
    }
}

impl axum::extract::FromRef<AppState> for Registry {
    fn from_ref(s: &AppState) -> Registry {
        s.registry.clone()
    }
}

impl AppState {
    pub fn new(registry: Registry, config: Arc<Config>) -> AppState {
        let certs = crate::certs::CertManager::new(registry.clone(), &config.apps_domain);
        AppState {
            services: Services::new(registry, config, None),
            limiter: Arc::new(LoginLimiter::new(5, Duration::from_secs(300))),
            hashing: Arc::new(Hashing::per_core()),
            certs,
            metrics: Arc::new(crate::proxy::ProxyMetrics::new()),
            rates: Arc::new(crate::web::rates::Rates::new()),
        }
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "escale API", description = "Self-hosted PaaS: apps, releases, config, scale, domains, certificates."),
    paths(
        health, openapi_json,
        accounts::setup, accounts::login, accounts::me,
        accounts::list_users, accounts::create_user, accounts::delete_user,
        accounts::list_teams, accounts::create_team,
        accounts::list_tokens, accounts::create_token, accounts::delete_token,
        apps::list_apps, apps::create_app, apps::get_app, apps::destroy_app,
        apps::list_processes, apps::update_process, apps::update_formation,
        apps::get_config, apps::update_config,
        apps::list_releases, apps::get_release, apps::create_release, apps::rollback,
        apps::list_domains, apps::add_domain, apps::remove_domain,
        certs::list_certs, certs::add_cert, certs::remove_cert,
        apps::get_manifest, apps::apply_manifest,
        webhooks::set_webhook, webhooks::get_webhook, webhooks::remove_webhook,
        apps::list_events, apps::list_all_events,
        cluster::list_instances, cluster::logs, stream::stream_events,
        nodes::list_nodes, nodes::get_node, nodes::add_node, nodes::renew_node,
        nodes::cordon_node, nodes::uncordon_node, nodes::drain_node, nodes::remove_node,
        backups::create_backup, backups::list_backups, backups::download_backup,
    ),
    components(schemas(Problem)),
    modifiers(&SecurityAddon),
    tags((name = "apps"), (name = "accounts"), (name = "system")),
)]
pub struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole API as one router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .route("/setup", post(accounts::setup))
        .route("/login", post(accounts::login))
        .route("/me", get(accounts::me))
        .route(
            "/users",
            get(accounts::list_users).post(accounts::create_user),
        )
        .route("/users/{name}", delete(accounts::delete_user))
        .route(
            "/teams",
            get(accounts::list_teams).post(accounts::create_team),
        )
        .route(
            "/tokens",
            get(accounts::list_tokens).post(accounts::create_token),
        )
        .route("/tokens/{name}", delete(accounts::delete_token))
        .route("/apps", get(apps::list_apps).post(apps::create_app))
        .route("/apps/{app}", get(apps::get_app).delete(apps::destroy_app))
        .route("/apps/{app}/processes", get(apps::list_processes))
        .route(
            "/apps/{app}/processes/{process}",
            patch(apps::update_process),
        )
        .route("/apps/{app}/formation", patch(apps::update_formation))
        .route(
            "/apps/{app}/config",
            get(apps::get_config).patch(apps::update_config),
        )
        .route(
            "/apps/{app}/releases",
            get(apps::list_releases).post(apps::create_release),
        )
        .route("/apps/{app}/releases/{version}", get(apps::get_release))
        .route("/apps/{app}/rollback", post(apps::rollback))
        .route(
            "/apps/{app}/domains",
            get(apps::list_domains).post(apps::add_domain),
        )
        .route("/apps/{app}/domains/{domain}", delete(apps::remove_domain))
        .route(
            "/apps/{app}/certs",
            get(certs::list_certs).post(certs::add_cert),
        )
        .route("/apps/{app}/certs/{domain}", delete(certs::remove_cert))
        .route(
            "/apps/{app}/manifest",
            get(apps::get_manifest).put(apps::apply_manifest),
        )
        .route(
            "/apps/{app}/webhook",
            get(webhooks::get_webhook)
                .put(webhooks::set_webhook)
                .delete(webhooks::remove_webhook),
        )
        .route("/apps/{app}/events", get(apps::list_events))
        .route("/apps/{app}/instances", get(cluster::list_instances))
        .route("/apps/{app}/logs", get(cluster::logs))
        .route("/nodes", get(nodes::list_nodes).post(nodes::add_node))
        .route(
            "/nodes/{node}",
            get(nodes::get_node).delete(nodes::remove_node),
        )
        .route("/nodes/{node}/renew", post(nodes::renew_node))
        .route("/nodes/{node}/cordon", post(nodes::cordon_node))
        .route("/nodes/{node}/uncordon", post(nodes::uncordon_node))
        .route("/nodes/{node}/drain", post(nodes::drain_node))
        .route(
            "/backups",
            get(backups::list_backups).post(backups::create_backup),
        )
        .route("/backups/{name}", get(backups::download_backup))
        .route("/events", get(apps::list_all_events))
        .route("/events/stream", get(stream::stream_events));
    let services = state.services.clone();
    // The dashboard at `/` (see `crate::web`), on the same services, limiter and hashing bound.
    let web = crate::web::router(crate::web::WebState {
        services: state.services.clone(),
        limiter: state.limiter.clone(),
        hashing: state.hashing.clone(),
        metrics: state.metrics.clone(),
        certs: state.certs.clone(),
        rates: state.rates.clone(),
        session_ttl: crate::web::SESSION_TTL,
    });
    Router::new()
        .nest("/api/v1", v1)
        .route("/metrics", get(metrics))
        .with_state(state)
        // Git smart HTTP under `/git/` (see `crate::git`); outside `/api/v1`.
        .merge(crate::git::router().with_state(services.clone()))
        // Push webhooks under `/hooks/` (see `crate::webhooks`); signed, no token.
        .merge(crate::webhooks::router().with_state(services))
        .merge(web)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(1 << 20))
}

/// An unknown path: a problem+json under the machine prefixes, the dashboard's 404 page
/// elsewhere.
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    let p = uri.path();
    let machine = ["/api/", "/git/", "/hooks/", "/metrics"]
        .iter()
        .any(|m| p.starts_with(m) || p == m.trim_end_matches('/'));
    if machine {
        ApiError::NotFound("no such API route; see /api/v1/openapi.json".into()).into_response()
    } else {
        crate::web::not_found_page()
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Prometheus metrics of the proxy and the scheduler (text format; admins only: the series are
/// labelled with every team's app names and show their traffic, and a scrape job is an
/// operator's, not a team's).
async fn metrics(
    axum::extract::State(s): axum::extract::State<AppState>,
    Auth(actor): Auth,
) -> Result<axum::response::Response, ApiError> {
    actor.require_admin("reading /metrics (every team's apps)")?;
    let mut out = String::with_capacity(4096);
    s.metrics.render_prometheus(&mut out);
    s.services.backups.render(&mut out);
    if let Some(sched) = &s.scheduler {
        use std::sync::atomic::Ordering::Relaxed;
        let view = sched.view.load();
        out.push_str("# HELP escale_instances Instances observed, by health.\n# TYPE escale_instances gauge\n");
        {
            use crate::events::HealthStatus as H;
            for (h, label) in [
                (H::Healthy, "healthy"),
                (H::Unhealthy, "unhealthy"),
                (H::Starting, "starting"),
                (H::None, "none"),
            ] {
                let n = view.instances.iter().filter(|i| i.health == h).count();
                out.push_str(&format!("escale_instances{{health=\"{label}\"}} {n}\n"));
            }
        }
        out.push_str(&format!(
            "# HELP escale_scheduler_panics_total Scheduler tasks and passes that panicked (caught).\n# TYPE escale_scheduler_panics_total counter\nescale_scheduler_panics_total {}\n",
            sched.panics.load(Relaxed)
        ));
        out.push_str(&format!(
            "# HELP escale_reconcile_passes_total Reconcile passes completed.\n# TYPE escale_reconcile_passes_total counter\nescale_reconcile_passes_total {}\n",
            sched.passes.load(Relaxed)
        ));
        out.push_str("# HELP escale_node_ready Whether a node answers (1), by node and state.\n# TYPE escale_node_ready gauge\n");
        for n in &view.nodes {
            let state = serde_json::to_value(n.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            out.push_str(&format!(
                "escale_node_ready{{node=\"{}\",state=\"{state}\"}} {}\n",
                n.name,
                u8::from(n.ready)
            ));
        }
        out.push_str(&format!(
            "# HELP escale_engine_calls_total Docker engine calls made by reconcile passes.\n# TYPE escale_engine_calls_total counter\nescale_engine_calls_total {}\n",
            sched.engine_calls.load(Relaxed)
        ));
    }
    let certs = s.registry.node_certs().await?;
    if !certs.is_empty() {
        let now = crate::registry::now_ms();
        out.push_str("# HELP escale_node_certificate_expiry_seconds Seconds until a node's server certificate expires (renew with `escale nodes renew` under 30 days).\n# TYPE escale_node_certificate_expiry_seconds gauge\n");
        for c in certs {
            out.push_str(&format!(
                "escale_node_certificate_expiry_seconds{{node=\"{}\"}} {}\n",
                c.node,
                (c.not_after - now) / 1000
            ));
        }
    }
    let usage = s.usage.view();
    if !usage.nodes.is_empty() {
        out.push_str("# HELP escale_node_memory_used_bytes Memory escale's instances use on a node (page cache left out), last sampled.\n# TYPE escale_node_memory_used_bytes gauge\n");
        for (node, u) in &usage.nodes {
            out.push_str(&format!(
                "escale_node_memory_used_bytes{{node=\"{node}\"}} {}\n",
                u.memory_bytes
            ));
        }
        out.push_str("# HELP escale_node_cpu_used CPUs escale's instances use on a node, last sampled.\n# TYPE escale_node_cpu_used gauge\n");
        for (node, u) in &usage.nodes {
            out.push_str(&format!(
                "escale_node_cpu_used{{node=\"{node}\"}} {:.3}\n",
                u.cpus
            ));
        }
        out.push_str("# HELP escale_node_disk_used_ratio Used fraction of the filesystem of a node's engine data root, as df counts it (engines on this host).\n# TYPE escale_node_disk_used_ratio gauge\n");
        for (node, u) in &usage.nodes {
            if let Some(fs) = u.disk.as_ref().and_then(|d| d.filesystem.as_ref()) {
                let ratio = f64::from(fs.used_percent) / 100.0;
                out.push_str(&format!(
                    "escale_node_disk_used_ratio{{node=\"{node}\"}} {ratio:.4}\n"
                ));
            }
        }
        out.push_str("# HELP escale_node_owned_disk_bytes Disk escale's images and containers take on a node.\n# TYPE escale_node_owned_disk_bytes gauge\n");
        for (node, u) in &usage.nodes {
            if let Some(d) = &u.disk {
                out.push_str(&format!(
                    "escale_node_owned_disk_bytes{{node=\"{node}\"}} {}\n",
                    d.images_bytes + d.containers_bytes
                ));
            }
        }
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response())
}

/// Liveness probe (no authentication).
#[utoipa::path(get, path = "/api/v1/health", tag = "system", responses((status = 200, description = "the server is up")))]
async fn health() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system", security(("token" = [])),
    responses((status = 200, description = "OpenAPI 3.1 document")))]
async fn openapi_json(_auth: Auth) -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
