//! ACME TLS-ALPN-01 (RFC 8737): the validation certificates the HTTPS listener shows to a CA.
//!
//! While an order validates with `tls-alpn-01`, [`TlsAlpn01Challenges`] holds one self-signed
//! certificate per domain: its only SAN is the domain, and its critical `acmeIdentifier`
//! extension (OID 1.3.6.1.5.5.7.1.31) holds the SHA-256 digest of the key authorization.
//! [`CertResolver`] is the HTTPS listener's certificate resolver: a ClientHello offering ALPN
//! `acme-tls/1` gets the pending validation certificate for its server name, or none (the
//! handshake fails); every other ClientHello gets the [`CertStore`]'s certificate. The proxy
//! closes `acme-tls/1` connections after the handshake.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::CertError;
use crate::tls::offers_acme_tls;
use crate::tls::{certified_key_from_pem, CertStore};

/// Pending TLS-ALPN-01 validation certificates, by domain.
#[derive(Default)]
pub struct TlsAlpn01Challenges {
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for TlsAlpn01Challenges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let certs = self.certs.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<&str> = certs.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("TlsAlpn01Challenges")
            .field("pending", &names)
            .finish()
    }
}

fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

impl TlsAlpn01Challenges {
    /// Shows `key` to `acme-tls/1` clients asking for `domain` until removed.
    pub fn insert(&self, domain: &str, key: Arc<CertifiedKey>) {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(normalize(domain), key);
    }

    /// Stops answering for `domain`.
    pub fn remove(&self, domain: &str) {
        self.certs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&normalize(domain));
    }

    /// The pending validation certificate of `domain` (exact name only).
    pub fn get(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&normalize(domain))
            .cloned()
    }

    /// Number of pending validations.
    pub fn len(&self) -> usize {
        self.certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when no validation is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The TLS-ALPN-01 validation certificate for `domain`: self-signed with a fresh key, SAN
/// `domain`, and the critical `acmeIdentifier` extension holding `digest`, the SHA-256 of the
/// key authorization (32 bytes).
pub fn validation_certificate(domain: &str, digest: &[u8]) -> Result<CertifiedKey, CertError> {
    if digest.len() != 32 {
        return Err(CertError::Acme(format!(
            "a TLS-ALPN-01 key authorization digest is 32 bytes, not {}",
            digest.len()
        )));
    }
    let err = |e: rcgen::Error| {
        CertError::Acme(format!(
            "building the TLS-ALPN-01 certificate for `{domain}`: {e}"
        ))
    };
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(err)?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(err)?;
    certified_key_from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .map_err(|e| CertError::Acme(format!("loading the TLS-ALPN-01 certificate: {e}")))
}

/// The HTTPS listener's certificate resolver: [`CertStore`] for ordinary clients, pending
/// TLS-ALPN-01 validation certificates for clients offering `acme-tls/1`.
#[derive(Debug, Clone)]
pub struct CertResolver {
    store: Arc<CertStore>,
    challenges: Arc<TlsAlpn01Challenges>,
}

impl CertResolver {
    /// A resolver over `store` and `challenges`.
    pub fn new(store: Arc<CertStore>, challenges: Arc<TlsAlpn01Challenges>) -> CertResolver {
        CertResolver { store, challenges }
    }

    /// The certificate for a ClientHello with `server_name` that does (`acme_tls`) or does not
    /// offer ALPN `acme-tls/1`. A validation never falls back to a served certificate, and an
    /// ordinary client never sees a validation certificate.
    pub fn choose(&self, server_name: Option<&str>, acme_tls: bool) -> Option<Arc<CertifiedKey>> {
        let name = server_name?;
        if acme_tls {
            self.challenges.get(name)
        } else {
            self.store.get(name)
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_tls = offers_acme_tls(&client_hello);
        self.choose(client_hello.server_name(), acme_tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    #[test]
    fn validation_certificate_carries_the_critical_acme_identifier() {
        let digest = [7u8; 32];
        let key = validation_certificate("Shop.Example.eu", &digest).unwrap();
        assert_eq!(key.cert.len(), 1, "a single self-signed certificate");
        let (_, cert) = X509Certificate::from_der(key.cert[0].as_ref()).unwrap();
        assert_eq!(cert.issuer(), cert.subject(), "self-signed");
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, ["Shop.Example.eu"]);
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("the acmeIdentifier extension");
        assert!(ext.critical, "acmeIdentifier must be critical (RFC 8737)");
        // extnValue is an OCTET STRING of the 32-byte digest: 04 20 <digest>.
        let mut want = vec![0x04, 0x20];
        want.extend_from_slice(&digest);
        assert_eq!(ext.value, &want[..]);

        assert!(validation_certificate("shop.example.eu", &[1u8; 31]).is_err());
    }

    #[test]
    fn resolver_serves_validation_certificates_only_to_acme_tls_clients() {
        let store = Arc::new(CertStore::new());
        let challenges = Arc::new(TlsAlpn01Challenges::default());
        let resolver = CertResolver::new(store.clone(), challenges.clone());
        let normal = crate::tls::tests::key("shop.example.eu");
        store.insert("shop.example.eu", normal.clone());
        let wild = crate::tls::tests::key("*.example.eu");
        store.insert("*.example.eu", wild);

        // Nothing pending: an acme-tls/1 client gets no certificate, even though one is served.
        assert!(resolver.choose(Some("shop.example.eu"), true).is_none());
        let pending = Arc::new(validation_certificate("shop.example.eu", &[1u8; 32]).unwrap());
        challenges.insert("SHOP.example.eu.", pending.clone());
        assert_eq!(challenges.len(), 1);

        let got = resolver.choose(Some("shop.example.eu"), true).unwrap();
        assert!(Arc::ptr_eq(&got, &pending), "the validation certificate");
        let got = resolver.choose(Some("shop.example.eu"), false).unwrap();
        assert!(
            Arc::ptr_eq(&got, &normal),
            "ordinary clients are unaffected"
        );
        // No wildcard fallback and no other names for a validation; no SNI, nothing.
        assert!(resolver.choose(Some("blog.example.eu"), true).is_none());
        assert!(resolver.choose(Some("blog.example.eu"), false).is_some());
        assert!(resolver.choose(None, true).is_none());
        assert!(resolver.choose(None, false).is_none());

        challenges.remove("shop.example.eu");
        assert!(challenges.is_empty());
        assert!(resolver.choose(Some("shop.example.eu"), true).is_none());
    }
}
