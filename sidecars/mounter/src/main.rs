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
}

fn main() -> std::process::ExitCode {
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
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("mounter").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol-mounter: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(ferrovol_mounter::server::serve(args.socket.clone())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(socket = %args.socket.display(), error = %e, "the mounter stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
