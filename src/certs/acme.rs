//! ACME: orders certificates for custom domains (HTTP-01, answered by the proxy on port 80
//! from [`Http01Challenges`]) and renews ACME certificates nearing expiry, from a daemon loop.
//!
//! Each pass: forget certificates of host names no app has; then, when ACME is enabled, order
//! a certificate for every custom domain that has none (or an ACME one expiring within
//! `renew_before`). A failure is recorded as the domain's `last_error` and retried with
//! exponential backoff (1 min, doubling, at most 6 h). Domains with an uploaded certificate are
//! left alone. The ACME account is created once per run and kept in memory.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use super::store::{self, Source};
use super::{CertError, CertManager};
use crate::registry::now_ms;

/// The HTTP-01 path prefix the proxy answers from this map.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Pending HTTP-01 tokens and their key authorizations.
#[derive(Debug, Default)]
pub struct Http01Challenges {
    tokens: RwLock<HashMap<String, String>>,
}

impl Http01Challenges {
    /// Answers `token` with `key_authorization` until removed.
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_string(), key_authorization.to_string());
    }

    /// Stops answering `token`.
    pub fn remove(&self, token: &str) {
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }

    /// The key authorization for a request path, if it is a pending challenge.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }
}

/// `[acme]`, as the loop needs it.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL; `None` disables ordering.
    pub directory_url: Option<String>,
    /// Contact address given to the CA.
    pub email: Option<String>,
    /// Renew an ACME certificate this long before it expires.
    pub renew_before: Duration,
    /// A PEM root trusted for the connection to the directory (test CAs), instead of the
    /// platform's roots.
    pub ca_root: Option<PathBuf>,
}

