//! `ferrovol run`: serves one of three roles on the CSI endpoint, and on SIGTERM or SIGINT
//! finishes in-flight calls, removes the socket and exits 0.
//!
//! - all-in-one (the default): Identity, Controller and Node on one socket; the controller
//!   calls this node's agent in-process.
//! - `--roles controller`: Identity and Controller on the CSI endpoint, plus the Registry
//!   that node agents register with, on `--cluster-listen` over mutual TLS. No durable state.
//! - `--roles node`: Identity and Node on the CSI endpoint, plus the Agent service the
//!   controller calls, on `--cluster-listen` over mutual TLS; registers with
//!   `--controller-address` once its start-up reconcile is done.
//!
//! A node reconciles in the background (Node and agent calls answer UNAVAILABLE until it is
//! done; Probe says not ready).
//!
//! Every role also serves `/metrics` and `/healthz` on `--metrics-listen` when it is given
//! (crate::metrics).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_cluster::heartbeat;
use ferrovol_cluster::registry::{Registry, Timing};
use ferrovol_cluster::server::AgentEndpoint;
use ferrovol_cluster::tls::{role_interceptor, Role, TlsMaterial};
use ferrovol_controller::ControllerService;
use ferrovol_core::agent::NodeAgent;
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
use ferrovol_node::metrics::Metrics;
use ferrovol_node::service::NodeService;
use ferrovol_node::stage::NodeOps;
use ferrovol_node::store::LoopStore;
use ferrovol_proto::agent::v1::agent_server::AgentServer;
use ferrovol_proto::agent::v1::registry_server::RegistryServer;
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
    /// The S3 mounter's socket; `None`: this node stages no S3 volumes.
    pub mounter_socket: Option<PathBuf>,
    /// The bound on every S3 call the controller makes (`--s3-timeout`).
    pub s3_timeout: Duration,
    pub roles: Roles,
    /// The cluster settings of the split roles; `None` in all-in-one mode.
    pub cluster: Option<ClusterConfig>,
    /// Where to serve /metrics and /healthz over plain HTTP; `None` serves neither.
    pub metrics_listen: Option<SocketAddr>,
}

/// The node's S3 volumes: through the mounter when one is configured.
fn s3_node(cfg: &RunConfig) -> ferrovol_node::s3::S3Node {
    ferrovol_node::s3::S3Node::new(cfg.mounter_socket.clone(), cfg.s3_timeout)
}

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    AllInOne,
    Controller,
    Node,
}

/// Settings of the split roles.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// ca.crt, tls.crt and tls.key of this role.
    pub tls_dir: PathBuf,
    /// Where the Registry (controller) or the Agent service (node) listens.
    pub listen: SocketAddr,
    /// Node: the controller's Registry, host:port.
    pub controller_address: Option<String>,
    /// Node: the address the controller calls this agent on.
    pub advertise_address: Option<SocketAddr>,
    /// Controller: how often agents heartbeat (the lease is five of these).
    pub heartbeat_interval: Duration,
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
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("--metrics-listen {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The node side of a process: its agents, stage/publish operations and store.
struct NodeParts {
    store: LoopStore,
    ops: NodeOps,
    agent: FamilyAgents,
    lvm_agent: Option<LvmAgent>,
    /// For the metrics: the loop family's space ledger and the served LVM volume groups.
    ledger: Arc<SpaceLedger>,
    lvm_groups: Option<Arc<VolumeGroups>>,
}

fn build_node(cfg: &RunConfig) -> Result<NodeParts, StartError> {
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
        Arc::clone(&ledger),
        Arc::new(SystemRunner),
        Arc::new(SystemKernel),
        roots,
    );
    let lvm_groups = lvm_groups(cfg)?;
    let lvm_agent = match &lvm_groups {
        Some(groups) => {
            ops = ops.with_lvm(Arc::clone(groups));
            Some(LvmAgent::new(cfg.node_id.clone(), Arc::clone(groups), store.clone(), inflight))
        }
        None => None,
    };
    let agent = FamilyAgents::new(loop_agent, lvm_agent.clone());
    Ok(NodeParts { store, ops, agent, lvm_agent, ledger, lvm_groups })
}

/// Adds the node's capacity collectors to `metrics`.
fn watch_node(metrics: &mut Metrics, parts: &NodeParts) {
    metrics.watch_loop(parts.store.clone(), Arc::clone(&parts.ledger));
    if let Some(groups) = &parts.lvm_groups {
        metrics.watch_lvm(Arc::clone(groups));
    }
}

