//! The CSI Controller RPCs of `type: s3` volumes: checked here into core types and passed
//! to the [`S3Controller`] with the request's secrets. S3 IDs carry the bucket where other
//! families carry the node, so these calls never reach the node-agent routing. S3 volumes
//! are mount only, any access mode, reachable from every node (no topology).

use std::collections::HashMap;

use ferrovol_core::agent::{NewVolume, Source};
use ferrovol_core::error::{Code, Error, Result};
use ferrovol_core::ids::{printable, Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{Capability, ContentSource, MIB};
use ferrovol_node::convert;
use ferrovol_proto::csi::v1 as csi;
use ferrovol_s3::controller::{S3Snapshot, S3Volume, S3VolumeStatus};
use ferrovol_s3::S3Endpoint;

use crate::service::{ControllerService, PUBLISH_CONTEXT_NODE};

/// Whether CreateVolume's or GetCapacity's parameters ask for an S3 volume.
pub(crate) fn is_s3_params(params: &HashMap<String, String>) -> bool {
    params.get("type").map(String::as_str) == Some("s3")
}

/// The ID if it is an S3 volume ID.
pub(crate) fn s3_volume(id: &str) -> Option<VolumeId> {
    VolumeId::parse(id).ok().filter(|i| i.family() == Family::S3)
}

/// The ID if it is an S3 snapshot ID.
pub(crate) fn s3_snapshot(id: &str) -> Option<SnapshotId> {
    SnapshotId::parse(id).ok().filter(|i| i.family() == Family::S3)
}

/// Checks a capability for an S3 volume: mount only, any access mode; a filesystem type is
/// ignored (Kubernetes sends ext4 by default; the volume is a FUSE filesystem whatever it
/// says).
pub(crate) fn capability(field: &'static str, cap: &csi::VolumeCapability) -> Result<Capability> {
    let mut cap = cap.clone();
    if let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.fs_type.clear();
    }
    let c = convert::capability(field, &cap)?;
    if c.is_block() {
        return Err(Error::UnsupportedCapability { reason: "s3 volumes are mount only".into() });
    }
    Ok(c)
}

fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities", "at least one capability is required"));
    }
    caps.iter().map(|c| capability("volume_capabilities", c)).collect()
}

fn context(bucket: &str) -> HashMap<String, String> {
    HashMap::from([("type".to_string(), "s3".to_string()), ("bucket".to_string(), bucket.to_string())])
}

fn source_proto(source: &Option<String>) -> Option<csi::VolumeContentSource> {
    let s = source.as_ref()?;
    let cs = if SnapshotId::parse(s).is_ok() {
        ContentSource::Snapshot(s.clone())
    } else {
        ContentSource::Volume(s.clone())
    };
    crate::service::source_proto(&Some(cs))
}

fn volume_proto(v: &S3Volume) -> csi::Volume {
    csi::Volume {
        capacity_bytes: i64::try_from(v.record.capacity_bytes).unwrap_or(i64::MAX),
        volume_id: v.id.to_string(),
        volume_context: context(&v.bucket),
        content_source: source_proto(&v.record.source),
        accessible_topology: Vec::new(),
    }
}

/// A volume with its status; capacity 0 (unknown) when the record could not be read.
pub(crate) fn status_proto(s: &S3VolumeStatus) -> (csi::Volume, Vec<String>, csi::VolumeCondition) {
    let volume = csi::Volume {
        capacity_bytes: s.record.as_ref().map_or(0, |r| i64::try_from(r.capacity_bytes).unwrap_or(i64::MAX)),
        volume_id: s.id.to_string(),
        volume_context: context(&s.bucket),
        content_source: s.record.as_ref().and_then(|r| source_proto(&r.source)),
        accessible_topology: Vec::new(),
    };
    (volume, s.published.clone(), convert::condition(&s.condition))
}

pub(crate) fn snapshot_proto(s: &S3Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: i64::try_from(s.record.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: s.id.to_string(),
        source_volume_id: s.record.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: s.record.created_unix, nanos: s.record.created_nanos }),
        ready_to_use: s.record.ready,
        group_snapshot_id: String::new(),
    }
}

