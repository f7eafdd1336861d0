//! The engine seam: what the reconciler needs of one node, whatever runs its containers.
//!
//! An [`Engine`] names itself, says where its published ports are reached, lists the
//! instances of an installation (by label), starts one from an [`InstanceSpec`], stops and
//! removes it, makes images present (pull, or save/load from another engine), streams logs and
//! container events, and lists/removes app networks. The Docker engine ([`crate::node::Node`],
//! through bollard) is the production one; `fake::FakeEngine` is an in-memory one for the
//! reconciler's unit tests (compiled for tests only). bollard is used by `node.rs` only: nothing else sees it.

#[cfg(test)]
pub mod fake;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

pub use crate::node::{
    AppNetwork, ContainerInstance, InstanceSpec, InstanceState, LogLine, LogStream, NodeEvent,
    StartedInstance,
};

/// What can go wrong with an engine call.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The Docker engine answered with an error (or could not be reached).
    #[error(transparent)]
    Docker(#[from] crate::node::NodeError),
    /// The call did not finish in time (the caller gave up on it).
    #[error("engine `{engine}`: {action} did not finish within {after:?}")]
    Timeout {
        engine: String,
        action: String,
        after: Duration,
    },
    /// The call failed (an engine that is not Docker, or a condition escale checks itself).
    #[error("engine `{engine}`: {action} failed: {reason}")]
    Failed {
        engine: String,
        action: String,
        reason: String,
    },
}

/// Result alias for engine calls.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// One node's container engine, as the reconciler uses it.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The node's name in the registry (`local` for the engine escale runs beside).
    fn name(&self) -> &str;
    /// The address the proxy and health checks reach published ports on.
    fn advertise_ip(&self) -> IpAddr;
    /// The containers of `installation` (by label), labels parsed back.
    async fn list_instances(&self, installation: &str) -> Result<Vec<ContainerInstance>>;
    /// Creates and starts one instance; returns once it runs and publishes its port.
    async fn start_instance(&self, spec: &InstanceSpec) -> Result<StartedInstance>;
    /// SIGTERM, then SIGKILL after `timeout`.
    async fn stop_instance(&self, container_id: &str, timeout: Duration) -> Result<()>;
    /// Removes a container (stopped or not); a missing one is not an error.
    async fn remove_instance(&self, container_id: &str) -> Result<()>;
    /// Whether `image` is present on this engine.
    async fn image_exists(&self, image: &str) -> Result<bool>;
    /// Makes `image` present (pulls it when absent).
    async fn ensure_image(&self, image: &str) -> Result<()>;
    /// `image` as a tar stream (`docker save`).
    fn save_image(&self, image: &str) -> BoxStream<'static, Result<Bytes>>;
    /// Loads a tar stream made by [`Engine::save_image`] (`docker load`).
    async fn load_image(&self, tar: BoxStream<'static, Result<Bytes>>) -> Result<()>;
    /// A container's output; `follow` keeps the stream open until the container ends.
    fn logs(
        &self,
        container_id: &str,
        follow: bool,
        tail: Option<usize>,
    ) -> BoxStream<'static, Result<LogLine>>;
    /// This installation's container events from now on.
    fn events(&self, installation: &str) -> BoxStream<'static, Result<NodeEvent>>;
    /// The app networks of `installation`.
    async fn list_app_networks(&self, installation: &str) -> Result<Vec<AppNetwork>>;
    /// Removes a network by id or name.
    async fn remove_network(&self, id: &str) -> Result<()>;
    /// What the node has in all (CPUs, memory); `None` when the engine does not say.
    async fn capacity(&self) -> Result<Option<crate::node::Capacity>> {
        Ok(None)
    }
}

/// Copies `image` from `from` to `to` (save streamed into load, nothing buffered); nothing
/// to do when `to` has it.
pub async fn copy_image(from: &dyn Engine, to: &dyn Engine, image: &str) -> Result<()> {
    let failed = |reason: String| EngineError::Failed {
        engine: to.name().to_string(),
        action: format!("copying image `{image}` from `{}`", from.name()),
        reason,
    };
    if to.image_exists(image).await? {
        return Ok(());
    }
    if !from.image_exists(image).await? {
        return Err(failed(format!("it is not on node `{}`", from.name())));
    }
    to.load_image(from.save_image(image)).await?;
    if to.image_exists(image).await? {
        Ok(())
    } else {
        Err(failed("the load finished but the image is absent".into()))
    }
}

/// The last `n` lines a container wrote, trimmed; empty when they cannot be had within
/// `within` (the engine is slow, the container is gone).
pub async fn last_logs(
    engine: &dyn Engine,
    container_id: &str,
    n: usize,
    within: Duration,
) -> Vec<String> {
    let collect = engine
        .logs(container_id, false, Some(n))
        .take(n)
        .filter_map(|l| async move { l.ok().map(|l| l.text.trim_end().to_string()) })
        .collect::<Vec<_>>();
    tokio::time::timeout(within, collect)
        .await
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Engine for crate::node::Node {
    fn name(&self) -> &str {
        &self.name
    }
    fn advertise_ip(&self) -> IpAddr {
        self.advertise_ip
    }
    async fn list_instances(&self, installation: &str) -> Result<Vec<ContainerInstance>> {
        Ok(crate::node::Node::list_instances(self, installation).await?)
    }
    async fn start_instance(&self, spec: &InstanceSpec) -> Result<StartedInstance> {
        Ok(crate::node::Node::start_instance(self, spec).await?)
    }
    async fn stop_instance(&self, container_id: &str, timeout: Duration) -> Result<()> {
        Ok(crate::node::Node::stop_instance(self, container_id, timeout).await?)
    }
    async fn remove_instance(&self, container_id: &str) -> Result<()> {
        Ok(crate::node::Node::remove_instance(self, container_id).await?)
    }
    async fn image_exists(&self, image: &str) -> Result<bool> {
        Ok(crate::node::Node::image_exists(self, image).await?)
    }
    async fn ensure_image(&self, image: &str) -> Result<()> {
        Ok(crate::node::Node::ensure_image(self, image).await?)
    }
    fn save_image(&self, image: &str) -> BoxStream<'static, Result<Bytes>> {
        crate::node::Node::save_image(self, image)
            .map(|r| r.map_err(EngineError::from))
            .boxed()
    }
    async fn load_image(&self, tar: BoxStream<'static, Result<Bytes>>) -> Result<()> {
        Ok(crate::node::Node::load_image(self, tar).await?)
    }
    async fn capacity(&self) -> Result<Option<crate::node::Capacity>> {
        Ok(Some(crate::node::Node::capacity(self).await?))
    }
    fn logs(
        &self,
        container_id: &str,
        follow: bool,
        tail: Option<usize>,
    ) -> BoxStream<'static, Result<LogLine>> {
        crate::node::Node::logs(self, container_id, follow, tail)
            .map(|r| r.map_err(EngineError::from))
            .boxed()
    }
    fn events(&self, installation: &str) -> BoxStream<'static, Result<NodeEvent>> {
        crate::node::Node::events(self, installation)
            .map(|r| r.map_err(EngineError::from))
            .boxed()
    }
    async fn list_app_networks(&self, installation: &str) -> Result<Vec<AppNetwork>> {
        Ok(crate::node::Node::list_app_networks(self, installation).await?)
    }
    async fn remove_network(&self, id: &str) -> Result<()> {
        Ok(crate::node::Node::remove_network(self, id).await?)
    }
}
