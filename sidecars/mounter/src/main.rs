//! `ferrovol-mounter`: serves mount requests from the node plugin over a unix socket and
//! holds the S3 volumes' FUSE sessions, so restarting the node plugin never breaks a mount.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The ferrovol S3 mounter.
#[derive(Debug, Parser)]
#[command(name = "ferrovol-mounter", version)]
struct Args {
    /// The unix socket the node plugin talks to (mode 0600).
    #[arg(long, default_value = "/run/ferrovol/mounter.sock")]
    socket: PathBuf,
    /// A tracing filter: error, warn, info, debug, trace, or directives.
    #[arg(long, default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The memory, MiB, that read-ahead and write buffers of all mounts together may hold.
    #[arg(long, default_value_t = (ferrovol_mounter::fs::budget::DEFAULT_BYTES >> 20) as u64)]
    buffer_budget_mib: u64,
    /// Where to serve Prometheus metrics (/metrics) and a health check (/healthz) over
    /// plain HTTP, e.g. 0.0.0.0:9809. Off when not given.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> std::process::ExitCode {
    // SAFETY: mallopt only sets a malloc tunable; it is called first thing, before any
    // other thread exists or anything is allocated through the tunable. Buffers of 256 KiB
    // and more (read chunks, write parts) are then mmapped and returned to the system when
    // freed, instead of staying in glibc's heap: that kept the peak RSS at 100-150 MiB.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let args = Args::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferrovol-mounter: --log-level {:?} is not a filter: {e}", args.log_level);
            return std::process::ExitCode::from(2);
        }
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let budget = usize::try_from(args.buffer_budget_mib.max(16).saturating_mul(1 << 20)).unwrap_or(usize::MAX >> 4);
    ferrovol_mounter::fs::budget::Budget::set_global(budget);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("mounter").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol-mounter: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(ferrovol_mounter::server::serve(args.socket.clone(), args.metrics_listen)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(socket = %args.socket.display(), error = %e, "the mounter stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
