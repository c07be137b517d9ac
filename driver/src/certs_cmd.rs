//! `ferrovol certs generate`: writes the CA and the controller and node certificates of the
//! split roles, and can print them as Kubernetes Secret manifests.

use std::path::PathBuf;
use std::process::ExitCode;

use ferrovol_cluster::certs::{self, GenerateOptions};

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Write ca.crt/ca.key, controller/{ca.crt,tls.crt,tls.key} and node/{...} into --out.
    Generate(GenerateArgs),
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Validity of the certificates, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// An extra DNS name or IP for the controller certificate (repeatable).
    #[arg(long = "controller-san")]
    controller_sans: Vec<String>,
    /// An extra DNS name or IP for the node certificate (repeatable).
    #[arg(long = "node-san")]
    node_sans: Vec<String>,
    /// Replace files that exist.
    #[arg(long)]
    force: bool,
    /// Also print the two Secrets (`<prefix>-controller-tls`, `<prefix>-node-tls`) as YAML.
    #[arg(long)]
    print_secret: bool,
    /// Namespace of the printed Secrets.
    #[arg(long, default_value = "ferrovol")]
    namespace: String,
    /// Name prefix of the printed Secrets.
    #[arg(long, default_value = "ferrovol")]
    secret_prefix: String,
}

pub fn execute(cmd: CertsCommand) -> ExitCode {
    match cmd {
        CertsCommand::Generate(a) => {
            let opts = GenerateOptions {
                days: a.days,
                controller_sans: a.controller_sans,
                node_sans: a.node_sans,
                force: a.force,
            };
            let generated = match certs::generate(&a.out, &opts) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("ferrovol certs generate: {e}");
                    return ExitCode::FAILURE;
                }
            };
            eprintln!(
                "wrote {} (keep ca.key offline), {} and {}",
                generated.ca_cert.display(),
                generated.controller_dir.display(),
                generated.node_dir.display()
            );
            if a.print_secret {
                match certs::secret_manifests(&a.out, &a.namespace, &a.secret_prefix) {
                    Ok(yaml) => print!("{yaml}"),
                    Err(e) => {
                        eprintln!("ferrovol certs generate: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
