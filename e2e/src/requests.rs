//! Builders for CSI requests as Kubernetes' sidecars and kubelet send them.

use std::collections::HashMap;
use std::path::Path;

use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use crate::csi::{
    volume_content_source, CapacityRange, ControllerExpandVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest,
    DeleteVolumeRequest, NodeExpandVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, TopologyRequirement, Volume,
    VolumeCapability, VolumeContentSource,
};
use crate::family::{Family, FsType};

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// How a workload uses a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Mount(FsType),
    Block,
}

impl Access {
    pub fn is_block(self) -> bool {
        matches!(self, Access::Block)
    }

    /// A small size for this access type in `family`.
    pub fn small_bytes(self, family: &Family) -> i64 {
        match self {
            Access::Mount(fs) => fs.small_bytes(),
            Access::Block => family.block_minimum_bytes.max(32 * MIB),
        }
    }

    /// A short label for names (`ext4`, `xfs`, `block`).
    pub fn label(self) -> &'static str {
        match self {
            Access::Mount(fs) => fs.name(),
            Access::Block => "block",
        }
    }
}

/// The access types `family` supports: each filesystem in mount, then block.
pub fn accesses(family: &Family) -> Vec<Access> {
    let mut all: Vec<Access> = family.fs_types.iter().map(|fs| Access::Mount(*fs)).collect();
    if family.block {
        all.push(Access::Block);
    }
    all
}

pub fn access_mode(mode: Mode) -> Option<AccessMode> {
    Some(AccessMode { mode: mode as i32 })
}

/// A mount capability with a raw `fs_type` (empty means unspecified).
pub fn mount_capability(fs_type: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: access_mode(mode),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability { access_mode: access_mode(mode), access_type: Some(AccessType::Block(BlockVolume {})) }
}

pub fn capability(access: Access, mode: Mode) -> VolumeCapability {
    match access {
        Access::Mount(fs) => mount_capability(fs.name(), mode),
        Access::Block => block_capability(mode),
    }
}

pub fn range(required_bytes: i64, limit_bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange { required_bytes, limit_bytes })
}

pub fn snapshot_source(snapshot_id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: snapshot_id.to_owned(),
        })),
    })
}

pub fn volume_source(volume_id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: volume_id.to_owned(),
        })),
    })
}

/// The StorageClass parameters for `access` in `family` (with `fsType` for mounts).
pub fn parameters(family: &Family, access: Access) -> HashMap<String, String> {
    let mut parameters = family.parameters.clone();
    if let Access::Mount(fs) = access {
        parameters.insert("fsType".to_owned(), fs.name().to_owned());
    }
    parameters
}

/// A CreateVolume request as external-provisioner sends it: one capability
/// (SINGLE_NODE_WRITER), the family's parameters plus the orchestrator's own keys.
///
/// For a split family the request is pinned to the focus node, as Kubernetes pins a
/// WaitForFirstConsumer claim to the selected node (requisite = preferred = that node);
/// a scenario that sets its own `accessibility_requirements` replaces the pin.
pub fn create_request(family: &Family, name: &str, access: Access, required_bytes: i64) -> CreateVolumeRequest {
    let mut parameters = parameters(family, access);
    parameters.insert("csi.storage.k8s.io/pvc/name".to_owned(), format!("{name}-claim"));
    parameters.insert("csi.storage.k8s.io/pvc/namespace".to_owned(), "e2e".to_owned());
    parameters.insert("csi.storage.k8s.io/pv/name".to_owned(), name.to_owned());
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: range(required_bytes, 0),
        volume_capabilities: vec![capability(access, Mode::SingleNodeWriter)],
        parameters,
        accessibility_requirements: family
            .pinned_topology()
            .map(|segment| TopologyRequirement { requisite: vec![segment.clone()], preferred: vec![segment] }),
        ..Default::default()
    }
}

/// A provisioned volume and how the test uses it.
#[derive(Clone, Debug)]
pub struct Vol {
    pub id: String,
    pub capacity: i64,
    pub context: HashMap<String, String>,
    pub capability: VolumeCapability,
    pub access: Access,
    /// From ControllerPublishVolume, passed to NodeStage/NodePublish as kubelet does.
    pub publish_context: HashMap<String, String>,
    /// The volume as CreateVolume answered it.
    pub volume: Volume,
}

