//! Benchmark 7: the S3 family. The real `ferrovol-mounter` daemon mounts a volume of one
//! garage server (started for the run, with an `LD_PRELOAD` shim that sets TCP_NODELAY on
//! the sockets it accepts, see docs/S3-TESTING.md's Nagle trap), and every figure is
//! compared in the same run with the raw aws-sdk-s3 operation against the same server:
//! a 1 GiB sequential write and a cold 1 GiB sequential read, `ls -l` of 10,000 objects,
//! 1,000 reads of 4 KiB files, and the mounter's memory while idle and at its peaks.
//!
//! Everything it makes (the shim, the mounter's socket and log, the mount points) lives in
//! one sandbox; the mounter and garage are stopped on every path (the panic hook and the
//! forced Ctrl-C kill them through [`kill_all`]).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use ferrovol_mounter::client::MounterClient;
use ferrovol_mounter::fs::FsConfig;
use ferrovol_mounter::wire::MountSpec;
use ferrovol_s3::record::{S3VolumeRecord, VolumeState};
use ferrovol_s3::testing::{S3Server, Server};
use ferrovol_s3::{build_client, client, Timeouts};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::sandbox::Sandbox;
use crate::stats::{ratio, Summary};
use crate::{progress, Config, Context, Result};

const MIB: f64 = (1u64 << 20) as f64;
/// The big file, written and read in buffers of `BLOCK` bytes (as `dd bs=1M` does).
const FILE_BYTES: u64 = 1 << 30;
const BLOCK: usize = 1 << 20;
/// Objects in the listed directory, and the small files read one after the other.
const LS_OBJECTS: usize = 10_000;
const SMALL_FILES: usize = 1_000;
const SMALL_BYTES: usize = 4096;
/// PutObjects in flight while the objects are made (untimed).
const POPULATE_CONCURRENCY: usize = 32;
/// The bound on one S3 call the mount is given (the driver's default).
const MOUNT_TIMEOUT_S: u64 = 15;
const GOAL_RATIO: f64 = 0.9;
const GOAL_RSS_MIB: f64 = 64.0;
/// How long the mounter sits with one mount before its idle memory is read.
const IDLE: Duration = Duration::from_secs(2);

/// The best peer mounter per column of docs/S3-TESTING.md (medians; same kind of machine
/// and server, but not this run).
const PEER_READ: (&str, f64) = ("s3fs 1.90", 397.0);
const PEER_WRITE: (&str, f64) = ("s3fs 1.90, staged on local disk", 169.0);
const PEER_LS_S: (&str, f64) = ("mountpoint-s3 1.24", 0.50);
const PEER_SMALL_S: (&str, f64) = ("rclone 1.60", 2.46);
const PEER_RSS: &str = "s3fs 1.90: 17–44 MiB";

/// The shim garage is started with: sets TCP_NODELAY on every TCP socket it accepts, and
/// creates the file `FERROVOL_NODELAY_MARK` names the first time that succeeded.
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int marked;

static void nodelay(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int one = 1;
    if (fd < 0 || getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return;
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) return;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) return;
    if (!__atomic_exchange_n(&marked, 1, __ATOMIC_RELAXED)) {
        const char *p = getenv("FERROVOL_NODELAY_MARK");
        if (p) {
            int m = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (m >= 0) close(m);
        }
    }
}

int accept(int s, struct sockaddr *a, socklen_t *l) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int fd = real(s, a, l);
    nodelay(fd);
    return fd;
}

int accept4(int s, struct sockaddr *a, socklen_t *l, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int fd = real(s, a, l, flags);
    nodelay(fd);
    return fd;
}
"#;

#[derive(Debug, Serialize)]
pub struct Report {
    pub server: String,
    /// Whether garage ran with the TCP_NODELAY shim, and how that was known (or why not).
    pub nodelay_shim: bool,
    pub nodelay_note: String,
    pub big_reps: usize,
    pub small_reps: usize,
    pub file_bytes: u64,
    /// The mounter's multipart part size and parts in flight per writer; the raw multipart
    /// PUT uses the same.
    pub part_bytes: u64,
    pub parts_in_flight: usize,
    /// The mounter's read-ahead chunk and how many chunks it keeps in flight; the raw
    /// parallel ranged GET uses the same.
    pub read_chunk_bytes: u64,
    pub read_chunks_in_flight: u64,
    pub write: WriteReport,
    pub read: ReadReport,
    pub ls: TimeReport,
    pub small: TimeReport,
    pub memory: MemoryReport,
    pub metrics: MetricsReport,
}

/// The cost of counting S3 calls (ferrovol_s3::metrics): the same HeadObject on a client
/// with the metrics interceptor and on one without, microseconds per call.
#[derive(Debug, Serialize)]
pub struct MetricsReport {
    pub calls: usize,
    pub metered_us: Summary,
    pub unmetered_us: Summary,
    /// Median metered over median unmetered (a time: 1.00 is free).
    pub ratio: f64,
}

