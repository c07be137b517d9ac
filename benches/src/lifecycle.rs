//! Benchmark 1: the whole life of a 1 GiB ext4 volume through the driver over gRPC, against
//! the same operations done directly, alternating the two so drift hits both alike.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::driver::{paths_for, Csi, Driver};
use crate::raw::{self, StageParts};
use crate::sandbox::Sandbox;
use crate::stats::{ratio, timed, timed_async, Summary};
use crate::{Config, Context, Result};

const VOLUME_BYTES: u64 = 1 << 30;
const GOAL_RATIO: f64 = 1.05;

/// The CSI calls in order, with the raw operation each stands for.
const STEPS: [(&str, &str); 8] = [
    ("CreateVolume", "create sparse file + set_len"),
    ("ControllerPublish", "(nothing: bookkeeping only)"),
    ("NodeStage", "losetup --direct-io=on -f, mkfs.ext4, mkdir + mount"),
    ("NodePublish", "mkdir + bind mount"),
    ("NodeUnpublish", "umount + rmdir"),
    ("NodeUnstage", "umount + losetup -d"),
    ("ControllerUnpublish", "(nothing: bookkeeping only)"),
    ("DeleteVolume", "rm"),
];

type StepTimes = [f64; STEPS.len()];

#[derive(Debug, Serialize)]
pub struct Report {
    pub reps: usize,
    pub volume_bytes: u64,
    pub driver_total_ms: Summary,
    pub raw_total_ms: Summary,
    /// Median driver time over median raw time.
    pub ratio: f64,
    pub goal_ratio: f64,
    pub steps: Vec<StepReport>,
    pub raw_stage_parts_ms: PartsReport,
    /// A Probe round trip on the same channel: what any call costs before the driver does work.
    pub probe_rtt_ms: Summary,
}

#[derive(Debug, Serialize)]
pub struct StepReport {
    pub call: &'static str,
    pub raw_equivalent: &'static str,
    pub driver_ms: Summary,
    pub raw_ms: Summary,
}

#[derive(Debug, Serialize)]
pub struct PartsReport {
    pub losetup: Summary,
    /// The driver's safety probe before mkfs; timed on the raw path for comparison, not counted in it.
    pub blkid_probe_not_counted: Summary,
    pub mkfs: Summary,
    pub mount: Summary,
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let (driver, csi) = Driver::start(&cfg.bin, &cfg.work_dir, "lifecycle", None).await?;
    let raw_dir = Sandbox::new(&cfg.work_dir, "lifecycle-raw")?;

    // One untimed round each first: binaries, libraries and metadata get into the caches.
    driver_once(&csi, &driver, "pvc-warm").await?;
    raw_once(raw_dir.path(), "warm")?;

    let mut driver_runs = Vec::new();
    let mut raw_runs = Vec::new();
    let mut probes = Vec::new();
    for rep in 0..reps {
        let (ready, t) = timed_async(csi.probe()).await;
        ready?;
        probes.push(t);
        let name = format!("pvc-life-{rep}");
        // Alternate which goes first, so a slow drift or the other's after-effects
        // (writeback, journal commits) fall on both alike.
        if rep % 2 == 0 {
            driver_runs.push(driver_once(&csi, &driver, &name).await?);
            raw_runs.push(raw_once(raw_dir.path(), &name)?);
        } else {
            raw_runs.push(raw_once(raw_dir.path(), &name)?);
            driver_runs.push(driver_once(&csi, &driver, &name).await?);
        }
        crate::progress(&format!("lifecycle {}/{reps}", rep + 1))?;
    }
    crate::report::check_clean(driver.sandbox(), "lifecycle (driver)");
    crate::report::check_clean(&raw_dir, "lifecycle (raw)");

    let totals = |runs: &[StepTimes]| Summary::of(&runs.iter().map(|r| r.iter().sum()).collect::<Vec<f64>>());
    let raw_steps: Vec<StepTimes> = raw_runs.iter().map(|(t, _)| *t).collect();
    let (driver_total_ms, raw_total_ms) = (totals(&driver_runs), totals(&raw_steps));
    let steps = STEPS
        .iter()
        .enumerate()
        .map(|(i, (call, raw_equivalent))| StepReport {
            call,
            raw_equivalent,
            driver_ms: Summary::of(&driver_runs.iter().map(|r| r[i]).collect::<Vec<_>>()),
            raw_ms: Summary::of(&raw_steps.iter().map(|r| r[i]).collect::<Vec<_>>()),
        })
        .collect();
    let part = |f: fn(&StageParts) -> f64| Summary::of(&raw_runs.iter().map(|(_, p)| f(p)).collect::<Vec<_>>());
    Ok(Report {
        reps,
        volume_bytes: VOLUME_BYTES,
        ratio: ratio(driver_total_ms.median, raw_total_ms.median),
        driver_total_ms,
        raw_total_ms,
        goal_ratio: GOAL_RATIO,
        steps,
        raw_stage_parts_ms: PartsReport {
            losetup: part(|p| p.losetup),
            blkid_probe_not_counted: part(|p| p.blkid.unwrap_or(0.0)),
            mkfs: part(|p| p.mkfs),
            mount: part(|p| p.mount),
        },
        probe_rtt_ms: Summary::of(&probes),
    })
}

