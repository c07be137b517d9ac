//! Checked domain types for volumes and snapshots: capabilities, capacity ranges, content
//! sources, and the records each backend keeps as its durable state.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One mebibyte; every size the driver hands out is a multiple of it.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// The size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: u64 = GIB;

/// A filesystem the node can make, mount and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// Parses an fs type from a parameter or capability.
    pub fn parse(s: &str, field: &'static str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(Error::UnsupportedCapability {
                reason: format!("{field} {:?} is not supported (supported: ext4, xfs)", crate::ids::printable(other)),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// The smallest volume that can hold this filesystem (xfsprogs refuses < 300 MiB).
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 16 * MIB,
            FsType::Xfs => 300 * MIB,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The access modes of the CSI spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    /// Whether the mode lets more than one node use the volume (local volumes cannot).
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly | AccessMode::MultiNodeSingleWriter | AccessMode::MultiNodeMultiWriter
        )
    }

    /// Whether the mode only allows reading.
    pub fn is_read_only(self) -> bool {
        matches!(self, AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly)
    }

    /// Whether the volume may be published at only one target path (ReadWriteOncePod).
    pub fn is_single_publisher(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }
}

/// How a workload sees the volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessType {
    /// A filesystem; `fs_type` is `None` when the CO left it to the volume's default.
    Mount { fs_type: Option<FsType>, mount_flags: Vec<String> },
    /// The raw block device.
    Block,
}

/// A checked volume capability.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

impl Capability {
    /// Whether a local (single-node) volume can give this access mode.
    pub fn check_single_node(&self) -> Result<()> {
        if self.access_mode.is_multi_node() {
            return Err(Error::UnsupportedCapability {
                reason: format!(
                    "access mode {:?} needs a multi-node volume; local volumes serve one node",
                    self.access_mode
                ),
            });
        }
        Ok(())
    }

    /// Whether a local (single-node) volume of `fs_type` can give this capability.
    pub fn check_local(&self, fs_type: FsType) -> Result<()> {
        self.check_single_node()?;
        if let AccessType::Mount { fs_type: Some(want), .. } = &self.access_type {
            if *want != fs_type {
                return Err(Error::UnsupportedCapability {
                    reason: format!("the volume's filesystem is {fs_type}, the capability asks for {want}"),
                });
            }
        }
        Ok(())
    }

    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
}

/// A checked capacity range: `required` ≤ `limit` where both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    pub required: Option<u64>,
    pub limit: Option<u64>,
}

impl CapacityRange {
    /// Checks the raw request fields (0 means unset, negative is invalid).
    pub fn from_request(required: i64, limit: i64) -> Result<Self> {
        if required < 0 || limit < 0 {
            return Err(Error::invalid("capacity_range", "required_bytes and limit_bytes must not be negative"));
        }
        let r = CapacityRange {
            required: (required > 0).then_some(required as u64),
            limit: (limit > 0).then_some(limit as u64),
        };
        if let (Some(req), Some(lim)) = (r.required, r.limit) {
            if lim < req {
                return Err(Error::CapacityOutOfRange {
                    volume: String::new(),
                    reason: format!("limit_bytes {lim} is below required_bytes {req}"),
                });
            }
        }
        Ok(r)
    }

    /// The size to provision: `required` (or the default, or at least `floor`), rounded up
    /// to whole MiB, never above `limit`.
    pub fn pick(&self, floor: u64, volume: &str) -> Result<u64> {
        let floor = floor.div_ceil(MIB).saturating_mul(MIB);
        let size = match (self.required, self.limit) {
            (Some(r), _) => r.div_ceil(MIB).saturating_mul(MIB).max(floor),
            // With only a limit, the default shrinks to fit it (rounded down to whole MiB).
            (None, Some(l)) => DEFAULT_VOLUME_BYTES.min(l / MIB * MIB).max(floor),
            (None, None) => DEFAULT_VOLUME_BYTES.max(floor),
        };
        if let Some(lim) = self.limit {
            if size > lim {
                return Err(Error::CapacityOutOfRange {
                    volume: volume.to_owned(),
                    reason: format!(
                        "the smallest size this volume can have is {size} bytes (whole MiB, at least {floor}), above limit_bytes {lim}"
                    ),
                });
            }
        }
        Ok(size)
    }

    /// Whether an existing size satisfies the range.
    pub fn admits(&self, size: u64) -> bool {
        self.required.is_none_or(|r| size >= r) && self.limit.is_none_or(|l| size <= l)
    }
}

/// What a new volume is made from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// Health of a volume as reported in `VolumeCondition`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn healthy() -> Self {
        Condition { abnormal: false, message: "volume is healthy".into() }
    }
    pub fn abnormal(message: impl Into<String>) -> Self {
        Condition { abnormal: true, message: message.into() }
    }
}

/// The durable record of one volume, kept beside its data by the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The full volume ID.
    pub id: String,
    /// The CO's name for it (the idempotency key).
    pub name: String,
    pub capacity_bytes: u64,
    pub fs_type: FsType,
    #[serde(default)]
    pub source: Option<ContentSource>,
    /// The StorageClass parameters it was created with (never secrets).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub created_unix: i64,
    /// Nodes the volume is ControllerPublished to.
    #[serde(default)]
    pub published_nodes: Vec<String>,
}

/// The durable record of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub fs_type: FsType,
    /// Seconds and nanoseconds since the Unix epoch.
    pub created_unix: i64,
    #[serde(default)]
    pub created_nanos: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn capacity_rules() {
        let r = CapacityRange::from_request(0, 0).expect("empty");
        assert_eq!(r.pick(16 * MIB, "v").expect("default"), GIB);
        let r = CapacityRange::from_request(1, 0).expect("tiny");
        assert_eq!(r.pick(16 * MIB, "v").expect("floor"), 16 * MIB);
        let r = CapacityRange::from_request((20 * MIB + 1) as i64, 0).expect("odd");
        assert_eq!(r.pick(16 * MIB, "v").expect("round"), 21 * MIB);
        let r = CapacityRange::from_request(0, (8 * MIB) as i64).expect("limit");
        assert_eq!(r.pick(16 * MIB, "v").expect_err("below floor").code(), Code::OutOfRange);
        assert_eq!(CapacityRange::from_request(10, 5).expect_err("inverted").code(), Code::OutOfRange);
        assert_eq!(CapacityRange::from_request(-1, 0).expect_err("negative").code(), Code::InvalidArgument);
        let r = CapacityRange::from_request(0, (64 * MIB) as i64).expect("limit only");
        assert_eq!(r.pick(16 * MIB, "v").expect("limit below default"), 64 * MIB);
    }

    #[test]
    fn local_volumes_refuse_multi_node_modes_and_other_fs() {
        let cap = |mode, fs| Capability {
            access_type: AccessType::Mount { fs_type: fs, mount_flags: vec![] },
            access_mode: mode,
        };
        assert!(cap(AccessMode::SingleNodeWriter, None).check_local(FsType::Ext4).is_ok());
        assert!(cap(AccessMode::MultiNodeMultiWriter, None).check_local(FsType::Ext4).is_err());
        assert!(cap(AccessMode::SingleNodeWriter, Some(FsType::Xfs)).check_local(FsType::Ext4).is_err());
    }
}