const FIRST_BACKOFF_MS: i64 = 60_000;
const MAX_BACKOFF_MS: i64 = 6 * 3600 * 1000;
const PASS_INTERVAL: Duration = Duration::from_secs(60);
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs until `shutdown` resolves.
pub async fn run(
    manager: Arc<CertManager>,
    settings: AcmeSettings,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut account: Option<Account> = None;
    // domain -> (failures in a row, next attempt at)
    let mut backoff: HashMap<String, (u32, i64)> = HashMap::new();
    loop {
        if let Err(e) = manager.prune().await {
            tracing::warn!(error = %e, "certificate pruning failed");
        }
        let mut wait = PASS_INTERVAL;
        if let Some(url) = &settings.directory_url {
            match due(&manager, settings.renew_before).await {
                Ok(domains) => {
                    backoff.retain(|d, _| domains.contains(d));
                    for domain in domains {
                        let now = now_ms();
                        if let Some((_, at)) = backoff.get(&domain) {
                            if *at > now {
                                wait = wait.min(Duration::from_millis((*at - now) as u64));
                                continue;
                            }
                        }
                        tracing::info!(%domain, "ordering a certificate (ACME HTTP-01)");
                        let result = tokio::time::timeout(
                            ORDER_TIMEOUT,
                            obtain(&manager, &settings, url, &mut account, &domain),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(CertError::Acme(format!(
                                "the order did not complete within {}s",
                                ORDER_TIMEOUT.as_secs()
                            )))
                        });
                        match result {
                            Ok(()) => {
                                tracing::info!(%domain, "certificate issued and installed");
                                backoff.remove(&domain);
                            }
                            Err(e) => {
                                let (n, _) = backoff.get(&domain).copied().unwrap_or((0, 0));
                                let delay = FIRST_BACKOFF_MS
                                    .saturating_mul(1 << n.min(16))
                                    .min(MAX_BACKOFF_MS);
                                backoff.insert(domain.clone(), (n + 1, now_ms() + delay));
                                wait = wait.min(Duration::from_millis(delay as u64));
                                let msg =
                                    format!("{e} (attempt {}, next in {}s)", n + 1, delay / 1000);
                                tracing::warn!(%domain, error = %msg, "certificate order failed");
                                if let Err(e) =
                                    store::record_error(manager.registry(), &domain, &msg).await
                                {
                                    tracing::warn!(%domain, error = %e, "cannot record the error");
                                }
                                if matches!(e, CertError::Acme(_)) {
                                    // A broken account (e.g. the CA restarted) is made anew.
                                    account = None;
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list domains for ACME"),
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = manager.acme_wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Custom domains that need a certificate now: none yet, or an ACME one within `renew_before`
/// of its expiry.
async fn due(manager: &CertManager, renew_before: Duration) -> Result<Vec<String>, CertError> {
    let states = store::states(manager.registry()).await?;
    let attached = store::attached_hosts(manager.registry(), manager.apps_domain()).await?;
    let horizon = now_ms().saturating_add(renew_before.as_millis() as i64);
    let mut out: Vec<String> = attached
        .into_iter()
        .filter(|(_, custom)| *custom)
        .map(|(d, _)| d)
        .filter(|d| match states.get(d) {
            None => true,
            Some(s) if !s.has_certificate => true,
            Some(s) => s.source == Some(Source::Acme) && s.not_after.unwrap_or(0) < horizon,
        })
        .collect();
    out.sort();
    Ok(out)
}

fn acme_err(what: &str) -> impl FnOnce(instant_acme::Error) -> CertError + '_ {
    move |e| CertError::Acme(format!("{what}: {e}"))
}

async fn account_for(
    settings: &AcmeSettings,
    url: &str,
    slot: &mut Option<Account>,
) -> Result<Account, CertError> {
    if let Some(a) = slot {
        return Ok(a.clone());
    }
    let builder = match &settings.ca_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(acme_err(
        "setting up the HTTPS client for the ACME directory",
    ))?;
    let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, _credentials) = builder
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            url.to_string(),
            None,
        )
        .await
        .map_err(acme_err(&format!("creating an account at {url}")))?;
    *slot = Some(account.clone());
    Ok(account)
}

/// Orders, validates (HTTP-01) and installs a certificate for `domain`.
async fn obtain(
    manager: &CertManager,
    settings: &AcmeSettings,
    url: &str,
    slot: &mut Option<Account>,
    domain: &str,
) -> Result<(), CertError> {
    let account = account_for(settings, url, slot).await?;
    let identifiers = [Identifier::Dns(domain.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(acme_err("creating the order"))?;
    let mut tokens = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz.map_err(acme_err("reading the authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(CertError::Acme(format!(
                        "the authorization is {other:?}"
                    )))
                }
            }
            let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
                CertError::Acme("the CA offers no HTTP-01 challenge".into())
            })?;
            let token = challenge.token.clone();
            let key_auth = challenge.key_authorization();
            manager.challenges().insert(&token, key_auth.as_str());
            tokens.push(token);
            challenge
                .set_ready()
                .await
                .map_err(acme_err("starting the HTTP-01 validation"))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(acme_err("waiting for the validation"))?;
        if status != OrderStatus::Ready {
            return Err(CertError::Acme(format!(
                "validation failed (order {status:?}){}: is port 80 of this host reachable as {domain}?",
                authz_problem(&mut order).await
            )));
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(acme_err("finalizing the order"))?;
        let chain_pem = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(60)))
            .await
            .map_err(acme_err("downloading the certificate"))?;
        Ok((chain_pem, key_pem))
    }
    .await;
    for t in &tokens {
        manager.challenges().remove(t);
    }
    let (chain_pem, key_pem) = result?;
    manager.install_acme(domain, &chain_pem, &key_pem).await
}

/// The CA's reason for a failed authorization, as ` (reason)`, or nothing.
async fn authz_problem(order: &mut instant_acme::Order) -> String {
    let mut authzs = order.authorizations();
    while let Some(Ok(authz)) = authzs.next().await {
        for c in &authz.challenges {
            if let Some(p) = &c.error {
                return format!(" ({p})");
            }
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_answer_only_pending_tokens() {
        let c = Http01Challenges::default();
        c.insert("tok", "tok.thumb");
        assert_eq!(
            c.answer("/.well-known/acme-challenge/tok").as_deref(),
            Some("tok.thumb")
        );
        assert!(c.answer("/.well-known/acme-challenge/other").is_none());
        assert!(c.answer("/tok").is_none());
        c.remove("tok");
        assert!(c.answer("/.well-known/acme-challenge/tok").is_none());
    }
}