/// One life through the driver, each call timed on its own over one open channel.
async fn driver_once(csi: &Csi, driver: &Driver, name: &str) -> Result<StepTimes> {
    let (staging, target) = paths_for(&driver.kubelet, name);
    let mut t = [0.0; STEPS.len()];
    let (id, t0) = timed_async(csi.create(name, VOLUME_BYTES)).await;
    let id = id?;
    t[0] = t0;
    let (ctx, t1) = timed_async(csi.controller_publish(&id)).await;
    let ctx = ctx?;
    t[1] = t1;
    let (r, t2) = timed_async(csi.stage(&id, ctx.clone(), &staging)).await;
    r?;
    t[2] = t2;
    let (r, t3) = timed_async(csi.publish(&id, ctx, &staging, &target)).await;
    r?;
    t[3] = t3;
    let (r, t4) = timed_async(csi.unpublish(&id, &target)).await;
    r?;
    t[4] = t4;
    let (r, t5) = timed_async(csi.unstage(&id, &staging)).await;
    r?;
    t[5] = t5;
    let (r, t6) = timed_async(csi.controller_unpublish(&id)).await;
    r?;
    t[6] = t6;
    let (r, t7) = timed_async(csi.delete(&id)).await;
    r?;
    t[7] = t7;
    Ok(t)
}

/// The same life done by hand, step by step. The bookkeeping-only calls count as zero.
fn raw_once(dir: &Path, name: &str) -> Result<(StepTimes, StageParts)> {
    let image = dir.join(format!("{name}.img"));
    let (staging, target) = paths_for(&dir.join("kubelet"), name);
    let mut t = [0.0; STEPS.len()];
    let (r, t0) = timed(|| raw::sparse_image(&image, VOLUME_BYTES));
    r?;
    t[0] = t0;
    let (staged, parts) = raw::stage(&image, &staging, true)?;
    t[2] = parts.total();
    let (bind, t3) = timed(|| raw::Mounted::bind(&staging, &target));
    let bind = bind?;
    t[3] = t3;
    let (r, t4) = timed(|| bind.unmount(true));
    r?;
    t[4] = t4;
    let raw::RawStaged { image, mount, dev } = staged;
    let (r, t5) = timed(|| mount.unmount(false).and_then(|()| dev.detach()));
    r?;
    t[5] = t5;
    let (r, t7) = timed(|| fs::remove_file(&image).context(|| format!("removing {}", image.display())));
    r?;
    t[7] = t7;
    Ok((t, parts))
}

/// The text report.
pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(out, "1. Volume lifecycle, 1 GiB ext4, {} reps alternated (ms: median (min–max))", r.reps)?;
    writeln!(out, "   driver (8 CSI calls over gRPC)  {}", r.driver_total_ms.show(1))?;
    writeln!(out, "   raw (same operations directly)  {}", r.raw_total_ms.show(1))?;
    writeln!(
        out,
        "   ratio driver/raw                {:.3}   goal <= {:.2}: {}",
        r.ratio,
        r.goal_ratio,
        crate::report::verdict(r.ratio <= r.goal_ratio)
    )?;
    writeln!(out, "   per step (median ms)         driver      raw    delta   raw operation")?;
    for s in &r.steps {
        writeln!(
            out,
            "     {:<22} {:>9.2} {:>8.2} {:>+8.2}   {}",
            s.call,
            s.driver_ms.median,
            s.raw_ms.median,
            s.driver_ms.median - s.raw_ms.median,
            s.raw_equivalent
        )?;
    }
    let p = &r.raw_stage_parts_ms;
    writeln!(
        out,
        "   raw NodeStage parts (median ms): losetup {:.2}, mkfs.ext4 {:.2}, mount {:.2}; \
         blkid -p (the driver's pre-mkfs probe, not counted in raw) {:.2}",
        p.losetup.median, p.mkfs.median, p.mount.median, p.blkid_probe_not_counted.median
    )?;
    writeln!(out, "   gRPC floor: one Probe round trip on the same channel {} ms", r.probe_rtt_ms.show(3))
}
