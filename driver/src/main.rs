//! The `ferrovol` binary: `ferrovol run` serves the CSI Identity, Controller and Node
//! services (all in one process, or split into the controller and node roles);
//! `ferrovol certs` makes the certificates of the split roles; the other subcommands are an
//! operator's client for any CSI endpoint.
//! The command line is a contract: docs/CLI.md describes it and changes keep it compatible.

mod certs_cmd;
mod client;
mod endpoint;
mod identity;
mod logging;
mod metrics;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferrovol_core::ids::NodeId;

use crate::endpoint::Endpoint;

const DEFAULT_ENDPOINT: &str = "unix:///run/ferrovol/csi.sock";

#[derive(Debug, Parser)]
#[command(
    name = "ferrovol",
    version,
    about = "A CSI storage driver: loop-device volumes on a directory, with snapshots and expansion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services on one endpoint.
    Run(Box<RunArgs>),
    /// Certificates for the mutual TLS between the controller and the node agents.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Operator client commands against a running driver.
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// A role of `--roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    Controller,
    Node,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where to listen: unix:///PATH or tcp://HOST:PORT.
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: Endpoint,
    /// This node's ID (reported by NodeGetInfo and encoded in volume IDs). Default: host name.
    #[arg(long, env = "FERROVOL_NODE_ID")]
    node_id: Option<String>,
    /// Directory that holds volume images, snapshots and their records.
    #[arg(long, env = "FERROVOL_DATA_DIR", default_value = "/var/lib/ferrovol")]
    data_dir: PathBuf,
    /// CSI driver name reported by GetPluginInfo.
    #[arg(long, default_value = ferrovol_core::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Directory under which staging and target paths must lie (repeatable).
    #[arg(long = "kubelet-dir", default_value = "/var/lib/kubelet")]
    kubelet_dirs: Vec<PathBuf>,
    /// max_volumes_per_node reported by NodeGetInfo.
    #[arg(long, default_value_t = 256)]
    max_volumes: i64,
    /// An LVM volume group this node serves for `type: lvm` and `lvm-thin` volumes
    /// (repeatable). Without it the LVM family is off. StorageClasses can name only these.
    #[arg(long = "lvm-volume-group", env = "FERROVOL_LVM_VOLUME_GROUPS", value_delimiter = ',')]
    lvm_volume_groups: Vec<String>,
    /// Data or metadata use of a thin pool (percent) at which new thin volumes and
    /// snapshots are refused and its volumes are reported abnormal.
    #[arg(long, default_value_t = 90.0)]
    thin_pool_full_percent: f64,
    /// Node role: the unix socket of the S3 mounter (`ferrovol-mounter --socket`) that
    /// holds the FUSE mounts of `type: s3` volumes. Without it this node stages no S3
    /// volumes.
    #[arg(long, env = "FERROVOL_MOUNTER_SOCKET")]
    mounter_socket: Option<PathBuf>,
    /// The bound, in seconds, on every S3 call of the `s3` family (connect, attempts and
    /// retries included): an unreachable S3 server fails a call with UNAVAILABLE within it.
    #[arg(long, env = "FERROVOL_S3_TIMEOUT", default_value_t = 15.0)]
    s3_timeout: f64,
    /// Which services to run: `controller,node` (all in one process, the default),
    /// `controller` (the StatefulSet) or `node` (the DaemonSet).
    #[arg(long, env = "FERROVOL_ROLES", value_enum, value_delimiter = ',', default_value = "controller,node")]
    roles: Vec<RoleArg>,
    /// Directory holding ca.crt, tls.crt and tls.key of this role (a mounted Secret; see
    /// `ferrovol certs generate`). Required by the split roles.
    #[arg(long, env = "FERROVOL_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Split roles: where the controller's Registry (default 0.0.0.0:9470) or the node's
    /// agent service (default 0.0.0.0:9471) listens, over mutual TLS.
    #[arg(long, env = "FERROVOL_CLUSTER_LISTEN")]
    cluster_listen: Option<std::net::SocketAddr>,
    /// Node role: the controller's Registry address, IP:PORT or HOST:PORT.
    #[arg(long, env = "FERROVOL_CONTROLLER_ADDRESS")]
    controller_address: Option<String>,
    /// Node role: the IP:PORT the controller calls this node's agent on (default: the
    /// --cluster-listen address when it is not a wildcard).
    #[arg(long, env = "FERROVOL_ADVERTISE_ADDRESS")]
    advertise_address: Option<std::net::SocketAddr>,
    /// Controller role: how often node agents send a heartbeat, in seconds; a node is
    /// considered down after five missed ones.
    #[arg(long, default_value_t = 2.0)]
    heartbeat_interval: f64,
    /// Where to serve Prometheus metrics (/metrics) and a health check (/healthz) over plain
    /// HTTP, IP:PORT (e.g. 0.0.0.0:9472). Off unless given; see docs/METRICS.md.
    #[arg(long, env = "FERROVOL_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    /// Log level or tracing filter (error, warn, info, debug, trace, or e.g. "ferrovol_node=debug").
    #[arg(long, env = "FERROVOL_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrovol: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => runtime.block_on(run(*args)),
        Command::Certs(cmd) => certs_cmd::execute(cmd),
        Command::Client(cmd) => runtime.block_on(client::execute(cmd)),
    }
}

async fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = logging::init(args.log_format, &args.log_level) {
        eprintln!("ferrovol: {e}");
        return ExitCode::from(2);
    }
    let node = match args.node_id.map_or_else(host_name, Ok).and_then(|n| NodeId::parse(&n).map_err(|e| e.to_string()))
    {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let roles = match (args.roles.contains(&RoleArg::Controller), args.roles.contains(&RoleArg::Node)) {
        (true, true) => serve::Roles::AllInOne,
        (true, false) => serve::Roles::Controller,
        (false, true) => serve::Roles::Node,
        (false, false) => {
            tracing::error!("--roles names no role");
            return ExitCode::from(2);
        }
    };
    if !(args.heartbeat_interval > 0.0 && args.heartbeat_interval <= 3600.0) {
        tracing::error!("--heartbeat-interval {} is not a number of seconds from 0 to 3600", args.heartbeat_interval);
        return ExitCode::from(2);
    }
    if !(args.s3_timeout >= 1.0 && args.s3_timeout <= 3600.0) {
        tracing::error!("--s3-timeout {} is not a number of seconds from 1 to 3600", args.s3_timeout);
        return ExitCode::from(2);
    }
    let cluster = match (roles, args.tls_dir) {
        (serve::Roles::AllInOne, None) => None,
        (serve::Roles::AllInOne, Some(_)) => {
            tracing::error!("--tls-dir is for the split roles (--roles controller or --roles node); all-in-one calls its agent in-process");
            return ExitCode::from(2);
        }
        (_, None) => {
            tracing::error!("--roles controller and --roles node talk over mutual TLS: pass --tls-dir (see `ferrovol certs generate`)");
            return ExitCode::from(2);
        }
        (r, Some(tls_dir)) => Some(serve::ClusterConfig {
            tls_dir,
            listen: args.cluster_listen.unwrap_or_else(|| {
                let port = if r == serve::Roles::Controller { 9470 } else { 9471 };
                std::net::SocketAddr::from(([0, 0, 0, 0], port))
            }),
            controller_address: args.controller_address,
            advertise_address: args.advertise_address,
            heartbeat_interval: std::time::Duration::from_secs_f64(args.heartbeat_interval),
        }),
    };
    let cfg = serve::RunConfig {
        endpoint: args.endpoint,
        node_id: node,
        data_dir: args.data_dir,
        driver_name: args.driver_name,
        kubelet_dirs: args.kubelet_dirs,
        max_volumes: args.max_volumes,
        lvm_volume_groups: args.lvm_volume_groups,
        thin_pool_full_percent: args.thin_pool_full_percent,
        mounter_socket: args.mounter_socket,
        s3_timeout: std::time::Duration::from_secs_f64(args.s3_timeout),
        roles,
        cluster,
        metrics_listen: args.metrics_listen,
    };
    match serve::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn host_name() -> Result<String, String> {
    nix::unistd::gethostname()
        .map_err(|e| format!("cannot read the host name for --node-id: {e}"))?
        .into_string()
        .map_err(|_| "the host name is not UTF-8; pass --node-id".to_string())
}
