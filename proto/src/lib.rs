//! Generated Rust types and tonic services for the CSI v1.12 wire contract (`csi.v1`) and
//! for ferrovol's internal controller-to-agent API (`ferrovol.agent.v1`).
//!
//! Nothing here is written by hand except this module wrapper: the code is generated at
//! build time from `proto/csi.proto`, whose declarations match the specification exactly,
//! and from `proto/agent.proto`.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

/// The `csi.v1` package.
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// The `ferrovol.agent.v1` package: the controller's Registry and the node agents' Agent
/// service.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("ferrovol.agent.v1");
    }
}
