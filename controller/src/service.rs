//! The CSI Controller service: a thin tonic adapter that checks each request into core
//! types, routes it to the node agent that owns the volume, and converts the answer back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrovol_core::agent::{Directory, LocalDirectory, NewVolume, NodeAgent, Source};
use ferrovol_core::error::{Code, Error, Result};
use ferrovol_core::ids::{printable, Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::{VolumeParams, CO_PREFIX};
use ferrovol_core::volume::{
    AccessType, Capability, CapacityRange, ContentSource, FsType, SnapshotRecord, VolumeRecord,
};
use ferrovol_core::TOPOLOGY_NODE_KEY;
use ferrovol_node::convert;
use ferrovol_node::rpc::{call, Noise};
use ferrovol_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::page::paginate;
use crate::s3::{is_s3_params, s3_snapshot, s3_volume};

use csi::controller_service_capability::rpc::Type as Cap;

/// The publish-context key naming the node a volume was attached to.
pub const PUBLISH_CONTEXT_NODE: &str = "ferrovol.dev/node";

/// The CSI Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    pub(crate) directory: Arc<dyn Directory>,
    /// CreateVolume calls whose outcome on a node is unknown (the node stopped answering
    /// mid-call), by CO name: until that node is back, a repeat is not placed elsewhere.
    pub(crate) uncertain: Arc<Mutex<HashMap<String, NodeId>>>,
    /// The S3 family, which needs no node: its IDs carry the bucket.
    pub(crate) s3: ferrovol_s3::S3Controller,
}

impl ControllerService {
    /// A controller over one in-process node agent (all-in-one mode).
    pub fn new(agent: Arc<dyn NodeAgent>) -> Self {
        Self::with_directory(Arc::new(LocalDirectory::new(agent)))
    }

    /// A controller over any directory of node agents (the cluster registry).
    pub fn with_directory(directory: Arc<dyn Directory>) -> Self {
        ControllerService {
            directory,
            uncertain: Arc::default(),
            s3: ferrovol_s3::S3Controller::new(ferrovol_s3::Timeouts::default()),
        }
    }

    /// Bounds every S3 call of the S3 family by `timeouts` (`--s3-timeout`).
    pub fn with_s3_timeouts(mut self, timeouts: ferrovol_s3::Timeouts) -> Self {
        self.s3 = ferrovol_s3::S3Controller::new(timeouts);
        self
    }

    /// Bounds every S3 call of the S3 family by `bound` (`--s3-timeout`): connect, each
    /// attempt and the whole call with its retries fit inside it.
    pub fn with_s3_timeout(self, bound: std::time::Duration) -> Self {
        self.with_s3_timeouts(ferrovol_s3::Timeouts::within(bound))
    }

    /// The S3 family's controller (tests look at what it remembers).
    pub fn s3(&self) -> &ferrovol_s3::S3Controller {
        &self.s3
    }

    /// The agent that owns objects of `node`: `None` when this driver does not serve that
    /// node at all; UNAVAILABLE when the node is not registered now.
    fn agent_for(&self, node: &NodeId) -> Result<Option<Arc<dyn NodeAgent>>> {
        self.directory.agent(node)
    }

    /// The agent that owns a volume, or NOT_FOUND naming the node nobody serves.
    fn volume_agent(&self, id: &VolumeId) -> Result<Arc<dyn NodeAgent>> {
        self.agent_for(id.node())?.ok_or_else(|| Error::VolumeNotFound {
            volume: id.to_string(),
            reason: format!("node {} is not served here", id.node()),
        })
    }

    /// The agent that owns a snapshot, or NOT_FOUND naming the node nobody serves.
    fn snapshot_agent(&self, id: &SnapshotId) -> Result<Arc<dyn NodeAgent>> {
        self.agent_for(id.node())?.ok_or_else(|| Error::SnapshotNotFound {
            snapshot: id.to_string(),
            reason: format!("node {} is not served here", id.node()),
        })
    }

    pub(crate) fn uncertain(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeId>> {
        self.uncertain.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn required(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Ok(())
}

/// A CO-chosen name: required, and free of control characters (the spec's rule for names).
fn name(field: &'static str, value: &str) -> Result<()> {
    required(field, value)?;
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, format!("{:?} contains control characters", printable(value))));
    }
    Ok(())
}

fn topology(node: &NodeId) -> csi::Topology {
    csi::Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), node.to_string())]) }
}

