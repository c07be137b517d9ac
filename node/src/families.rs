//! The node's agents for every family it serves, as one `NodeAgent`: calls are routed by the
//! family in the volume or snapshot ID, creates by the `type` parameter. A CO name is one
//! volume whatever its family, so a create checks that no other family has the name.

use async_trait::async_trait;
use ferrovol_core::agent::{CapacityReport, NewVolume, NodeAgent};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, Condition, SnapshotRecord, VolumeRecord};

use crate::agent::LoopAgent;
use crate::lvm::agent::LvmAgent;

/// Every family's agent on one node.
#[derive(Debug, Clone)]
pub struct FamilyAgents {
    node: NodeId,
    loop_agent: LoopAgent,
    lvm: Option<LvmAgent>,
}

impl FamilyAgents {
    /// The loop family always; LVM when the node serves volume groups.
    pub fn new(loop_agent: LoopAgent, lvm: Option<LvmAgent>) -> Self {
        FamilyAgents { node: loop_agent.node_id().clone(), loop_agent, lvm }
    }

    fn agent(&self, family: Family) -> Option<&dyn NodeAgent> {
        match family {
            Family::Loop => Some(&self.loop_agent),
            Family::Lvm => self.lvm.as_ref().map(|a| a as &dyn NodeAgent),
            // S3 volumes belong to no node: the controller serves them itself.
            Family::S3 => None,
        }
    }

    fn not_served(&self, family: Family) -> String {
        match family {
            Family::S3 => "s3 volumes are served by the controller, not by a node agent".into(),
            _ => {
                format!("the {} family is not enabled on node {} (see --lvm-volume-group)", family.as_str(), self.node)
            }
        }
    }

    fn volume_agent(&self, id: &VolumeId) -> Result<&dyn NodeAgent> {
        self.agent(id.family())
            .ok_or_else(|| Error::VolumeNotFound { volume: id.to_string(), reason: self.not_served(id.family()) })
    }

    fn all(&self) -> Vec<&dyn NodeAgent> {
        let mut v: Vec<&dyn NodeAgent> = vec![&self.loop_agent];
        if let Some(l) = &self.lvm {
            v.push(l);
        }
        v
    }

    /// Fails when a family other than `family` already has a volume (or snapshot) of this
    /// local name: the CO's name is unique across the driver, not per family.
    async fn name_is_free(&self, family: Family, local: &LocalName, kind: &'static str, name: &str) -> Result<()> {
        for other in [Family::Loop, Family::Lvm].into_iter().filter(|f| *f != family) {
            let Some(agent) = self.agent(other) else { continue };
            let taken = match kind {
                "volume" => agent.get_volume(&VolumeId::new(other, self.node.clone(), local.clone())).await.is_ok(),
                _ => agent.get_snapshot(&SnapshotId::new(other, self.node.clone(), local.clone())).await.is_ok(),
            };
            if taken {
                return Err(Error::NameConflict {
                    kind,
                    name: name.to_owned(),
                    reason: format!("a {kind} of that name exists in the {} family", other.as_str()),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl NodeAgent for FamilyAgents {
    fn node_id(&self) -> &NodeId {
        &self.node
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let family = req.params.family;
        let agent = self.agent(family).ok_or_else(|| Error::invalid("parameters", self.not_served(family)))?;
        self.name_is_free(family, &req.local, "volume", &req.name).await?;
        agent.create_volume(req).await
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        match self.agent(id.family()) {
            Some(a) => a.delete_volume(id).await,
            // An ID of a family this node does not serve names nothing here: deleted.
            None => Ok(()),
        }
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<(VolumeRecord, Condition)> {
        self.volume_agent(id)?.get_volume(id).await
    }

    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>> {
        let mut out = Vec::new();
        for a in self.all() {
            out.extend(a.list_volumes().await?);
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }

    async fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64> {
        self.volume_agent(id)?.expand_volume(id, range).await
    }

    async fn publish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        self.volume_agent(id)?.publish_volume(id, node).await
    }

    async fn unpublish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        match self.agent(id.family()) {
            Some(a) => a.unpublish_volume(id, node).await,
            None => Ok(()),
        }
    }

    async fn create_snapshot(&self, name: &str, local: LocalName, source: &VolumeId) -> Result<SnapshotRecord> {
        let agent = self.volume_agent(source)?;
        self.name_is_free(source.family(), &local, "snapshot", name).await?;
        agent.create_snapshot(name, local, source).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        match self.agent(id.family()) {
            Some(a) => a.delete_snapshot(id).await,
            None => Ok(()),
        }
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord> {
        match self.agent(id.family()) {
            Some(a) => a.get_snapshot(id).await,
            None => Err(Error::SnapshotNotFound { snapshot: id.to_string(), reason: self.not_served(id.family()) }),
        }
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut out = Vec::new();
        for a in self.all() {
            out.extend(a.list_snapshots().await?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn capacity(&self, params: &VolumeParams) -> Result<CapacityReport> {
        match self.agent(params.family) {
            Some(a) => a.capacity(params).await,
            // GetCapacity of a family this node does not serve: none here.
            None => Ok(CapacityReport { available: 0, maximum_volume_size: 0 }),
        }
    }
}
