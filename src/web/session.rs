//! Dashboard sessions and CSRF protection.
//!
//! A session id is 256 random bits (hex) in the `escale_session` cookie (`HttpOnly`,
//! `SameSite=Strict`, `Path=/`, `Max-Age` = the session's life, `Secure` when the request
//! came over TLS); the registry keeps only its SHA-256. The CSRF token of a session is
//! derived from its id (`SHA-256("escale-csrf" ‖ id)`), so it is tied to that session, and
//! every state-changing form carries it as `csrf`; an [`Action`] checks it in constant time
//! and refuses requests whose `Origin` or `Sec-Fetch-Site` names another site.
//!
//! The login form has no session yet: it is protected by a double-submit token (a random
//! value in a short-lived `escale_login` cookie that the form must repeat) and the same
//! origin check.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{view, WebError, WebState};
use crate::auth::{random_hex, token_hash};
use crate::http::ApiError;
use crate::registry::{now_ms, Actor};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "escale_session";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "escale_login";

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub actor: Actor,
    /// The synchronizer token forms of this session carry.
    pub csrf: String,
    /// The SHA-256 of the session id (what the registry stores).
    hash: String,
}

impl Session {
    /// Whether the session still exists and has not expired (a live stream asks again from
    /// time to time, so that a logout or a deleted user ends it).
    pub async fn still_valid(&self, registry: &crate::registry::Registry) -> bool {
        matches!(registry.actor_for_session(&self.hash).await, Ok(Some(_)))
    }
}

/// The CSRF token of session id `id`.
fn csrf_for(id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"escale-csrf\0");
    h.update(id.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether the request came over TLS (directly, or through a proxy that says so: claiming
/// it only makes the cookie stricter).
fn over_tls(parts: &Parts) -> bool {
    parts.uri.scheme_str() == Some("https")
        || parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie values are hex")
}

/// Refuses a state change that a browser says comes from another site: an `Origin` that is
/// not this host (or `null`), or `Sec-Fetch-Site` other than `same-origin`/`none`.
fn check_origin(parts: &Parts) -> Result<(), WebError> {
    if let Some(site) = parts.headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if site != "same-origin" && site != "none" {
            return Err(WebError::Csrf("the form was posted from another site"));
        }
    }
    let Some(origin) = parts.headers.get(header::ORIGIN) else {
        // Browsers send `Origin` on every POST; a client that does not still needs the token.
        return Ok(());
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .ok_or(WebError::Csrf("the request names no host"))?;
    let origin = origin.to_str().unwrap_or("");
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(WebError::Csrf("the form was posted from another origin"))
    }
}

impl FromRequestParts<WebState> for Session {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, s: &WebState) -> Result<Session, WebError> {
        let id = cookie(&parts.headers, SESSION_COOKIE)
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(WebError::LoginRequired)?;
        let hash = token_hash(id);
        let actor = s
            .registry
            .actor_for_session(&hash)
            .await?
            .ok_or(WebError::LoginRequired)?;
        Ok(Session {
            actor,
            csrf: csrf_for(id),
            hash,
        })
    }
}

/// A state-changing form post: a live session, a same-site origin, the session's CSRF token
/// in the `csrf` field, and the other fields.
pub struct Action {
    pub session: Session,
    fields: Vec<(String, String)>,
}

impl Action {
    /// A field's value ("" when absent).
    pub fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn actor(&self) -> &Actor {
        &self.session.actor
    }
}

fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

impl FromRequest<WebState> for Action {
    type Rejection = WebError;

    async fn from_request(req: Request, s: &WebState) -> Result<Action, WebError> {
        let (mut parts, body) = req.into_parts();
        check_origin(&parts)?;
        let session = Session::from_request_parts(&mut parts, s).await?;
        let body = Bytes::from_request(Request::from_parts(parts, body), s)
            .await
            .map_err(|_| WebError::Api(ApiError::PayloadTooLarge(1 << 20)))?;
        let fields = form_fields(&body);
        let token = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map_or("", |(_, v)| v.as_str());
        if token.is_empty() || !bool::from(token.as_bytes().ct_eq(session.csrf.as_bytes())) {
            return Err(WebError::Csrf(
                "the form's CSRF token is missing or not this session's; reload the page and try again",
            ));
        }
        Ok(Action { session, fields })
    }
}

