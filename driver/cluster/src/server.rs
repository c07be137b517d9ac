//! The node agent's gRPC service: the controller's calls, served by this node's local
//! agent. Every operation runs in its own task, so a controller that disconnects (it was
//! restarted, its call timed out, the link was cut) never cancels a create or delete halfway:
//! the operation ends as it would have, and the controller's retry finds its result.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrovol_core::agent::NodeAgent;
use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_node::rpc::{call, Noise};
use ferrovol_proto::agent::v1 as pb;
use tonic::{Request, Response, Status};

use crate::wire;

/// The Agent service over one node's local agent.
#[derive(Debug, Clone)]
pub struct AgentEndpoint {
    agent: Arc<dyn NodeAgent>,
    ready: Arc<AtomicBool>,
}

impl AgentEndpoint {
    /// `ready` turns true when the node's start-up reconcile is done; until then every call
    /// answers UNAVAILABLE.
    pub fn new(agent: Arc<dyn NodeAgent>, ready: Arc<AtomicBool>) -> Self {
        AgentEndpoint { agent, ready }
    }

    /// Runs `op` detached from the caller's connection, logged like every RPC.
    async fn run<T, F, Fut>(
        &self,
        method: &'static str,
        object: &str,
        noise: Noise,
        op: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn NodeAgent>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let ready = self.ready.load(Ordering::Acquire);
        let fut = op(Arc::clone(&self.agent));
        call(method, object, noise, async move {
            if !ready {
                return Err(Error::Unavailable {
                    reason: "the node agent is still reconciling its volumes after start-up".into(),
                });
            }
            tokio::spawn(fut).await.map_err(|e| Error::system(method, "the node agent", e))?
        })
        .await
    }
}

fn node_of(agent: &Arc<dyn NodeAgent>) -> NodeId {
    agent.node_id().clone()
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentEndpoint {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::VolumeRecord>, Status> {
        let r = req.into_inner();
        let name = r.name.clone();
        self.run("agent.CreateVolume", &name, Noise::Change, move |a| async move {
            let new = wire::new_volume_from(r)?;
            Ok(wire::volume_to(&a.create_volume(new).await?))
        })
        .await
    }

    async fn delete_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        self.run("agent.DeleteVolume", &r.volume_id.clone(), Noise::Change, move |a| async move {
            // An ID that is not ours names nothing here: deleting it is done already.
            if let Ok(id) = VolumeId::parse(&r.volume_id) {
                if id.node() == &node_of(&a) {
                    a.delete_volume(&id).await?;
                }
            }
            Ok(pb::Empty {})
        })
        .await
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeStatus>, Status> {
        let r = req.into_inner();
        self.run("agent.GetVolume", &r.volume_id.clone(), Noise::Query, move |a| async move {
            let id = VolumeId::parse(&r.volume_id)?;
            let (v, c) = a.get_volume(&id).await?;
            Ok(wire::status_to(&v, &c))
        })
        .await
    }

    async fn list_volumes(&self, _req: Request<pb::Empty>) -> Result<Response<pb::VolumeList>, Status> {
        self.run("agent.ListVolumes", "", Noise::Query, move |a| async move {
            let volumes = a.list_volumes().await?.iter().map(|(v, c)| wire::status_to(v, c)).collect();
            Ok(pb::VolumeList { volumes })
        })
        .await
    }

    async fn expand_volume(
        &self,
        req: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        self.run("agent.ExpandVolume", &r.volume_id.clone(), Noise::Change, move |a| async move {
            let id = VolumeId::parse(&r.volume_id)?;
            let range = wire::range_from(r.capacity.as_ref())?;
            Ok(pb::ExpandVolumeResponse { capacity_bytes: a.expand_volume(&id, range).await? })
        })
        .await
    }

    async fn publish_volume(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        self.run("agent.PublishVolume", &r.volume_id.clone(), Noise::Change, move |a| async move {
            let id = VolumeId::parse(&r.volume_id)?;
            let node = NodeId::parse(&r.node_id)?;
            a.publish_volume(&id, &node).await?;
            Ok(pb::Empty {})
        })
        .await
    }

    async fn unpublish_volume(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        self.run("agent.UnpublishVolume", &r.volume_id.clone(), Noise::Change, move |a| async move {
            let id = VolumeId::parse(&r.volume_id)?;
            let node = NodeId::parse(&r.node_id)?;
            a.unpublish_volume(&id, &node).await?;
            Ok(pb::Empty {})
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotRecord>, Status> {
        let r = req.into_inner();
        self.run("agent.CreateSnapshot", &r.name.clone(), Noise::Change, move |a| async move {
            let local = LocalName::parse(&r.local_name)
                .ok_or_else(|| Error::invalid("local_name", "is not a valid local name"))?;
            let source = VolumeId::parse(&r.source_volume_id)?;
            Ok(wire::snapshot_to(&a.create_snapshot(&r.name, local, &source).await?))
        })
        .await
    }

    async fn delete_snapshot(&self, req: Request<pb::SnapshotRef>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        self.run("agent.DeleteSnapshot", &r.snapshot_id.clone(), Noise::Change, move |a| async move {
            if let Ok(id) = SnapshotId::parse(&r.snapshot_id) {
                if id.node() == &node_of(&a) {
                    a.delete_snapshot(&id).await?;
                }
            }
            Ok(pb::Empty {})
        })
        .await
    }

    async fn get_snapshot(&self, req: Request<pb::SnapshotRef>) -> Result<Response<pb::SnapshotRecord>, Status> {
        let r = req.into_inner();
        self.run("agent.GetSnapshot", &r.snapshot_id.clone(), Noise::Query, move |a| async move {
            let id = SnapshotId::parse(&r.snapshot_id)?;
            Ok(wire::snapshot_to(&a.get_snapshot(&id).await?))
        })
        .await
    }

    async fn list_snapshots(&self, _req: Request<pb::Empty>) -> Result<Response<pb::SnapshotList>, Status> {
        self.run("agent.ListSnapshots", "", Noise::Query, move |a| async move {
            Ok(pb::SnapshotList { snapshots: a.list_snapshots().await?.iter().map(wire::snapshot_to).collect() })
        })
        .await
    }

    async fn capacity(&self, req: Request<pb::CapacityRequest>) -> Result<Response<pb::CapacityReport>, Status> {
        let r = req.into_inner();
        self.run("agent.Capacity", "", Noise::Query, move |a| async move {
            let params = VolumeParams::parse(&r.parameters)?;
            Ok(wire::capacity_to(&a.capacity(&params).await?))
        })
        .await
    }

    async fn health(&self, _req: Request<pb::Empty>) -> Result<Response<pb::HealthReport>, Status> {
        let ready = self.ready.load(Ordering::Acquire);
        Ok(Response::new(pb::HealthReport {
            ready,
            message: if ready { "ready".into() } else { "reconciling volumes after start-up".into() },
        }))
    }
}