pub(crate) fn source_proto(src: &Option<ContentSource>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    src.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource { snapshot_id: id.clone() }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource { volume_id: id.clone() }),
        }),
    })
}

fn volume_proto(rec: &VolumeRecord, node: &NodeId) -> csi::Volume {
    csi::Volume {
        capacity_bytes: rec.capacity_bytes as i64,
        volume_id: rec.id.clone(),
        volume_context: HashMap::from([("fsType".to_string(), rec.fs_type.as_str().to_string())]),
        content_source: source_proto(&rec.source),
        accessible_topology: vec![topology(node)],
    }
}

fn snapshot_proto(rec: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: rec.size_bytes as i64,
        snapshot_id: rec.id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: rec.created_unix, nanos: rec.created_nanos }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// The filesystem a new volume gets: the capabilities' fs_type if they name one (the
/// external-provisioner passes the StorageClass's `csi.storage.k8s.io/fstype` there), else
/// the `fsType` parameter. Disagreement is an error.
fn effective_fs(params: &mut VolumeParams, caps: &[Capability]) -> Result<FsType> {
    let mut from_caps: Option<FsType> = None;
    for c in caps {
        if let AccessType::Mount { fs_type: Some(f), .. } = c.access_type {
            if from_caps.is_some_and(|g| g != f) {
                return Err(Error::UnsupportedCapability {
                    reason: "the capabilities ask for different filesystems".into(),
                });
            }
            from_caps = Some(f);
        }
    }
    if let Some(f) = from_caps {
        if params.recorded.contains_key("fsType") && params.fs_type != f {
            return Err(Error::invalid(
                "parameters",
                format!("fsType {} contradicts the capability's fs_type {f}", params.fs_type),
            ));
        }
        params.fs_type = f;
        params.recorded.insert("fsType".into(), f.as_str().into());
    }
    Ok(params.fs_type)
}

