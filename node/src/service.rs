//! The CSI Node service: a thin tonic adapter that checks each request into core types
//! and hands it to [`NodeOps`].

use ferrovol_core::error::{Error, Result};
use ferrovol_core::guard::InFlight;
use ferrovol_core::ids::{Family, VolumeId};
use ferrovol_core::volume::CapacityRange;
use ferrovol_core::TOPOLOGY_NODE_KEY;
use ferrovol_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::rpc::{call, Noise};
use crate::s3::S3Node;
use crate::stage::{NodeOps, Stats, EPHEMERAL_KEY};

use csi::node_service_capability::rpc::Type as Cap;

/// The CSI Node service of one node.
#[derive(Debug, Clone)]
pub struct NodeService {
    ops: NodeOps,
    max_volumes: i64,
    /// S3 volumes, through the mounter process.
    s3: S3Node,
    /// One call at a time per S3 volume (the other families guard inside `ops`).
    s3_inflight: InFlight,
}

impl NodeService {
    /// A Node service over `ops`, advertising `max_volumes` per node; no S3 volumes.
    pub fn new(ops: NodeOps, max_volumes: i64) -> Self {
        NodeService {
            ops,
            max_volumes,
            s3: S3Node::new(None, std::time::Duration::from_secs(15)),
            s3_inflight: InFlight::default(),
        }
    }

    /// Serves S3 volumes through `s3` too.
    pub fn with_s3(mut self, s3: S3Node) -> Self {
        self.s3 = s3;
        self
    }

    /// The ID of an S3 volume, or `None` for every other ID (the other families' checks
    /// then answer as before).
    fn s3_volume(volume_id: &str) -> Option<VolumeId> {
        VolumeId::parse(volume_id).ok().filter(|id| id.family() == Family::S3)
    }

    fn s3_guard(&self, id: &VolumeId) -> Result<ferrovol_core::guard::InFlightGuard> {
        self.s3_inflight.try_acquire(&id.to_string(), || format!("volume {id}"))
    }
}

fn required(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Ok(())
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        call("NodeStageVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let staging = self.ops.check_path("staging_target_path", &r.staging_target_path)?;
            let cap = convert::required_capability(&r.volume_capability)?;
            if let Some(id) = Self::s3_volume(&r.volume_id) {
                let _g = self.s3_guard(&id)?;
                self.s3.stage(&id, &staging, &cap, &r.secrets).await?;
                return Ok(csi::NodeStageVolumeResponse {});
            }
            self.ops.stage(r.volume_id.clone(), staging, cap).await?;
            Ok(csi::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        call("NodeUnstageVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let staging = self.ops.check_path("staging_target_path", &r.staging_target_path)?;
            if let Some(id) = Self::s3_volume(&r.volume_id) {
                let _g = self.s3_guard(&id)?;
                self.s3.unstage(&id, &staging).await?;
                return Ok(csi::NodeUnstageVolumeResponse {});
            }
            self.ops.unstage(r.volume_id.clone(), staging).await?;
            Ok(csi::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        call("NodePublishVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let target = self.ops.check_path("target_path", &r.target_path)?;
            let cap = convert::required_capability(&r.volume_capability)?;
            if r.volume_context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true") {
                self.ops.publish_ephemeral(r.volume_id.clone(), target, cap, r.readonly, r.volume_context.clone()).await?;
                return Ok(csi::NodePublishVolumeResponse {});
            }
            if r.staging_target_path.is_empty() {
                return Err(Error::precondition(
                    format!("volume {}", ferrovol_core::ids::printable(&r.volume_id)),
                    "staging_target_path is not set; this driver stages volumes (STAGE_UNSTAGE_VOLUME) before publishing them",
                ));
            }
            let staging = self.ops.check_path("staging_target_path", &r.staging_target_path)?;
            if let Some(id) = Self::s3_volume(&r.volume_id) {
                let _g = self.s3_guard(&id)?;
                self.s3.publish(&id, &staging, &target, &cap, r.readonly).await?;
                return Ok(csi::NodePublishVolumeResponse {});
            }
            self.ops.publish(r.volume_id.clone(), staging, target, cap, r.readonly).await?;
            Ok(csi::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        call("NodeUnpublishVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let target = self.ops.check_path("target_path", &r.target_path)?;
            if let Some(id) = Self::s3_volume(&r.volume_id) {
                let _g = self.s3_guard(&id)?;
                self.s3.unpublish(&id, &target).await?;
                return Ok(csi::NodeUnpublishVolumeResponse {});
            }
            self.ops.unpublish(r.volume_id.clone(), target).await?;
            Ok(csi::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        call("NodeGetVolumeStats", &r.volume_id, Noise::Query, async {
            required("volume_id", &r.volume_id)?;
            let path = self.ops.check_path("volume_path", &r.volume_path)?;
            let (stats, cond) = match Self::s3_volume(&r.volume_id) {
                Some(id) => self.s3.stats(&id, &path).await?,
                None => self.ops.stats(r.volume_id.clone(), path).await?,
            };
            let usage = match stats {
                Stats::Block { total_bytes } => vec![csi::VolumeUsage {
                    total: total_bytes as i64,
                    unit: csi::volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }],
                Stats::Filesystem(u) => vec![
                    csi::VolumeUsage {
                        available: u.available_bytes as i64,
                        total: u.total_bytes as i64,
                        used: u.used_bytes as i64,
                        unit: csi::volume_usage::Unit::Bytes as i32,
                    },
                    csi::VolumeUsage {
                        available: u.free_inodes as i64,
                        total: u.total_inodes as i64,
                        used: u.used_inodes as i64,
                        unit: csi::volume_usage::Unit::Inodes as i32,
                    },
                ],
            };
            Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(convert::condition(&cond)) })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        call("NodeExpandVolume", &r.volume_id, Noise::Change, async {
            required("volume_id", &r.volume_id)?;
            let path = self.ops.check_path("volume_path", &r.volume_path)?;
            let range = match &r.capacity_range {
                Some(c) => CapacityRange::from_request(c.required_bytes, c.limit_bytes)?,
                None => CapacityRange::default(),
            };
            if let Some(id) = Self::s3_volume(&r.volume_id) {
                let _g = self.s3_guard(&id)?;
                let size = self.s3.expand(&id).await?;
                return Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size as i64 });
            }
            if let Some(c) = &r.volume_capability {
                convert::capability("volume_capability", c)?.check_single_node()?;
            }
            let size = self.ops.expand(r.volume_id.clone(), path, range).await?;
            Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size as i64 })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        call("NodeGetCapabilities", "", Noise::Query, async {
            let capabilities = [
                Cap::StageUnstageVolume,
                Cap::GetVolumeStats,
                Cap::ExpandVolume,
                Cap::VolumeCondition,
                Cap::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(csi::node_service_capability::Type::Rpc(csi::node_service_capability::Rpc {
                    r#type: t as i32,
                })),
            })
            .collect();
            Ok(csi::NodeGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        call("NodeGetInfo", "", Noise::Query, async {
            let node = self.ops.node_id().to_string();
            Ok(csi::NodeGetInfoResponse {
                node_id: node.clone(),
                max_volumes_per_node: self.max_volumes,
                accessible_topology: Some(csi::Topology { segments: [(TOPOLOGY_NODE_KEY.to_string(), node)].into() }),
            })
        })
        .await
    }
}
