//! The run's results as a whole: facts about the machine and how busy it was, each
//! benchmark's report, and the problems met; rendered as text and serialised as JSON.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::{concurrency, datapath, lifecycle, raw, sandbox, startup, Result};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub lifecycle: Option<lifecycle::Report>,
    pub concurrency: Option<concurrency::Report>,
    pub datapath: Option<datapath::Report>,
    pub startup: Option<startup::Report>,
    pub lvm: Option<crate::lvm::Report>,
    pub cluster: Option<crate::cluster::Report>,
    pub s3: Option<crate::s3::Report>,
    /// Benchmarks that failed, and anything a sweep had to take down after a benchmark.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub driver: String,
    pub driver_version: String,
    pub fio_version: String,
    pub kernel: String,
    pub cpus: usize,
    pub started_unix: u64,
    pub duration_s: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// Sampled at every progress line. The bench itself accounts for about 1 to 2 of it.
    pub busy: Busy,
}

/// How busy the machine was while the bench ran, beyond the bench itself.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Busy {
    pub max_loadavg_1m: f64,
    /// The most compiler processes (rustc, cc1, ld) seen at once: other builds skew timings.
    pub max_compilers: usize,
}

static PROBLEMS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static BUSY: Mutex<Busy> = Mutex::new(Busy { max_loadavg_1m: 0.0, max_compilers: 0 });

impl Machine {
    /// Facts known before the first benchmark.
    pub fn before(bin: &Path) -> Machine {
        sample_busy();
        Machine {
            driver: bin.display().to_string(),
            driver_version: first_line(raw::run(&bin.to_string_lossy(), &["--version"])),
            fio_version: first_line(raw::run("fio", &["--version"])),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            loadavg_before: loadavg(),
            ..Machine::default()
        }
    }

    /// Adds what is known after the last benchmark.
    pub fn after(&mut self, started: Instant) {
        sample_busy();
        self.duration_s = started.elapsed().as_secs_f64();
        self.loadavg_after = loadavg();
        self.busy = *BUSY.lock().unwrap_or_else(|p| p.into_inner());
    }
}

/// Notes the load average and the number of compilers running now.
pub fn sample_busy() {
    let load: f64 = loadavg().split(' ').next().and_then(|l| l.parse().ok()).unwrap_or(0.0);
    let compilers = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .filter(|c| matches!(c.trim(), "rustc" | "cc1" | "cc1plus" | "ld" | "rust-lld" | "ld.lld"))
                .count()
        })
        .unwrap_or(0);
    let mut b = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    b.max_loadavg_1m = b.max_loadavg_1m.max(load);
    b.max_compilers = b.max_compilers.max(compilers);
}

/// Records a problem for the report.
pub fn problem(what: String) {
    eprintln!("ferrovol-bench: {what}");
    PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()).push(what);
}

pub fn problems() -> Vec<String> {
    PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Keeps a benchmark's report, or records why it failed.
pub fn keep<T>(r: Result<T>, name: &str) -> Option<T> {
    r.map_err(|e| problem(format!("benchmark {name} failed: {e}"))).ok()
}

/// Sweeps a sandbox at the end of a benchmark: anything found there was left behind by the
/// driver or the bench, which is worth a line in the report.
pub fn check_clean(sandbox: &sandbox::Sandbox, what: &str) {
    let s = sandbox.sweep();
    if !s.is_empty() {
        problem(format!(
            "{what}: {} mount(s) and {} loop device(s) were still there after the benchmark and were taken down{}",
            s.mounts,
            s.loops,
            if s.failures.is_empty() { String::new() } else { format!("; failures: {}", s.failures.join("; ")) }
        ));
    }
}

pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The text report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_all(r, &mut out);
    out
}

fn write_all(r: &Report, out: &mut String) -> std::fmt::Result {
    let m = &r.machine;
    writeln!(out, "\nferrovol-bench report")?;
    writeln!(out, "   driver  {} ({})", m.driver, m.driver_version)?;
    writeln!(out, "   kernel {}, {} CPUs, {}; took {:.0} s", m.kernel, m.cpus, m.fio_version, m.duration_s)?;
    writeln!(
        out,
        "   load average before {} / after {}; during: max 1-min load {:.2}, max {} compiler processes at once",
        m.loadavg_before, m.loadavg_after, m.busy.max_loadavg_1m, m.busy.max_compilers
    )?;
    if let Some(l) = &r.lifecycle {
        out.push('\n');
        lifecycle::print(l, out)?;
    }
    if let Some(c) = &r.concurrency {
        out.push('\n');
        concurrency::print(c, out)?;
    }
    if let Some(d) = &r.datapath {
        out.push('\n');
        datapath::print(d, out)?;
    }
    if let Some(s) = &r.startup {
        out.push('\n');
        startup::print(s, out)?;
    }
    if let Some(l) = &r.lvm {
        out.push('\n');
        crate::lvm::print(l, out)?;
    }
    if let Some(c) = &r.cluster {
        out.push('\n');
        crate::cluster::print(c, out)?;
    }
    if let Some(s) = &r.s3 {
        out.push('\n');
        crate::s3::print(s, out)?;
    }
    if !r.problems.is_empty() {
        writeln!(out, "\nPROBLEMS")?;
        r.problems.iter().try_for_each(|p| writeln!(out, "   - {p}"))?;
    }
    Ok(())
}

fn first_line(r: Result<String>) -> String {
    r.map(|s| s.lines().next().unwrap_or_default().to_string()).unwrap_or_else(|e| format!("unknown ({e})"))
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    read_trimmed("/proc/loadavg").split(' ').take(3).collect::<Vec<_>>().join(" ")
}