/// Starts the /metrics and /healthz endpoint when `--metrics-listen` asks for one.
async fn start_metrics<S, F>(
    cfg: &RunConfig,
    metrics: Metrics,
    ready: &Arc<AtomicBool>,
    stopped: S,
) -> Result<Option<tokio::task::JoinHandle<()>>, StartError>
where
    S: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(addr) = cfg.metrics_listen else { return Ok(None) };
    let source = crate::metrics::DriverSource { metrics, ready: Arc::clone(ready) };
    ferrovol_metrics::http::start(addr, Arc::new(source), stopped)
        .await
        .map(Some)
        .map_err(|source| StartError::Metrics { addr, source })
}

/// Reconciles the node in the background, sets `ready`, then runs `after` (registration).
fn spawn_reconcile(
    parts: &NodeParts,
    ready: Arc<AtomicBool>,
    after: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) {
    let reconcile_store = parts.store.clone();
    let reconcile_ops = parts.ops.clone();
    let lvm_agent = parts.lvm_agent.clone();
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
        ready.store(true, Ordering::Release);
        if let Some(after) = after {
            after.await;
        }
    });
}

fn gate(
    ready: &Arc<AtomicBool>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let ready = Arc::clone(ready);
    move |req: Request<()>| {
        if ready.load(Ordering::Acquire) {
            Ok(req)
        } else {
            Err(Status::unavailable("the driver is still reconciling its volumes after start-up; retry shortly"))
        }
    }
}

