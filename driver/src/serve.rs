//! `ferrovol run`: opens the data dir, binds the endpoint, serves Identity, Controller and
//! Node on one socket, reconciles in the background (Controller and Node calls answer
//! UNAVAILABLE until it is done; Probe says not ready), and on SIGTERM or SIGINT finishes
//! in-flight calls, removes the socket and exits 0.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrovol_controller::ControllerService;
use ferrovol_core::guard::InFlight;
use ferrovol_core::ids::NodeId;
use ferrovol_node::agent::LoopAgent;
use ferrovol_node::command::SystemRunner;
use ferrovol_node::families::FamilyAgents;
use ferrovol_node::kernel::SystemKernel;
use ferrovol_node::ledger::SpaceLedger;
use ferrovol_node::lvm::agent::LvmAgent;
use ferrovol_node::lvm::cli::LvmCli;
use ferrovol_node::lvm::groups::VolumeGroups;
use ferrovol_node::lvm::names::VgName;
use ferrovol_node::lvm::tags;
use ferrovol_node::service::NodeService;
use ferrovol_node::stage::NodeOps;
use ferrovol_node::store::LoopStore;
use ferrovol_proto::csi::v1 as csi;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::endpoint::Endpoint;
use crate::identity::IdentityService;

/// Everything `ferrovol run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub endpoint: Endpoint,
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub driver_name: String,
    pub kubelet_dirs: Vec<PathBuf>,
    pub max_volumes: i64,
    /// LVM volume groups served; empty turns the LVM family off.
    pub lvm_volume_groups: Vec<String>,
    pub thin_pool_full_percent: f64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir { path: String, source: io::Error },
    #[error("kubelet dir {path}: {source}")]
    KubeletDir { path: String, source: io::Error },
    #[error("LVM: {0}")]
    Lvm(String),
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig) -> Result<(), StartError> {
    let store = LoopStore::open(&cfg.data_dir)
        .map_err(|source| StartError::DataDir { path: cfg.data_dir.display().to_string(), source })?;
    let mut roots = Vec::new();
    for d in &cfg.kubelet_dirs {
        std::fs::create_dir_all(d)
            .map_err(|source| StartError::KubeletDir { path: d.display().to_string(), source })?;
        roots
            .push(d.canonicalize().map_err(|source| StartError::KubeletDir { path: d.display().to_string(), source })?);
    }
    let inflight = InFlight::default();
    let ledger = Arc::new(SpaceLedger::default());
    let loop_agent = LoopAgent::new(cfg.node_id.clone(), store.clone(), inflight.clone(), Arc::clone(&ledger));
    let mut ops = NodeOps::new(
        cfg.node_id.clone(),
        store.clone(),
        inflight.clone(),
        ledger,
        Arc::new(SystemRunner),
        Arc::new(SystemKernel),
        roots,
    );
    let lvm_agent = match lvm_groups(&cfg)? {
        Some(groups) => {
            ops = ops.with_lvm(Arc::clone(&groups));
            Some(LvmAgent::new(cfg.node_id.clone(), groups, store.clone(), inflight))
        }
        None => None,
    };
    let agent = FamilyAgents::new(loop_agent, lvm_agent.clone());

    let ready = Arc::new(AtomicBool::new(false));
    let identity = IdentityService::new(cfg.driver_name.clone(), Arc::clone(&ready));
    let gate = {
        let ready = Arc::clone(&ready);
        move |req: Request<()>| {
            if ready.load(Ordering::Acquire) {
                Ok(req)
            } else {
                Err(Status::unavailable("the driver is still reconciling its volumes after start-up; retry shortly"))
            }
        }
    };
    let controller = csi::controller_server::ControllerServer::with_interceptor(
        ControllerService::new(Arc::new(agent)),
        gate.clone(),
    );
    let node = csi::node_server::NodeServer::with_interceptor(NodeService::new(ops.clone(), cfg.max_volumes), gate);
    let router = Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(identity))
        .add_service(controller)
        .add_service(node);

    let reconcile_store = store.clone();
    let reconcile_ready = Arc::clone(&ready);
    let reconcile_ops = ops.clone();
    tokio::spawn(async move {
        if let Some(lvm) = lvm_agent {
            match lvm.clean_up_debris().await {
                Ok(notes) => notes.iter().for_each(|n| tracing::warn!("LVM clean-up: {n}")),
                Err(e) => tracing::error!("LVM clean-up failed: {e}"),
            }
            for note in reconcile_ops.restage_lvm().await {
                tracing::info!("LVM reconcile: {note}");
            }
        }
        let report = tokio::task::spawn_blocking(move || ferrovol_node::reconcile::run(&reconcile_store)).await;
        if let Ok(r) = report {
            tracing::info!(
                detached = r.detached.len(),
                reattached = r.reattached.len(),
                remounted = r.remounted.len(),
                thawed = r.thawed.len(),
                problems = r.problems.len(),
                "start-up reconcile done"
            );
        }
        reconcile_ready.store(true, Ordering::Release);
    });

    tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, data_dir = %store.root().display(), driver = %cfg.driver_name, "serving");
    match &cfg.endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)
                .map_err(|reason| StartError::Endpoint { endpoint: cfg.endpoint.to_string(), reason })?;
            let result =
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal()).await;
            let _ = std::fs::remove_file(path);
            result?;
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Endpoint { endpoint: cfg.endpoint.to_string(), reason: e.to_string() })?;
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal()).await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// The LVM volume groups of `--lvm-volume-group`, checked; `None` when none are served.
fn lvm_groups(cfg: &RunConfig) -> Result<Option<Arc<VolumeGroups>>, StartError> {
    if cfg.lvm_volume_groups.is_empty() {
        return Ok(None);
    }
    if !tags::is_tag_safe(&cfg.driver_name) || !tags::is_tag_safe(cfg.node_id.as_str()) {
        return Err(StartError::Lvm(format!(
            "the driver name {:?} and node ID {} must be usable in LVM tags ([A-Za-z0-9_+.-/=!:#&])",
            cfg.driver_name, cfg.node_id
        )));
    }
    if !(1.0..=100.0).contains(&cfg.thin_pool_full_percent) {
        return Err(StartError::Lvm(format!(
            "--thin-pool-full-percent {} is not a percentage from 1 to 100",
            cfg.thin_pool_full_percent
        )));
    }
    let mut vgs = Vec::new();
    for name in &cfg.lvm_volume_groups {
        let vg = VgName::parse(name).map_err(|e| StartError::Lvm(format!("--lvm-volume-group {name:?}: {e}")))?;
        if !vgs.contains(&vg) {
            vgs.push(vg);
        }
    }
    let cli = LvmCli::new(Arc::new(SystemRunner));
    let owner = tags::Owner { driver: cfg.driver_name.clone(), node: cfg.node_id.to_string() };
    Ok(Some(Arc::new(VolumeGroups::new(cli, owner, vgs, cfg.thin_pool_full_percent))))
}

/// Binds a unix socket, replacing a stale socket file left by a crash but never a live one
/// or a file that is not a socket.
fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("{} is in use by a running server", path.display()));
            }
            std::fs::remove_file(path).map_err(|e| format!("removing stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => return Err(format!("{} exists and is not a socket; refusing to replace it", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    // Only root (the kubelet, the sidecars in the pod) may talk to the driver.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can only be killed; serve until then.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight calls"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight calls"),
    }
}
