//! Nodes (`escale nodes ...`): register a Docker engine and get its bundle, renew its
//! certificate, cordon, drain, uncordon, remove, list. Admins only; everything goes through
//! [`crate::service::nodes`].

use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiError, AppState, Auth, Json, Path};
use crate::registry::Schedulable;
use crate::service::nodes::{NodeAdd, NodeBundleView, NodeInfo};

/// A node to register.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    /// A DNS label: 1 to 63 lowercase letters, digits and `-`.
    pub name: String,
    /// `HOST:PORT` of the node's Docker engine with TLS (e.g. `10.0.0.2:2376`).
    pub address: String,
    /// The IP its published ports are reached on (default: the address's IP).
    #[serde(default)]
    pub advertise: Option<String>,
    /// `KEY=VALUE` labels, matched by process constraints.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// A new certificate for a node.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewNodeRequest {
    /// A new `HOST:PORT` for the node (default: its current address).
    #[serde(default)]
    pub address: Option<String>,
}

fn node_name(name: &str) -> Result<(), ApiError> {
    if crate::validate::node_name(name) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "node `{}` not found",
            crate::validate::printable(name)
        )))
    }
}

#[utoipa::path(get, path = "/api/v1/nodes", tag = "system", security(("token" = [])),
    responses((status = 200, body = [NodeInfo]), (status = 403, body = super::Problem)))]
pub async fn list_nodes(
    State(s): State<AppState>,
    Auth(actor): Auth,
) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    Ok(Json(s.services.node_list(&actor).await?))
}

#[utoipa::path(get, path = "/api/v1/nodes/{node}", tag = "system", security(("token" = [])),
    params(("node" = String, Path)),
    responses((status = 200, body = NodeInfo), (status = 403, body = super::Problem), (status = 404, body = super::Problem)))]
pub async fn get_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    node_name(&node)?;
    one(&s, &actor, &node).await.map(Json)
}

async fn one(
    s: &AppState,
    actor: &crate::registry::Actor,
    node: &str,
) -> Result<NodeInfo, ApiError> {
    s.services
        .node_list(actor)
        .await?
        .into_iter()
        .find(|n| n.name == node)
        .ok_or_else(|| ApiError::NotFound(format!("node `{node}` not found")))
}

/// Registers a node and answers its bundle: the certificates (its private key is kept
/// nowhere else), `daemon.json`, a systemd drop-in and `install.sh`.
#[utoipa::path(post, path = "/api/v1/nodes", tag = "system", security(("token" = [])), request_body = AddNodeRequest,
    responses((status = 201, body = NodeBundleView), (status = 403, body = super::Problem),
        (status = 409, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn add_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Json(req): Json<AddNodeRequest>,
) -> Result<(StatusCode, Json<NodeBundleView>), ApiError> {
    let advertise = match &req.advertise {
        Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
            ApiError::Unprocessable(format!(
                "advertise address `{}` is not an IP address (e.g. 10.0.0.2 or fd00::2)",
                crate::validate::printable(a)
            ))
        })?),
        None => None,
    };
    let bundle = s
        .services
        .add_node(
            &actor,
            NodeAdd {
                name: req.name,
                address: req.address,
                advertise,
                labels: req.labels,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(bundle)))
}

/// Issues a node a new server certificate and answers the new bundle.
#[utoipa::path(post, path = "/api/v1/nodes/{node}/renew", tag = "system", security(("token" = [])),
    params(("node" = String, Path)), request_body = RenewNodeRequest,
    responses((status = 200, body = NodeBundleView), (status = 403, body = super::Problem),
        (status = 404, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn renew_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
    Json(req): Json<RenewNodeRequest>,
) -> Result<Json<NodeBundleView>, ApiError> {
    node_name(&node)?;
    Ok(Json(
        s.services
            .renew_node(&actor, &node, req.address.as_deref())
            .await?,
    ))
}

async fn schedulable(
    s: AppState,
    actor: crate::registry::Actor,
    node: String,
    to: Schedulable,
) -> Result<Json<NodeInfo>, ApiError> {
    node_name(&node)?;
    s.services.set_schedulable(&actor, &node, to).await?;
    one(&s, &actor, &node).await.map(Json)
}

/// Nothing new is placed on the node; what runs there stays.
#[utoipa::path(post, path = "/api/v1/nodes/{node}/cordon", tag = "system", security(("token" = [])),
    params(("node" = String, Path)),
    responses((status = 200, body = NodeInfo), (status = 403, body = super::Problem),
        (status = 404, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn cordon_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    schedulable(s, actor, node, Schedulable::Cordoned).await
}

/// The node takes new instances again (ends a cordon or a drain).
#[utoipa::path(post, path = "/api/v1/nodes/{node}/uncordon", tag = "system", security(("token" = [])),
    params(("node" = String, Path)),
    responses((status = 200, body = NodeInfo), (status = 403, body = super::Problem),
        (status = 404, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn uncordon_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    schedulable(s, actor, node, Schedulable::Yes).await
}

/// Cordons the node and moves its instances to other nodes, each replacement healthy before
/// the instance it replaces stops. Follow it with `GET /nodes/{node}` (`instances` reaches 0).
#[utoipa::path(post, path = "/api/v1/nodes/{node}/drain", tag = "system", security(("token" = [])),
    params(("node" = String, Path)),
    responses((status = 200, body = NodeInfo), (status = 403, body = super::Problem),
        (status = 404, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn drain_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    schedulable(s, actor, node, Schedulable::Draining).await
}

/// Removes a node; refused (409) while escale's instances run there.
#[utoipa::path(delete, path = "/api/v1/nodes/{node}", tag = "system", security(("token" = [])),
    params(("node" = String, Path)),
    responses((status = 204), (status = 403, body = super::Problem), (status = 404, body = super::Problem),
        (status = 409, body = super::Problem), (status = 422, body = super::Problem)))]
pub async fn remove_node(
    State(s): State<AppState>,
    Auth(actor): Auth,
    Path(node): Path<String>,
) -> Result<StatusCode, ApiError> {
    node_name(&node)?;
    s.services.remove_node(&actor, &node).await?;
    Ok(StatusCode::NO_CONTENT)
}
