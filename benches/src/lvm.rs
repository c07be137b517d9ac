//! Benchmark 5 (inside the test VM, on a scratch disk): the LVM family's CreateVolume against
//! the raw `lvcreate` it wraps, linear and thin; CreateVolume + NodeStage against raw
//! `lvcreate` + `mkfs.ext4` + mount; how many lvm commands each CreateVolume ran (from the
//! driver's debug log); and N concurrent creates against N concurrent raw `lvcreate`s.
//! Alternates driver and raw so drift hits both alike. Cleanup is not timed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::driver::{paths_for, Csi, Driver};
use crate::raw::{self, Mounted};
use crate::stats::{ms, ratio, timed, timed_async, Summary};
use crate::{progress, Config, Context, Result};

const VG: &str = "fvbench";
const POOL: &str = "pool";
const POOL_BYTES: u64 = 2 << 30;
const VOLUME_BYTES: u64 = 64 << 20;

#[derive(Debug, Serialize)]
pub struct Report {
    pub reps: usize,
    pub device: String,
    pub volume_bytes: u64,
    pub linear_create_ms: Summary,
    pub raw_lvcreate_linear_ms: Summary,
    pub linear_ratio: f64,
    pub thin_create_ms: Summary,
    pub raw_lvcreate_thin_ms: Summary,
    pub thin_ratio: f64,
    /// CreateVolume + NodeStageVolume (mkfs.ext4 + mount) of a linear volume.
    pub create_stage_ms: Summary,
    /// `lvcreate` + `mkfs.ext4` (the driver's options) + mount.
    pub raw_create_mkfs_mount_ms: Summary,
    pub create_stage_ratio: f64,
    /// lvm commands per CreateVolume after the first (the steady path), from the debug log.
    pub lvm_commands_linear: Summary,
    pub lvm_commands_thin: Summary,
    pub concurrent: usize,
    pub concurrent_driver_ms: Summary,
    pub concurrent_raw_ms: Summary,
    pub concurrent_ratio: f64,
    /// lvm commands per CreateVolume in a concurrent burst (the `--deltag`s are shared).
    pub lvm_commands_concurrent: Summary,
}

fn lvm(args: &[&str]) -> Result<String> {
    raw::run("lvm", args)
}

/// The bench's VG on `device`, removed (with everything in it) on drop.
struct BenchVg {
    device: String,
}

impl BenchVg {
    fn make(device: &str) -> Result<BenchVg> {
        lvm(&["pvcreate", "--yes", "--force", device])?;
        let vg = BenchVg { device: device.to_owned() };
        lvm(&["vgcreate", "--yes", VG, device])?;
        lvm(&["lvcreate", "--yes", "--type", "thin-pool", "--size", &format!("{POOL_BYTES}b"), "--name", POOL, VG])?;
        Ok(vg)
    }
}

impl Drop for BenchVg {
    fn drop(&mut self) {
        let _ = lvm(&["vgremove", "--yes", "--force", VG]);
        let _ = lvm(&["pvremove", "--yes", &self.device]);
    }
}

fn params(thin: bool) -> HashMap<String, String> {
    let mut p = HashMap::from([
        ("type".to_string(), if thin { "lvm-thin" } else { "lvm" }.to_string()),
        ("volumeGroup".to_string(), VG.to_string()),
        ("fsType".to_string(), "ext4".to_string()),
    ]);
    if thin {
        p.insert("thinPool".into(), POOL.into());
        p.insert("thinPoolOverprovisionRatio".into(), "100".into());
    }
    p
}

/// Lines the driver logged for lvm commands so far.
fn lvm_lines(log: &Path) -> usize {
    fs::read_to_string(log).map(|t| t.lines().filter(|l| l.contains("lvm command")).count()).unwrap_or(0)
}

