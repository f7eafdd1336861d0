//! Push webhooks: `POST /hooks/{app}` (outside `/api/v1`, no token) takes push events from
//! GitHub, GitLab and Gitea/Forgejo, authenticated by a per-app shared secret, and deploys the
//! pushed commit like a `git push` to escale.
//!
//! - GitHub: `X-GitHub-Event: push`, `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
//!   body>`, `X-GitHub-Delivery`.
//! - GitLab: `X-Gitlab-Event: Push Hook`, `X-Gitlab-Token: <secret>`, `X-Gitlab-Event-UUID`.
//! - Gitea/Forgejo: `X-Gitea-Event: push`, `X-Gitea-Signature: <hex HMAC-SHA256>`,
//!   `X-Gitea-Delivery` (or the `X-Forgejo-*` equivalents).
//!
//! Signatures are compared in constant time; a delivery id or a body seen before is refused
//! (409), so a captured request cannot be replayed, not even under a new delivery id (the id
//! header is not signed). A push to the configured branch is answered 202 at once
//! and deployed in the background: the configured repository is fetched into the app's bare
//! repository (`git fetch` with argv only, `--` before the URL, `GIT_TERMINAL_PROMPT=0`,
//! `GIT_ALLOW_PROTOCOL`, no redirects, a timeout), `main` is moved to the pushed commit and the
//! commit is built and released by [`crate::git::deploy`]; the release shows the outcome, and
//! a deploy that created no release (fetch or build failed) is a `webhook.deploy_failed` event.
//!
//! Repository URLs ([`check_repo_url`]) are `https://` or `http://` (`file://` only when
//! `webhooks.allow_file_repositories`), a restricted character set, no credentials, no `..`;
//! hosts that are or resolve to anything but global unicast addresses ([`is_global`]: no
//! loopback, private, link-local, shared, reserved, documentation, benchmarking or multicast
//! address, nor an IPv6 form embedding one) are refused unless
//! `webhooks.allow_private_repositories`. The check runs when the webhook is configured
//! and again before every fetch, and git is pinned to the address that was checked
//! (`http.curloptResolve`).

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::WebhooksConfig;
use crate::git::{self, GitError, RefUpdate, ZERO_OID};
use crate::http::ApiError;
use crate::registry::{Actor, WebhookTarget};
use crate::service::{Queue, Services};

/// How long fetching the source repository may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// How long resolving a repository host may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest repository URL.
const MAX_URL: usize = 2048;
/// The ref the fetched branch is stored under in the app's repository.
const FETCH_REF: &str = "refs/escale/webhook";

