//! The web dashboard, served by `escale serve` at `/` on the API listener (the API stays under
//! `/api/v1`): server-rendered pages (maud templates, compiled with the binary, escaping
//! everything they interpolate), one stylesheet and one small script of our own from `web/`
//! embedded with rust-embed and served under content-hashed names, and live updates by
//! Server-Sent Events from the event bus (never polling).
//!
//! Invariants:
//! - **The same rules as the API**: every page reads and every action writes through the same
//!   registry calls (scoped by the [`Actor`](crate::registry::Actor)) and [`Services`] methods
//!   the API handlers use, with the same validation ([`crate::validate`]); another team's app
//!   is the same plain 404 page as an app that does not exist.
//! - **Sessions**: login checks the same accounts, password hashing bound and login rate
//!   limiter as `POST /api/v1/login`; the session id is 256 random bits in an `HttpOnly`,
//!   `SameSite=Strict` cookie (`Secure` over TLS), only its SHA-256 is stored, a new one is
//!   made at every login, it expires, and logout deletes it ([`session`]).
//! - **CSRF**: every state-changing request is a POST carrying a synchronizer token derived
//!   from the session id, and is refused when its `Origin` (or `Sec-Fetch-Site`) says it
//!   comes from another site; the login form has its own double-submit token.
//! - **Headers on every answer**: a `Content-Security-Policy` without `unsafe-inline` or
//!   `unsafe-eval` and with `frame-ancestors 'none'`, `X-Content-Type-Options: nosniff`,
//!   `Referrer-Policy: same-origin`; pages are `no-store`, hashed assets immutable.

pub mod assets;
mod live;
mod pages;
pub mod rates;
mod session;
mod view;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::auth::{Hashing, LoginLimiter};
use crate::http::ApiError;
use crate::registry::Registry;
use crate::service::Services;

pub use session::SESSION_COOKIE;

/// The policy every dashboard answer carries: scripts, styles and connections from this
/// origin only, nothing inline, no framing, forms posted here only.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How long a dashboard session lives after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// What the dashboard's handlers share: the [`Services`] every surface uses (through
/// `Deref`), and the API's login limiter and hashing bound (the same instances, so the
/// limits are shared between the two surfaces).
#[derive(Clone)]
pub struct WebState {
    pub services: Services,
    pub limiter: Arc<LoginLimiter>,
    pub hashing: Arc<Hashing>,
    /// The proxy's counters, for request and error figures per app.
    pub metrics: Arc<crate::proxy::ProxyMetrics>,
    /// Certificate state of domains.
    pub certs: Arc<crate::certs::CertManager>,
    /// Request and error rates per app over the last hour (sampled by `escale serve`).
    pub rates: Arc<rates::Rates>,
    pub session_ttl: Duration,
}

impl std::ops::Deref for WebState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl axum::extract::FromRef<WebState> for Registry {
    fn from_ref(s: &WebState) -> Registry {
        s.registry.clone()
    }
}

/// Why a dashboard request failed; each renders as a page (or a redirect to the login).
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// What the API would answer, rendered as a page with the same status and message.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No valid session: go to the login page.
    #[error("log in first")]
    LoginRequired,
    /// A state change without a valid CSRF token, or from another site.
    #[error("refused: {0}")]
    Csrf(&'static str),
}

impl From<crate::registry::RegistryError> for WebError {
    fn from(e: crate::registry::RegistryError) -> WebError {
        WebError::Api(e.into())
    }
}

impl From<crate::service::ServiceError> for WebError {
    fn from(e: crate::service::ServiceError) -> WebError {
        WebError::Api(e.into())
    }
}

impl From<crate::validate::ValidationError> for WebError {
    fn from(e: crate::validate::ValidationError) -> WebError {
        WebError::Api(e.into())
    }
}

impl From<crate::auth::AuthError> for WebError {
    fn from(e: crate::auth::AuthError) -> WebError {
        WebError::Api(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            WebError::LoginRequired => return Redirect::to("/login").into_response(),
            WebError::Csrf(_) => (StatusCode::FORBIDDEN, self.to_string()),
            WebError::Api(e) => {
                let status = e.status();
                if status.is_server_error() {
                    tracing::error!(error = %e, "dashboard request failed");
                }
                let message = match e {
                    ApiError::Internal(_) => {
                        "the server failed to handle this request; its log says why".to_string()
                    }
                    other => other.to_string(),
                };
                (status, message)
            }
        };
        let mut resp = (status, view::error_page(status, &message)).into_response();
        if let WebError::Api(ApiError::TooManyRequests(secs)) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        resp
    }
}

/// The dashboard's routes (pages, forms, fragments, live streams and assets), each answer
/// with the security headers. Merged into the API's router by [`crate::api::router`].
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/apps", post(pages::create_app))
        .route("/apps/{app}", get(pages::app_page))
        .route("/apps/{app}/instances", get(pages::instances_fragment))
        .route("/apps/{app}/scale", post(pages::scale))
        .route("/apps/{app}/deploy", post(pages::deploy))
        .route("/apps/{app}/rollback", post(pages::rollback))
        .route("/apps/{app}/config", post(pages::set_config))
        .route("/apps/{app}/config/unset", post(pages::unset_config))
        .route("/apps/{app}/domains", post(pages::add_domain))
        .route("/apps/{app}/domains/remove", post(pages::remove_domain))
        .route("/apps/{app}/logs/live", get(live::logs))
        .route(
            "/apps/{app}/releases/{version}/build-log",
            get(pages::build_log),
        )
        .route("/overview/apps", get(pages::apps_fragment))
        .route("/live", get(live::events))
        .route("/nodes", get(pages::nodes_page))
        .route("/nodes/{node}/{action}", post(pages::node_action))
        .route("/events", get(pages::events_page))
        .route("/account", get(pages::account_page))
        .route("/account/tokens", post(pages::create_token))
        .route("/account/tokens/revoke", post(pages::revoke_token))
        .route("/account/users", post(pages::create_user))
        .route("/account/teams", post(pages::create_team))
        .route("/assets/{file}", get(assets::serve))
        .with_state(state)
        .layer(axum::middleware::map_response(security_headers))
}

/// The page for any path no route takes (outside the API's prefixes).
pub fn not_found_page() -> Response {
    let mut resp =
        WebError::Api(ApiError::NotFound("there is no page here".into())).into_response();
    add_security_headers(resp.headers_mut());
    resp
}

async fn security_headers(mut resp: Response) -> Response {
    add_security_headers(resp.headers_mut());
    resp
}

fn add_security_headers(h: &mut axum::http::HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

#[cfg(test)]
mod tests;