fn raw_lvcreate(name: &str, thin: bool) -> Result<()> {
    let size = format!("{VOLUME_BYTES}b");
    if thin {
        lvm(&["lvcreate", "--yes", "--type", "thin", "--thinpool", POOL, "--virtualsize", &size, "--name", name, VG])?;
    } else {
        lvm(&["lvcreate", "--yes", "--size", &size, "--name", name, VG])?;
    }
    Ok(())
}

fn raw_remove(name: &str) -> Result<()> {
    lvm(&["lvremove", "--yes", &format!("{VG}/{name}")]).map(|_| ())
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let device = cfg.lvm_device.clone().ok_or_else(|| {
        "the lvm benchmark needs --lvm-device (a scratch block device it wipes) and device-mapper; \
         run it in the test VM: e2e/vm/run --disk 8G -- target/release/ferrovol-bench --only lvm --lvm-device /dev/vda"
            .to_string()
    })?;
    let _vg = BenchVg::make(&device)?;
    let extra = vec!["--lvm-volume-group".to_string(), VG.to_string()];
    let mut driver = Driver::spawn_with(&cfg.bin, &cfg.work_dir, "lvm", None, &extra, "warn,ferrovol_node::lvm=debug")?;
    let csi = driver.wait_ready().await?;
    let log = driver.sandbox().path().join("driver.log");

    let mut samples: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut push = |k: &'static str, v: f64| samples.entry(k).or_default().push(v);
    for thin in [false, true] {
        // One untimed create first: it reads the report the steady path then keeps current.
        let warm = csi.create_with(&format!("warm-{thin}"), VOLUME_BYTES, params(thin)).await?;
        csi.delete(&warm).await?;
        for rep in 0..reps {
            progress(&format!("lvm: {} create {rep}", if thin { "thin" } else { "linear" }))?;
            let before = lvm_lines(&log);
            let (id, t) = timed_async(csi.create_with(&format!("pvc-{thin}-{rep}"), VOLUME_BYTES, params(thin))).await;
            let id = id?;
            let commands = (lvm_lines(&log) - before) as f64;
            let raw_name = format!("raw-{thin}-{rep}");
            let (r, raw_t) = timed(|| raw_lvcreate(&raw_name, thin));
            r?;
            push(if thin { "thin" } else { "linear" }, t);
            push(if thin { "raw_thin" } else { "raw_linear" }, raw_t);
            push(if thin { "cmd_thin" } else { "cmd_linear" }, commands);
            csi.delete(&id).await?;
            raw_remove(&raw_name)?;
        }
    }

    // CreateVolume + NodeStage vs lvcreate + mkfs + mount.
    for rep in 0..reps {
        progress(&format!("lvm: create + stage {rep}"))?;
        let name = format!("pvc-stage-{rep}");
        let (staging, _) = paths_for(&driver.kubelet, &name);
        let start = Instant::now();
        let id = csi.create_with(&name, VOLUME_BYTES, params(false)).await?;
        csi.stage(&id, HashMap::new(), &staging).await?;
        push("create_stage", ms(start.elapsed()));

        let raw_name = format!("raw-stage-{rep}");
        let dir = cfg.work_dir.join(format!("ferrovol-bench-lvm-mnt-{rep}-{}", std::process::id()));
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let dev = PathBuf::from(format!("/dev/mapper/{VG}-{}", raw_name.replace('-', "--")));
        let start = Instant::now();
        raw_lvcreate(&raw_name, false)?;
        raw::mkfs_ext4(&dev)?;
        let mounted = Mounted::ext4(&dev, &dir)?;
        push("raw_create_stage", ms(start.elapsed()));
        drop(mounted);
        let _ = fs::remove_dir(&dir);
        raw_remove(&raw_name)?;
        csi.unstage(&id, &staging).await?;
        csi.delete(&id).await?;
    }

    // N concurrent creates.
    let n = cfg.lvm_concurrency;
    let mut conc_driver = Vec::new();
    let mut conc_raw = Vec::new();
    let mut conc_commands = Vec::new();
    for rep in 0..reps.min(3) {
        progress(&format!("lvm: {n} concurrent creates, round {rep}"))?;
        let before = lvm_lines(&log);
        let start = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let csi: Csi = csi.clone();
                tokio::spawn(
                    async move { csi.create_with(&format!("pvc-c{rep}-{i}"), VOLUME_BYTES, params(false)).await },
                )
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.map_err(|e| format!("create task: {e}"))??);
        }
        conc_driver.push(ms(start.elapsed()));
        conc_commands.push((lvm_lines(&log) - before) as f64 / n as f64);
        for id in &ids {
            csi.delete(id).await?;
        }
        let start = Instant::now();
        let names: Vec<String> = (0..n).map(|i| format!("raw-c{rep}-{i}")).collect();
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = names.iter().map(|nm| s.spawn(move || raw_lvcreate(nm, false))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("raw lvcreate thread panicked".into()))).collect()
        });
        conc_raw.push(ms(start.elapsed()));
        for r in results {
            r?;
        }
        for nm in &names {
            raw_remove(nm)?;
        }
    }
    driver.stop()?;

    let s = |k: &str| Summary::of(samples.get(k).map_or(&[][..], |v| v.as_slice()));
    let (linear, raw_linear, thin, raw_thin) = (s("linear"), s("raw_linear"), s("thin"), s("raw_thin"));
    let (cs, rcs) = (s("create_stage"), s("raw_create_stage"));
    let (cd, cr) = (Summary::of(&conc_driver), Summary::of(&conc_raw));
    Ok(Report {
        reps,
        device,
        volume_bytes: VOLUME_BYTES,
        linear_ratio: ratio(linear.median, raw_linear.median),
        thin_ratio: ratio(thin.median, raw_thin.median),
        create_stage_ratio: ratio(cs.median, rcs.median),
        concurrent_ratio: ratio(cd.median, cr.median),
        linear_create_ms: linear,
        raw_lvcreate_linear_ms: raw_linear,
        thin_create_ms: thin,
        raw_lvcreate_thin_ms: raw_thin,
        create_stage_ms: cs,
        raw_create_mkfs_mount_ms: rcs,
        lvm_commands_linear: s("cmd_linear"),
        lvm_commands_thin: s("cmd_thin"),
        concurrent: n,
        concurrent_driver_ms: cd,
        concurrent_raw_ms: cr,
        lvm_commands_concurrent: Summary::of(&conc_commands),
    })
}

pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(out, "LVM (in the VM, {} reps, {} MiB volumes on {}):", r.reps, r.volume_bytes >> 20, r.device)?;
    writeln!(
        out,
        "  CreateVolume linear {} ms vs raw lvcreate {} ms: ratio {:.2}",
        r.linear_create_ms.show(1),
        r.raw_lvcreate_linear_ms.show(1),
        r.linear_ratio
    )?;
    writeln!(
        out,
        "  CreateVolume thin   {} ms vs raw lvcreate {} ms: ratio {:.2}",
        r.thin_create_ms.show(1),
        r.raw_lvcreate_thin_ms.show(1),
        r.thin_ratio
    )?;
    writeln!(
        out,
        "  CreateVolume + NodeStage {} ms vs lvcreate + mkfs.ext4 + mount {} ms: ratio {:.2}",
        r.create_stage_ms.show(1),
        r.raw_create_mkfs_mount_ms.show(1),
        r.create_stage_ratio
    )?;
    writeln!(
        out,
        "  lvm commands per CreateVolume (steady): linear {}, thin {}",
        r.lvm_commands_linear.show(1),
        r.lvm_commands_thin.show(1)
    )?;
    writeln!(
        out,
        "  {} concurrent CreateVolume {} ms vs {} concurrent lvcreate {} ms: ratio {:.2}; {} lvm commands per create",
        r.concurrent,
        r.concurrent_driver_ms.show(0),
        r.concurrent,
        r.concurrent_raw_ms.show(0),
        r.concurrent_ratio,
        r.lvm_commands_concurrent.show(2)
    )?;
    Ok(())
}
