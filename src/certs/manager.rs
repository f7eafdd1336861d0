//! [`CertManager`]: the one place certificates change. It writes the registry, then updates
//! the proxy's [`CertStore`] and publishes `CertificatesChanged` (the reconciler wakes on it and (which republishes routes with
//! `redirect_https` for hosts that have a certificate), so no change needs a restart.

use std::sync::Arc;

use tokio::sync::Notify;

use super::acme::Http01Challenges;
use super::alpn::{CertResolver, TlsAlpn01Challenges};
use super::store::{self, CertState, Source};
use super::{inspect, CertError};
use crate::registry::{now_ms, Actor, Registry};
use crate::tls::CertStore;

/// Keeps the registry's certificates and the proxy's [`CertStore`] in step.
#[derive(Debug)]
pub struct CertManager {
    registry: Registry,
    store: Arc<CertStore>,
    challenges: Arc<Http01Challenges>,
    alpn_challenges: Arc<TlsAlpn01Challenges>,
    /// The ACME loop's wake-up (a domain was added).
    pub(crate) acme_wake: Notify,
    apps_domain: String,
}

impl CertManager {
    /// A manager over an empty [`CertStore`]; call [`CertManager::load`] to fill it.
    pub fn new(registry: Registry, apps_domain: &str) -> Arc<CertManager> {
        Arc::new(CertManager {
            registry,
            store: Arc::new(CertStore::new()),
            challenges: Arc::new(Http01Challenges::default()),
            alpn_challenges: Arc::new(TlsAlpn01Challenges::default()),
            acme_wake: Notify::new(),
            apps_domain: apps_domain.to_string(),
        })
    }

    /// The store the HTTPS listener resolves certificates from.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The HTTP-01 tokens the proxy answers.
    pub fn challenges(&self) -> &Arc<Http01Challenges> {
        &self.challenges
    }

    /// The pending TLS-ALPN-01 validation certificates.
    pub fn alpn_challenges(&self) -> &Arc<TlsAlpn01Challenges> {
        &self.alpn_challenges
    }

    /// The HTTPS listener's certificate resolver: the [`CertStore`], and TLS-ALPN-01
    /// validation certificates for clients offering `acme-tls/1`.
    pub fn resolver(&self) -> Arc<CertResolver> {
        Arc::new(CertResolver::new(
            self.store.clone(),
            self.alpn_challenges.clone(),
        ))
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn apps_domain(&self) -> &str {
        &self.apps_domain
    }

    /// Replaces the store's content with every certificate of the registry. A certificate that
    /// no longer parses is skipped with a warning. Returns how many were loaded.
    pub async fn load(&self) -> Result<usize, CertError> {
        let mut loaded = Vec::new();
        for s in store::load_all(&self.registry).await? {
            match crate::tls::certified_key_from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes()) {
                Ok(k) => loaded.push((s.domain, Arc::new(k))),
                Err(e) => {
                    tracing::warn!(domain = %s.domain, error = %e, "stored certificate not loaded")
                }
            }
        }
        let n = loaded.len();
        self.store.replace_all(loaded);
        self.registry
            .bus()
            .publish(crate::events::Event::CertificatesChanged);
        Ok(n)
    }

    /// Tells the ACME loop to look for domains without a certificate now.
    pub fn wake_acme(&self) {
        self.acme_wake.notify_one();
    }

    /// The host names of `app` (visible to `actor`): `APP.<apps_domain>` then its domains.
    pub async fn app_hosts(&self, actor: &Actor, app: &str) -> Result<Vec<String>, CertError> {
        let mut hosts = vec![format!("{app}.{}", self.apps_domain)];
        hosts.extend(
            self.registry
                .domains(actor, app)
                .await?
                .into_iter()
                .map(|d| d.domain),
        );
        Ok(hosts)
    }

