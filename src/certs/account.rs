//! The ACME account, registered once per directory and kept in the registry.
//!
//! The `acme_accounts` table holds one row per directory URL: the account URL (its id at the
//! CA, not a secret) and instant-acme's `AccountCredentials` as JSON (it holds the account's
//! private key), sealed by the master key and bound to `acme-account:<directory url>`.
//! [`Accounts`] gives the ACME loop its account: kept in memory, else restored from the row,
//! else registered at the CA and stored. CAs rate-limit account creation, so a restart reuses
//! the stored account. When the CA answers `accountDoesNotExist` (it forgot the account, e.g.
//! a test CA that was restarted), [`Accounts::replace`] registers a new one and replaces the
//! row.

use instant_acme::{Account, AccountCredentials, NewAccount};

use super::acme::AcmeSettings;
use super::CertError;
use crate::registry::{audit, now_ms, Registry};

/// Where the sealed credentials of the account at `directory_url` are bound.
pub fn account_place(directory_url: &str) -> String {
    format!("acme-account:{directory_url}")
}

/// The stored account of one directory, opened.
pub struct StoredAccount {
    /// The account URL at the CA.
    pub account_url: String,
    /// The credentials to restore the account with.
    pub credentials: AccountCredentials,
}

impl std::fmt::Debug for StoredAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredAccount")
            .field("account_url", &self.account_url)
            .finish_non_exhaustive()
    }
}

/// The stored account of `directory_url`, if any.
pub async fn load(reg: &Registry, directory_url: &str) -> Result<Option<StoredAccount>, CertError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT account_url, credentials_sealed FROM acme_accounts WHERE directory_url = ?",
    )
    .bind(directory_url)
    .fetch_optional(reg.pool())
    .await?;
    let Some((account_url, sealed)) = row else {
        return Ok(None);
    };
    let unreadable = |reason: String| CertError::AccountUnreadable {
        directory: directory_url.to_string(),
        reason,
    };
    let json = reg
        .open_secret(&account_place(directory_url), &sealed)
        .map_err(|e| unreadable(e.to_string()))?;
    let credentials = serde_json::from_str(&json).map_err(|e| unreadable(e.to_string()))?;
    Ok(Some(StoredAccount {
        account_url,
        credentials,
    }))
}

/// Stores (replacing) the account of `directory_url`, with an audit event.
pub async fn save(
    reg: &Registry,
    directory_url: &str,
    account_url: &str,
    credentials: &AccountCredentials,
) -> Result<(), CertError> {
    let json = serde_json::to_string(credentials)
        .map_err(|e| CertError::Acme(format!("serializing the account credentials: {e}")))?;
    let sealed = reg
        .master_key()
        .seal(&account_place(directory_url), json.as_bytes());
    let now = now_ms();
    let mut tx = reg.write().await?;
    let previous: Option<String> =
        sqlx::query_scalar("SELECT account_url FROM acme_accounts WHERE directory_url = ?")
            .bind(directory_url)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO acme_accounts (directory_url, account_url, credentials_sealed, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (directory_url) DO UPDATE SET account_url = excluded.account_url,
           credentials_sealed = excluded.credentials_sealed, updated_at = excluded.updated_at",
    )
    .bind(directory_url)
    .bind(account_url)
    .bind(&sealed)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let detail = match previous {
        Some(old) => format!("ACME account {account_url} at {directory_url} replaces {old}"),
        None => format!("ACME account {account_url} registered at {directory_url}"),
    };
    audit(&mut tx, "escale", None, "acme.account", &detail).await?;
    tx.commit().await?;
    Ok(())
}

/// Whether an ACME error says the CA does not know (or no longer accepts) the account.
pub fn rejected(e: &instant_acme::Error) -> bool {
    matches!(
        e,
        instant_acme::Error::Api(p)
            if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
    )
}

/// The account the ACME loop orders with, cached for the daemon's run.
#[derive(Default)]
pub struct Accounts {
    cached: Option<Account>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("cached", &self.cached.as_ref().map(Account::id))
            .finish()
    }
}

fn acme_err(what: String) -> impl FnOnce(instant_acme::Error) -> CertError {
    move |e| CertError::Acme(format!("{what}: {e}"))
}

fn builder(settings: &AcmeSettings) -> Result<instant_acme::AccountBuilder, CertError> {
    match &settings.ca_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(acme_err(
        "setting up the HTTPS client for the ACME directory".into(),
    ))
}

