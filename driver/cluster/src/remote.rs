//! The controller's side of the agent API: a [`NodeAgent`] whose every method is a gRPC
//! call, over mutual TLS, to the node agent at its registered address.
//!
//! Time bounds: connecting takes at most [`CONNECT_TIMEOUT`]; HTTP/2 keep-alive pings find
//! a dead link within about ten seconds, which fails the calls in flight on it; queries give
//! up after [`QUERY_TIMEOUT`]. Changes get [`CHANGE_TIMEOUT`], long enough for a copy of a
//! large volume, because the node finishes them anyway (see `server`) and the CO retries.

use std::time::Duration;

use async_trait::async_trait;
use ferrovol_core::agent::{CapacityReport, NewVolume, NodeAgent};
use ferrovol_core::error::{Code, Error, Result};
use ferrovol_core::ids::{LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, Condition, SnapshotRecord, VolumeRecord};
use ferrovol_proto::agent::v1 as pb;
use pb::agent_client::AgentClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::wire;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(15);
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
const KEEPALIVE: Duration = Duration::from_secs(5);

/// A node agent reached over the network.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    node: NodeId,
    address: String,
    client: AgentClient<Channel>,
}

impl RemoteAgent {
    /// An agent at `address` (host:port); the connection is made on first use.
    pub fn connect(node: NodeId, address: &str, tls: ClientTlsConfig) -> Result<Self> {
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| Error::invalid("address", format!("node {node} registered address {address:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let client = AgentClient::new(endpoint.connect_lazy());
        Ok(RemoteAgent { node, address: address.to_string(), client })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// A failed call as a core error: the node's code and message pass through; a call
    /// that did not reach the node says so.
    fn failed(&self, status: tonic::Status) -> Error {
        let code = Code::from_tonic(status.code());
        let message = match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown => {
                format!("the node agent at {} is unavailable: {}", self.address, status.message())
            }
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                format!("the node agent at {} refused the controller: {}", self.address, status.message())
            }
            _ => status.message().to_string(),
        };
        let code = if status.code() == tonic::Code::Unknown { Code::Unavailable } else { code };
        Error::Remote { node: self.node.to_string(), code, message }
    }
}

#[async_trait]
impl NodeAgent for RemoteAgent {
    fn node_id(&self) -> &NodeId {
        &self.node
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let msg = wire::new_volume_to(&req);
        let r = self.client.clone().create_volume(self.request(msg, CHANGE_TIMEOUT)).await;
        wire::volume_from(r.map_err(|s| self.failed(s))?.into_inner())
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let msg = pb::VolumeRef { volume_id: id.to_string() };
        self.client.clone().delete_volume(self.request(msg, CHANGE_TIMEOUT)).await.map_err(|s| self.failed(s))?;
        Ok(())
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<(VolumeRecord, Condition)> {
        let msg = pb::VolumeRef { volume_id: id.to_string() };
        let r = self.client.clone().get_volume(self.request(msg, QUERY_TIMEOUT)).await;
        wire::status_from(r.map_err(|s| self.failed(s))?.into_inner())
    }

    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>> {
        let r = self.client.clone().list_volumes(self.request(pb::Empty {}, QUERY_TIMEOUT)).await;
        r.map_err(|s| self.failed(s))?.into_inner().volumes.into_iter().map(wire::status_from).collect()
    }

    async fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64> {
        let msg = pb::ExpandVolumeRequest { volume_id: id.to_string(), capacity: Some(wire::range_to(&range)) };
        let r = self.client.clone().expand_volume(self.request(msg, CHANGE_TIMEOUT)).await;
        Ok(r.map_err(|s| self.failed(s))?.into_inner().capacity_bytes)
    }

    async fn publish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        let msg = pb::PublishRequest { volume_id: id.to_string(), node_id: node.to_string() };
        self.client.clone().publish_volume(self.request(msg, CHANGE_TIMEOUT)).await.map_err(|s| self.failed(s))?;
        Ok(())
    }

    async fn unpublish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        let msg = pb::PublishRequest { volume_id: id.to_string(), node_id: node.to_string() };
        self.client.clone().unpublish_volume(self.request(msg, CHANGE_TIMEOUT)).await.map_err(|s| self.failed(s))?;
        Ok(())
    }

    async fn create_snapshot(&self, name: &str, local: LocalName, source: &VolumeId) -> Result<SnapshotRecord> {
        let msg = pb::CreateSnapshotRequest {
            name: name.to_string(),
            local_name: local.as_str().to_string(),
            source_volume_id: source.to_string(),
        };
        let r = self.client.clone().create_snapshot(self.request(msg, CHANGE_TIMEOUT)).await;
        wire::snapshot_from(r.map_err(|s| self.failed(s))?.into_inner())
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let msg = pb::SnapshotRef { snapshot_id: id.to_string() };
        self.client.clone().delete_snapshot(self.request(msg, CHANGE_TIMEOUT)).await.map_err(|s| self.failed(s))?;
        Ok(())
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord> {
        let msg = pb::SnapshotRef { snapshot_id: id.to_string() };
        let r = self.client.clone().get_snapshot(self.request(msg, QUERY_TIMEOUT)).await;
        wire::snapshot_from(r.map_err(|s| self.failed(s))?.into_inner())
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let r = self.client.clone().list_snapshots(self.request(pb::Empty {}, QUERY_TIMEOUT)).await;
        r.map_err(|s| self.failed(s))?.into_inner().snapshots.into_iter().map(wire::snapshot_from).collect()
    }

    async fn capacity(&self, params: &VolumeParams) -> Result<CapacityReport> {
        let msg = pb::CapacityRequest { parameters: wire::params_to(params) };
        let r = self.client.clone().capacity(self.request(msg, QUERY_TIMEOUT)).await;
        Ok(wire::capacity_from(r.map_err(|s| self.failed(s))?.into_inner()))
    }
}
