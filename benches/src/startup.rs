//! Benchmark 4: time from exec to the first Probe that answers ready, and the driver's
//! resident memory after it has served that Probe and sat idle for a second. The floor it is
//! compared with is the same binary's `--version`: exec, argument parsing and exit.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::driver::Driver;
use crate::stats::{ms, Summary};
use crate::{Config, Context, Result};

const GOAL_READY_MS: f64 = 50.0;
const GOAL_RSS_MIB: f64 = 8.0;
const IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize)]
pub struct Report {
    pub reps: usize,
    pub exec_to_ready_ms: Summary,
    /// `ferrovol --version` from spawn to exit: what any start costs.
    pub exec_version_ms: Summary,
    pub idle_rss_mib: Summary,
    /// The high-water mark of resident memory at the same moment.
    pub peak_rss_mib: Summary,
    pub goal_ready_ms: f64,
    pub goal_rss_mib: f64,
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let (mut ready, mut version, mut rss, mut hwm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let t = Instant::now();
        let out = Command::new(&cfg.bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .context(|| format!("running {} --version", cfg.bin.display()))?;
        version.push(ms(t.elapsed()));
        if !out.success() {
            return Err(format!("{} --version failed: {out}", cfg.bin.display()));
        }

        // A fresh sandbox (empty data dir) each time: the same start a new node makes.
        let mut driver = Driver::spawn(&cfg.bin, &cfg.work_dir, "startup", None)?;
        driver.wait_ready().await?;
        ready.push(ms(driver.spawned.elapsed()));
        tokio::time::sleep(IDLE).await;
        let (now, peak) = driver.memory_kb()?;
        rss.push(now as f64 / 1024.0);
        hwm.push(peak as f64 / 1024.0);
        driver.stop()?;
        crate::progress(&format!("startup {}/{reps}", rep + 1))?;
    }
    Ok(Report {
        reps,
        exec_to_ready_ms: Summary::of(&ready),
        exec_version_ms: Summary::of(&version),
        idle_rss_mib: Summary::of(&rss),
        peak_rss_mib: Summary::of(&hwm),
        goal_ready_ms: GOAL_READY_MS,
        goal_rss_mib: GOAL_RSS_MIB,
    })
}

pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(out, "4. Start-up and idle memory, {} starts (median (min–max))", r.reps)?;
    writeln!(
        out,
        "   exec -> first Probe ready=true   {} ms   goal <= {:.0} ms: {}",
        r.exec_to_ready_ms.show(1),
        r.goal_ready_ms,
        crate::report::verdict(r.exec_to_ready_ms.median <= r.goal_ready_ms)
    )?;
    writeln!(out, "   exec -> exit of `ferrovol --version` {} ms (the floor of any start)", r.exec_version_ms.show(1))?;
    writeln!(
        out,
        "   idle VmRSS after Probe + 1 s     {} MiB   goal <= {:.0} MiB: {}",
        r.idle_rss_mib.show(2),
        r.goal_rss_mib,
        crate::report::verdict(r.idle_rss_mib.median <= r.goal_rss_mib)
    )?;
    writeln!(out, "   VmHWM (peak RSS) at that moment  {} MiB", r.peak_rss_mib.show(2))
}
