//! Benchmark 2: N concurrent CreateVolume + NodeStage of small ext4 volumes with the driver
//! pinned to one CPU and then to two, against the same work done directly by N threads
//! pinned to the same CPUs. Cleanup after each round is not timed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::driver::{paths_for, Csi, Driver};
use crate::raw::{self, RawStaged, StageParts};
use crate::sandbox::Sandbox;
use crate::stats::{ms, ratio, timed_async, Summary};
use crate::{Config, Result};

const VOLUME_BYTES: u64 = 64 << 20;

#[derive(Debug, Serialize)]
pub struct Report {
    pub concurrency: usize,
    pub volume_bytes: u64,
    pub reps: usize,
    pub cpu_sets: Vec<CpuSetReport>,
    /// Median ops/s on the last CPU set over median ops/s on the first.
    pub driver_scaling: f64,
    pub raw_scaling: f64,
}

#[derive(Debug, Serialize)]
pub struct CpuSetReport {
    /// As given to `taskset -c`.
    pub cpus: String,
    /// What the kernel says the driver may use (`Cpus_allowed_list`), to show the pinning held.
    pub driver_cpus_allowed: String,
    pub driver_total_ms: Summary,
    pub driver_ops_per_s: Summary,
    /// CreateVolume + NodeStage of one volume, over every volume of every round.
    pub driver_op_ms: Summary,
    /// The two calls of one operation on their own.
    pub driver_create_ms: Summary,
    pub driver_stage_ms: Summary,
    pub raw_total_ms: Summary,
    pub raw_ops_per_s: Summary,
    pub raw_op_ms: Summary,
    /// The raw round's parts per volume: `losetup -f` (serialised across the workers, so
    /// this includes waiting for the others; see `raw::stage`), mkfs and mount.
    pub raw_losetup_ms: Summary,
    pub raw_mkfs_ms: Summary,
    pub raw_mount_ms: Summary,
    /// Median driver round time over median raw round time.
    pub ratio: f64,
}

/// One timed round: its wall time and each operation's latency, in ms.
struct Round {
    total_ms: f64,
    op_ms: Vec<f64>,
    /// Driver rounds only: (CreateVolume, NodeStage) of each operation.
    calls: Vec<(f64, f64)>,
    /// Raw rounds only.
    parts: Vec<StageParts>,
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let mut cpu_sets = Vec::new();
    for list in &cfg.cpu_sets {
        let cpus = parse_cpu_list(list)?;
        let (driver, csi) = Driver::start(&cfg.bin, &cfg.work_dir, "concurrency", Some(list)).await?;
        let raw_dir = Sandbox::new(&cfg.work_dir, "concurrency-raw")?;
        let driver_cpus_allowed = driver.status_field("Cpus_allowed_list")?;
        let (mut drv, mut raw) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let prefix = format!("pvc-c{rep}");
            if rep % 2 == 0 {
                drv.push(driver_round(&csi, &driver.kubelet, &prefix, cfg.concurrency).await?);
                raw.push(raw_round(raw_dir.path(), &cpus, &prefix, cfg.concurrency).await?);
            } else {
                raw.push(raw_round(raw_dir.path(), &cpus, &prefix, cfg.concurrency).await?);
                drv.push(driver_round(&csi, &driver.kubelet, &prefix, cfg.concurrency).await?);
            }
            crate::progress(&format!("concurrency cpus {list}: {}/{reps}", rep + 1))?;
        }
        crate::report::check_clean(driver.sandbox(), "concurrency (driver)");
        crate::report::check_clean(&raw_dir, "concurrency (raw)");
        let (d, r) = (summarise(&drv, cfg.concurrency), summarise(&raw, cfg.concurrency));
        let part = |f: fn(&StageParts) -> f64| {
            Summary::of(&raw.iter().flat_map(|r| r.parts.iter().map(f)).collect::<Vec<_>>())
        };
        let call = |f: fn(&(f64, f64)) -> f64| {
            Summary::of(&drv.iter().flat_map(|r| r.calls.iter().map(f)).collect::<Vec<_>>())
        };
        cpu_sets.push(CpuSetReport {
            cpus: list.clone(),
            driver_cpus_allowed,
            ratio: ratio(d.0.median, r.0.median),
            driver_total_ms: d.0,
            driver_ops_per_s: d.1,
            driver_op_ms: d.2,
            driver_create_ms: call(|c| c.0),
            driver_stage_ms: call(|c| c.1),
            raw_total_ms: r.0,
            raw_ops_per_s: r.1,
            raw_op_ms: r.2,
            raw_losetup_ms: part(|p| p.losetup),
            raw_mkfs_ms: part(|p| p.mkfs),
            raw_mount_ms: part(|p| p.mount),
        });
    }
    let scaling = |f: fn(&CpuSetReport) -> f64| match (cpu_sets.first(), cpu_sets.last()) {
        (Some(a), Some(b)) => ratio(f(b), f(a)),
        _ => f64::NAN,
    };
    Ok(Report {
        concurrency: cfg.concurrency,
        volume_bytes: VOLUME_BYTES,
        reps,
        driver_scaling: scaling(|c| c.driver_ops_per_s.median),
        raw_scaling: scaling(|c| c.raw_ops_per_s.median),
        cpu_sets,
    })
}

