//! TLS shared by the proxy and certificate management: the certificate store that `certs`
//! fills and the proxy serves from, the HTTP-01 tokens the proxy answers, and the rustls
//! server configuration (ring provider, ALPN `acme-tls/1`, `h2` and `http/1.1`). Depends on
//! nothing else in escale, so the proxy and `certs` depend on it and never on each other.
//!
//! `acme-tls/1` (RFC 8737) is only for an ACME CA validating a TLS-ALPN-01 challenge: the
//! resolver given to the proxy's TLS listener decides which certificate such a client gets
//! (see `certs::alpn`), and the connection is closed after the handshake, never served HTTP.
//!
//! [`CertStore`] maps host names to certified keys in an `ArcSwap`, so the handshake path
//! only loads a snapshot. Lookup is exact first, then a `*.` wildcard for one label
//! (`*.example.eu` covers `shop.example.eu`, not `example.eu` nor `a.b.example.eu`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use std::sync::{PoisonError, RwLock};

/// Certificate and TLS configuration failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The HTTP-01 path prefix the proxy answers from [`Http01Challenges`].
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Pending HTTP-01 tokens and their key authorizations: filled by the ACME client, answered
/// by the proxy on port 80.
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

/// Host name -> certificate, swapped atomically.
#[derive(Default)]
pub struct CertStore {
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let certs = self.certs.load();
        let mut names: Vec<&str> = certs.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("CertStore").field("hosts", &names).finish()
    }
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the certificate for `host` (exact name or `*.domain`).
    pub fn insert(&self, host: &str, key: Arc<CertifiedKey>) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.certs.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(host.clone(), key.clone());
            m
        });
    }

    /// Removes the certificate for `host`; returns whether one was present.
    pub fn remove(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut removed = false;
        self.certs.rcu(|m| {
            let mut m = HashMap::clone(m);
            removed = m.remove(&host).is_some();
            m
        });
        removed
    }

    /// Replaces the whole store.
    pub fn replace_all(&self, certs: impl IntoIterator<Item = (String, Arc<CertifiedKey>)>) {
        let map = certs
            .into_iter()
            .map(|(h, k)| (h.trim_end_matches('.').to_ascii_lowercase(), k))
            .collect();
        self.certs.store(Arc::new(map));
    }

    /// The certificate for a TLS server name: exact match, then a one-label wildcard.
    pub fn get(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        let certs = self.certs.load();
        if let Some(k) = certs.get(&name) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        if parent.is_empty() {
            return None;
        }
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Number of host names with a certificate.
    pub fn len(&self) -> usize {
        self.certs.load().len()
    }

    /// True when the store holds no certificate.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get(client_hello.server_name()?)
    }
}

/// Builds a [`CertifiedKey`] from a PEM certificate chain and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1), signing with the ring provider.
pub fn certified_key_from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = rustls_pemfile::certs(&mut &chain_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("reading the certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate(
            "the certificate chain holds no certificate".into(),
        ));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| TlsError::Certificate(format!("reading the private key: {e}")))?
        .ok_or_else(|| TlsError::Certificate("no private key found".into()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// The ALPN protocol of ACME TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Whether a ClientHello offers ALPN `acme-tls/1`, i.e. comes from an ACME CA validating a
/// TLS-ALPN-01 challenge.
pub fn offers_acme_tls(client_hello: &ClientHello<'_>) -> bool {
    client_hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN))
}

/// The rustls server configuration: ring provider, safe default versions, no client auth,
/// ALPN `acme-tls/1`, `h2`, `http/1.1`. The server picks the first of these the client
/// offers, so a client offering `acme-tls/1` negotiates it (and gets no HTTP); ordinary
/// clients never offer it.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec(), b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `name`, ready to serve (also used by `certs::alpn`).
    pub(crate) fn key(name: &str) -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        Arc::new(
            certified_key_from_pem(
                c.cert.pem().as_bytes(),
                c.signing_key.serialize_pem().as_bytes(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn exact_then_one_label_wildcard() {
        let store = CertStore::new();
        let exact = key("shop.example.eu");
        let wild = key("*.example.eu");
        store.insert("Shop.Example.eu", exact.clone());
        store.insert("*.example.eu", wild.clone());
        assert!(Arc::ptr_eq(&store.get("shop.example.eu").unwrap(), &exact));
        assert!(Arc::ptr_eq(&store.get("BLOG.example.eu").unwrap(), &wild));
        assert!(store.get("example.eu").is_none());
        assert!(store.get("a.b.example.eu").is_none());
        assert!(store.remove("shop.example.eu"));
        assert!(Arc::ptr_eq(&store.get("shop.example.eu").unwrap(), &wild));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn rejects_garbage_pem() {
        assert!(certified_key_from_pem(b"nope", b"nope").is_err());
    }
}