/// MiB/s per rep.
#[derive(Debug, Serialize)]
pub struct WriteReport {
    /// open + 1,024 × write(1 MiB) + close (close commits the upload).
    pub mount_mibs: Summary,
    pub raw_multipart_mibs: Summary,
    pub raw_single_put_mibs: Summary,
    /// Median mount over median raw multipart.
    pub ratio: f64,
}

/// MiB/s per rep; every mount rep on a fresh mount (nothing cached).
#[derive(Debug, Serialize)]
pub struct ReadReport {
    pub mount_mibs: Summary,
    pub raw_single_get_mibs: Summary,
    pub raw_ranged_get_mibs: Summary,
    /// Median mount over median raw single-stream GET.
    pub ratio: f64,
    pub ratio_ranged: f64,
}

/// Seconds per rep; every mount rep on a fresh mount.
#[derive(Debug, Serialize)]
pub struct TimeReport {
    pub what: String,
    pub raw_what: String,
    pub mount_s: Summary,
    pub raw_s: Summary,
    /// Median mount over median raw (a time: lower is better).
    pub ratio: f64,
}

/// The mounter process's memory, MiB.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// VmRSS with one mount, `IDLE` after it was made.
    pub idle_rss_mib: f64,
    /// VmHWM over each rep of the 1 GiB write and read (reset before each rep).
    pub write_peak_mib: Summary,
    pub read_peak_mib: Summary,
    pub goal_mib: f64,
}

/// Processes this benchmark started and has not stopped yet (the mounter, garage).
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn pids() -> std::sync::MutexGuard<'static, Vec<u32>> {
    PIDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills the mounter and garage at once (panic hook, forced Ctrl-C); the sandbox sweep then
