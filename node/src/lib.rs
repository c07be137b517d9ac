//! CSI Node service and node agent of ferrovol: the loop backend, mkfs, mounts and stats.

pub mod agent;
pub mod command;
pub mod convert;
pub mod fs;
pub mod kernel;
pub mod ledger;
pub mod reconcile;
pub mod rpc;
pub mod service;
pub mod stage;
pub mod store;
pub mod sys;
