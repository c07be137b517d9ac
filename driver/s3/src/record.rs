//! The records kept beside a volume's and a snapshot's objects (decision 4: state lives in
//! the resource). The controller writes them; the mounter reads a volume's quota from its
//! record at mount time and when NodeExpandVolume asks it to look again.

use std::collections::BTreeMap;

/// The record format version written now.
pub const VERSION: u32 = 1;

/// Where a volume's lifecycle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Content is still being copied in (a restore or a clone); a crash leaves it here.
    Creating,
    Ready,
    /// DeleteVolume has begun removing objects; a repeat resumes it.
    Deleting,
}

/// `ferrovol/volumes/<local>/volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3VolumeRecord {
    pub version: u32,
    /// The CO's name (the idempotency key).
    pub name: String,
    /// The volume's ID.
    pub id: String,
    /// The quota: the bytes the volume's files may hold.
    pub capacity_bytes: u64,
    /// Whether the bucket was made for this volume (and is removed with it).
    pub own_bucket: bool,
    pub state: VolumeState,
    /// The snapshot or volume ID it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The parameters that decide what the volume is (orchestrator keys left out).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    pub created_unix: i64,
}

/// `ferrovol/snapshots/<local>/snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3SnapshotRecord {
    pub version: u32,
    pub name: String,
    pub id: String,
    pub source_volume_id: String,
    /// Bytes of the copied objects.
    pub size_bytes: u64,
    /// False while the copy runs; a crash leaves it false, and a repeat starts it over.
    pub ready: bool,
    pub created_unix: i64,
    pub created_nanos: i32,
}

/// `ferrovol/bucket.json`: marks a bucket the driver made for one volume of its own. Only a
/// bucket holding it is ever removed by the driver, and only when nothing but it remains.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketMarker {
    pub version: u32,
    /// The CO's name of the volume the bucket was made for.
    pub name: String,
    /// That volume's ID.
    pub volume_id: String,
    pub created_unix: i64,
}

/// `ferrovol/volumes/<local>/published/<node>`: the volume is ControllerPublished to
/// `<node>`. Markers written before they had a body are empty.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishMarker {
    pub version: u32,
    /// Published read-only (ControllerPublishVolume's `readonly`).
    pub readonly: bool,
}
