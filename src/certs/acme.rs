//! ACME: orders certificates for custom domains and renews ACME certificates nearing expiry,
//! from a daemon loop. The challenge is `acme.challenge`: HTTP-01, answered by the proxy on
//! port 80 from [`Http01Challenges`], or TLS-ALPN-01, answered by the proxy's HTTPS listener
//! with a validation certificate from [`TlsAlpn01Challenges`](super::TlsAlpn01Challenges).
//!
//! Each pass: forget certificates of host names no app has; then, when ACME is enabled, order
//! a certificate for every custom domain that has none (or an ACME one expiring within
//! `renew_before`). A failure is recorded as the domain's `last_error` and retried with
//! exponential backoff (1 min, doubling, at most 6 h). Domains with an uploaded certificate are
//! left alone. The ACME account is registered once per directory and stored in the registry
//! ([`account`](super::account)); it is reused across restarts, and replaced when the CA says
//! it does not exist.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};

use super::account::{self, Accounts};
use super::alpn::validation_certificate;
use super::store::{self, Source};
use super::{CertError, CertManager};
use crate::config::AcmeChallenge;
use crate::registry::now_ms;

pub use crate::tls::{Http01Challenges, CHALLENGE_PREFIX};

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
    /// The challenge type answered.
    pub challenge: AcmeChallenge,
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
    let mut accounts = Accounts::default();
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
                        tracing::info!(
                            %domain,
                            challenge = settings.challenge.as_str(),
                            "ordering a certificate (ACME)"
                        );
                        let result = tokio::time::timeout(
                            ORDER_TIMEOUT,
                            obtain(&manager, &settings, url, &mut accounts, &domain),
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
                                    // Restored from the registry afresh on the next attempt.
                                    accounts.forget();
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

/// A challenge answer the proxy gives while an order validates.
enum Answer {
    /// An HTTP-01 token.
    Http01(String),
    /// A TLS-ALPN-01 validation certificate, by domain.
    TlsAlpn01(String),
}

/// Orders, validates (HTTP-01 or TLS-ALPN-01) and installs a certificate for `domain`.
async fn obtain(
    manager: &CertManager,
    settings: &AcmeSettings,
    url: &str,
    accounts: &mut Accounts,
    domain: &str,
) -> Result<(), CertError> {
    let account = accounts.get(manager.registry(), settings, url).await?;
    let identifiers = [Identifier::Dns(domain.to_string())];
    let new_order = NewOrder::new(&identifiers);
    let mut order = match account.new_order(&new_order).await {
        Ok(order) => order,
        Err(e) if account::rejected(&e) => {
            tracing::warn!(
                account = %account.id(),
                directory = %url,
                error = %e,
                "the CA rejects the stored ACME account (was the CA reset?); registering a new one"
            );
            accounts
                .replace(manager.registry(), settings, url)
                .await?
                .new_order(&new_order)
                .await
                .map_err(acme_err("creating the order"))?
        }
        Err(e) => return Err(acme_err("creating the order")(e)),
    };
    let (kind, port) = match settings.challenge {
        AcmeChallenge::Http01 => (ChallengeType::Http01, 80),
        AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, 443),
    };
    let name = settings.challenge.as_str();
    let mut answers = Vec::new();
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
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                CertError::Acme(format!("the CA offers no {name} challenge"))
            })?;
            let key_auth = challenge.key_authorization();
            match settings.challenge {
                AcmeChallenge::Http01 => {
                    let token = challenge.token.clone();
                    manager.challenges().insert(&token, key_auth.as_str());
                    answers.push(Answer::Http01(token));
                }
                AcmeChallenge::TlsAlpn01 => {
                    let host = challenge.identifier().to_string();
                    let cert = validation_certificate(&host, key_auth.digest().as_ref())?;
                    manager.alpn_challenges().insert(&host, Arc::new(cert));
                    answers.push(Answer::TlsAlpn01(host));
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(acme_err(&format!("starting the {name} validation")))?;
        }
        let status = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(acme_err("waiting for the validation"))?;
        if status != OrderStatus::Ready {
            return Err(CertError::Acme(format!(
                "{name} validation failed (order {status:?}){}: is port {port} of this host reachable as {domain}?",
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
    for a in &answers {
        match a {
            Answer::Http01(token) => manager.challenges().remove(token),
            Answer::TlsAlpn01(host) => manager.alpn_challenges().remove(host),
        }
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