/// `GET /login`: the form, with a fresh double-submit token. A logged-in browser goes to
/// the overview.
pub async fn login_page(State(s): State<WebState>, parts: Parts) -> Response {
    if Session::from_request_parts(&mut parts.clone(), &s)
        .await
        .is_ok()
    {
        return Redirect::to("/").into_response();
    }
    login_form(&parts, None, axum::http::StatusCode::OK)
}

fn login_form(parts: &Parts, error: Option<&str>, status: axum::http::StatusCode) -> Response {
    let token = random_hex(16);
    let mut resp = (status, view::login_page(&token, error)).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &token, 900, over_tls(parts)),
    );
    resp
}

/// `POST /login`: checks the double-submit token and the origin, then the user name and
/// password under the API's rate limit and hashing bound; success makes a new session (the
/// one the browser had, if any, is ended) and goes to the overview.
pub async fn login(State(s): State<WebState>, req: Request) -> Result<Response, WebError> {
    let (parts, body) = req.into_parts();
    check_origin(&parts)?;
    let body = Bytes::from_request(Request::from_parts(parts.clone(), body), &s)
        .await
        .map_err(|_| WebError::Api(ApiError::PayloadTooLarge(1 << 20)))?;
    let fields = form_fields(&body);
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let sent = get("login_token");
    let expected = cookie(&parts.headers, LOGIN_COOKIE).unwrap_or("");
    if sent.is_empty() || !bool::from(sent.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(WebError::Csrf(
            "the login form expired or was posted from elsewhere; reload it and try again",
        ));
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let user: String = get("name").chars().take(64).collect();
    if let Err(wait) = s.limiter.check(&user, peer) {
        return Err(ApiError::TooManyRequests(wait.as_secs().max(1)).into());
    }
    let creds = s.registry.user_credentials(&user).await?;
    let stored = creds.as_ref().and_then(|(_, h)| h.clone());
    let ok = s.hashing.verify(get("password"), stored).await?;
    let actor = match (ok, creds) {
        (true, Some((actor, _))) => actor,
        _ => {
            s.limiter.failed(&user, peer);
            return Ok(login_form(
                &parts,
                Some("wrong user name or password"),
                axum::http::StatusCode::UNAUTHORIZED,
            ));
        }
    };
    s.limiter.succeeded(&user, peer);
    // A new id at every login; the browser's previous session (if any) ends here.
    if let Some(old) = cookie(&parts.headers, SESSION_COOKIE) {
        s.registry.delete_session(&actor, &token_hash(old)).await?;
    }
    let id = random_hex(32);
    let ttl = s.session_ttl;
    s.registry
        .create_session(&actor, &token_hash(&id), now_ms() + ttl.as_millis() as i64)
        .await?;
    let secure = over_tls(&parts);
    let mut resp = Redirect::to("/").into_response();
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &id, ttl.as_secs(), secure),
    );
    h.append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0, secure));
    Ok(resp)
}

/// `POST /logout`: ends the session server-side and clears the cookie.
pub async fn logout(
    State(s): State<WebState>,
    parts: Parts,
    action: Action,
) -> Result<Response, WebError> {
    s.registry
        .delete_session(action.actor(), &action.session.hash)
        .await?;
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, over_tls(&parts)),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("xescale_session=no; escale_session=yes; other=1"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("yes"));
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn the_csrf_token_is_tied_to_the_session() {
        assert_ne!(csrf_for("a"), csrf_for("b"));
        assert_eq!(csrf_for("a"), csrf_for("a"));
        assert_eq!(csrf_for("a").len(), 32);
    }

    #[test]
    fn session_cookies_are_strict_and_secure_over_tls() {
        let c = set_cookie(SESSION_COOKIE, "ab", 60, true);
        let c = c.to_str().unwrap();
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=60",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c} lacks {part}");
        }
        let plain = set_cookie(SESSION_COOKIE, "ab", 60, false);
        assert!(!plain.to_str().unwrap().contains("Secure"));
    }
}
