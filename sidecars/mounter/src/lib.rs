//! The S3 mounter: our FUSE filesystem over S3 and the process that holds its sessions.
pub mod client;
pub mod fs;
pub mod fuse;
pub mod metrics;
pub mod mountinfo;
pub mod server;
pub mod wire;
