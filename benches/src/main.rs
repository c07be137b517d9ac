//! `ferrovol-bench`: starts the real release `ferrovol` binary and measures volume lifecycle
//! latency, concurrent provisioning, data-path throughput, start-up time and idle memory, each
//! against the raw operation it wraps in the same run, the split controller and node roles
//! against all-in-one, and the S3 mounter against raw S3 calls. Prints a text report, optionally JSON.
//!
//! Needs root (loop devices and mounts). Everything it makes lives under fresh directories of
//! its own and is taken down on every path; see `sandbox`.

mod cluster;
mod concurrency;
mod datapath;
mod driver;
mod lifecycle;
mod lvm;
mod raw;
mod report;
mod s3;
mod sandbox;
mod startup;
mod stats;

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use clap::{Parser, ValueEnum};

use report::{keep, Machine, Report};

/// Errors are sentences for the person running the bench.
pub type Result<T, E = String> = std::result::Result<T, E>;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    Lifecycle,
    Concurrency,
    Datapath,
    Startup,
    /// The LVM family (needs device-mapper and --lvm-device: run it in the test VM).
    Lvm,
    /// The split roles (controller + node agent over mTLS) against all-in-one.
    Cluster,
    /// The S3 mounter against raw aws-sdk-s3 calls, on a garage server ($FERROVOL_GARAGE).
    S3,
}

#[derive(Debug, Parser)]
#[command(name = "ferrovol-bench", about = "Benchmarks of the ferrovol driver against the raw operations it wraps")]
struct Cli {
    /// Repetitions of every benchmark [default: lifecycle 30, concurrency 5, datapath 3, startup 10,
    /// cluster 30 (controller restarts: at most 5), s3 3 for the 1 GiB reads and writes and 5 for
    /// the others].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Benchmarks to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lifecycle,concurrency,datapath,startup,cluster")]
    only: Vec<Bench>,
    /// Directory for the scratch directories; the driver's data dir is made here, so this is
    /// the filesystem the data-path benchmark compares against.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Volumes created and staged at once in benchmark 2.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    concurrency: u32,
    /// CPU sets (`taskset -c` lists) to pin the driver to in benchmark 2; the scaling factor
    /// compares the last with the first.
    #[arg(long = "cpus", default_values = ["0", "0,1"])]
    cpu_sets: Vec<String>,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    fio_runtime: u32,
    /// fio file size.
    #[arg(long, default_value = "512M")]
    fio_size: String,
    /// Scratch block device for the lvm benchmark: its content is destroyed.
    #[arg(long)]
    lvm_device: Option<String>,
    /// Volumes created at once in the lvm benchmark.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    lvm_concurrency: u32,
}

/// What every benchmark needs to know.
#[derive(Debug)]
pub struct Config {
    pub bin: PathBuf,
    pub work_dir: PathBuf,
    pub concurrency: usize,
    pub cpu_sets: Vec<String>,
    pub fio_runtime: u32,
    pub fio_size: String,
    pub lvm_device: Option<String>,
    pub lvm_concurrency: usize,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Prints a progress line to stderr and samples how busy the machine is; fails once Ctrl-C
/// was pressed, so the benchmark stops at its next step and its guards take everything down.
pub fn progress(what: &str) -> Result<()> {
    let elapsed = START.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
    eprintln!("[{elapsed:7.1}s] {what}");
    report::sample_busy();
    interrupted()
}

/// Fails once Ctrl-C was pressed.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("ferrovol-bench: run as root (loop devices and mounts need it)");
        return ExitCode::FAILURE;
    }
    let bin = match driver::binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ferrovol-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // panic = "abort" in release: drops do not run, so the hook takes everything down itself.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        driver::kill_all_running();
        s3::kill_all();
        sandbox::sweep_all_live();
        default_hook(info);
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrovol-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "ferrovol-bench: interrupted; stopping at the next step and cleaning up (Ctrl-C again to force)"
                );
                INTERRUPTED.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    driver::kill_all_running();
                    s3::kill_all();
                    sandbox::sweep_all_live();
                    std::process::exit(130);
                }
            }
        });
        run(cli, bin).await
    })
}

async fn run(cli: Cli, bin: PathBuf) -> ExitCode {
    let started = *START.get_or_init(Instant::now);
    let reps = |default: u32| cli.reps.unwrap_or(default) as usize;
    let cfg = Config {
        bin: bin.clone(),
        work_dir: cli.work_dir.clone(),
        concurrency: cli.concurrency as usize,
        cpu_sets: cli.cpu_sets.clone(),
        fio_runtime: cli.fio_runtime,
        fio_size: cli.fio_size.clone(),
        lvm_device: cli.lvm_device.clone(),
        lvm_concurrency: cli.lvm_concurrency as usize,
    };
    let mut machine = Machine::before(&bin);
    eprintln!(
        "ferrovol-bench: driver {} ({}), load average {}",
        machine.driver, machine.driver_version, machine.loadavg_before
    );

    let wanted = |b: Bench| cli.only.contains(&b) && interrupted().is_ok();
    let mut report = Report::default();
    if wanted(Bench::Lifecycle) {
        report.lifecycle = keep(lifecycle::run(&cfg, reps(30)).await, "lifecycle");
    }
    if wanted(Bench::Concurrency) {
        report.concurrency = keep(concurrency::run(&cfg, reps(5)).await, "concurrency");
    }
    if wanted(Bench::Datapath) {
        report.datapath = keep(datapath::run(&cfg, reps(3)).await, "datapath");
    }
    if wanted(Bench::Startup) {
        report.startup = keep(startup::run(&cfg, reps(10)).await, "startup");
    }
    if wanted(Bench::Lvm) {
        report.lvm = keep(lvm::run(&cfg, reps(10)).await, "lvm");
    }
    if wanted(Bench::Cluster) {
        report.cluster = keep(cluster::run(&cfg, reps(30)).await, "cluster");
    }
    if wanted(Bench::S3) {
        report.s3 = keep(s3::run(&cfg, reps(3), reps(5)).await, "s3");
    }
    machine.after(started);
    report.machine = machine;
    report.problems = report::problems();

    println!("{}", report::render(&report));
    if let Some(path) = &cli.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|j| std::fs::write(path, j + "\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("ferrovol-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.problems.is_empty() && !INTERRUPTED.load(Ordering::Relaxed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
