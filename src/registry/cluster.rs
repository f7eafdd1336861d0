//! The cluster's certificate authority in the registry (`cluster_ca`, `cluster_client_cert`,
//! `cluster_node_certs`, migration 0005).
//!
//! Private keys are sealed by the master key before they reach SQL: the CA's bound to
//! [`CA_KEY_PLACE`], escale's client key bound to [`CLIENT_KEY_PLACE`]. Node server keys are
//! never stored; only what was issued to a node is recorded. The PEMs themselves are made by
//! `cluster::pki`; this file only keeps them.

use super::{audit, Registry, Result};

/// Where the CA's sealed private key is bound.
pub const CA_KEY_PLACE: &str = "cluster-ca";
/// Where escale's sealed client key is bound.
pub const CLIENT_KEY_PLACE: &str = "cluster-client";

/// The cluster CA as stored, its key opened.
#[derive(Clone)]
pub struct StoredClusterCa {
    /// The CA certificate's subject common name.
    pub common_name: String,
    pub cert_pem: String,
    /// PKCS#8 PEM of the CA's private key.
    pub key_pem: String,
    /// Unix milliseconds.
    pub not_after: i64,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl std::fmt::Debug for StoredClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredClusterCa")
            .field("common_name", &self.common_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// escale's client certificate as stored, its key opened.
#[derive(Clone)]
pub struct StoredClientCert {
    pub cert_pem: String,
    /// PKCS#8 PEM of the client key.
    pub key_pem: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix milliseconds.
    pub not_after: i64,
    /// Unix milliseconds.
    pub issued_at: i64,
}

impl std::fmt::Debug for StoredClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredClientCert")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The latest server certificate issued to a node (no key).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NodeCertRecord {
    pub node: String,
    /// `HOST:PORT` the certificate was issued for.
    pub address: String,
    /// Serial number, hex.
    pub serial: String,
    pub cert_pem: String,
    /// Unix milliseconds.
    pub not_after: i64,
    /// Unix milliseconds.
    pub issued_at: i64,
}

impl Registry {
    /// The stored cluster CA, if one was made.
    pub async fn cluster_ca(&self) -> Result<Option<StoredClusterCa>> {
        let row: Option<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT common_name, cert_pem, key_sealed, not_after, created_at FROM cluster_ca WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(common_name, cert_pem, sealed, not_after, created_at)| {
            Ok(StoredClusterCa {
                common_name,
                cert_pem,
                key_pem: self.open_secret(CA_KEY_PLACE, &sealed)?,
                not_after,
                created_at,
            })
        })
        .transpose()
    }

    /// Stores `ca` unless a CA is already stored; returns the one that is stored afterwards
    /// (the first one wins when two starts race: one transaction, `BEGIN IMMEDIATE`).
    pub async fn store_cluster_ca_if_absent(
        &self,
        ca: &StoredClusterCa,
    ) -> Result<StoredClusterCa> {
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM cluster_ca WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            let sealed = self.key.seal(CA_KEY_PLACE, ca.key_pem.as_bytes());
            sqlx::query(
                "INSERT INTO cluster_ca (id, common_name, cert_pem, key_sealed, not_after, created_at)
                 VALUES (1, ?, ?, ?, ?, ?)",
            )
            .bind(&ca.common_name)
            .bind(&ca.cert_pem)
            .bind(&sealed)
            .bind(ca.not_after)
            .bind(ca.created_at)
            .execute(&mut *tx)
            .await?;
            audit(
                &mut tx,
                "escale",
                None,
                "cluster.ca.create",
                &format!("cluster CA `{}` created", ca.common_name),
            )
            .await?;
        }
        tx.commit().await?;
        self.cluster_ca()
            .await?
            .ok_or_else(|| super::not_found("cluster CA", "cluster-ca"))
    }

    /// escale's stored client certificate, if one was issued.
    pub async fn cluster_client_cert(&self) -> Result<Option<StoredClientCert>> {
        let row: Option<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT cert_pem, key_sealed, serial, not_after, issued_at FROM cluster_client_cert WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(cert_pem, sealed, serial, not_after, issued_at)| {
            Ok(StoredClientCert {
                cert_pem,
                key_pem: self.open_secret(CLIENT_KEY_PLACE, &sealed)?,
                serial,
                not_after,
                issued_at,
            })
        })
        .transpose()
    }

    /// Stores (replacing) escale's client certificate, with an audit event.
    pub async fn store_cluster_client_cert(&self, cert: &StoredClientCert) -> Result<()> {
        let sealed = self.key.seal(CLIENT_KEY_PLACE, cert.key_pem.as_bytes());
        let mut tx = self.write().await?;
        let previous: Option<String> =
            sqlx::query_scalar("SELECT serial FROM cluster_client_cert WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO cluster_client_cert (id, cert_pem, key_sealed, serial, not_after, issued_at)
             VALUES (1, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET cert_pem = excluded.cert_pem, key_sealed = excluded.key_sealed,
               serial = excluded.serial, not_after = excluded.not_after, issued_at = excluded.issued_at",
        )
        .bind(&cert.cert_pem)
        .bind(&sealed)
        .bind(&cert.serial)
        .bind(cert.not_after)
        .bind(cert.issued_at)
        .execute(&mut *tx)
        .await?;
        let detail = match previous {
            Some(old) => format!(
                "cluster client certificate {} issued, replacing {old}",
                cert.serial
            ),
            None => format!("cluster client certificate {} issued", cert.serial),
        };
        audit(&mut tx, "escale", None, "cluster.client_cert", &detail).await?;
        tx.commit().await
    }

    /// Records (replacing) the server certificate issued to `record.node`, with an audit event
    /// by `actor`.
    pub async fn record_node_cert(&self, actor: &str, record: &NodeCertRecord) -> Result<()> {
        let mut tx = self.write().await?;
        super::nodes::put_cert(&mut tx, record).await?;
        audit(
            &mut tx,
            actor,
            None,
            "cluster.node_cert",
            &format!(
                "server certificate {} issued to node `{}` for {}",
                record.serial, record.node, record.address
            ),
        )
        .await?;
        tx.commit().await
    }

    /// The server certificate recorded for `node`, if any.
    pub async fn node_cert(&self, node: &str) -> Result<Option<NodeCertRecord>> {
        Ok(sqlx::query_as(
            "SELECT node, address, serial, cert_pem, not_after, issued_at FROM cluster_node_certs WHERE node = ?",
        )
        .bind(node)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Every recorded node server certificate, by node name.
    pub async fn node_certs(&self) -> Result<Vec<NodeCertRecord>> {
        Ok(sqlx::query_as(
            "SELECT node, address, serial, cert_pem, not_after, issued_at FROM cluster_node_certs ORDER BY node",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