fn snapshot_params(params: &HashMap<String, String>) -> Result<()> {
    match params.keys().find(|k| !k.starts_with(CO_PREFIX)) {
        Some(k) => Err(Error::UnknownParameter { key: printable(k), known: "(snapshots take no parameters)".into() }),
        None => Ok(()),
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        call("CreateVolume", &r.name, Noise::Change, async {
            name("name", &r.name)?;
            if is_s3_params(&r.parameters) {
                return self.s3_create_volume(&r).await;
            }
            let caps = convert::capabilities(&r.volume_capabilities)?;
            let mut params = VolumeParams::parse(&r.parameters)?;
            let fs = effective_fs(&mut params, &caps)?;
            for c in &caps {
                c.check_local(fs)?;
            }
            let capacity = request_capacity(&r)?;
            let source = request_source(&r)?;
            if let Some(t) = &r.accessibility_requirements {
                if t.requisite.is_empty() && t.preferred.is_empty() {
                    return Err(Error::invalid(
                        "accessibility_requirements",
                        "is set but has neither requisite nor preferred",
                    ));
                }
            }
            let new =
                NewVolume { name: r.name.clone(), local: LocalName::from_co_name(&r.name), capacity, params, source };
            let (rec, node) = self.place_and_create(new, r.accessibility_requirements.as_ref()).await?;
            Ok(csi::CreateVolumeResponse { volume: Some(volume_proto(&rec, &node)) })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        call("DeleteVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            // An ID that is not ours names no volume of ours: deleting it is done already.
            let Ok(id) = VolumeId::parse(&r.volume_id) else { return Ok(csi::DeleteVolumeResponse {}) };
            if id.family() == Family::S3 {
                self.s3.delete_volume(&id, &r.secrets).await?;
                return Ok(csi::DeleteVolumeResponse {});
            }
            if let Some(agent) = self.agent_for(id.node())? {
                agent.delete_volume(&id).await?;
            }
            Ok(csi::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        call("ControllerPublishVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            required("node_id", &r.node_id)?;
            if let Some(id) = s3_volume(&r.volume_id) {
                return self.s3_controller_publish(&r, &id).await;
            }
            let cap = convert::required_capability(&r.volume_capability)?;
            let id = VolumeId::parse(&r.volume_id)?;
            let node = NodeId::parse(&r.node_id).map_err(|_| Error::NodeNotFound {
                node: printable(&r.node_id),
                reason: "not a valid node ID".into(),
            })?;
            let agent = self.volume_agent(&id)?;
            let (rec, _) = agent.get_volume(&id).await?;
            // A node this driver does not serve at all is NOT_FOUND; a node of the cluster
            // that is not the volume's own cannot reach a local volume, registered or not.
            if matches!(self.agent_for(&node), Ok(None)) {
                return Err(Error::NodeNotFound {
                    node: node.to_string(),
                    reason: "no node agent with this ID is known".into(),
                });
            }
            if &node != id.node() {
                return Err(Error::precondition(
                    format!("volume {id}"),
                    format!("it is a local volume on node {}; it cannot be attached to node {node}", id.node()),
                ));
            }
            cap.check_local(rec.fs_type)?;
            agent.publish_volume(&id, &node).await?;
            Ok(csi::ControllerPublishVolumeResponse {
                publish_context: HashMap::from([(PUBLISH_CONTEXT_NODE.to_string(), node.to_string())]),
            })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        call("ControllerUnpublishVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            // The spec: a volume or node that cannot be found is safely unpublished: OK.
            let Ok(id) = VolumeId::parse(&r.volume_id) else { return Ok(csi::ControllerUnpublishVolumeResponse {}) };
            if id.family() == Family::S3 {
                return self.s3_controller_unpublish(&r, &id).await;
            }
            let Some(agent) = self.agent_for(id.node())? else {
                return Ok(csi::ControllerUnpublishVolumeResponse {});
            };
            let nodes = if r.node_id.is_empty() {
                match agent.get_volume(&id).await {
                    Ok((rec, _)) => rec.published_nodes.iter().filter_map(|n| NodeId::parse(n).ok()).collect(),
                    Err(e) if e.code() == Code::NotFound => vec![],
                    Err(e) => return Err(e),
                }
            } else {
                NodeId::parse(&r.node_id).map(|n| vec![n]).unwrap_or_default()
            };
            for n in &nodes {
                agent.unpublish_volume(&id, n).await?;
            }
            Ok(csi::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        call("ValidateVolumeCapabilities", &r.volume_id, Noise::Query, async {
            required("volume_id", &r.volume_id)?;
            if r.volume_capabilities.is_empty() {
                return Err(Error::invalid("volume_capabilities", "at least one capability is required"));
            }
            if let Some(id) = s3_volume(&r.volume_id) {
                return self.s3_validate(&r, &id).await;
            }
            // A malformed capability is INVALID_ARGUMENT; a well-formed one we cannot give is
            // answered without confirmation, as the spec asks.
            let mut caps = Vec::new();
            let mut refusal = None;
            for c in &r.volume_capabilities {
                match convert::capability("volume_capabilities", c) {
                    Ok(c) => caps.push(c),
                    Err(e @ Error::UnsupportedCapability { .. }) => {
                        refusal.get_or_insert(e.to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
            let id = VolumeId::parse(&r.volume_id)?;
            let agent = self.volume_agent(&id)?;
            let (rec, _) = agent.get_volume(&id).await?;
            let refusal = refusal
                .or_else(|| VolumeParams::parse(&r.parameters).err().map(|e| e.to_string()))
                .or_else(|| caps.iter().find_map(|c| c.check_local(rec.fs_type).err().map(|e| e.to_string())));
            Ok(match refusal {
                Some(message) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message },
                None => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context.clone(),
                        volume_capabilities: r.volume_capabilities.clone(),
                        parameters: r.parameters.clone(),
                        mutable_parameters: HashMap::new(),
                    }),
                    message: String::new(),
                },
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        call("ListVolumes", "", Noise::Query, async {
            let mut all = Vec::new();
            for m in self.directory.members() {
                let node = m.node().clone();
                all.extend(m.agent.list_volumes().await?.into_iter().map(|(rec, cond)| {
                    (volume_proto(&rec, &node), rec.published_nodes.clone(), convert::condition(&cond))
                }));
            }
            all.extend(self.s3.list_volumes().await.iter().map(crate::s3::status_proto));
            all.sort_by(|a, b| a.0.volume_id.cmp(&b.0.volume_id));
            let (page, next_token) = paginate(all, r.max_entries, &r.starting_token)?;
            let entries = page
                .into_iter()
                .map(|(volume, published_node_ids, condition)| csi::list_volumes_response::Entry {
                    volume: Some(volume),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition),
                    }),
                })
                .collect();
            Ok(csi::ListVolumesResponse { entries, next_token })
        })
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        call("GetCapacity", "", Noise::Query, async {
            if is_s3_params(&r.parameters) {
                return self.s3_capacity(&r);
            }
            let mut params = VolumeParams::parse(&r.parameters)?;
            let caps = r
                .volume_capabilities
                .iter()
                .map(|c| convert::capability("volume_capabilities", c))
                .collect::<Result<Vec<_>>>()?;
            let fs = effective_fs(&mut params, &caps)?;
            let usable = caps.iter().all(|c| c.check_local(fs).is_ok());
            let members: Vec<_> = self
                .directory
                .members()
                .into_iter()
                .filter(|m| r.accessible_topology.as_ref().is_none_or(|t| crate::placement::admits(t, &m.topology)))
                .collect();
            if !usable || members.is_empty() {
                return Ok(csi::GetCapacityResponse {
                    available_capacity: 0,
                    maximum_volume_size: None,
                    minimum_volume_size: None,
                });
            }
            // Per segment (one node, as the external-provisioner asks with capacity
            // tracking) this is the node's own answer; without a segment, the sum.
            let (mut available, mut maximum) = (0u64, 0u64);
            for m in members {
                let report = m.agent.capacity(&params).await?;
                available = available.saturating_add(report.available);
                maximum = maximum.max(report.maximum_volume_size);
            }
            Ok(csi::GetCapacityResponse {
                available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
                maximum_volume_size: Some(i64::try_from(maximum).unwrap_or(i64::MAX)),
                minimum_volume_size: Some(fs.min_bytes() as i64),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        call("ControllerGetCapabilities", "", Noise::Query, async {
            let capabilities = [
                Cap::CreateDeleteVolume,
                Cap::PublishUnpublishVolume,
                Cap::ListVolumes,
                Cap::GetCapacity,
                Cap::CreateDeleteSnapshot,
                Cap::ListSnapshots,
                Cap::CloneVolume,
                Cap::ExpandVolume,
                Cap::ListVolumesPublishedNodes,
                Cap::VolumeCondition,
                Cap::GetVolume,
                Cap::SingleNodeMultiWriter,
                Cap::GetSnapshot,
            ]
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(csi::controller_service_capability::Rpc {
                    r#type: t as i32,
                })),
            })
            .collect();
            Ok(csi::ControllerGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        call("CreateSnapshot", &r.name, Noise::Change, async {
            name("name", &r.name)?;
            required("source_volume_id", &r.source_volume_id)?;
            snapshot_params(&r.parameters)?;
            let source = VolumeId::parse(&r.source_volume_id)?;
            if source.family() == Family::S3 {
                return self.s3_create_snapshot(&r, &source).await;
            }
            let agent = self.volume_agent(&source)?;
            let rec = agent.create_snapshot(&r.name, LocalName::from_co_name(&r.name), &source).await?;
            Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_proto(&rec)) })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        call("DeleteSnapshot", &r.snapshot_id, Noise::Change, async {
            required("snapshot_id", &r.snapshot_id)?;
            let Ok(id) = SnapshotId::parse(&r.snapshot_id) else { return Ok(csi::DeleteSnapshotResponse {}) };
            if id.family() == Family::S3 {
                self.s3.delete_snapshot(&id, &r.secrets).await?;
                return Ok(csi::DeleteSnapshotResponse {});
            }
            if let Some(agent) = self.agent_for(id.node())? {
                agent.delete_snapshot(&id).await?;
            }
            Ok(csi::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        call("ListSnapshots", &r.snapshot_id, Noise::Query, async {
            let all: Vec<csi::Snapshot> = if s3_snapshot(&r.snapshot_id).is_some() {
                self.s3_list_snapshots(&r).await?
            } else if !r.snapshot_id.is_empty() {
                match SnapshotId::parse(&r.snapshot_id) {
                    Ok(id) => match self.agent_for(id.node())? {
                        Some(agent) => match agent.get_snapshot(&id).await {
                            Ok(s) => vec![snapshot_proto(&s)],
                            Err(e) if e.code() == Code::NotFound => vec![],
                            Err(e) => return Err(e),
                        },
                        None => vec![],
                    },
                    Err(_) => vec![],
                }
            } else {
                let mut all: Vec<csi::Snapshot> = Vec::new();
                for m in self.directory.members() {
                    all.extend(m.agent.list_snapshots().await?.iter().map(snapshot_proto));
                }
                all.extend(self.s3_list_snapshots(&r).await?);
                all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
                all
            };
            let all: Vec<csi::Snapshot> = all
                .into_iter()
                .filter(|s| r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
                .collect();
            let (page, next_token) = paginate(all, r.max_entries, &r.starting_token)?;
            let entries = page.into_iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) }).collect();
            Ok(csi::ListSnapshotsResponse { entries, next_token })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        call("GetSnapshot", &r.snapshot_id, Noise::Query, async {
            required("snapshot_id", &r.snapshot_id)?;
            let id = SnapshotId::parse(&r.snapshot_id)?;
            if id.family() == Family::S3 {
                let s = self.s3_get_snapshot(&id, &r.secrets).await?;
                return Ok(csi::GetSnapshotResponse { snapshot: Some(crate::s3::snapshot_proto(&s)) });
            }
            let agent = self.snapshot_agent(&id)?;
            let rec = agent.get_snapshot(&id).await?;
            Ok(csi::GetSnapshotResponse { snapshot: Some(snapshot_proto(&rec)) })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        call("ControllerExpandVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let c = r.capacity_range.as_ref().ok_or_else(|| Error::invalid("capacity_range", "is required"))?;
            let range = CapacityRange::from_request(c.required_bytes, c.limit_bytes).map_err(|e| match e {
                Error::CapacityOutOfRange { reason, .. } => {
                    Error::CapacityOutOfRange { volume: printable(&r.volume_id), reason }
                }
                other => other,
            })?;
            if let Some(id) = s3_volume(&r.volume_id) {
                if let Some(c) = &r.volume_capability {
                    crate::s3::capability("volume_capability", c)?;
                }
                let size = self.s3.expand_volume(&id, range, &r.secrets).await?;
                // The node tells the mounter to read the quota again.
                return Ok(csi::ControllerExpandVolumeResponse {
                    capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
                    node_expansion_required: true,
                });
            }
            let block = match &r.volume_capability {
                Some(c) => {
                    let cap = convert::capability("volume_capability", c)?;
                    cap.check_single_node()?;
                    cap.is_block()
                }
                None => false,
            };
            let id = VolumeId::parse(&r.volume_id)?;
            let agent = self.volume_agent(&id)?;
            let size = agent.expand_volume(&id, range).await?;
            // A filesystem must be grown by the node; a raw device is the right size already.
            Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: size as i64, node_expansion_required: !block })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        call("ControllerGetVolume", &r.volume_id, Noise::Query, async {
            required("volume_id", &r.volume_id)?;
            let id = VolumeId::parse(&r.volume_id)?;
            if id.family() == Family::S3 {
                let (volume, published_node_ids, condition) = crate::s3::status_proto(&self.s3.get_volume(&id).await?);
                return Ok(csi::ControllerGetVolumeResponse {
                    volume: Some(volume),
                    status: Some(csi::controller_get_volume_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition),
                    }),
                });
            }
            let agent = self.volume_agent(&id)?;
            let (rec, cond) = agent.get_volume(&id).await?;
            Ok(csi::ControllerGetVolumeResponse {
                volume: Some(volume_proto(&rec, id.node())),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: rec.published_nodes.clone(),
                    volume_condition: Some(convert::condition(&cond)),
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not offered (MODIFY_VOLUME is not advertised)"))
    }
}

/// The capacity range of a CreateVolume; an impossible one is OUT_OF_RANGE naming the volume.
pub(crate) fn request_capacity(r: &csi::CreateVolumeRequest) -> Result<CapacityRange> {
    match &r.capacity_range {
        Some(c) => CapacityRange::from_request(c.required_bytes, c.limit_bytes).map_err(|e| match e {
            Error::CapacityOutOfRange { reason, .. } => {
                Error::CapacityOutOfRange { volume: printable(&r.name), reason }
            }
            other => other,
        }),
        None => Ok(CapacityRange::default()),
    }
}

/// The content source of a CreateVolume: an ID that is not ours is NOT_FOUND, a source
/// naming neither kind INVALID_ARGUMENT.
pub(crate) fn request_source(r: &csi::CreateVolumeRequest) -> Result<Option<Source>> {
    Ok(match r.volume_content_source.as_ref().map(|s| s.r#type.as_ref()) {
        None => None,
        Some(None) => {
            return Err(Error::invalid("volume_content_source", "is set but names neither a snapshot nor a volume"))
        }
        Some(Some(csi::volume_content_source::Type::Snapshot(s))) => {
            Some(Source::Snapshot(SnapshotId::parse(&s.snapshot_id)?))
        }
        Some(Some(csi::volume_content_source::Type::Volume(v))) => Some(Source::Volume(VolumeId::parse(&v.volume_id)?)),
    })
}