/// (round time, ops/s, per-operation latency)
fn summarise(rounds: &[Round], n: usize) -> (Summary, Summary, Summary) {
    let totals: Vec<f64> = rounds.iter().map(|r| r.total_ms).collect();
    let rates: Vec<f64> = totals.iter().map(|t| n as f64 / (t / 1e3)).collect();
    let ops: Vec<f64> = rounds.iter().flat_map(|r| r.op_ms.iter().copied()).collect();
    (Summary::of(&totals), Summary::of(&rates), Summary::of(&ops))
}

/// N tasks at once on one channel, as the provisioner and kubelet would send them.
async fn driver_round(csi: &Csi, kubelet: &Path, prefix: &str, n: usize) -> Result<Round> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let csi = csi.clone();
        let name = format!("{prefix}-{i}");
        let (staging, _) = paths_for(kubelet, &name);
        tasks.spawn(async move {
            let (id, create_ms) = timed_async(csi.create(&name, VOLUME_BYTES)).await;
            let id = match id {
                Ok(id) => id,
                Err(e) => return (None, Err(e)),
            };
            let (r, stage_ms) = timed_async(csi.stage(&id, HashMap::new(), &staging)).await;
            (Some((id, staging)), r.map(|()| (create_ms, stage_ms)))
        });
    }
    let mut made: Vec<(String, PathBuf)> = Vec::new();
    let mut calls = Vec::new();
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        let (vol, r) = joined.unwrap_or_else(|e| (None, Err(format!("a request task failed: {e}"))));
        made.extend(vol);
        match r {
            Ok(c) => calls.push(c),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    let total_ms = ms(start.elapsed());
    // Untimed: take every volume down again, even after a failure.
    for (id, staging) in made {
        let r = csi.unstage(&id, &staging).await.and(csi.delete(&id).await);
        if let Err(e) = r {
            first_err = first_err.or(Some(format!("cleaning up {id}: {e}")));
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Round { total_ms, op_ms: calls.iter().map(|(c, s)| c + s).collect(), calls, parts: Vec::new() }),
    }
}