/// Loads and checks this role's TLS material.
fn tls_material(cluster: &ClusterConfig, role: Role) -> Result<TlsMaterial, StartError> {
    let m = TlsMaterial::load(&cluster.tls_dir).map_err(|e| StartError::Tls(e.to_string()))?;
    m.check_role(role).map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(m)
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(cfg: RunConfig) -> Result<(), StartError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let identity =
        csi::identity_server::IdentityServer::new(IdentityService::new(cfg.driver_name.clone(), Arc::clone(&ready)));
    let mut metrics = Metrics::new(env!("CARGO_PKG_VERSION"));
    // The metrics endpoint's task, joined once the gRPC servers have stopped.
    let web;
    match cfg.roles {
        Roles::AllInOne => {
            let parts = build_node(&cfg)?;
            watch_node(&mut metrics, &parts);
            web = start_metrics(&cfg, metrics, &ready, stopped.clone()).await?;
            let controller = csi::controller_server::ControllerServer::with_interceptor(
                ControllerService::new(Arc::new(parts.agent.clone())).with_s3_timeout(cfg.s3_timeout),
                gate(&ready),
            );
            let node = csi::node_server::NodeServer::with_interceptor(
                NodeService::new(parts.ops.clone(), cfg.max_volumes).with_s3(s3_node(&cfg)),
                gate(&ready),
            );
            let router = Server::builder().add_service(identity).add_service(controller).add_service(node);
            spawn_reconcile(&parts, Arc::clone(&ready), None);
            tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, data_dir = %parts.store.root().display(), driver = %cfg.driver_name, "serving");
            serve_csi(router, &cfg.endpoint, stopped()).await?;
        }
        Roles::Controller => {
            let cluster = cluster_config(&cfg)?;
            let tls = tls_material(cluster, Role::Controller)?;
            let registry =
                Registry::new(Timing::from_heartbeat(cluster.heartbeat_interval), tls.client_config(Role::Node));
            let live = registry.clone();
            metrics.gauge_fn(
                "ferrovol_cluster_nodes_registered",
                "Node agents registered with this controller whose lease has not expired",
                move || i64::try_from(live.live_nodes().len()).unwrap_or(i64::MAX),
            );
            web = start_metrics(&cfg, metrics, &ready, stopped.clone()).await?;
            let sweeper = registry.clone();
            let sweep_every = cluster.heartbeat_interval;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(sweep_every).await;
                    sweeper.expire();
                }
            });
            ready.store(true, Ordering::Release);
            let controller = csi::controller_server::ControllerServer::new(
                ControllerService::with_directory(Arc::new(registry.clone())).with_s3_timeout(cfg.s3_timeout),
            );
            let router = Server::builder().add_service(identity).add_service(controller);
            let listener = TcpListener::bind(cluster.listen)
                .await
                .map_err(|e| StartError::Cluster(format!("--cluster-listen {}: {e}", cluster.listen)))?;
            let registry_server = Server::builder()
                .tls_config(tls.server_config())?
                .add_service(RegistryServer::with_interceptor(registry.grpc(), role_interceptor(Role::Node)))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped());
            tracing::info!(endpoint = %cfg.endpoint, cluster = %cluster.listen, driver = %cfg.driver_name, "serving the controller role");
            // Either server failing (the socket in use, say) stops the process at once.
            tokio::try_join!(serve_csi(router, &cfg.endpoint, stopped()), async {
                registry_server.await.map_err(StartError::from)
            })?;
        }
        Roles::Node => {
            let cluster = cluster_config(&cfg)?;
            let tls = tls_material(cluster, Role::Node)?;
            let controller_address = cluster
                .controller_address
                .clone()
                .ok_or_else(|| StartError::Cluster("--roles node needs --controller-address".into()))?;
            let advertise = match cluster.advertise_address {
                Some(a) => a,
                None if !cluster.listen.ip().is_unspecified() => cluster.listen,
                None => {
                    return Err(StartError::Cluster(format!(
                        "--cluster-listen {} does not say which address the controller should call; set \
                         --advertise-address (in Kubernetes: the pod IP from the downward API)",
                        cluster.listen
                    )))
                }
            };
            let parts = build_node(&cfg)?;
            watch_node(&mut metrics, &parts);
            web = start_metrics(&cfg, metrics, &ready, stopped.clone()).await?;
            let node = csi::node_server::NodeServer::with_interceptor(
                NodeService::new(parts.ops.clone(), cfg.max_volumes).with_s3(s3_node(&cfg)),
                gate(&ready),
            );
            let router = Server::builder().add_service(identity).add_service(node);
            let agent: Arc<dyn NodeAgent> = Arc::new(parts.agent.clone());
            let endpoint = AgentEndpoint::new(Arc::clone(&agent), Arc::clone(&ready));
            let listener = TcpListener::bind(cluster.listen)
                .await
                .map_err(|e| StartError::Cluster(format!("--cluster-listen {}: {e}", cluster.listen)))?;
            let agent_server = Server::builder()
                .tls_config(tls.server_config())?
                .add_service(AgentServer::with_interceptor(endpoint, role_interceptor(Role::Controller)))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped());
            let channel = heartbeat::channel(&controller_address, tls.client_config(Role::Controller))
                .map_err(StartError::Cluster)?;
            let mut families = vec!["loop".to_string()];
            if parts.lvm_agent.is_some() {
                families.push("lvm".into());
            }
            let me = heartbeat::Announcement {
                node_id: cfg.node_id.to_string(),
                address: advertise.to_string(),
                topology: std::collections::HashMap::from([(
                    ferrovol_core::TOPOLOGY_NODE_KEY.to_string(),
                    cfg.node_id.to_string(),
                )]),
                families,
            };
            let stop_heartbeat = stopped();
            spawn_reconcile(
                &parts,
                Arc::clone(&ready),
                Some(Box::pin(async move {
                    tokio::select! {
                        () = heartbeat::run(channel, me, agent) => {}
                        () = stop_heartbeat => {}
                    }
                })),
            );
            tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, cluster = %cluster.listen, advertise = %advertise, controller = %controller_address, data_dir = %parts.store.root().display(), driver = %cfg.driver_name, "serving the node role");
            // Either server failing (the socket in use, say) stops the process at once.
            tokio::try_join!(serve_csi(router, &cfg.endpoint, stopped()), async {
                agent_server.await.map_err(StartError::from)
            })?;
        }
    }
    if let Some(web) = web {
        let _ = web.await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn cluster_config(cfg: &RunConfig) -> Result<&ClusterConfig, StartError> {
    cfg.cluster.as_ref().ok_or_else(|| StartError::Cluster("the split roles need --tls-dir".into()))
}

/// Serves the CSI services on the endpoint until `stop`.
async fn serve_csi(
    router: tonic::transport::server::Router,
    endpoint: &Endpoint,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let listener =
                bind_unix(path).map_err(|reason| StartError::Endpoint { endpoint: endpoint.to_string(), reason })?;
            let result = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop).await;
            let _ = std::fs::remove_file(path);
            result?;
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Endpoint { endpoint: endpoint.to_string(), reason: e.to_string() })?;
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop).await?;
        }
    }
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