    /// Checks and stores an uploaded certificate for `domain` of `app`, and serves it at once.
    pub async fn upload(
        &self,
        actor: &Actor,
        app: &str,
        domain: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<CertState, CertError> {
        if !self
            .app_hosts(actor, app)
            .await?
            .iter()
            .any(|h| h == domain)
        {
            return Err(CertError::NotAppDomain {
                app: app.into(),
                domain: domain.into(),
                apps_domain: self.apps_domain.clone(),
            });
        }
        let info = inspect(domain, cert_pem, key_pem, now_ms())?;
        store::save(
            &self.registry,
            &actor.name,
            Some(app),
            domain,
            cert_pem,
            key_pem,
            &info,
            Source::Manual,
        )
        .await?;
        self.store.insert(domain, info.key.clone());
        self.registry
            .bus()
            .publish(crate::events::Event::CertificatesChanged);
        self.state(domain).await
    }

    /// Stores a certificate obtained from the ACME CA and serves it at once.
    pub(crate) async fn install_acme(
        &self,
        domain: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), CertError> {
        let info = inspect(domain, cert_pem, key_pem, now_ms())?;
        let app = self
            .registry
            .all_domains()
            .await?
            .into_iter()
            .find(|(d, _)| d == domain)
            .map(|(_, a)| a);
        store::save(
            &self.registry,
            "escale",
            app.as_deref(),
            domain,
            cert_pem,
            key_pem,
            &info,
            Source::Acme,
        )
        .await?;
        self.store.insert(domain, info.key);
        self.registry
            .bus()
            .publish(crate::events::Event::CertificatesChanged);
        Ok(())
    }

    /// Removes the certificate of `domain` of `app`.
    pub async fn remove(&self, actor: &Actor, app: &str, domain: &str) -> Result<(), CertError> {
        if !self
            .app_hosts(actor, app)
            .await?
            .iter()
            .any(|h| h == domain)
        {
            return Err(CertError::NotFound(domain.into()));
        }
        if !store::delete(&self.registry, &actor.name, Some(app), domain).await? {
            return Err(CertError::NotFound(domain.into()));
        }
        self.store.remove(domain);
        self.registry
            .bus()
            .publish(crate::events::Event::CertificatesChanged);
        Ok(())
    }

    /// Forgets the certificate of a host name that no longer belongs to any app.
    pub async fn forget(&self, domain: &str) -> Result<(), CertError> {
        store::delete(&self.registry, "escale", None, domain).await?;
        if self.store.remove(domain) {
            self.registry
                .bus()
                .publish(crate::events::Event::CertificatesChanged);
        }
        Ok(())
    }

    /// Removes certificates (and error rows) of host names no app has any more.
    pub async fn prune(&self) -> Result<(), CertError> {
        let attached = store::attached_hosts(&self.registry, &self.apps_domain).await?;
        for domain in store::states(&self.registry).await?.into_keys() {
            if !attached.contains_key(&domain) {
                tracing::info!(%domain, "forgetting the certificate of a host no app has");
                self.forget(&domain).await?;
            }
        }
        Ok(())
    }

    /// The certificate state of one host name.
    pub async fn state(&self, domain: &str) -> Result<CertState, CertError> {
        Ok(store::states(&self.registry)
            .await?
            .remove(domain)
            .unwrap_or_else(|| CertState::none(domain)))
    }

    /// The certificate state of every host name of `app`.
    pub async fn states(&self, actor: &Actor, app: &str) -> Result<Vec<CertState>, CertError> {
        let hosts = self.app_hosts(actor, app).await?;
        let mut all = store::states(&self.registry).await?;
        Ok(hosts
            .iter()
            .map(|h| all.remove(h).unwrap_or_else(|| CertState::none(h)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::MasterKey;

    #[tokio::test]
    async fn upload_serves_at_once_and_key_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("escale.db");
        let reg = Registry::open(&db, MasterKey::random()).await.unwrap();
        let actor = reg.host_admin().await.unwrap();
        reg.create_app(&actor, "shop", None, 8080).await.unwrap();
        let m = CertManager::new(reg.clone(), "apps.test");
        let c = rcgen::generate_simple_self_signed(vec!["shop.apps.test".to_string()]).unwrap();
        let key_pem = c.signing_key.serialize_pem();
        let st = m
            .upload(&actor, "shop", "shop.apps.test", &c.cert.pem(), &key_pem)
            .await
            .unwrap();
        assert!(st.has_certificate && st.source == Some(Source::Manual));
        assert!(m.store().get("shop.apps.test").is_some());
        let e = m
            .upload(&actor, "shop", "other.apps.test", &c.cert.pem(), &key_pem)
            .await
            .unwrap_err();
        assert!(matches!(e, CertError::NotAppDomain { .. }), "{e}");

        // A fresh manager loads it back; the key is not stored in clear.
        let m2 = CertManager::new(reg.clone(), "apps.test");
        assert_eq!(m2.load().await.unwrap(), 1);
        reg.pool().close().await;
        let body = key_pem.lines().nth(1).unwrap().to_string();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains(&body));
        }
    }
}