/// N threads pinned to `cpus`, each creating, attaching, formatting and mounting one image
/// (`losetup -f` one at a time, see `raw::stage`).
async fn raw_round(dir: &Path, cpus: &[usize], prefix: &str, n: usize) -> Result<Round> {
    let (dir, cpus, prefix) = (dir.to_path_buf(), Arc::new(cpus.to_vec()), prefix.to_string());
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let results: Vec<Result<(RawStaged, StageParts, f64)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..n)
                .map(|i| {
                    let (dir, cpus, prefix) = (&dir, &cpus, &prefix);
                    s.spawn(move || {
                        pin_current_thread(cpus)?;
                        let t = Instant::now();
                        let image = dir.join(format!("{prefix}-{i}.img"));
                        raw::sparse_image(&image, VOLUME_BYTES)?;
                        let (staged, parts) = raw::stage(&image, &dir.join(format!("{prefix}-{i}")), false)?;
                        Ok((staged, parts, ms(t.elapsed())))
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("a raw worker panicked".into()))).collect()
        });
        let total_ms = ms(start.elapsed());
        let (mut op_ms, mut parts) = (Vec::new(), Vec::new());
        let mut first_err = None;
        for r in results {
            match r.and_then(|(staged, p, t)| staged.teardown().map(|()| (p, t))) {
                Ok((p, t)) => {
                    op_ms.push(t);
                    parts.push(p);
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(Round { total_ms, op_ms, calls: Vec::new(), parts }),
        }
    })
    .await
    .map_err(|e| format!("the raw round failed: {e}"))?
}

/// Parses a `taskset -c` style list: `0`, `0,1`, `0-3`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let bad = || format!("{s:?} is not a CPU list like 0 or 0,1 or 0-3");
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// Restricts the calling thread (and the processes it starts) to `cpus`.
fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes inside the set for
    // cpu < CPU_SETSIZE, which parse_cpu_list checked; sched_setaffinity(0, ..) reads
    // size_of::<cpu_set_t>() bytes of `set`, which outlives the call, and changes only this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(format!("pinning a thread to CPUs {cpus:?}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "2. {} concurrent CreateVolume + NodeStage, 64 MiB ext4, {} reps per CPU set (cleanup untimed)",
        r.concurrency, r.reps
    )?;
    writeln!(out, "   cpus   who      round ms: median (min–max)     ops/s median   per-op ms median (max)")?;
    for c in &r.cpu_sets {
        for (who, total, rate, op) in [
            ("driver", &c.driver_total_ms, &c.driver_ops_per_s, &c.driver_op_ms),
            ("raw", &c.raw_total_ms, &c.raw_ops_per_s, &c.raw_op_ms),
        ] {
            writeln!(
                out,
                "   {:<6} {:<8} {:<30} {:>12.1}   {:.1} ({:.1})",
                c.cpus,
                who,
                total.show(1),
                rate.median,
                op.median,
                op.max
            )?;
        }
        writeln!(
            out,
            "   {:<6} driver (allowed CPUs {}) calls ms median (max): CreateVolume {:.1} ({:.1}), NodeStage {:.1} ({:.1})",
            c.cpus,
            c.driver_cpus_allowed,
            c.driver_create_ms.median,
            c.driver_create_ms.max,
            c.driver_stage_ms.median,
            c.driver_stage_ms.max
        )?;
        writeln!(
            out,
            "   {:<6} ratio driver/raw round time {:.2}; raw parts ms median (max): losetup {:.1} ({:.1}), \
             mkfs {:.1} ({:.1}), mount {:.1} ({:.1})",
            c.cpus,
            c.ratio,
            c.raw_losetup_ms.median,
            c.raw_losetup_ms.max,
            c.raw_mkfs_ms.median,
            c.raw_mkfs_ms.max,
            c.raw_mount_ms.median,
            c.raw_mount_ms.max
        )?;
    }
    writeln!(
        out,
        "   scaling (ops/s on the last CPU set / the first): driver {:.2}x, raw {:.2}x",
        r.driver_scaling, r.raw_scaling
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").ok(), Some(vec![0]));
        assert_eq!(parse_cpu_list("0,1").ok(), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2").ok(), Some(vec![0, 1, 2]));
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("2-1").is_err());
    }
}
