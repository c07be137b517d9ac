//! The node-agent seam: the node-local operations the controller needs (create, delete,
//! expand, snapshot, capacity, publish bookkeeping). In all-in-one mode the controller calls
//! the local backend through this trait in-process; a remote agent implements the same trait
//! over the internal gRPC API.

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::{LocalName, NodeId, SnapshotId, VolumeId};
use crate::params::VolumeParams;
use crate::volume::{CapacityRange, Condition, SnapshotRecord, VolumeRecord};

/// What a new volume is made from, with checked IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

/// A checked CreateVolume request, ready for a backend.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// The CO's name: the idempotency key.
    pub name: String,
    pub local: LocalName,
    pub capacity: CapacityRange,
    pub params: VolumeParams,
    pub source: Option<Source>,
}

/// Free space as GetCapacity reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityReport {
    /// Bytes a new volume can still get, after honouring what existing volumes were promised.
    pub available: u64,
    /// The largest single volume that can be created now.
    pub maximum_volume_size: u64,
}

/// Node-local storage operations for one node.
#[async_trait]
pub trait NodeAgent: Send + Sync + std::fmt::Debug {
    /// The node this agent serves.
    fn node_id(&self) -> &NodeId;

    /// Creates a volume, or answers the existing one for a compatible repeat.
    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord>;
    /// Deletes a volume; an unknown volume is OK (the spec's idempotency rule).
    async fn delete_volume(&self, id: &VolumeId) -> Result<()>;
    /// One volume with its health.
    async fn get_volume(&self, id: &VolumeId) -> Result<(VolumeRecord, Condition)>;
    /// Every volume with its health, in a stable order (by ID).
    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>>;
    /// Grows a volume to fit `range`; answers the new size. Never shrinks.
    async fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64>;
    /// Records that the volume is attached to `node` (ControllerPublish).
    async fn publish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()>;
    /// Forgets that the volume is attached to `node` (ControllerUnpublish).
    async fn unpublish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()>;
    /// Creates a snapshot of a volume, or answers the existing one for a compatible repeat.
    async fn create_snapshot(&self, name: &str, local: LocalName, source: &VolumeId) -> Result<SnapshotRecord>;
    /// Deletes a snapshot; unknown is OK.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()>;
    /// One snapshot.
    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord>;
    /// Every snapshot, in a stable order (by ID).
    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>>;
    /// Free capacity for volumes of these parameters.
    async fn capacity(&self, params: &VolumeParams) -> Result<CapacityReport>;
}

/// A node agent as the controller's directory knows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub agent: std::sync::Arc<dyn NodeAgent>,
    /// The node's topology segments (always [`crate::TOPOLOGY_NODE_KEY`]).
    pub topology: std::collections::BTreeMap<String, String>,
}

impl Member {
    /// A member whose only topology key is its node.
    pub fn of(agent: std::sync::Arc<dyn NodeAgent>) -> Self {
        let topology =
            std::collections::BTreeMap::from([(crate::TOPOLOGY_NODE_KEY.to_string(), agent.node_id().to_string())]);
        Member { agent, topology }
    }

    pub fn node(&self) -> &NodeId {
        self.agent.node_id()
    }
}

/// Where the controller finds node agents: the one in-process agent of the all-in-one
/// mode ([`LocalDirectory`]), or the registry of agents that registered over the network.
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// The agent of `node`. `Ok(None)`: this driver does not serve that node at all (the
    /// all-in-one mode and a foreign node). `Err(Unavailable)`: the node is not registered
    /// now (down, cut off, or the controller has just started); the CO retries.
    fn agent(&self, node: &NodeId) -> Result<Option<std::sync::Arc<dyn NodeAgent>>>;
    /// Every live agent, ordered by node ID.
    fn members(&self) -> Vec<Member>;
    /// Whether a new volume may be placed now. After a controller start the registry waits
    /// one lease for live agents to register again, so that a repeated CreateVolume finds
    /// the volume an earlier attempt made instead of making a second one elsewhere.
    fn ready_to_place(&self) -> Result<()>;
    /// Whether nodes come and go (registered agents) rather than being fixed in-process.
    fn is_cluster(&self) -> bool;
}

/// The directory of the all-in-one mode: one agent, called in-process.
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    member: Member,
}

impl LocalDirectory {
    pub fn new(agent: std::sync::Arc<dyn NodeAgent>) -> Self {
        LocalDirectory { member: Member::of(agent) }
    }
}

impl Directory for LocalDirectory {
    fn agent(&self, node: &NodeId) -> Result<Option<std::sync::Arc<dyn NodeAgent>>> {
        Ok((self.member.node() == node).then(|| std::sync::Arc::clone(&self.member.agent)))
    }
    fn members(&self) -> Vec<Member> {
        vec![self.member.clone()]
    }
    fn ready_to_place(&self) -> Result<()> {
        Ok(())
    }
    fn is_cluster(&self) -> bool {
        false
    }
}