/// The endpoint of a request's secrets if it carries any (for the list calls).
fn optional_endpoint(secrets: &HashMap<String, String>) -> Result<Option<S3Endpoint>> {
    if secrets.is_empty() {
        Ok(None)
    } else {
        S3Endpoint::from_secrets("secrets", secrets).map(Some)
    }
}

impl ControllerService {
    pub(crate) async fn s3_create_volume(&self, r: &csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse> {
        capabilities(&r.volume_capabilities)?;
        let params = VolumeParams::parse(&r.parameters)?;
        let capacity = crate::service::request_capacity(r)?;
        let source = crate::service::request_source(r)?;
        let source_family = match &source {
            Some(Source::Snapshot(s)) => Some((s.family(), s.to_string())),
            Some(Source::Volume(v)) => Some((v.family(), v.to_string())),
            None => None,
        };
        if let Some((family, id)) = source_family.filter(|(f, _)| *f != Family::S3) {
            return Err(Error::invalid(
                "volume_content_source",
                format!(
                    "{id} is a {} object; an s3 volume can only be made from s3 snapshots and volumes",
                    family.as_str()
                ),
            ));
        }
        let new = NewVolume { name: r.name.clone(), local: LocalName::from_co_name(&r.name), capacity, params, source };
        let v = self.s3.create_volume(new, &r.secrets).await?;
        Ok(csi::CreateVolumeResponse { volume: Some(volume_proto(&v)) })
    }

    pub(crate) async fn s3_controller_publish(
        &self,
        r: &csi::ControllerPublishVolumeRequest,
        id: &VolumeId,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        capability(
            "volume_capability",
            r.volume_capability.as_ref().ok_or_else(|| Error::invalid("volume_capability", "is required"))?,
        )?;
        let node = NodeId::parse(&r.node_id)
            .map_err(|_| Error::NodeNotFound { node: printable(&r.node_id), reason: "not a valid node ID".into() })?;
        self.s3.publish_volume(id, &node, r.readonly, &r.secrets).await?;
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: HashMap::from([(PUBLISH_CONTEXT_NODE.to_string(), node.to_string())]),
        })
    }

    pub(crate) async fn s3_controller_unpublish(
        &self,
        r: &csi::ControllerUnpublishVolumeRequest,
        id: &VolumeId,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        if r.node_id.is_empty() {
            self.s3.unpublish_volume(id, None, &r.secrets).await?;
        } else if let Ok(node) = NodeId::parse(&r.node_id) {
            self.s3.unpublish_volume(id, Some(&node), &r.secrets).await?;
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    pub(crate) async fn s3_validate(
        &self,
        r: &csi::ValidateVolumeCapabilitiesRequest,
        id: &VolumeId,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let mut refusal = None;
        for c in &r.volume_capabilities {
            match capability("volume_capabilities", c) {
                Ok(_) => {}
                Err(e @ Error::UnsupportedCapability { .. }) => {
                    refusal.get_or_insert(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        let ep = self.s3.endpoint_or_known(ferrovol_s3::layout::volume_bucket(id), &r.secrets)?;
        self.s3.volume(id, &ep).await?;
        let refusal = refusal.or_else(|| match VolumeParams::parse(&r.parameters) {
            Err(e) => Some(e.to_string()),
            Ok(p) if !r.parameters.is_empty() && p.family != Family::S3 => {
                Some(format!("volume {id} is an s3 volume, the parameters ask for type {}", p.family.as_str()))
            }
            Ok(_) => None,
        });
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
    }

    /// GetCapacity for `type: s3`: S3 has no capacity to report, and every node reaches it,
    /// so the answer is the same for any topology: unbounded (i64::MAX), so that Kubernetes'
    /// capacity tracking never holds back an s3 volume; quotas are per volume.
    pub(crate) fn s3_capacity(&self, r: &csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        VolumeParams::parse(&r.parameters)?;
        let mut usable = true;
        for c in &r.volume_capabilities {
            match capability("volume_capabilities", c) {
                Ok(_) => {}
                Err(Error::UnsupportedCapability { .. }) => usable = false,
                Err(e) => return Err(e),
            }
        }
        if !usable {
            return Ok(csi::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: None,
            });
        }
        Ok(csi::GetCapacityResponse {
            available_capacity: i64::MAX,
            maximum_volume_size: None,
            minimum_volume_size: Some(MIB as i64),
        })
    }

    pub(crate) async fn s3_create_snapshot(
        &self,
        r: &csi::CreateSnapshotRequest,
        source: &VolumeId,
    ) -> Result<csi::CreateSnapshotResponse> {
        let s = self.s3.create_snapshot(&r.name, LocalName::from_co_name(&r.name), source, &r.secrets).await?;
        Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot_proto(&s)) })
    }

    pub(crate) async fn s3_get_snapshot(
        &self,
        id: &SnapshotId,
        secrets: &HashMap<String, String>,
    ) -> Result<S3Snapshot> {
        let ep = self.s3.endpoint_or_known(ferrovol_s3::layout::snapshot_bucket(id), secrets)?;
        self.s3.get_snapshot(id, &ep).await
    }

    /// The S3 snapshots ListSnapshots shows: the one asked for, or those the controller
    /// can see (see [`ferrovol_s3::S3Controller::list_snapshots`]). A snapshot asked for
    /// that cannot be looked for (no secrets in the request, none remembered for its
    /// bucket) cannot be found: an empty list, as CSI answers an unknown snapshot_id.
    pub(crate) async fn s3_list_snapshots(&self, r: &csi::ListSnapshotsRequest) -> Result<Vec<csi::Snapshot>> {
        if !r.snapshot_id.is_empty() {
            let Some(id) = s3_snapshot(&r.snapshot_id) else { return Ok(Vec::new()) };
            let bucket = ferrovol_s3::layout::snapshot_bucket(&id);
            if r.secrets.is_empty() && self.s3.known_endpoint(bucket).is_none() {
                tracing::debug!(snapshot = %id, bucket = %bucket, "ListSnapshots: no secrets in the request and none seen for the snapshot's bucket; answering an empty list");
                return Ok(Vec::new());
            }
            return match self.s3_get_snapshot(&id, &r.secrets).await {
                Ok(s) => Ok(vec![snapshot_proto(&s)]),
                Err(e) if e.code() == Code::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let extra = optional_endpoint(&r.secrets)?;
        Ok(self.s3.list_snapshots(extra.as_ref()).await.iter().map(snapshot_proto).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::access_mode::Mode;

    fn cap(mode: Mode, access: csi::volume_capability::AccessType) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str, group: &str) -> csi::volume_capability::AccessType {
        csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            volume_mount_group: group.into(),
            ..Default::default()
        })
    }

    #[test]
    fn s3_capabilities_are_mount_only_any_mode_any_fs_type() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
        ] {
            for fs in ["", "ext4", "xfs", "fuse.ferrovol"] {
                assert!(capability("c", &cap(mode, mount(fs, ""))).is_ok(), "{mode:?} {fs}");
            }
        }
        let block = cap(Mode::SingleNodeWriter, csi::volume_capability::AccessType::Block(Default::default()));
        let e = capability("c", &block).expect_err("block");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("s3 volumes are mount only"), "{e}");
        assert!(capability("c", &cap(Mode::SingleNodeWriter, mount("", "1000"))).is_err(), "mount group");
        let no_mode = csi::VolumeCapability { access_mode: None, access_type: Some(mount("", "")) };
        assert_eq!(capability("c", &no_mode).expect_err("mode").code(), Code::InvalidArgument);
    }

    #[test]
    fn routing_predicates() {
        assert!(is_s3_params(&HashMap::from([("type".to_string(), "s3".to_string())])));
        assert!(!is_s3_params(&HashMap::from([("type".to_string(), "loop".to_string())])));
        assert!(!is_s3_params(&HashMap::new()));
        assert!(s3_volume("s3.vol:my-bucket:pvc-1").is_some());
        assert!(s3_volume("loop.vol:node-1:pvc-1").is_none());
        assert!(s3_volume("s3.vol:my-bucket:../x").is_none());
        assert!(s3_snapshot("s3.snap:my-bucket:snap-1").is_some());
        assert!(s3_snapshot("s3.vol:my-bucket:snap-1").is_none());
    }
}
