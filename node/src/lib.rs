//! CSI Node service and node agents of ferrovol: the loop and LVM backends, mkfs, mounts and stats,
//! and S3 volumes through the mounter process.

pub mod agent;
pub mod command;
pub mod convert;
pub mod families;
pub mod fs;
pub mod kernel;
pub mod ledger;
pub mod lvm;
pub mod metrics;
pub mod reconcile;
pub mod rpc;
pub mod s3;
pub mod service;
pub mod stage;
pub mod store;
pub mod sys;

/// Runs `f` on `state` on tokio's blocking pool: everything the node does to the kernel and
/// the data dir is blocking syscalls, which must not stall the async workers serving gRPC.
pub(crate) async fn on_blocking_thread<S, T>(
    state: &std::sync::Arc<S>,
    who: &'static str,
    f: impl FnOnce(&S) -> ferrovol_core::Result<T> + Send + 'static,
) -> ferrovol_core::Result<T>
where
    S: Send + Sync + 'static,
    T: Send + 'static,
{
    let state = std::sync::Arc::clone(state);
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ferrovol_core::Error::system("run blocking task", who, e))?
}
