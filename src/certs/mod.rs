//! TLS certificates of app host names: uploaded ones ("manual") and ones ordered from an ACME
//! CA (HTTP-01 or TLS-ALPN-01), stored in the registry with their private key sealed, and
//! served by the proxy.
//!
//! - [`inspect`]: parses a PEM chain and key, checks that they match and that the leaf covers
//!   the host name, and reads its issuer and expiry.
//! - [`store`]: the `certificates` table. Private keys are sealed with the master key, bound to
//!   `cert/<domain>`; a row without a certificate (`cert_pem = ''`) records an ACME failure
//!   for a domain that has no certificate yet.
//! - [`CertManager`]: loads every certificate into the proxy's [`CertStore`] at start, keeps it
//!   in step with every change (no restart), and wakes the reconciler so that hosts with a
//!   certificate redirect plain HTTP to HTTPS.
//! - [`acme`]: the daemon loop that orders certificates for custom domains and renews those
//!   nearing expiry, answering HTTP-01 from [`Http01Challenges`] (consulted by the proxy before
//!   routing) or TLS-ALPN-01 from [`TlsAlpn01Challenges`] (`acme.challenge`), with exponential
//!   backoff and a readable `last_error` on failure.
//! - [`alpn`]: TLS-ALPN-01 validation certificates and [`CertResolver`], the HTTPS listener's
//!   certificate resolver (validation certificates for `acme-tls/1` clients only).
//! - [`account`]: the ACME account, registered once per directory and stored in the
//!   `acme_accounts` table with its credentials sealed (bound to `acme-account:<directory>`).

pub mod account;
pub mod acme;
pub mod alpn;
pub mod inspect;
mod manager;
pub mod store;

pub use acme::Http01Challenges;
pub use alpn::{CertResolver, TlsAlpn01Challenges};
pub use inspect::{inspect, CertInfo};
pub use manager::CertManager;
pub use store::CertState;

#[allow(unused_imports)] // for the docs above
use crate::tls::CertStore;

/// Everything that can go wrong with certificates. `Invalid*`, `KeyMismatch`, `NotCovered` and
/// `Expired` are the uploader's to fix (422); `Acme` is recorded as the domain's `last_error`.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate PEM could not be read.
    #[error("the certificate is not valid PEM/X.509: {0}")]
    InvalidCert(String),
    /// The private key PEM could not be read or is of an unsupported type.
    #[error("the private key is not a valid PEM private key (PKCS#8, PKCS#1 or SEC1): {0}")]
    InvalidKey(String),
    /// The key does not belong to the certificate.
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    /// The leaf certificate is not valid for the host name.
    #[error("the certificate is not valid for `{domain}`: it covers {names}")]
    NotCovered { domain: String, names: String },
    /// The certificate has expired.
    #[error("the certificate expired at {0}")]
    Expired(String),
    /// The host name does not belong to the app.
    #[error("`{domain}` is not a domain of app `{app}`: add it with `escale domains add {app} {domain}` first, or use {app}.{apps_domain}")]
    NotAppDomain {
        app: String,
        domain: String,
        apps_domain: String,
    },
    /// No certificate is stored for the host name.
    #[error("no certificate for `{0}`")]
    NotFound(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Ordering a certificate from the ACME CA failed.
    #[error("ACME: {0}")]
    Acme(String),
    /// The stored ACME account of a directory cannot be opened (wrong master key, or the row
    /// was altered).
    #[error("ACME: the stored account for {directory} cannot be read: {reason}")]
    AccountUnreadable { directory: String, reason: String },
}

impl From<sqlx::Error> for CertError {
    fn from(e: sqlx::Error) -> Self {
        CertError::Registry(e.into())
    }
}
