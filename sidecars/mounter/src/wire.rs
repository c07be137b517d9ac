//! The node plugin ↔ mounter protocol: one JSON request and one JSON answer per line over
//! the mounter's unix socket (mode 0600, root only). Requests carry S3 credentials, so no
//! type here derives a `Debug` that prints them (see `S3Endpoint`).

use std::path::PathBuf;

use ferrovol_core::error::Code;
use ferrovol_s3::S3Endpoint;

/// The protocol version; a mounter answers requests of other versions with an error.
pub const PROTOCOL_VERSION: u32 = 1;

/// What to mount where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    /// The volume's ID (for messages and `fsname`).
    pub volume_id: String,
    /// An existing, empty directory: the staging path.
    pub target: PathBuf,
    pub endpoint: S3Endpoint,
    pub bucket: String,
    /// The prefix the filesystem shows as `/` (`ferrovol_s3::layout::volume_data_prefix`).
    pub data_prefix: String,
    /// The volume's record, read at mount and on `RefreshQuota` for the quota.
    pub record_key: String,
    pub read_only: bool,
    /// Owner and modes every file and directory shows.
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// The bound on any one S3 call, in seconds: past it an operation fails with EIO.
    pub timeout_secs: u64,
}

/// A request to the mounter.
// One request per connection: the size of a Mount is of no consequence, and boxing it would
// change the type the node plugin builds.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Mounts; a repeat for the same volume at the same target with the same spec is OK.
    Mount { spec: MountSpec },
    /// Unmounts; nothing mounted there is OK.
    Unmount { target: PathBuf },
    /// Usage and health of the mount at `target`.
    Stats { target: PathBuf },
    /// Reads the quota from the volume's record again (after an expansion).
    RefreshQuota { target: PathBuf },
    /// Every mount this mounter holds.
    List,
}

/// A request as sent: with its protocol version.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub version: u32,
    #[serde(flatten)]
    pub request: Request,
}

/// Usage and health of one mount.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountStats {
    pub volume_id: String,
    pub target: PathBuf,
    /// Bytes the volume's files hold now.
    pub used_bytes: u64,
    /// The quota.
    pub quota_bytes: u64,
    /// Files and directories.
    pub inodes: u64,
    /// False when the last S3 calls failed (server unreachable, credentials refused).
    pub healthy: bool,
    /// Why not healthy, or empty.
    pub message: String,
}

/// The mounter's answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Stats {
        stats: MountStats,
    },
    Quota {
        quota_bytes: u64,
    },
    Mounts {
        mounts: Vec<MountStats>,
    },
    /// A failure with the gRPC code the node plugin should answer with.
    Error {
        code: Code,
        message: String,
    },
}