impl Vol {
    pub fn new(volume: &Volume, access: Access, mode: Mode) -> Vol {
        Vol {
            id: volume.volume_id.clone(),
            capacity: volume.capacity_bytes,
            context: volume.volume_context.clone(),
            capability: capability(access, mode),
            access,
            publish_context: HashMap::new(),
            volume: volume.clone(),
        }
    }

    pub fn delete_request(&self) -> DeleteVolumeRequest {
        DeleteVolumeRequest { volume_id: self.id.clone(), secrets: HashMap::new() }
    }

    pub fn controller_publish_request(&self, node_id: &str) -> ControllerPublishVolumeRequest {
        ControllerPublishVolumeRequest {
            volume_id: self.id.clone(),
            node_id: node_id.to_owned(),
            volume_capability: Some(self.capability.clone()),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: self.context.clone(),
        }
    }

    pub fn controller_unpublish_request(&self, node_id: &str) -> ControllerUnpublishVolumeRequest {
        ControllerUnpublishVolumeRequest {
            volume_id: self.id.clone(),
            node_id: node_id.to_owned(),
            secrets: HashMap::new(),
        }
    }

    pub fn stage_request(&self, staging: &Path) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: self.id.clone(),
            publish_context: self.publish_context.clone(),
            staging_target_path: path_string(staging),
            volume_capability: Some(self.capability.clone()),
            secrets: HashMap::new(),
            volume_context: self.context.clone(),
        }
    }

    pub fn unstage_request(&self, staging: &Path) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest { volume_id: self.id.clone(), staging_target_path: path_string(staging) }
    }

    pub fn publish_request(&self, staging: &Path, target: &Path, readonly: bool) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: self.id.clone(),
            publish_context: self.publish_context.clone(),
            staging_target_path: path_string(staging),
            target_path: path_string(target),
            volume_capability: Some(self.capability.clone()),
            readonly,
            secrets: HashMap::new(),
            volume_context: self.context.clone(),
        }
    }

    pub fn unpublish_request(&self, target: &Path) -> NodeUnpublishVolumeRequest {
        NodeUnpublishVolumeRequest { volume_id: self.id.clone(), target_path: path_string(target) }
    }

    pub fn stats_request(&self, volume_path: &Path, staging: &Path) -> NodeGetVolumeStatsRequest {
        NodeGetVolumeStatsRequest {
            volume_id: self.id.clone(),
            volume_path: path_string(volume_path),
            staging_target_path: path_string(staging),
        }
    }

    pub fn controller_expand_request(&self, required_bytes: i64) -> ControllerExpandVolumeRequest {
        ControllerExpandVolumeRequest {
            volume_id: self.id.clone(),
            capacity_range: range(required_bytes, 0),
            secrets: HashMap::new(),
            volume_capability: Some(self.capability.clone()),
        }
    }

    pub fn node_expand_request(
        &self,
        volume_path: &Path,
        staging: &Path,
        required_bytes: i64,
    ) -> NodeExpandVolumeRequest {
        NodeExpandVolumeRequest {
            volume_id: self.id.clone(),
            volume_path: path_string(volume_path),
            capacity_range: range(required_bytes, 0),
            staging_target_path: path_string(staging),
            volume_capability: Some(self.capability.clone()),
            secrets: HashMap::new(),
        }
    }

    pub fn snapshot_request(&self, name: &str) -> CreateSnapshotRequest {
        CreateSnapshotRequest {
            source_volume_id: self.id.clone(),
            name: name.to_owned(),
            secrets: HashMap::new(),
            parameters: HashMap::new(),
        }
    }
}

pub fn delete_snapshot_request(snapshot_id: &str) -> DeleteSnapshotRequest {
    DeleteSnapshotRequest { snapshot_id: snapshot_id.to_owned(), secrets: HashMap::new() }
}

/// A path as the string the CSI messages carry.
pub fn path_string(path: &Path) -> String {
    path.to_str().unwrap_or_else(|| panic!("non-UTF-8 path {}", path.display())).to_owned()
}

/// A name no other test uses: external-provisioner style `pvc-<...>`.
pub fn unique_name(prefix: &str, label: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{label}-{}-{n}", std::process::id())
}
