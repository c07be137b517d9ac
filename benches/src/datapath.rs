//! Benchmark 3: fio through a published 1 GiB ext4 volume against the same job on a file in
//! the data dir's own filesystem (where the volume's image lives).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::driver::{paths_for, Csi, Driver};
use crate::sandbox::Sandbox;
use crate::stats::{ratio, Summary};
use crate::{Config, Context, Result};

const VOLUME_BYTES: u64 = 1 << 30;
const GOAL_RATIO: f64 = 0.95;
const MIB: f64 = 1024.0 * 1024.0;

/// One fio job: name, `--rw`, block size, iodepth.
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const JOBS: [Job; 4] = [
    Job { name: "seq-write 1M", rw: "write", bs: "1M", iodepth: 1 },
    Job { name: "seq-read 1M", rw: "read", bs: "1M", iodepth: 1 },
    Job { name: "rand-read 4k", rw: "randread", bs: "4k", iodepth: 16 },
    Job { name: "rand-write 4k", rw: "randwrite", bs: "4k", iodepth: 16 },
];

#[derive(Debug, Serialize)]
pub struct Report {
    pub reps: usize,
    pub ioengine: String,
    pub runtime_s: u32,
    pub file_size: String,
    /// Filesystem type and source of the data dir (where both the image and the raw file live).
    pub data_fs: String,
    /// Whether the published volume's loop device does direct I/O to its image (sysfs `loop/dio`).
    pub loop_direct_io: Option<bool>,
    pub goal_ratio: f64,
    pub jobs: Vec<JobReport>,
}

#[derive(Debug, Serialize)]
pub struct JobReport {
    pub job: &'static str,
    pub iodepth: u32,
    pub volume_mib_s: Summary,
    pub volume_iops: Summary,
    pub raw_mib_s: Summary,
    pub raw_iops: Summary,
    /// Median volume bandwidth over median raw bandwidth.
    pub ratio: f64,
}

/// Bandwidth and IOPS of one fio run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    mib_s: f64,
    iops: f64,
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let (driver, csi) = Driver::start(&cfg.bin, &cfg.work_dir, "datapath", None).await?;
    let raw_dir = Sandbox::new(&cfg.work_dir, "datapath-raw")?;
    let ioengine = pick_ioengine(raw_dir.path()).await;
    let data_fs = crate::raw::run("findmnt", &["-n", "-o", "FSTYPE,SOURCE", "-T", &driver.kubelet.to_string_lossy()])
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"));

    let name = "pvc-fio";
    let (staging, target) = paths_for(&driver.kubelet, name);
    let id = csi.create(name, VOLUME_BYTES).await?;
    let mut loop_direct_io = None;
    let measured = async {
        let ctx = csi.controller_publish(&id).await?;
        csi.stage(&id, ctx.clone(), &staging).await?;
        csi.publish(&id, ctx, &staging, &target).await?;
        loop_direct_io = direct_io_of_loops(driver.sandbox().path());
        measure(cfg, reps, &ioengine, &target.join("fio.dat"), &raw_dir.path().join("fio.dat")).await
    }
    .await;
    let teardown = teardown(&csi, &id, &staging, &target).await;
    let jobs = measured?;
    teardown?;
    crate::report::check_clean(driver.sandbox(), "datapath (driver)");
    Ok(Report {
        reps,
        ioengine,
        runtime_s: cfg.fio_runtime,
        file_size: cfg.fio_size.clone(),
        data_fs,
        loop_direct_io,
        goal_ratio: GOAL_RATIO,
        jobs,
    })
}

async fn teardown(csi: &Csi, id: &str, staging: &Path, target: &Path) -> Result<()> {
    csi.unpublish(id, target).await?;
    csi.unstage(id, staging).await?;
    csi.controller_unpublish(id).await?;
    csi.delete(id).await
}