impl Accounts {
    /// The account for `url`: the cached one, else the stored one, else a new one registered
    /// at the CA and stored.
    pub async fn get(
        &mut self,
        reg: &Registry,
        settings: &AcmeSettings,
        url: &str,
    ) -> Result<Account, CertError> {
        if let Some(a) = &self.cached {
            return Ok(a.clone());
        }
        let account = match load(reg, url).await? {
            Some(stored) => {
                let account = builder(settings)?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(acme_err(format!("restoring the stored account at {url}")))?;
                tracing::info!(account = %stored.account_url, directory = %url, "using the stored ACME account");
                account
            }
            None => self.register(reg, settings, url).await?,
        };
        self.cached = Some(account.clone());
        Ok(account)
    }

    /// Registers a new account at `url` and replaces the stored one (the CA rejected it).
    pub async fn replace(
        &mut self,
        reg: &Registry,
        settings: &AcmeSettings,
        url: &str,
    ) -> Result<Account, CertError> {
        self.cached = None;
        let account = self.register(reg, settings, url).await?;
        self.cached = Some(account.clone());
        Ok(account)
    }

    /// Forgets the cached account: the next [`Accounts::get`] restores it from the registry.
    pub fn forget(&mut self) {
        self.cached = None;
    }

    async fn register(
        &mut self,
        reg: &Registry,
        settings: &AcmeSettings,
        url: &str,
    ) -> Result<Account, CertError> {
        let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder(settings)?
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
            .map_err(acme_err(format!("creating an account at {url}")))?;
        save(reg, url, account.id(), &credentials).await?;
        tracing::info!(account = %account.id(), directory = %url, "registered and stored a new ACME account");
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::MasterKey;
    use base64::Engine;

    /// Credentials as instant-acme serializes them, with a fresh P-256 key; returns them and
    /// the base64url key (the canary).
    fn credentials(id: &str, directory: &str) -> (AccountCredentials, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.serialize_der());
        let json = serde_json::json!({"id": id, "key_pkcs8": b64, "directory": directory});
        (serde_json::from_value(json).unwrap(), b64)
    }

    #[tokio::test]
    async fn stored_account_round_trips_sealed_and_bound_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("escale.db"), MasterKey::random())
            .await
            .unwrap();
        let url = "https://ca.test/dir";
        assert!(load(&reg, url).await.unwrap().is_none());

        let (creds, canary) = credentials("https://ca.test/acct/1", url);
        let json = serde_json::to_string(&creds).unwrap();
        save(&reg, url, "https://ca.test/acct/1", &creds)
            .await
            .unwrap();
        let got = load(&reg, url).await.unwrap().unwrap();
        assert_eq!(got.account_url, "https://ca.test/acct/1");
        assert_eq!(serde_json::to_string(&got.credentials).unwrap(), json);
        assert!(load(&reg, "https://other.test/dir")
            .await
            .unwrap()
            .is_none());

        // Replacing keeps one row per directory.
        let (creds2, canary2) = credentials("https://ca.test/acct/2", url);
        save(&reg, url, "https://ca.test/acct/2", &creds2)
            .await
            .unwrap();
        let got = load(&reg, url).await.unwrap().unwrap();
        assert_eq!(got.account_url, "https://ca.test/acct/2");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_accounts")
            .fetch_one(reg.pool())
            .await
            .unwrap();
        assert_eq!(rows, 1);

        // The sealed value copied to another directory's row does not open there.
        sqlx::query(
            "INSERT INTO acme_accounts SELECT 'https://evil.test/dir', account_url, credentials_sealed, created_at, updated_at FROM acme_accounts",
        )
        .execute(reg.pool())
        .await
        .unwrap();
        let e = load(&reg, "https://evil.test/dir").await.unwrap_err();
        assert!(
            matches!(e, CertError::AccountUnreadable { .. }) && e.to_string().contains("evil.test"),
            "{e}"
        );

        // Neither the key nor the JSON is in the database files (main file and WAL) in clear.
        reg.pool().close().await;
        let json2 = serde_json::to_string(&creds2).unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let path = f.unwrap().path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            for needle in [&canary, &canary2, &json, &json2] {
                assert!(
                    !text.contains(needle.as_str()),
                    "{} holds account credentials in clear",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn only_account_does_not_exist_counts_as_rejected() {
        let problem = |t: &str| {
            instant_acme::Error::Api(
                serde_json::from_value(
                    serde_json::json!({"type": t, "detail": "x", "status": 400}),
                )
                .unwrap(),
            )
        };
        assert!(rejected(&problem(
            "urn:ietf:params:acme:error:accountDoesNotExist"
        )));
        assert!(!rejected(&problem(
            "urn:ietf:params:acme:error:rateLimited"
        )));
        assert!(!rejected(&instant_acme::Error::Str("nope")));
    }
}
