//! Protocol-free core of ferrovol, shared by every role: checked domain types, the error
//! type with its gRPC code mapping, per-volume in-flight guards, secret redaction, and the
//! node-agent seam through which the controller reaches node-local storage.
//!
//! Nothing here knows protobuf; the tonic adapters in `controller/` and `node/` convert
//! requests into these types and back.

pub mod agent;
pub mod error;
pub mod guard;
pub mod ids;
pub mod params;
pub mod redact;
pub mod volume;

#[cfg(feature = "tonic")]
mod status;

pub use error::{Error, Result};

/// The topology key under which every local volume and node reports its node.
pub const TOPOLOGY_NODE_KEY: &str = "topology.ferrovol.dev/node";

/// The default CSI driver name.
pub const DEFAULT_DRIVER_NAME: &str = "csi.ferrovol.dev";
