//! CSI Controller service of ferrovol: provisioning, snapshots, expansion and capacity.
//! It checks requests and routes each to the node agent that owns the volume (the volume ID
//! names the node); the agent does the node-local work.

mod page;
mod placement;
mod s3;
pub mod service;

pub use service::ControllerService;