/// takes the dead mounts down.
pub fn kill_all() {
    for pid in pids().drain(..) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

pub async fn run(cfg: &Config, big_reps: usize, small_reps: usize) -> Result<Report> {
    let mounter_bin = mounter_binary()?;
    let garage_bin = garage_binary()?;
    let server_version = crate::raw::run(&garage_bin.to_string_lossy(), &["--version"])
        .map(|v| v.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_else(|e| format!("garage (version unknown: {e})"));
    let sandbox = Sandbox::new(&cfg.work_dir, "s3")?;

    progress("s3: building the TCP_NODELAY shim and starting garage")?;
    let shim = build_shim(sandbox.path());
    let mark = sandbox.path().join("nodelay.mark");
    let env: Vec<(&str, String)> = match &shim {
        Ok(so) => vec![
            ("LD_PRELOAD", so.to_string_lossy().into_owned()),
            ("FERROVOL_NODELAY_MARK", mark.to_string_lossy().into_owned()),
        ],
        Err(_) => Vec::new(),
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = S3Server::start_with_env(Server::Garage, &env_refs);
    let server = ServerGuard::new(server);
    let bounds = Timeouts {
        connect: Duration::from_secs(3),
        attempt: Duration::from_secs(300),
        operation: Duration::from_secs(300),
        attempts: 1,
    };
    // The raw baseline: the SDK as we configure it, without our metrics interceptor.
    let raw = Client::from_conf(client::config(&server.0.endpoint, bounds).build());
    let metered = build_client(&server.0.endpoint, bounds);
    let bucket = server.0.bucket.clone();
    let local = "pvc-bench";
    let prefix = format!("ferrovol/volumes/{local}/fs/");
    let spec = MountSpec {
        volume_id: format!("s3.vol:{bucket}:{local}"),
        target: PathBuf::new(),
        endpoint: server.0.endpoint.clone(),
        bucket: bucket.clone(),
        data_prefix: prefix.clone(),
        record_key: format!("ferrovol/volumes/{local}/volume.json"),
        read_only: false,
        uid: 0,
        gid: 0,
        file_mode: 0o644,
        dir_mode: 0o755,
        timeout_secs: MOUNT_TIMEOUT_S,
    };
    put_record(&raw, &spec).await?;
    let s3 = Raw { client: raw, bucket };
    // The first request tells whether the shim did its work.
    s3.put(&format!("{prefix}probe"), Bytes::from_static(b"probe")).await?;
    let (nodelay_shim, nodelay_note) = match &shim {
        Ok(_) if mark.exists() => {
            (true, "LD_PRELOAD shim active: it set TCP_NODELAY on garage's accepted sockets".into())
        }
        Ok(_) => (false, "LD_PRELOAD shim built but it never set TCP_NODELAY (garage did not load it?)".into()),
        Err(e) => (false, format!("no shim ({e}): small requests pay Nagle's ~40 ms stalls")),
    };

    progress(&format!("s3: {METRICS_CALLS} HeadObject calls with and without the metrics interceptor"))?;
    let metrics = metrics_cost(&s3, &metered, &format!("{prefix}probe")).await?;

    let defaults = FsConfig::new("", "", "", Duration::from_secs(MOUNT_TIMEOUT_S));
    let part = defaults.part_size;
    let in_flight = ferrovol_mounter::fs::write::MAX_PARTS_IN_FLIGHT;
    let (chunk, depth) = (defaults.read_chunk, defaults.read_depth);

    progress(&format!("s3: putting {LS_OBJECTS} + {SMALL_FILES} small objects ({POPULATE_CONCURRENCY} at once)"))?;
    let ls_keys: Vec<String> = (0..LS_OBJECTS).map(|i| format!("{prefix}ls/f{i:05}")).collect();
    let small_keys: Vec<String> = (0..SMALL_FILES).map(|i| format!("{prefix}small/s{i:04}")).collect();
    populate(&s3, &ls_keys, |i| Bytes::from(format!("object {i}\n"))).await?;
    populate(&s3, &small_keys, |i| {
        let mut b = vec![b'x'; SMALL_BYTES];
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Bytes::from(b)
    })
    .await?;

    let mut m = Mounter::start(&mounter_bin, sandbox.path(), spec).await?;
    let t = m.mount_fresh().await?;
    tokio::time::sleep(IDLE).await;
    let (idle_rss, _) = m.memory_kb()?;
    m.unmount(&t).await?;

    let base = Arc::new(random_block());
    let big_key = format!("{prefix}big");
    let (mut w_mount, mut w_mp, mut w_put, mut w_hwm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..big_reps {
        let tag = rep as u64 * 16;
        let mut mount_first = rep % 2 == 0;
        for _ in 0..2 {
            if mount_first {
                let t = m.mount_fresh().await?;
                m.reset_peak()?;
                let (path, b) = (t.join("big"), base.clone());
                let secs = blocking(move || write_through(&path, &b, tag + 1)).await?;
                w_hwm.push(m.memory_kb()?.1 as f64 / 1024.0);
                m.unmount(&t).await?;
                w_mount.push(FILE_BYTES as f64 / MIB / secs);
            } else {
                let key = format!("{prefix}raw-multipart");
                w_mp.push(FILE_BYTES as f64 / MIB / s3.multipart(&key, &base, tag + 2, part, in_flight).await?);
                let key = format!("{prefix}raw-put");
                w_put.push(FILE_BYTES as f64 / MIB / s3.single_put(&key, &base, tag + 3).await?);
            }
            mount_first = !mount_first;
        }
        progress(&format!(
            "s3: 1 GiB write {}/{big_reps}: mount {:.0} MiB/s, raw multipart {:.0}, raw PutObject {:.0}",
            rep + 1,
            w_mount.last().unwrap_or(&0.0),
            w_mp.last().unwrap_or(&0.0),
            w_put.last().unwrap_or(&0.0)
        ))?;
    }
    for key in ["raw-multipart", "raw-put"] {
        s3.delete(&format!("{prefix}{key}")).await?;
    }

    let (mut r_mount, mut r_get, mut r_ranged, mut r_hwm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..big_reps {
        let mut mount_first = rep % 2 == 0;
        for _ in 0..2 {
            if mount_first {
                let t = m.mount_fresh().await?;
                m.reset_peak()?;
                let path = t.join("big");
                let secs = blocking(move || read_through(&path)).await?;
                r_hwm.push(m.memory_kb()?.1 as f64 / 1024.0);
                m.unmount(&t).await?;
                r_mount.push(FILE_BYTES as f64 / MIB / secs);
            } else {
                r_get.push(FILE_BYTES as f64 / MIB / s3.get_stream(&big_key).await?);
                r_ranged.push(FILE_BYTES as f64 / MIB / s3.get_ranged(&big_key, chunk, depth + 1).await?);
            }
            mount_first = !mount_first;
        }
        progress(&format!(
            "s3: 1 GiB cold read {}/{big_reps}: mount {:.0} MiB/s, raw GET {:.0}, raw ranged GET {:.0}",
            rep + 1,
            r_mount.last().unwrap_or(&0.0),
            r_get.last().unwrap_or(&0.0),
            r_ranged.last().unwrap_or(&0.0)
        ))?;
    }

    let (mut ls_mount, mut ls_raw, mut sm_mount, mut sm_raw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..small_reps {
        let mut mount_first = rep % 2 == 0;
        for _ in 0..2 {
            if mount_first {
                let t = m.mount_fresh().await?;
                let dir = t.join("ls");
                ls_mount.push(blocking(move || ls_l(&dir)).await?);
                m.unmount(&t).await?;
                let t = m.mount_fresh().await?;
                let dir = t.join("small");
                sm_mount.push(blocking(move || read_small(&dir)).await?);
                m.unmount(&t).await?;
            } else {
                ls_raw.push(s3.list(&format!("{prefix}ls/")).await?);
                sm_raw.push(s3.get_small(&small_keys).await?);
            }
            mount_first = !mount_first;
        }
        progress(&format!(
            "s3: ls -l / small reads {}/{small_reps}: mount {:.2} s / {:.2} s, raw {:.3} s / {:.2} s",
            rep + 1,
            ls_mount.last().unwrap_or(&0.0),
            sm_mount.last().unwrap_or(&0.0),
            ls_raw.last().unwrap_or(&0.0),
            sm_raw.last().unwrap_or(&0.0)
        ))?;
    }
    m.stop()?;
    drop(m);
    crate::report::check_clean(&sandbox, "s3");
    drop(server);

    let w = WriteReport {
        ratio: ratio(Summary::of(&w_mount).median, Summary::of(&w_mp).median),
        mount_mibs: Summary::of(&w_mount),
        raw_multipart_mibs: Summary::of(&w_mp),
        raw_single_put_mibs: Summary::of(&w_put),
    };
    let r = ReadReport {
        ratio: ratio(Summary::of(&r_mount).median, Summary::of(&r_get).median),
        ratio_ranged: ratio(Summary::of(&r_mount).median, Summary::of(&r_ranged).median),
        mount_mibs: Summary::of(&r_mount),
        raw_single_get_mibs: Summary::of(&r_get),
        raw_ranged_get_mibs: Summary::of(&r_ranged),
    };
    let time = |what: &str, raw_what: &str, mount: &[f64], raw: &[f64]| TimeReport {
        what: what.into(),
        raw_what: raw_what.into(),
        mount_s: Summary::of(mount),
        raw_s: Summary::of(raw),
        ratio: ratio(Summary::of(mount).median, Summary::of(raw).median),
    };
    Ok(Report {
        server: server_version,
        nodelay_shim,
        nodelay_note,
        big_reps,
        small_reps,
        file_bytes: FILE_BYTES,
        part_bytes: part as u64,
        parts_in_flight: in_flight,
        read_chunk_bytes: chunk,
        read_chunks_in_flight: depth + 1,
        write: w,
        read: r,
        ls: time(
            "ls -l of 10,000 objects (readdir + lstat of each)",
            "ListObjectsV2 with delimiter, every page",
            &ls_mount,
            &ls_raw,
        ),
        small: time(
            "1,000 files of 4 KiB, open + read + close each",
            "GetObject of each key, one client",
            &sm_mount,
            &sm_raw,
        ),
        memory: MemoryReport {
            idle_rss_mib: idle_rss as f64 / 1024.0,
            write_peak_mib: Summary::of(&w_hwm),
            read_peak_mib: Summary::of(&r_hwm),
            goal_mib: GOAL_RSS_MIB,
        },
        metrics,
    })
}

/// Calls per side of the metrics cost measurement, in alternating blocks of 100.
const METRICS_CALLS: usize = 2000;

/// HeadObject of `key`, one call at a time, alternately on the raw client and on `metered`.
async fn metrics_cost(s3: &Raw, metered: &Client, key: &str) -> Result<MetricsReport> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for block in 0..METRICS_CALLS / 100 {
        for side in 0..2 {
            let (client, out) = if (block + side) % 2 == 0 { (metered, &mut with) } else { (&s3.client, &mut without) };
            for _ in 0..100 {
                let t = Instant::now();
                client
                    .head_object()
                    .bucket(&s3.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| s3_error(format!("HeadObject {key}"), e))?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    Ok(MetricsReport {
        calls: METRICS_CALLS,
        ratio: ratio(Summary::of(&with).median, Summary::of(&without).median),
        metered_us: Summary::of(&with),
        unmetered_us: Summary::of(&without),
    })
}

/// `$FERROVOL_MOUNTER_BIN`, else `ferrovol-mounter` beside this executable.
fn mounter_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("FERROVOL_MOUNTER_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context(|| "finding this executable".to_string())?
            .with_file_name("ferrovol-mounter"),
    };
    if !path.is_file() {
        return Err(format!(
            "mounter binary {} not found: run `cargo build --release -p ferrovol-mounter` first, or set \
             FERROVOL_MOUNTER_BIN",
            path.display()
        ));
    }
    Ok(path)
}

/// The garage binary the S3 fixture starts: `$FERROVOL_GARAGE`, else `garage` on the PATH.
/// Checked here because the fixture panics when it cannot start the server.
fn garage_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERROVOL_GARAGE") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("FERROVOL_GARAGE={} is not a file", p.display())) };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "no garage binary: set FERROVOL_GARAGE (e.g. /var/cache/ferrovol-tools/garage/bin/garage; \
             scripts/s3-servers installs it)"
                .to_string()
        })
}

/// Compiles [`SHIM_C`] into `dir/nodelay.so`.
fn build_shim(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("nodelay.c");
    let so = dir.join("nodelay.so");
    fs::write(&src, SHIM_C).context(|| format!("writing {}", src.display()))?;
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .context(|| "running gcc".to_string())?;
    if !out.status.success() {
        return Err(format!("gcc failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(so)
}

/// garage, registered for [`kill_all`] while it runs.
struct ServerGuard(S3Server);

impl ServerGuard {
    fn new(s: S3Server) -> ServerGuard {
        if let Some(pid) = s.pid() {
            pids().push(pid);
        }
        ServerGuard(s)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.pid() {
            pids().retain(|p| *p != pid);
        }
        self.0.stop();
    }
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("a blocking task failed: {e}"))?
}

async fn put_record(client: &Client, spec: &MountSpec) -> Result<()> {
    let rec = S3VolumeRecord {
        version: ferrovol_s3::record::VERSION,
        name: "pvc-bench".into(),
        id: spec.volume_id.clone(),
        capacity_bytes: 64 << 30,
        own_bucket: false,
        state: VolumeState::Ready,
        source: None,
        parameters: Default::default(),
        created_unix: 0,
    };
    let body = serde_json::to_vec(&rec).context(|| "encoding the volume record".to_string())?;
    client
        .put_object()
        .bucket(&spec.bucket)
        .key(&spec.record_key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("putting the volume record: {}", aws_sdk_s3::error::DisplayErrorContext(e)))
}

/// 1 MiB of pseudo-random bytes (xorshift64*): garage stores blocks by content hash, so
/// every block written is stamped to differ (see [`stamp`]) and nothing is deduplicated.
fn random_block() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v
}

/// Marks block `index` of stream `tag`.
fn stamp(buf: &mut [u8], tag: u64, index: u64) {
    buf[..8].copy_from_slice(&tag.to_le_bytes());
    buf[8..16].copy_from_slice(&index.to_le_bytes());
}

fn blocks() -> u64 {
    FILE_BYTES / BLOCK as u64
}

/// Writes the 1 GiB file through the mount in 1 MiB writes and closes it; answers seconds
/// from open to the end of close (close commits the multipart upload).
fn write_through(path: &Path, base: &[u8], tag: u64) -> Result<f64> {
    let mut buf = base.to_vec();
    let t = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .context(|| format!("creating {}", path.display()))?;
    for i in 0..blocks() {
        stamp(&mut buf, tag, i);
        f.write_all(&buf).context(|| format!("writing {}", path.display()))?;
    }
    // std's close ignores errors; the commit's outcome is close's.
    nix::unistd::close(f.into_raw_fd()).context(|| format!("closing (committing) {}", path.display()))?;
    let secs = t.elapsed().as_secs_f64();
    let len = fs::metadata(path).context(|| format!("stat of {}", path.display()))?.len();
    if len != FILE_BYTES {
        return Err(format!("{} is {len} bytes after the write, not {FILE_BYTES}", path.display()));
    }
    Ok(secs)
}

/// Reads the file through the mount in 1 MiB reads; answers seconds from open to close.
fn read_through(path: &Path) -> Result<f64> {
    let mut buf = vec![0u8; BLOCK];
    let t = Instant::now();
    let mut f = File::open(path).context(|| format!("opening {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    drop(f);
    let secs = t.elapsed().as_secs_f64();
    if total != FILE_BYTES {
        return Err(format!("read {total} bytes of {}, expected {FILE_BYTES}", path.display()));
    }
    Ok(secs)
}

/// `ls -l`: the directory's entries and an lstat of each; answers seconds.
fn ls_l(dir: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut n = 0;
    for e in fs::read_dir(dir).context(|| format!("opening {}", dir.display()))? {
        let e = e.context(|| format!("reading {}", dir.display()))?;
        fs::symlink_metadata(e.path()).context(|| format!("lstat of {}", e.path().display()))?;
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    if n != LS_OBJECTS {
        return Err(format!("{} lists {n} entries, expected {LS_OBJECTS}", dir.display()));
    }
    Ok(secs)
}

/// Opens, reads and closes each small file in turn; answers seconds.
fn read_small(dir: &Path) -> Result<f64> {
    let mut buf = Vec::with_capacity(SMALL_BYTES);
    let t = Instant::now();
    for i in 0..SMALL_FILES {
        let path = dir.join(format!("s{i:04}"));
        buf.clear();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .context(|| format!("reading {}", path.display()))?;
        if buf.len() != SMALL_BYTES {
            return Err(format!("{} has {} bytes, expected {SMALL_BYTES}", path.display(), buf.len()));
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Puts `make(i)` at each of `keys`, `POPULATE_CONCURRENCY` at once.
async fn populate(s3: &Raw, keys: &[String], make: impl Fn(usize) -> Bytes) -> Result<()> {
    let bodies: Arc<Vec<(String, Bytes)>> =
        Arc::new(keys.iter().enumerate().map(|(i, k)| (k.clone(), make(i))).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..POPULATE_CONCURRENCY {
        let (s3, bodies, next) = (s3.clone(), bodies.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let Some((key, body)) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return Ok::<(), String>(());
                };
                s3.put(key, body.clone()).await?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.map_err(|e| format!("a PutObject task failed: {e}"))??;
    }
    Ok(())
}

fn s3_error(what: String, e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{what}: {}", aws_sdk_s3::error::DisplayErrorContext(e))
}

/// The raw aws-sdk-s3 operations, on one client.
#[derive(Debug, Clone)]
struct Raw {
    client: Client,
    bucket: String,
}

impl Raw {
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_error(format!("PutObject {key}"), e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_error(format!("DeleteObject {key}"), e))
    }

    /// A multipart upload of the 1 GiB stream in parts of `part` bytes, `in_flight` parts
    /// uploading at once, as the mounter's writer does; answers seconds including
    /// CreateMultipartUpload and CompleteMultipartUpload.
    async fn multipart(&self, key: &str, base: &[u8], tag: u64, part: usize, in_flight: usize) -> Result<f64> {
        let mut buf = base.to_vec();
        let t = Instant::now();
        let id = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(format!("CreateMultipartUpload {key}"), e))?
            .upload_id
            .ok_or_else(|| format!("CreateMultipartUpload {key} answered no upload ID"))?;
        let r = self.upload_parts(key, &id, &mut buf, tag, part, in_flight).await;
        let parts = match r {
            Ok(p) => p,
            Err(e) => {
                let _ = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&id).send().await;
                return Err(e);
            }
        };
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| s3_error(format!("CompleteMultipartUpload {key}"), e))?;
        Ok(t.elapsed().as_secs_f64())
    }

    async fn upload_parts(
        &self,
        key: &str,
        id: &str,
        buf: &mut [u8],
        tag: u64,
        part: usize,
        in_flight: usize,
    ) -> Result<Vec<CompletedPart>> {
        let mut pending: VecDeque<tokio::task::JoinHandle<Result<CompletedPart>>> = VecDeque::new();
        let mut done = Vec::new();
        let mut block = 0u64;
        let mut number = 1;
        while block < blocks() {
            let mut body = BytesMut::with_capacity(part);
            while body.len() < part && block < blocks() {
                stamp(buf, tag, block);
                body.extend_from_slice(buf);
                block += 1;
            }
            while pending.len() >= in_flight.max(1) {
                if let Some(h) = pending.pop_front() {
                    done.push(h.await.map_err(|e| format!("an UploadPart task failed: {e}"))??);
                }
            }
            let (s3, key, id, n) = (self.clone(), key.to_string(), id.to_string(), number);
            number += 1;
            pending.push_back(tokio::spawn(async move {
                let out = s3
                    .client
                    .upload_part()
                    .bucket(&s3.bucket)
                    .key(&key)
                    .upload_id(&id)
                    .part_number(n)
                    .body(ByteStream::from(body.freeze()))
                    .send()
                    .await
                    .map_err(|e| s3_error(format!("UploadPart {n} of {key}"), e))?;
                Ok(CompletedPart::builder().part_number(n).set_e_tag(out.e_tag).build())
            }));
        }
        for h in pending {
            done.push(h.await.map_err(|e| format!("an UploadPart task failed: {e}"))??);
        }
        Ok(done)
    }

    /// One PutObject of the whole 1 GiB (the body is built before the clock starts).
    async fn single_put(&self, key: &str, base: &[u8], tag: u64) -> Result<f64> {
        let mut buf = base.to_vec();
        let mut body = Vec::with_capacity(FILE_BYTES as usize);
        for i in 0..blocks() {
            stamp(&mut buf, tag, i);
            body.extend_from_slice(&buf);
        }
        let body = Bytes::from(body);
        let t = Instant::now();
        self.put(key, body).await?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// One GetObject of the whole object, its body streamed and dropped; answers seconds.
    async fn get_stream(&self, key: &str) -> Result<f64> {
        let t = Instant::now();
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error(format!("GetObject {key}"), e))?;
        let mut body = out.body;
        let mut total = 0u64;
        while let Some(b) = body.try_next().await.map_err(|e| format!("reading the body of {key}: {e}"))? {
            total += b.len() as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        if total != FILE_BYTES {
            return Err(format!("GetObject {key} gave {total} bytes, expected {FILE_BYTES}"));
        }
        Ok(secs)
    }

    /// Ranged GETs of `chunk` bytes, `window` in flight, consumed in order (the mounter's
    /// read-ahead); answers seconds.
    async fn get_ranged(&self, key: &str, chunk: u64, window: u64) -> Result<f64> {
        let t = Instant::now();
        let chunks = FILE_BYTES.div_ceil(chunk);
        let mut pending: VecDeque<tokio::task::JoinHandle<Result<u64>>> = VecDeque::new();
        let (mut next, mut total) = (0u64, 0u64);
        loop {
            while next < chunks && (pending.len() as u64) < window.max(1) {
                let (s3, key) = (self.clone(), key.to_string());
                let (start, end) = (next * chunk, ((next + 1) * chunk).min(FILE_BYTES));
                pending.push_back(tokio::spawn(async move {
                    let out = s3
                        .client
                        .get_object()
                        .bucket(&s3.bucket)
                        .key(&key)
                        .range(format!("bytes={start}-{}", end - 1))
                        .send()
                        .await
                        .map_err(|e| s3_error(format!("GetObject {key} {start}..{end}"), e))?;
                    let b = out.body.collect().await.map_err(|e| format!("reading {key} {start}..{end}: {e}"))?;
                    Ok(b.into_bytes().len() as u64)
                }));
                next += 1;
            }
            let Some(h) = pending.pop_front() else { break };
            total += h.await.map_err(|e| format!("a ranged GET task failed: {e}"))??;
        }
        let secs = t.elapsed().as_secs_f64();
        if total != FILE_BYTES {
            return Err(format!("ranged GETs of {key} gave {total} bytes, expected {FILE_BYTES}"));
        }
        Ok(secs)
    }

    /// ListObjectsV2 of `prefix` with delimiter `/`, every page; answers seconds.
    async fn list(&self, prefix: &str) -> Result<f64> {
        let t = Instant::now();
        let (mut token, mut n) = (None::<String>, 0usize);
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| s3_error(format!("ListObjectsV2 {prefix}"), e))?;
            n += out.contents().len() + out.common_prefixes().len();
            match out.next_continuation_token {
                Some(t) if out.is_truncated == Some(true) => token = Some(t),
                _ => break,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if n != LS_OBJECTS {
            return Err(format!("ListObjectsV2 {prefix} listed {n} entries, expected {LS_OBJECTS}"));
        }
        Ok(secs)
    }

    /// GetObject of each key in turn, each body read whole; answers seconds.
    async fn get_small(&self, keys: &[String]) -> Result<f64> {
        let t = Instant::now();
        for key in keys {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| s3_error(format!("GetObject {key}"), e))?;
            let b = out.body.collect().await.map_err(|e| format!("reading {key}: {e}"))?.into_bytes();
            if b.len() != SMALL_BYTES {
                return Err(format!("GetObject {key} gave {} bytes, expected {SMALL_BYTES}", b.len()));
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The `ferrovol-mounter` daemon, in a process group of its own, with the volume it mounts.
/// On drop every target it still has mounted is detached and the process is stopped.
struct Mounter {
    child: Child,
    client: MounterClient,
    spec: MountSpec,
    dir: PathBuf,
    mounted: Vec<PathBuf>,
    made: usize,
}

impl Mounter {
    async fn start(bin: &Path, dir: &Path, spec: MountSpec) -> Result<Mounter> {
        let socket = dir.join("mounter.sock");
        let log_path = dir.join("mounter.log");
        let log = File::create(&log_path).context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context(|| "duplicating the mounter log handle".to_string())?;
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .env_remove("AWS_CA_BUNDLE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .context(|| format!("starting {}", bin.display()))?;
        pids().push(child.id());
        let mut m = Mounter {
            child,
            client: MounterClient::new(socket.clone()),
            spec,
            dir: dir.to_path_buf(),
            mounted: Vec::new(),
            made: 0,
        };
        let since = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = m.child.try_wait().context(|| "waiting on the mounter".to_string())? {
                return Err(format!("the mounter exited at start ({st}): {}", m.log_tail()));
            }
            if since.elapsed() > Duration::from_secs(20) {
                return Err(format!("the mounter did not listen within 20 s: {}", m.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(m)
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("mounter.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Mounts the volume on a new empty directory (a fresh mount: nothing cached).
    async fn mount_fresh(&mut self) -> Result<PathBuf> {
        let target = self.dir.join(format!("mnt{}", self.made));
        self.made += 1;
        fs::create_dir(&target).context(|| format!("making {}", target.display()))?;
        let mut spec = self.spec.clone();
        spec.target = target.clone();
        self.client
            .mount(&spec)
            .await
            .map_err(|e| format!("mounting {}: {e}; mounter log: {}", target.display(), self.log_tail()))?;
        self.mounted.push(target.clone());
        Ok(target)
    }

    async fn unmount(&mut self, target: &Path) -> Result<()> {
        self.client.unmount(target).await.map_err(|e| format!("unmounting {}: {e}", target.display()))?;
        self.mounted.retain(|t| t != target);
        fs::remove_dir(target).context(|| format!("removing {}", target.display()))
    }

    /// VmRSS and VmHWM, kB.
    fn memory_kb(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context(|| "reading the mounter's /proc status".to_string())?;
        let kb = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| format!("no {name} in kB in the mounter's /proc status"))
        };
        Ok((kb("VmRSS")?, kb("VmHWM")?))
    }

    /// Resets VmHWM to the current RSS (`clear_refs` 5).
    fn reset_peak(&self) -> Result<()> {
        fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5")
            .context(|| "resetting the mounter's VmHWM".to_string())
    }

    /// SIGTERM (the mounter unmounts what it holds), SIGKILL after 10 s.
    fn stop(&mut self) -> Result<()> {
        let pid = self.child.id();
        pids().retain(|p| *p != pid);
        if self.child.try_wait().ok().flatten().is_some() {
            return Err(format!("the mounter had exited: {}", self.log_tail()));
        }
        if let Ok(p) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("the mounter did not stop within 10 s of SIGTERM; killed it".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Mounter {
    fn drop(&mut self) {
        for t in self.mounted.drain(..) {
            let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
        }
        if self.child.try_wait().ok().flatten().is_none() {
            if let Err(e) = self.stop() {
                eprintln!("ferrovol-bench: {e}");
            }
        }
    }
}

/// The text report.
pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "7. S3 family: ferrovol-mounter (FUSE) vs raw aws-sdk-s3, one {} server on 127.0.0.1 ({}), medians \
         (min–max); 1 GiB ops {} reps, the others {} reps, alternated; every read on a fresh mount",
        r.server, r.nodelay_note, r.big_reps, r.small_reps
    )?;
    writeln!(
        out,
        "   mounter: parts of {} MiB, {} uploading at once; read-ahead chunks of {} MiB, {} in flight",
        r.part_bytes >> 20,
        r.parts_in_flight,
        r.read_chunk_bytes >> 20,
        r.read_chunks_in_flight
    )?;
    let goal = |ratio: f64| crate::report::verdict(ratio >= GOAL_RATIO);
    let w = &r.write;
    writeln!(out, "   seq write 1 GiB (1 MiB writes + close)   mount {} MiB/s", w.mount_mibs.show(1))?;
    writeln!(
        out,
        "     raw multipart, same part size and parallelism {} MiB/s   ratio {:.2}   goal >= {GOAL_RATIO}: {}",
        w.raw_multipart_mibs.show(1),
        w.ratio,
        goal(w.ratio)
    )?;
    writeln!(out, "     raw single PutObject                           {} MiB/s", w.raw_single_put_mibs.show(1))?;
    writeln!(out, "     best peer ({}): {:.0} MiB/s (S3-TESTING.md, not this run)", PEER_WRITE.0, PEER_WRITE.1)?;
    let rd = &r.read;
    writeln!(out, "   seq read 1 GiB, cold (1 MiB reads)        mount {} MiB/s", rd.mount_mibs.show(1))?;
    writeln!(
        out,
        "     raw GetObject, one stream                      {} MiB/s   ratio {:.2}   goal >= {GOAL_RATIO}: {}",
        rd.raw_single_get_mibs.show(1),
        rd.ratio,
        goal(rd.ratio)
    )?;
    writeln!(
        out,
        "     raw ranged GETs as the mounter's read-ahead    {} MiB/s   ratio {:.2}",
        rd.raw_ranged_get_mibs.show(1),
        rd.ratio_ranged
    )?;
    writeln!(out, "     best peer ({}): {:.0} MiB/s (S3-TESTING.md, not this run)", PEER_READ.0, PEER_READ.1)?;
    for (t, peer) in [(&r.ls, PEER_LS_S), (&r.small, PEER_SMALL_S)] {
        writeln!(out, "   {}   mount {} s", t.what, t.mount_s.show(3))?;
        writeln!(out, "     raw: {}   {} s   ratio {:.2} (time)", t.raw_what, t.raw_s.show(3), t.ratio)?;
        writeln!(out, "     best peer ({}): {:.2} s (S3-TESTING.md, not this run)", peer.0, peer.1)?;
    }
    let m = &r.memory;
    let peak = m.write_peak_mib.max.max(m.read_peak_mib.max);
    writeln!(
        out,
        "   mounter memory (MiB): idle VmRSS with one mount {:.1}; VmHWM writing {}, reading {}   goal < {:.0}: {}   \
         (best peer {PEER_RSS})",
        m.idle_rss_mib,
        m.write_peak_mib.show(1),
        m.read_peak_mib.show(1),
        m.goal_mib,
        crate::report::verdict(peak < m.goal_mib)
    )?;
    let c = &r.metrics;
    writeln!(
        out,
        "   S3 call metrics: HeadObject x{} per side   metered {} us   unmetered {} us   ratio {:.3} (time)",
        c.calls,
        c.metered_us.show(0),
        c.unmetered_us.show(0),
        c.ratio
    )
}
