//! The S3 mounter: our FUSE filesystem over S3 and the process that holds its sessions.
pub mod wire;