/// Why a webhook setting or delivery was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error("{0}")]
    InvalidBranch(String),
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Git(#[from] GitError),
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> ApiError {
        match e {
            WebhookError::InvalidUrl(m) | WebhookError::InvalidBranch(m) => {
                ApiError::Unprocessable(m)
            }
            WebhookError::BadSignature(m) => ApiError::Unauthorized(m),
            WebhookError::BadRequest(m) => ApiError::BadRequest(m),
            WebhookError::Git(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// The webhook route, to merge into the API router.
pub fn router() -> Router<Services> {
    Router::new().route("/hooks/{app}", post(hook))
}

/// A branch name escale deploys from: what [`git::valid_ref`] accepts under `refs/heads/`.
pub fn check_branch(branch: &str) -> Result<(), WebhookError> {
    if git::valid_ref(&format!("refs/heads/{branch}")) {
        Ok(())
    } else {
        Err(WebhookError::InvalidBranch(format!(
            "branch `{}` is not accepted: use letters, digits, `.`, `_`, `-` and `/` (no component starting with `.` or `-`, no `..`)",
            crate::validate::printable(branch)
        )))
    }
}

/// True for addresses a webhook must not make the server fetch from (unless allowed): every
/// address that is not globally reachable unicast ([`is_global`]).
pub fn is_internal(ip: IpAddr) -> bool {
    !is_global(ip)
}

/// True when `ip` is a globally reachable unicast address, by the IANA special-purpose
/// registries. An allow-list for IPv6 (only `2000::/3` can be global) and a deny-list of every
/// special-purpose block for IPv4. Addresses embedding an IPv4 address are judged by it:
/// IPv4-mapped `::ffff:0:0/96`, the NAT64 well-known prefix `64:ff9b::/96`, 6to4 `2002::/16`
/// and Teredo `2001::/32` (server and client, both must be global); the deprecated
/// IPv4-compatible `::/96` and the local-use NAT64 prefix `64:ff9b:1::/48` are never global.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

fn is_global_v4(ip: std::net::Ipv4Addr) -> bool {
    let a = u32::from(ip);
    // (network, prefix length) of every block that is not globally reachable unicast.
    const NOT_GLOBAL: [(u32, u32); 15] = [
        (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
        (0x0a00_0000, 8),  // 10.0.0.0/8 private
        (0x6440_0000, 10), // 100.64.0.0/10 shared (carrier-grade NAT)
        (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
        (0xa9fe_0000, 16), // 169.254.0.0/16 link-local
        (0xac10_0000, 12), // 172.16.0.0/12 private
        (0xc000_0000, 24), // 192.0.0.0/24 IETF protocol assignments
        (0xc000_0200, 24), // 192.0.2.0/24 documentation
        (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay anycast (deprecated)
        (0xc0a8_0000, 16), // 192.168.0.0/16 private
        (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
        (0xc633_6400, 24), // 198.51.100.0/24 documentation
        (0xcb00_7100, 24), // 203.0.113.0/24 documentation
        (0xe000_0000, 4),  // 224.0.0.0/4 multicast
        (0xf000_0000, 4),  // 240.0.0.0/4 reserved, and the broadcast address
    ];
    !NOT_GLOBAL
        .iter()
        .any(|&(net, len)| a >> (32 - len) == net >> (32 - len))
}

fn is_global_v6(ip: std::net::Ipv6Addr) -> bool {
    let a = u128::from(ip);
    let in_block = |net: u128, len: u32| a >> (128 - len) == net >> (128 - len);
    let low_v4 = std::net::Ipv4Addr::from(a as u32);
    // Embedded IPv4 addresses first: the IPv4 address is where packets end up.
    if in_block(0xffff_0000_0000, 96) || in_block(0x64_ff9b << 96, 96) {
        // ::ffff:a.b.c.d (mapped) and 64:ff9b::a.b.c.d (NAT64 well-known prefix).
        return is_global_v4(low_v4);
    }
    if in_block(0, 96) {
        // ::a.b.c.d (IPv4-compatible, deprecated), ::, ::1.
        return false;
    }
    if in_block(0x2002 << 112, 16) {
        // 6to4: 2002:AABB:CCDD::/48 embeds a.b.c.d in bits 16..48.
        return is_global_v4(std::net::Ipv4Addr::from((a >> 80) as u32));
    }
    if in_block(0x2001 << 112, 32) {
        // Teredo: server in bits 32..64, client obfuscated (inverted) in the last 32 bits.
        let server = std::net::Ipv4Addr::from((a >> 64) as u32);
        let client = std::net::Ipv4Addr::from(!(a as u32));
        return is_global_v4(server) && is_global_v4(client);
    }
    // Only 2000::/3 is global unicast; inside it, these blocks are not globally reachable.
    const NOT_GLOBAL: [(u128, u32); 3] = [
        (0x2001_0000 << 96, 23), // 2001::/23 IETF protocol assignments (benchmarking, ORCHID...)
        (0x2001_0db8 << 96, 32), // 2001:db8::/32 documentation
        (0x3fff << 112, 20),     // 3fff::/20 documentation
    ];
    in_block(0x2000 << 112, 3) && !NOT_GLOBAL.iter().any(|&(net, len)| in_block(net, len))
}

fn bad_url(url: &str, why: &str) -> WebhookError {
    WebhookError::InvalidUrl(format!(
        "repository URL `{}` is refused: {why}",
        crate::validate::printable(url)
    ))
}

/// Checks a repository URL (see the module docs); resolves its host unless private
/// repositories are allowed. When a host name was resolved, returns the `HOST:PORT:ADDRESS`
/// that was checked, for `http.curloptResolve`, so that git connects to that address and not
/// to what a second lookup might answer (DNS rebinding).
pub async fn check_repo_url(
    url: &str,
    cfg: &WebhooksConfig,
) -> Result<Option<String>, WebhookError> {
    if url.is_empty() || url.len() > MAX_URL {
        return Err(bad_url(
            url,
            "give an https:// URL of at most 2048 characters",
        ));
    }
    if !url
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~/:+[]".contains(&b))
    {
        return Err(bad_url(
            url,
            "use letters, digits and `-._~/:+` only (no credentials, query, spaces or shell characters)",
        ));
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad_url(url, "write an https:// or http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if path
        .split('/')
        .any(|seg| seg == ".." || seg == "." || seg.starts_with('-'))
    {
        return Err(bad_url(
            url,
            "`.` and `..` path segments, and segments starting with `-`, are not allowed",
        ));
    }
    match scheme {
        "https" | "http" => {}
        "file" if cfg.allow_file_repositories => {
            if !authority.is_empty() || !path.starts_with('/') || path.len() < 2 {
                return Err(bad_url(url, "write file:///absolute/path"));
            }
            return Ok(None);
        }
        "file" => {
            return Err(bad_url(
                url,
                "file:// repositories are not allowed on this server (webhooks.allow_file_repositories)",
            ))
        }
        _ => return Err(bad_url(url, "only https:// and http:// URLs are accepted")),
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad_url(url, "unclosed `[` in the host"))?;
        match after {
            "" => (h, None),
            a => match a.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(bad_url(url, "unexpected text after the host")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad_url(url, "the port is not a number between 1 and 65535"))?,
        None if scheme == "https" => 443,
        None => 80,
    };
    if host.is_empty() || host.starts_with('-') || host.starts_with('.') {
        return Err(bad_url(url, "name a host"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if is_internal(ip) && !cfg.allow_private_repositories {
            return Err(bad_url(
                url,
                "the host is not a global unicast address (loopback, private, link-local, reserved, documentation, multicast or an IPv6 form embedding one); an admin can allow it with webhooks.allow_private_repositories",
            ));
        }
        return Ok(None);
    }
    if authority.starts_with('[')
        || !host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    {
        return Err(bad_url(url, "the host is not a valid name"));
    }
    if cfg.allow_private_repositories {
        return Ok(None);
    }
    let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| bad_url(url, "resolving the host timed out"))?
        .map_err(|e| bad_url(url, &format!("the host does not resolve ({e})")))?
        .map(|a| a.ip())
        .collect::<Vec<_>>();
    if addrs.is_empty() {
        return Err(bad_url(url, "the host does not resolve"));
    }
    if addrs.iter().any(|ip| is_internal(*ip)) {
        return Err(bad_url(
            url,
            "the host resolves to an address that is not global unicast (loopback, private, link-local, reserved, documentation, multicast or an IPv6 form embedding one); an admin can allow it with webhooks.allow_private_repositories",
        ));
    }
    let pin = match addrs[0] {
        IpAddr::V4(a) => format!("{host}:{port}:{a}"),
        IpAddr::V6(a) => format!("{host}:{port}:[{a}]"),
    };
    Ok(Some(pin))
}

/// Where a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
    Gitea,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
        }
    }
}

/// A verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub provider: Provider,
    /// The delivery id (replays are refused).
    pub id: String,
    /// Whether it is a push event.
    pub push: bool,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn hmac_ok(secret: &str, body: &[u8], hex_sig: &str) -> bool {
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Identifies the provider, checks the signature (constant time) and reads the delivery id.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<Delivery, WebhookError> {
    let unsigned = || {
        WebhookError::BadSignature("the webhook signature does not match this app's secret".into())
    };
    let gitea_event = header(headers, "x-gitea-event").or(header(headers, "x-forgejo-event"));
    let (provider, event, id) = if let Some(ev) = gitea_event {
        let sig = header(headers, "x-gitea-signature")
            .or(header(headers, "x-forgejo-signature"))
            .ok_or_else(unsigned)?;
        if !hmac_ok(secret, body, sig) {
            return Err(unsigned());
        }
        let id = header(headers, "x-gitea-delivery").or(header(headers, "x-forgejo-delivery"));
        (Provider::Gitea, ev == "push", id)
    } else if let Some(ev) = header(headers, "x-github-event") {
        let sig = header(headers, "x-hub-signature-256")
            .and_then(|s| s.strip_prefix("sha256="))
            .ok_or_else(unsigned)?;
        if !hmac_ok(secret, body, sig) {
            return Err(unsigned());
        }
        (
            Provider::GitHub,
            ev == "push",
            header(headers, "x-github-delivery"),
        )
    } else if let Some(ev) = header(headers, "x-gitlab-event") {
        let token = header(headers, "x-gitlab-token").ok_or_else(unsigned)?;
        // Hashes first, so the comparison's time says nothing about the length either.
        let a = Sha256::digest(token.as_bytes());
        let b = Sha256::digest(secret.as_bytes());
        if !bool::from(a.ct_eq(&b)) {
            return Err(unsigned());
        }
        (
            Provider::GitLab,
            ev == "Push Hook",
            header(headers, "x-gitlab-event-uuid"),
        )
    } else {
        return Err(WebhookError::BadRequest(
            "not a GitHub, GitLab or Gitea/Forgejo webhook (no X-GitHub-Event, X-Gitlab-Event or X-Gitea-Event header)".into(),
        ));
    };
    let id = id
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .ok_or_else(|| {
            WebhookError::BadRequest(format!(
                "the {} delivery has no valid delivery id header",
                provider.as_str()
            ))
        })?;
    Ok(Delivery {
        provider,
        id: id.to_string(),
        push: event,
    })
}

/// The branch and commit of a push event's payload; `None` for a branch deletion or a tag.
pub fn pushed(body: &[u8]) -> Result<Option<(String, String)>, WebhookError> {
    #[derive(serde::Deserialize)]
    struct Push {
        #[serde(rename = "ref")]
        r#ref: String,
        after: String,
    }
    let p: Push = serde_json::from_slice(body).map_err(|e| {
        WebhookError::BadRequest(format!(
            "the push event is not JSON with `ref` and `after`: {e}"
        ))
    })?;
    let Some(branch) = p.r#ref.strip_prefix("refs/heads/") else {
        return Ok(None);
    };
    if !git::valid_oid(&p.after) {
        return Err(WebhookError::BadRequest(
            "`after` is not a commit id".into(),
        ));
    }
    if p.after.bytes().all(|b| b == b'0') {
        return Ok(None);
    }
    Ok(Some((branch.to_string(), p.after)))
}

#[derive(serde::Serialize)]
struct HookAnswer {
    status: &'static str,
    detail: String,
}

fn answer(status: &'static str, detail: String) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(HookAnswer { status, detail }),
    )
        .into_response()
}

/// `POST /hooks/{app}`
async fn hook(
    State(s): State<Services>,
    axum::extract::Path(app): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let no_hook = || {
        ApiError::NotFound(format!(
            "no webhook is configured for app `{}`",
            crate::validate::printable(&app)
        ))
    };
    if crate::validate::app_name(&app).is_err() {
        return Err(no_hook());
    }
    let target = s.registry.webhook_target(&app).await?.ok_or_else(no_hook)?;
    let delivery = verify(&headers, &body, &target.secret)?;
    s.registry
        .record_delivery(
            target.app.id,
            &target.app.name,
            &delivery.id,
            &hex::encode(Sha256::digest(&body)),
        )
        .await?;
    if !delivery.push {
        return Ok(answer("ignored", "not a push event".into()));
    }
    let Some((branch, sha)) = pushed(&body)? else {
        return Ok(answer(
            "ignored",
            "not a push of a commit to a branch".into(),
        ));
    };
    if branch != target.hook.branch {
        return Ok(answer(
            "ignored",
            format!(
                "push to `{}`; this app deploys `{}`",
                crate::validate::printable(&branch),
                target.hook.branch
            ),
        ));
    }
    if s.scheduler.is_none() {
        return Err(ApiError::Unavailable(
            "this server runs no scheduler, so it cannot deploy".into(),
        ));
    }
    tracing::info!(app = %target.app.name, provider = delivery.provider.as_str(), delivery = %delivery.id, commit = %sha, "webhook push accepted");
    let detail = format!("deploying {} of `{branch}`", &sha[..7]);
    tokio::spawn(deploy_in_background(s, target, delivery.provider, sha));
    Ok(answer("accepted", detail))
}

async fn deploy_in_background(s: Services, target: WebhookTarget, provider: Provider, sha: String) {
    let app = target.app.name.clone();
    if let Err(e) = deploy(&s, &target, provider, &sha).await {
        tracing::warn!(app = %app, commit = %sha, error = %e, "webhook deploy failed");
        let detail = git::one_line(&format!("commit {}: {e}", &sha[..7]));
        let actor = Actor::webhook(&target.app, provider.as_str(), &target.hook.created_by).name;
        if let Err(e) = s
            .registry
            .webhook_deploy_failed(&app, &actor, &detail)
            .await
        {
            tracing::warn!(app = %app, error = %e, "recording a failed webhook deploy");
        }
    }
}

/// Fetches `sha` from the configured repository and deploys it as a push to `main`.
async fn deploy(
    s: &Services,
    target: &WebhookTarget,
    provider: Provider,
    sha: &str,
) -> Result<u32, WebhookError> {
    let hook = &target.hook;
    // Again: the setting may predate a configuration change, and DNS answers change.
    let pin = check_repo_url(&hook.repository, &s.config.webhooks).await?;
    check_branch(&hook.branch)?;
    // One deploy per app at a time: a delivery waits its turn behind a deploy in progress (a
    // push, an image deploy or another delivery), in order of arrival.
    let actor = Actor::webhook(&target.app, provider.as_str(), &hook.created_by);
    let queue = Queue {
        limit: s.config.scheduler.deploy_timeout + Duration::from_secs(600),
    };
    let guard = s
        .lock(
            &target.app,
            format!("a {} webhook deploy of {}", provider.as_str(), &sha[..7]),
            queue,
        )
        .await
        .map_err(|busy| GitError::Deploy(busy.to_string()))?;
    let repo = git::ensure_repo(&s.config.data_dir, &target.app).await?;
    let mut protocols = String::from("https:http");
    if s.config.webhooks.allow_file_repositories {
        protocols.push_str(":file");
    }
    let refspec = format!("+refs/heads/{}:{FETCH_REF}", hook.branch);
    let mut fetch = git::git();
    fetch
        .env("GIT_ALLOW_PROTOCOL", &protocols)
        .arg("--git-dir")
        .arg(&repo);
    if let Some(pin) = &pin {
        fetch.arg("-c").arg(format!("http.curloptResolve={pin}"));
    }
    let fetch = fetch
        .args([
            "-c",
            "http.followRedirects=false",
            "-c",
            "core.hooksPath=/dev/null",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-recurse-submodules",
            "--no-write-fetch-head",
            "--",
            &hook.repository,
            &refspec,
        ])
        .output();
    let out = tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| {
            GitError::Deploy(format!(
                "git fetch took longer than {}s",
                FETCH_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|source| GitError::Spawn {
            what: "fetch",
            source,
        })?;
    if !out.status.success() {
        return Err(GitError::Git {
            what: "fetch",
            stderr: git::one_line(&String::from_utf8_lossy(&out.stderr)),
        }
        .into());
    }
    let commit = format!("{sha}^{{commit}}");
    git::run_git("cat-file", &repo, &["cat-file", "-e", &commit])
        .await
        .map_err(|_| {
            GitError::Deploy(format!(
                "commit {} is not on `{}` of {} any more",
                &sha[..7],
                hook.branch,
                hook.repository
            ))
        })?;
    let deploy_ref = s.config.git.deploy_ref();
    let old = git::run_git(
        "rev-parse",
        &repo,
        &["rev-parse", "--verify", "--quiet", &deploy_ref],
    )
    .await
    .map(|o| String::from_utf8_lossy(&o).trim().to_string())
    .ok()
    .filter(|o| git::valid_oid(o))
    .unwrap_or_else(|| ZERO_OID.to_string());
    git::run_git(
        "update-ref",
        &repo,
        &["update-ref", "--", &deploy_ref, sha, &old],
    )
    .await?;
    let update = RefUpdate {
        old,
        new: sha.to_string(),
        name: deploy_ref.clone(),
    };
    let progress = git::http::Progress::detached();
    let job = git::deploy::Job {
        services: s,
        guard: &guard,
        actor: &actor,
        app: &target.app,
        repo: &repo,
        update: &update,
        progress: &progress,
    };
    match job.run().await {
        Ok(v) => Ok(v),
        Err(e) => {
            git::http::reset_branch(&repo, &update).await;
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(private: bool, file: bool) -> WebhooksConfig {
        WebhooksConfig {
            allow_private_repositories: private,
            allow_file_repositories: file,
        }
    }

    #[tokio::test]
    async fn urls_are_checked() {
        let strict = cfg(false, false);
        for ok in [
            "https://140.82.121.4/org/repo.git",
            "http://93.184.215.14:8080/repo",
            "https://[2606:4700:4700::1111]/repo.git",
        ] {
            check_repo_url(ok, &strict).await.expect(ok);
        }
        for bad in [
            "https://127.0.0.1/x.git",
            "http://10.1.2.3/x",
            "http://192.168.1.1/x",
            "http://169.254.169.254/latest",
            "http://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[::127.0.0.1]/x",
            "https://[64:ff9b::7f00:1]/x",
            "https://[2002:7f00:1::]/x",
            "https://[fec0::1]/x",
            "http://198.18.0.1/x",
            "http://224.0.0.1/x",
            "https://[ff02::1]/x",
            "https://203.0.113.9/x",
            "https://localhost/x.git",
            "file:///srv/repo.git",
            "ssh://example.com/x",
            "ext::sh -c id",
            "-uhttps://example.com/x",
            "https://example.com/$(id).git",
            "https://example.com/`id`.git",
            "https://example.com/a;id",
            "https://example.com/a\nb",
            "https://example.com/../../etc",
            "https://example.com/-x",
            "https://example.com/a\0b",
            "https://user:pw@example.com/x",
            "https://example.com/x?upload-pack=id",
            "",
        ] {
            assert!(check_repo_url(bad, &strict).await.is_err(), "{bad:?}");
        }
        let open = cfg(true, true);
        check_repo_url("http://127.0.0.1:9/x.git", &open)
            .await
            .unwrap();
        check_repo_url("file:///srv/repo.git", &open).await.unwrap();
        assert!(check_repo_url("file://host/x", &open).await.is_err());
        assert!(check_repo_url("file:///srv/../etc", &open).await.is_err());
    }

    /// Every address class, by table: (address, globally reachable unicast?).
    #[test]
    fn address_classes() {
        let table: &[(&str, bool)] = &[
            // IPv4
            ("8.8.8.8", true),
            ("140.82.121.4", true),
            ("100.63.255.255", true),
            ("100.128.0.0", true),
            ("172.32.0.1", true),
            ("198.17.255.255", true),
            ("198.20.0.0", true),
            ("223.255.255.255", true),
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("10.0.0.1", false),
            ("100.64.0.1", false),
            ("100.127.255.255", false),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("169.254.169.254", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.0.0.1", false),
            ("192.0.0.170", false),
            ("192.0.2.1", false),
            ("192.88.99.1", false),
            ("192.168.1.1", false),
            ("198.18.0.1", false),
            ("198.19.255.255", false),
            ("198.51.100.7", false),
            ("203.0.113.9", false),
            ("224.0.0.1", false),
            ("239.255.255.250", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            // IPv6 global unicast
            ("2606:4700:4700::1111", true),
            ("2a00:1450:4001:80b::200e", true),
            ("2001:4860::8888", true),
            // IPv6 special
            ("::", false),
            ("::1", false),
            ("100::1", false),
            ("2001:db8::1", false),
            ("2001:2::1", false),
            ("2001:10::1", false),
            ("3fff::1", false),
            ("5f00::1", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("fec0::1", false),
            ("feff::1", false),
            ("ff02::1", false),
            ("ff0e::1", false),
            ("4000::1", false),
            ("1fff::1", false),
            // IPv4-mapped: judged by the IPv4 address
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            // SIIT "IPv4-translated" ::ffff:0:a.b.c.d
            ("::ffff:0:8.8.8.8", false),
            // IPv4-compatible (deprecated): never
            ("::127.0.0.1", false),
            ("::8.8.8.8", false),
            // NAT64 well-known prefix: judged by the IPv4 address; local-use prefix never
            ("64:ff9b::7f00:1", false),
            ("64:ff9b::10.0.0.1", false),
            ("64:ff9b::169.254.169.254", false),
            ("64:ff9b::8.8.8.8", true),
            ("64:ff9b:1::8.8.8.8", false),
            // 6to4: the IPv4 address in bits 16..48
            ("2002:7f00:1::", false),
            ("2002:a00:1::1", false),
            ("2002:c612:1::1", false),
            ("2002:808:808::1", true),
            // Teredo: server 65.54.227.120, client 8.8.8.8 obfuscated (inverted)
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", true),
            // ... with a loopback server, or a private or documentation client
            ("2001:0:7f00:1:8000:63bf:f7f7:f7f7", false),
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", false),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
        ];
        let mut wrong = Vec::new();
        for &(addr, global) in table {
            let ip: IpAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
            if is_global(ip) != global || is_internal(ip) == global {
                wrong.push(format!("{addr}: expected global={global}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn branches_are_checked() {
        check_branch("main").unwrap();
        check_branch("release/v1").unwrap();
        for bad in ["$(id)", "`id`", "a;b", "a\nb", "-x", "../x", "a\0b", ""] {
            assert!(check_branch(bad).is_err(), "{bad:?}");
        }
    }

    fn signed(provider: Provider, secret: &str, body: &[u8], id: &str) -> HeaderMap {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        let sig = hex::encode(mac.finalize().into_bytes());
        let mut h = HeaderMap::new();
        let mut put = |k: &'static str, v: String| {
            h.insert(k, v.parse().unwrap());
        };
        match provider {
            Provider::GitHub => {
                put("x-github-event", "push".into());
                put("x-hub-signature-256", format!("sha256={sig}"));
                put("x-github-delivery", id.into());
            }
            Provider::GitLab => {
                put("x-gitlab-event", "Push Hook".into());
                put("x-gitlab-token", secret.into());
                put("x-gitlab-event-uuid", id.into());
            }
            Provider::Gitea => {
                put("x-gitea-event", "push".into());
                put("x-gitea-signature", sig);
                put("x-gitea-delivery", id.into());
            }
        }
        h
    }

    #[test]
    fn signatures_are_verified() {
        let body =
            br#"{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111"}"#;
        for p in [Provider::GitHub, Provider::GitLab, Provider::Gitea] {
            let d = verify(&signed(p, "s3cret", body, "d-1"), body, "s3cret").unwrap();
            assert_eq!((d.provider, d.id.as_str(), d.push), (p, "d-1", true));
            assert!(matches!(
                verify(&signed(p, "other", body, "d-1"), body, "s3cret"),
                Err(WebhookError::BadSignature(_))
            ));
            if p != Provider::GitLab {
                assert!(verify(&signed(p, "s3cret", body, "d-1"), b"{}", "s3cret").is_err());
            }
            assert!(verify(&signed(p, "s3cret", body, "a b"), body, "s3cret").is_err());
        }
        assert_eq!(pushed(body).unwrap(), Some(("main".into(), "1".repeat(40))));
        assert_eq!(
            pushed(format!(r#"{{"ref":"refs/heads/main","after":"{ZERO_OID}"}}"#).as_bytes())
                .unwrap(),
            None
        );
        assert!(pushed(br#"{"ref":"refs/heads/main","after":"$(id)"}"#).is_err());
    }
}