async fn measure(cfg: &Config, reps: usize, engine: &str, on_volume: &Path, on_raw: &Path) -> Result<Vec<JobReport>> {
    // Write both files in full first, so no job reads holes or pays for allocation.
    for f in [on_volume, on_raw] {
        fio(&["--name=prefill", "--rw=write", "--bs=1M", "--direct=1", &format!("--size={}", cfg.fio_size)], f).await?;
    }
    let mut samples: Vec<(Vec<Sample>, Vec<Sample>)> = JOBS.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for rep in 0..reps {
        for (i, job) in JOBS.iter().enumerate() {
            let args = [
                format!("--name={}", job.rw),
                format!("--rw={}", job.rw),
                format!("--bs={}", job.bs),
                format!("--iodepth={}", job.iodepth),
                format!("--ioengine={engine}"),
                "--direct=1".into(),
                format!("--size={}", cfg.fio_size),
                format!("--runtime={}", cfg.fio_runtime),
                "--time_based".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let direction = if job.rw.contains("read") { "read" } else { "write" };
            // Alternate which side goes first from one run to the next.
            let volume_first = (rep + i) % 2 == 0;
            for on_volume_now in [volume_first, !volume_first] {
                crate::interrupted()?;
                let file = if on_volume_now { on_volume } else { on_raw };
                let s = parse(&fio(&args, file).await?, direction)?;
                let (v, r) = &mut samples[i];
                if on_volume_now { v } else { r }.push(s);
            }
        }
        crate::progress(&format!("datapath {}/{reps}", rep + 1))?;
    }
    Ok(JOBS
        .iter()
        .zip(samples)
        .map(|(job, (v, r))| {
            let sum = |s: &[Sample], f: fn(&Sample) -> f64| Summary::of(&s.iter().map(f).collect::<Vec<_>>());
            let (volume_mib_s, raw_mib_s) = (sum(&v, |s| s.mib_s), sum(&r, |s| s.mib_s));
            JobReport {
                job: job.name,
                iodepth: job.iodepth,
                ratio: ratio(volume_mib_s.median, raw_mib_s.median),
                volume_mib_s,
                volume_iops: sum(&v, |s| s.iops),
                raw_mib_s,
                raw_iops: sum(&r, |s| s.iops),
            }
        })
        .collect())
}

/// Whether the loop device(s) under `root` do direct I/O; None if there is none or sysfs says nothing.
fn direct_io_of_loops(root: &Path) -> Option<bool> {
    let devs = crate::sandbox::loops_under(root).ok()?;
    let flags: Vec<bool> = devs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter_map(|n| std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok())
        .map(|v| v.trim() == "1")
        .collect();
    (!flags.is_empty()).then(|| flags.iter().all(|&f| f))
}

/// io_uring where the kernel allows it, else libaio.
async fn pick_ioengine(dir: &Path) -> String {
    let probe = dir.join("engine-probe.dat");
    let args = ["--name=probe", "--rw=randread", "--bs=4k", "--size=4M", "--direct=1", "--ioengine=io_uring"];
    let ok = fio(&args, &probe).await.is_ok_and(|v| v["jobs"][0]["error"].as_i64() == Some(0));
    let _ = std::fs::remove_file(&probe);
    if ok { "io_uring" } else { "libaio" }.to_string()
}

/// Runs one fio job on `file` and answers its JSON report. Killed if the bench is interrupted.
async fn fio(args: &[&str], file: &Path) -> Result<Value> {
    let out = tokio::process::Command::new("fio")
        .args(args)
        .arg(format!("--filename={}", file.display()))
        .arg("--output-format=json")
        .kill_on_drop(true)
        .output()
        .await
        .context(|| "running fio (is it installed? scripts/install-deps installs it)".to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("fio {} on {}: {}: {}", args.join(" "), file.display(), out.status, stderr_of(&out)));
    }
    // fio may print notes before the JSON document.
    let json = stdout.find('{').map(|i| &stdout[i..]).ok_or_else(|| format!("fio printed no JSON: {stdout}"))?;
    serde_json::from_str(json).context(|| "parsing fio's JSON output".to_string())
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn parse(v: &Value, direction: &str) -> Result<Sample> {
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio job failed with error {}", job["error"]));
    }
    let d = &job[direction];
    let bw = d["bw_bytes"].as_f64().ok_or_else(|| format!("fio JSON has no {direction}.bw_bytes"))?;
    let iops = d["iops"].as_f64().ok_or_else(|| format!("fio JSON has no {direction}.iops"))?;
    Ok(Sample { mib_s: bw / MIB, iops })
}

pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "3. Data path, fio direct=1 {} {}s x {} reps, {} file; volume vs a file on the data dir's fs ({})",
        r.ioengine, r.runtime_s, r.reps, r.file_size, r.data_fs
    )?;
    let dio = match r.loop_direct_io {
        Some(true) => "on",
        Some(false) => "OFF",
        None => "unknown",
    };
    writeln!(out, "   the volume's loop device: direct I/O {dio}")?;
    writeln!(
        out,
        "   job             qd   volume MiB/s (min–max)      IOPS     raw MiB/s (min–max)         IOPS   ratio"
    )?;
    for j in &r.jobs {
        writeln!(
            out,
            "   {:<14} {:>3}   {:<24} {:>8.0}     {:<24} {:>8.0}   {:.3} {}",
            j.job,
            j.iodepth,
            j.volume_mib_s.show(1),
            j.volume_iops.median,
            j.raw_mib_s.show(1),
            j.raw_iops.median,
            j.ratio,
            crate::report::verdict(j.ratio >= r.goal_ratio)
        )?;
    }
    writeln!(out, "   goal: ratio >= {:.2}", r.goal_ratio)
}
