//! Reading and checking a certificate chain and its private key before they are stored.

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use super::CertError;

/// What escale keeps about a checked certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The issuer's common name (or its whole distinguished name when it has none).
    pub issuer: String,
    /// Expiry of the leaf, unix milliseconds.
    pub not_after_ms: i64,
    /// DNS names the leaf covers (SANs, else the subject CN).
    pub names: Vec<String>,
    /// The chain and key, ready for the proxy.
    pub key: Arc<CertifiedKey>,
}

/// Parses `cert_pem` (leaf first, then intermediates) and `key_pem`, checks that the key
/// belongs to the leaf, that the leaf covers `domain` and has not expired at `now_ms`.
pub fn inspect(
    domain: &str,
    cert_pem: &str,
    key_pem: &str,
    now_ms: i64,
) -> Result<CertInfo, CertError> {
    let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::InvalidCert(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| CertError::InvalidCert("no CERTIFICATE block found".into()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| CertError::InvalidCert(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| CertError::InvalidKey(e.to_string()))?
        .ok_or_else(|| CertError::InvalidKey("no PRIVATE KEY block found".into()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::InvalidKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch)
        }
        // The key type cannot say (unknown): the handshake will.
        Err(_) => {}
    }

    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
        {
            names.push(cn.to_ascii_lowercase());
        }
    }
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !names.iter().any(|n| covers(n, &domain)) {
        return Err(CertError::NotCovered {
            domain,
            names: if names.is_empty() {
                "no DNS name".into()
            } else {
                names.join(", ")
            },
        });
    }
    let not_after = x509.validity().not_after;
    let not_after_ms = not_after.timestamp().saturating_mul(1000);
    if not_after_ms <= now_ms {
        return Err(CertError::Expired(not_after.to_string()));
    }
    let issuer = x509
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| x509.issuer().to_string());
    Ok(CertInfo {
        issuer,
        not_after_ms,
        names,
        key: Arc::new(certified),
    })
}

/// True when certificate name `name` (maybe `*.parent`) covers host `host` (both lowercase).
pub fn covers(name: &str, host: &str) -> bool {
    if let Some(parent) = name.strip_prefix("*.") {
        return host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent);
    }
    name == host
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn accepts_matching_pair_and_reads_expiry() {
        let (cert, key) = self_signed(&["shop.example.eu"]);
        let info = inspect("Shop.example.eu", &cert, &key, 0).unwrap();
        assert_eq!(info.names, ["shop.example.eu"]);
        assert!(info.not_after_ms > crate::registry::now_ms());
        assert!(!info.issuer.is_empty());
    }

    #[test]
    fn wildcard_covers_one_label() {
        assert!(covers("*.example.eu", "shop.example.eu"));
        assert!(!covers("*.example.eu", "a.b.example.eu"));
        assert!(!covers("*.example.eu", "example.eu"));
        let (cert, key) = self_signed(&["*.example.eu"]);
        assert!(inspect("blog.example.eu", &cert, &key, 0).is_ok());
    }

    #[test]
    fn rejects_mismatch_wrong_domain_and_garbage() {
        let (cert, _) = self_signed(&["shop.example.eu"]);
        let (_, other_key) = self_signed(&["shop.example.eu"]);
        assert!(matches!(
            inspect("shop.example.eu", &cert, &other_key, 0),
            Err(CertError::KeyMismatch)
        ));
        let (cert, key) = self_signed(&["shop.example.eu"]);
        let e = inspect("blog.example.eu", &cert, &key, 0).unwrap_err();
        assert!(e.to_string().contains("shop.example.eu"), "{e}");
        assert!(matches!(
            inspect("shop.example.eu", "nope", &key, 0),
            Err(CertError::InvalidCert(_))
        ));
        assert!(matches!(
            inspect("shop.example.eu", &cert, "nope", 0),
            Err(CertError::InvalidKey(_))
        ));
        assert!(matches!(
            inspect("shop.example.eu", &cert, &key, i64::MAX),
            Err(CertError::Expired(_))
        ));
    }
}
