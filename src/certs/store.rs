//! The `certificates` table: one row per host name, the private key sealed by the master key
//! (bound to `cert/<domain>`). A row with an empty `cert_pem` holds only the `last_error` of an
//! ACME order for a domain that has no certificate yet.

use std::collections::HashMap;

use serde::Serialize;

use super::{CertError, CertInfo};
use crate::registry::{audit, now_ms, Registry};

/// Where a certificate's sealed private key is bound.
pub fn key_place(domain: &str) -> String {
    format!("cert/{domain}")
}

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Uploaded by a user.
    Manual,
    /// Ordered from the ACME CA.
    Acme,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Manual => "manual",
            Source::Acme => "acme",
        }
    }

    fn parse(s: &str) -> Source {
        if s == "manual" {
            Source::Manual
        } else {
            Source::Acme
        }
    }
}

/// The certificate state of one host name, as the API shows it (never the key).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CertState {
    pub domain: String,
    /// True when a certificate is stored (and served).
    pub has_certificate: bool,
    /// The issuer's common name.
    pub issuer: Option<String>,
    /// Expiry, unix milliseconds.
    pub not_after: Option<i64>,
    pub source: Option<Source>,
    /// Why the last ACME order or renewal failed, if it did.
    pub last_error: Option<String>,
    /// Unix milliseconds of the last change.
    pub updated_at: Option<i64>,
}

impl CertState {
    /// The state of a host name without any row.
    pub fn none(domain: &str) -> CertState {
        CertState {
            domain: domain.to_string(),
            has_certificate: false,
            issuer: None,
            not_after: None,
            source: None,
            last_error: None,
            updated_at: None,
        }
    }
}

#[derive(sqlx::FromRow)]
struct StateRow {
    domain: String,
    has_cert: bool,
    issuer: String,
    not_after: i64,
    source: String,
    last_error: Option<String>,
    updated_at: i64,
}

impl From<StateRow> for CertState {
    fn from(r: StateRow) -> CertState {
        CertState {
            domain: r.domain,
            has_certificate: r.has_cert,
            issuer: r.has_cert.then_some(r.issuer),
            not_after: r.has_cert.then_some(r.not_after),
            source: r.has_cert.then(|| Source::parse(&r.source)),
            last_error: r.last_error,
            updated_at: Some(r.updated_at),
        }
    }
}

/// A stored certificate with its key opened, for loading into the proxy.
#[derive(Debug)]
pub struct Stored {
    pub domain: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
    pub source: Source,
}

/// Saves (replacing) the certificate of `domain` and clears its `last_error`, with an audit
/// event by `actor` on `app`.
#[allow(clippy::too_many_arguments)]
pub async fn save(
    reg: &Registry,
    actor: &str,
    app: Option<&str>,
    domain: &str,
    cert_pem: &str,
    key_pem: &str,
    info: &CertInfo,
    source: Source,
) -> Result<(), CertError> {
    let sealed = reg
        .master_key()
        .seal(&key_place(domain), key_pem.as_bytes());
    let mut tx = reg.write().await?;
    sqlx::query(
        "INSERT INTO certificates (domain, cert_pem, key_sealed, issuer, not_after, source, last_error, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, NULL, ?)
         ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem, key_sealed = excluded.key_sealed,
           issuer = excluded.issuer, not_after = excluded.not_after, source = excluded.source,
           last_error = NULL, updated_at = excluded.updated_at",
    )
    .bind(domain)
    .bind(cert_pem)
    .bind(&sealed)
    .bind(&info.issuer)
    .bind(info.not_after_ms)
    .bind(source.as_str())
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        actor,
        app,
        "cert.add",
        &format!(
            "{} certificate for `{domain}` from {}",
            source.as_str(),
            info.issuer
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records why obtaining a certificate for `domain` failed (keeps any certificate it has).
pub async fn record_error(reg: &Registry, domain: &str, error: &str) -> Result<(), CertError> {
    sqlx::query(
        "INSERT INTO certificates (domain, cert_pem, key_sealed, issuer, not_after, source, last_error, updated_at)
         VALUES (?, '', '', '', 0, 'acme', ?, ?)
         ON CONFLICT (domain) DO UPDATE SET last_error = excluded.last_error, updated_at = excluded.updated_at",
    )
    .bind(domain)
    .bind(error)
    .bind(now_ms())
    .execute(reg.pool())
    .await?;
    Ok(())
}

/// Deletes the row of `domain`; returns whether it held a certificate.
pub async fn delete(
    reg: &Registry,
    actor: &str,
    app: Option<&str>,
    domain: &str,
) -> Result<bool, CertError> {
    let mut tx = reg.write().await?;
    let had: Option<bool> =
        sqlx::query_scalar("DELETE FROM certificates WHERE domain = ? RETURNING cert_pem != ''")
            .bind(domain)
            .fetch_optional(&mut *tx)
            .await?;
    if had == Some(true) {
        audit(
            &mut tx,
            actor,
            app,
            "cert.remove",
            &format!("certificate for `{domain}` removed"),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(had == Some(true))
}

/// Every stored certificate with its key opened (rows without a certificate are skipped).
pub async fn load_all(reg: &Registry) -> Result<Vec<Stored>, CertError> {
    let rows: Vec<(String, String, String, i64, String)> = sqlx::query_as(
        "SELECT domain, cert_pem, key_sealed, not_after, source FROM certificates WHERE cert_pem != '' ORDER BY domain",
    )
    .fetch_all(reg.pool())
    .await?;
    rows.into_iter()
        .map(|(domain, cert_pem, sealed, not_after, source)| {
            let key_pem = reg.open_secret(&key_place(&domain), &sealed)?;
            Ok(Stored {
                domain,
                cert_pem,
                key_pem,
                not_after,
                source: Source::parse(&source),
            })
        })
        .collect()
}

/// The state of every row, by domain.
pub async fn states(reg: &Registry) -> Result<HashMap<String, CertState>, CertError> {
    let rows: Vec<StateRow> = sqlx::query_as(
        "SELECT domain, cert_pem != '' AS has_cert, issuer, not_after, source, last_error, updated_at FROM certificates",
    )
    .fetch_all(reg.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.domain.clone(), CertState::from(r)))
        .collect())
}

/// Every host name that belongs to an app: its custom domains and `APP.<apps_domain>`, with
/// whether it is a custom domain.
pub async fn attached_hosts(
    reg: &Registry,
    apps_domain: &str,
) -> Result<HashMap<String, bool>, CertError> {
    let mut out: HashMap<String, bool> = reg
        .all_apps()
        .await?
        .into_iter()
        .map(|a| (format!("{}.{apps_domain}", a.name), false))
        .collect();
    for (domain, _) in reg.all_domains().await? {
        out.insert(domain, true);
    }
    Ok(out)
}
