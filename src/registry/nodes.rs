//! Registered nodes (`nodes`, migrations 0001 and 0006): the Docker engines escale reaches
//! over mutual TLS, with their labels and whether they are cordoned or draining.
//!
//! A node and the server certificate issued for it are written in one transaction (adding,
//! renewing) and removed together, each with its audit event. The local engine (`local`) is
//! configured, not registered: it is never a row here.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{audit, not_found, now_ms, NodeCertRecord, Registry, RegistryError, Result};

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub name: String,
    /// `HOST:PORT` of its engine (the address its server certificate names).
    pub address: String,
    /// The IP its published ports are reached on.
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    /// Nothing new is placed on it.
    pub cordoned: bool,
    /// Cordoned, and its instances are being moved away.
    pub draining: bool,
    /// Unix milliseconds.
    pub created_at: i64,
}

#[derive(sqlx::FromRow)]
struct NodeRow {
    name: String,
    docker_host: String,
    advertise: String,
    labels: String,
    cordoned: bool,
    draining: bool,
    created_at: i64,
}

impl TryFrom<NodeRow> for NodeRecord {
    type Error = RegistryError;
    fn try_from(r: NodeRow) -> Result<NodeRecord> {
        let labels = serde_json::from_str(&r.labels).map_err(|e| {
            RegistryError::Invalid(format!("node `{}` has unreadable labels: {e}", r.name))
        })?;
        Ok(NodeRecord {
            name: r.name,
            address: r.docker_host,
            advertise: r.advertise,
            labels,
            cordoned: r.cordoned,
            draining: r.draining,
            created_at: r.created_at,
        })
    }
}

/// What `escale nodes cordon|uncordon|drain` asks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedulable {
    /// New instances may be placed on it.
    Yes,
    /// Nothing new is placed on it; what runs there stays.
    Cordoned,
    /// Nothing new is placed on it, and what runs there moves away.
    Draining,
}

impl Registry {
    /// Every registered node, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        sqlx::query_as::<_, NodeRow>(
            "SELECT name, docker_host, advertise, labels, cordoned, draining, created_at
             FROM nodes ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(NodeRecord::try_from)
        .collect()
    }

    /// The registered node `name`.
    pub async fn node(&self, name: &str) -> Result<NodeRecord> {
        sqlx::query_as::<_, NodeRow>(
            "SELECT name, docker_host, advertise, labels, cordoned, draining, created_at
             FROM nodes WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| not_found("node", name))?
        .try_into()
    }

    /// Registers `node` with the server certificate issued for it, by `actor`; a name taken
    /// already is a conflict.
    pub async fn add_node(
        &self,
        actor: &str,
        node: &NodeRecord,
        cert: &NodeCertRecord,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        let taken: Option<(String,)> = sqlx::query_as("SELECT name FROM nodes WHERE name = ?")
            .bind(&node.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(RegistryError::Conflict(format!(
                "node `{}` exists already (renew its certificate with `escale nodes renew {}`, or remove it first)",
                node.name, node.name
            )));
        }
        sqlx::query(
            "INSERT INTO nodes (name, docker_host, advertise, labels, cordoned, draining, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&node.name)
        .bind(&node.address)
        .bind(&node.advertise)
        .bind(serde_json::to_string(&node.labels).expect("labels serialise"))
        .bind(node.cordoned)
        .bind(node.draining)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        put_cert(&mut tx, cert).await?;
        let labels = if node.labels.is_empty() {
            String::new()
        } else {
            let l: Vec<String> = node
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(", labels {}", l.join(","))
        };
        audit(
            &mut tx,
            actor,
            None,
            "node.add",
            &format!(
                "node `{}` at {} added{labels}; server certificate {} issued",
                node.name, node.address, cert.serial
            ),
        )
        .await?;
        tx.commit().await
    }

    /// Records a new server certificate for the registered node `cert.node` (its address may
    /// change with it), by `actor`.
    pub async fn renew_node(&self, actor: &str, cert: &NodeCertRecord) -> Result<()> {
        let mut tx = self.write().await?;
        let updated = sqlx::query("UPDATE nodes SET docker_host = ? WHERE name = ?")
            .bind(&cert.address)
            .bind(&cert.node)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(not_found("node", &cert.node));
        }
        put_cert(&mut tx, cert).await?;
        audit(
            &mut tx,
            actor,
            None,
            "node.renew",
            &format!(
                "node `{}`: server certificate {} issued for {}",
                cert.node, cert.serial, cert.address
            ),
        )
        .await?;
        tx.commit().await
    }

    /// Sets whether node `name` takes new instances, by `actor`. Returns whether it changed.
    pub async fn set_node_schedulable(
        &self,
        actor: &str,
        name: &str,
        to: Schedulable,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        let (cordoned, draining) = match to {
            Schedulable::Yes => (false, false),
            Schedulable::Cordoned => (true, false),
            Schedulable::Draining => (true, true),
        };
        let now: Option<(bool, bool)> =
            sqlx::query_as("SELECT cordoned, draining FROM nodes WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(now) = now else {
            return Err(not_found("node", name));
        };
        if now == (cordoned, draining) {
            return Ok(false);
        }
        sqlx::query("UPDATE nodes SET cordoned = ?, draining = ? WHERE name = ?")
            .bind(cordoned)
            .bind(draining)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let (action, what) = match to {
            Schedulable::Yes => ("node.uncordon", "takes new instances again"),
            Schedulable::Cordoned => ("node.cordon", "cordoned: nothing new is placed on it"),
            Schedulable::Draining => ("node.drain", "draining: its instances move to other nodes"),
        };
        audit(
            &mut tx,
            actor,
            None,
            action,
            &format!("node `{name}` {what}"),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Removes node `name` and its certificate record, by `actor`.
    pub async fn remove_node(&self, actor: &str, name: &str) -> Result<()> {
        let mut tx = self.write().await?;
        let removed = sqlx::query("DELETE FROM nodes WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if removed.rows_affected() == 0 {
            return Err(not_found("node", name));
        }
        sqlx::query("DELETE FROM cluster_node_certs WHERE node = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            actor,
            None,
            "node.remove",
            &format!("node `{name}` removed"),
        )
        .await?;
        tx.commit().await
    }
}

/// Records (replacing) the server certificate issued to `record.node`.
pub(super) async fn put_cert(tx: &mut super::Write, record: &NodeCertRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO cluster_node_certs (node, address, serial, cert_pem, not_after, issued_at)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (node) DO UPDATE SET address = excluded.address, serial = excluded.serial,
           cert_pem = excluded.cert_pem, not_after = excluded.not_after, issued_at = excluded.issued_at",
    )
    .bind(&record.node)
    .bind(&record.address)
    .bind(&record.serial)
    .bind(&record.cert_pem)
    .bind(record.not_after)
    .bind(record.issued_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
