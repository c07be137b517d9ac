//! Benchmark 6: the split roles (a controller process and a node agent process that talk over
//! mutual TLS on 127.0.0.1) against the all-in-one process, on the same machine and the same
//! data-dir filesystem: controller-call latency, where the split path adds one mTLS gRPC hop
//! from the controller to the agent; how long a SIGKILLed controller takes to answer Probe, to
//! see its node again and to place a volume again; and the idle memory of each process.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use ferrovol_proto::csi::v1 as csi;
use serde::Serialize;
use tonic::transport::Channel;

use crate::driver::{connect, ext4_mount, Csi, Driver, NODE_ID};
use crate::sandbox::Sandbox;
use crate::stats::{ms, ratio, timed_async, Summary};
use crate::{progress, Config, Result};
use csi::controller_client::ControllerClient;

const VOLUME_BYTES: u64 = 64 << 20;
/// The driver's node topology key (`ferrovol_core::TOPOLOGY_NODE_KEY`).
const TOPOLOGY_NODE_KEY: &str = "topology.ferrovol.dev/node";
/// The controller's `--heartbeat-interval` default, and the short one also measured.
const DEFAULT_HEARTBEAT_S: f64 = 2.0;
const SHORT_HEARTBEAT_S: f64 = 0.5;
/// Controller restarts per heartbeat interval, at most (fewer when `--reps` is smaller).
const RESTART_REPS: usize = 5;
/// How long every process sits idle before its memory is read.
const IDLE: Duration = Duration::from_secs(3);
/// How long a started controller may take to see its node and place a volume.
const PLACE_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll periods: GetCapacity is cheap and quiet; every refused CreateVolume is a warn line
/// in the controller's log, so that poll is slower.
const CAPACITY_POLL: Duration = Duration::from_millis(1);
const CREATE_POLL: Duration = Duration::from_millis(10);

/// The calls timed on both paths, in the order of a round.
const CALLS: [(&str, &str); 5] = [
    ("CreateVolume", "controller -> agent: create"),
    ("DeleteVolume", "controller -> agent: delete"),
    ("ControllerGetVolume", "controller -> agent: get"),
    ("GetCapacity (node segment)", "controller -> agent: capacity"),
    ("Probe", "(answered by the controller alone)"),
];

type CallTimes = [f64; CALLS.len()];

#[derive(Debug, Serialize)]
pub struct Report {
    pub reps: usize,
    pub volume_bytes: u64,
    /// `--heartbeat-interval` of the controller the latencies were measured on.
    pub latency_heartbeat_s: f64,
    /// CreateVolume + DeleteVolume of one volume.
    pub pair_split_ms: Summary,
    pub pair_all_in_one_ms: Summary,
    /// Median split over median all-in-one.
    pub pair_ratio: f64,
    pub calls: Vec<CallReport>,
    pub restarts: Vec<RestartReport>,
    pub memory: MemoryReport,
}

#[derive(Debug, Serialize)]
pub struct CallReport {
    pub call: &'static str,
    pub split_path: &'static str,
    pub split_ms: Summary,
    pub all_in_one_ms: Summary,
    pub ratio: f64,
}

/// SIGKILL of the controller and the same command again, with the node agent left running.
#[derive(Debug, Serialize)]
pub struct RestartReport {
    pub heartbeat_s: f64,
    /// The driver's settle window: 2 heartbeats + 1 s, in which no volume is placed.
    pub settle_s: f64,
    pub reps: usize,
    pub exec_to_ready_ms: Summary,
    /// Until GetCapacity for the node's segment answers more than 0.
    pub exec_to_registered_ms: Summary,
    /// Until a CreateVolume answers OK (polled every 10 ms while it answers UNAVAILABLE).
    pub exec_to_first_create_ms: Summary,
    pub unavailable_answers: Summary,
}

/// VmRSS and VmHWM after the processes sat idle, MiB: one reading of each.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub idle_s: f64,
    pub controller_rss_mib: f64,
    pub controller_hwm_mib: f64,
    pub node_rss_mib: f64,
    pub node_hwm_mib: f64,
    pub all_in_one_rss_mib: f64,
    pub all_in_one_hwm_mib: f64,
    /// (controller + node) over all-in-one, VmRSS.
    pub ratio: f64,
}

pub async fn run(cfg: &Config, reps: usize) -> Result<Report> {
    let (mut aio, aio_csi) = Driver::start(&cfg.bin, &cfg.work_dir, "cluster-aio", None).await?;
    let aio_ctl = Ctl::connect(&aio.socket).await?;
    let mut split = Split::start(cfg, DEFAULT_HEARTBEAT_S).await?;
    let split_ctl = Ctl::connect(&split.controller.socket).await?;
    progress("cluster: waiting for the node to register and the settle window to pass")?;
    split.wait_placeable(&split_ctl).await?;

    // A volume each that ControllerGetVolume reads, then one untimed round each
    // (connections, caches).
    let kept_split = split.csi.create("pvc-kept", VOLUME_BYTES).await?;
    let kept_aio = aio_csi.create("pvc-kept", VOLUME_BYTES).await?;
    round(&split.csi, &split_ctl, "pvc-warm", &kept_split).await?;
    round(&aio_csi, &aio_ctl, "pvc-warm", &kept_aio).await?;

    progress(&format!("cluster: {} s idle, then memory", IDLE.as_secs()))?;
    tokio::time::sleep(IDLE).await;
    let mib = |d: &Driver| d.memory_kb().map(|(rss, hwm)| (rss as f64 / 1024.0, hwm as f64 / 1024.0));
    let (controller_rss, controller_hwm) = mib(&split.controller)?;
    let (node_rss, node_hwm) = mib(&split.node)?;
    let (aio_rss, aio_hwm) = mib(&aio)?;
    let memory = MemoryReport {
        idle_s: IDLE.as_secs_f64(),
        controller_rss_mib: controller_rss,
        controller_hwm_mib: controller_hwm,
        node_rss_mib: node_rss,
        node_hwm_mib: node_hwm,
        all_in_one_rss_mib: aio_rss,
        all_in_one_hwm_mib: aio_hwm,
        ratio: ratio(controller_rss + node_rss, aio_rss),
    };

    let (mut split_runs, mut aio_runs) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let name = format!("pvc-lat-{rep}");
        // Alternate which goes first, so a slow drift falls on both alike.
        if rep % 2 == 0 {
            split_runs.push(round(&split.csi, &split_ctl, &name, &kept_split).await?);
            aio_runs.push(round(&aio_csi, &aio_ctl, &name, &kept_aio).await?);
        } else {
            aio_runs.push(round(&aio_csi, &aio_ctl, &name, &kept_aio).await?);
            split_runs.push(round(&split.csi, &split_ctl, &name, &kept_split).await?);
        }
        progress(&format!("cluster: latency {}/{reps}", rep + 1))?;
    }
    split.csi.delete(&kept_split).await?;
    aio_csi.delete(&kept_aio).await?;
    crate::report::check_clean(aio.sandbox(), "cluster (all-in-one)");
    crate::report::check_clean(split.node.sandbox(), "cluster (node agent)");
    aio.stop()?;
    drop(aio);

    let restart_reps = reps.min(RESTART_REPS);
    let mut restarts = vec![split.restarts(restart_reps).await?];
    split.controller.stop()?;
    split.node.stop()?;
    drop(split);
    let mut short = Split::start(cfg, SHORT_HEARTBEAT_S).await?;
    let short_ctl = Ctl::connect(&short.controller.socket).await?;
    short.wait_placeable(&short_ctl).await?;
    restarts.insert(0, short.restarts(restart_reps).await?);
    crate::report::check_clean(short.node.sandbox(), "cluster (node agent)");

    let pair = |runs: &[CallTimes]| Summary::of(&runs.iter().map(|r| r[0] + r[1]).collect::<Vec<_>>());
    let (pair_split_ms, pair_all_in_one_ms) = (pair(&split_runs), pair(&aio_runs));
    let calls = CALLS
        .iter()
        .enumerate()
        .map(|(i, (call, split_path))| {
            let split_ms = Summary::of(&split_runs.iter().map(|r| r[i]).collect::<Vec<_>>());
            let all_in_one_ms = Summary::of(&aio_runs.iter().map(|r| r[i]).collect::<Vec<_>>());
            CallReport {
                call,
                split_path,
                ratio: ratio(split_ms.median, all_in_one_ms.median),
                split_ms,
                all_in_one_ms,
            }
        })
        .collect();
    Ok(Report {
        reps,
        volume_bytes: VOLUME_BYTES,
        latency_heartbeat_s: DEFAULT_HEARTBEAT_S,
        pair_ratio: ratio(pair_split_ms.median, pair_all_in_one_ms.median),
        pair_split_ms,
        pair_all_in_one_ms,
        calls,
        restarts,
        memory,
    })
}

/// One round of the timed calls: CreateVolume and DeleteVolume of `name`, then
/// ControllerGetVolume of the kept volume, GetCapacity and Probe.
async fn round(csi: &Csi, ctl: &Ctl, name: &str, kept: &str) -> Result<CallTimes> {
    let mut t = [0.0; CALLS.len()];
    let (id, t0) = timed_async(csi.create(name, VOLUME_BYTES)).await;
    let id = id?;
    t[0] = t0;
    let (r, t1) = timed_async(csi.delete(&id)).await;
    r?;
    t[1] = t1;
    let (r, t2) = timed_async(ctl.get_volume(kept)).await;
    r?;
    t[2] = t2;
    let (r, t3) = timed_async(ctl.capacity()).await;
    if r? <= 0 {
        return Err("GetCapacity answered no free space on the bench's node".into());
    }
    t[3] = t3;
    let (r, t4) = timed_async(csi.probe()).await;
    r?;
    t[4] = t4;
    Ok(t)
}

/// A controller and one node agent on 127.0.0.1 with certificates of their own, and a CSI
/// client of the controller. On drop the controller stops first, then the node agent, then
/// the certificates' sandbox goes (fields drop in order; each driver sweeps its sandbox).
#[derive(Debug)]
struct Split {
    controller: Driver,
    node: Driver,
    csi: Csi,
    heartbeat_s: f64,
    _certs: Sandbox,
}

impl Split {
    /// Makes the certificates, starts the controller and then the node agent, and waits until
    /// both answer Probe ready.
    async fn start(cfg: &Config, heartbeat_s: f64) -> Result<Split> {
        progress(&format!("cluster: starting a controller (heartbeat {heartbeat_s} s) and a node agent"))?;
        let certs = Sandbox::new(&cfg.work_dir, "cluster-certs")?;
        let out = certs.path().join("certs");
        crate::raw::run(&cfg.bin.to_string_lossy(), &["certs", "generate", "--out", &out.to_string_lossy()])?;
        let [registry, agent] = free_ports()?;
        let tls = |role: &str| format!("--tls-dir={}", out.join(role).display());
        let controller_args = [
            "--roles=controller".to_string(),
            tls("controller"),
            format!("--cluster-listen={registry}"),
            format!("--heartbeat-interval={heartbeat_s}"),
        ];
        let node_args = [
            "--roles=node".to_string(),
            tls("node"),
            format!("--cluster-listen={agent}"),
            format!("--controller-address={registry}"),
        ];
        let mut controller =
            Driver::spawn_with(&cfg.bin, &cfg.work_dir, "cluster-controller", None, &controller_args, "warn")?;
        let csi = controller.wait_ready().await?;
        let mut node = Driver::spawn_with(&cfg.bin, &cfg.work_dir, "cluster-node", None, &node_args, "warn")?;
        node.wait_ready().await?;
        Ok(Split { controller, node, csi, heartbeat_s, _certs: certs })
    }

    /// Waits until the node is registered and a volume can be placed (one is made and deleted).
    async fn wait_placeable(&self, ctl: &Ctl) -> Result<()> {
        let since = Instant::now();
        poll("the node agent to register", since, CAPACITY_POLL, || registered(ctl)).await?;
        let (id, _) = poll("a CreateVolume to succeed", since, CREATE_POLL, || ctl.try_create("pvc-settle")).await?;
        self.csi.delete(&id).await
    }

    /// SIGKILLs the controller and starts it again, `reps` times, timing from each exec: Probe
    /// ready, the node registered again, the first CreateVolume that succeeds.
    async fn restarts(&mut self, reps: usize) -> Result<RestartReport> {
        let (mut ready, mut registered_ms, mut created, mut refusals) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            // The node heartbeats on a schedule of its own; pausing a different fraction of
            // an interval before each kill spreads the kills over that schedule.
            let phase = self.heartbeat_s * (rep as f64 + 0.5) / reps as f64;
            tokio::time::sleep(Duration::from_secs_f64(phase)).await;
            self.controller.kill()?;
            self.controller.respawn()?;
            self.csi = self.controller.wait_ready().await?;
            let exec = self.controller.spawned;
            ready.push(ms(exec.elapsed()));
            let ctl = Ctl::connect(&self.controller.socket).await?;
            poll("the node agent to register again", exec, CAPACITY_POLL, || registered(&ctl)).await?;
            registered_ms.push(ms(exec.elapsed()));
            let name = format!("pvc-restart-{rep}");
            let (id, attempts) = poll("a CreateVolume to succeed", exec, CREATE_POLL, || ctl.try_create(&name)).await?;
            created.push(ms(exec.elapsed()));
            refusals.push((attempts - 1) as f64);
            self.csi.delete(&id).await?;
            progress(&format!("cluster: controller restart {}/{reps} (heartbeat {} s)", rep + 1, self.heartbeat_s))?;
        }
        Ok(RestartReport {
            heartbeat_s: self.heartbeat_s,
            settle_s: self.heartbeat_s * 2.0 + 1.0,
            reps,
            exec_to_ready_ms: Summary::of(&ready),
            exec_to_registered_ms: Summary::of(&registered_ms),
            exec_to_first_create_ms: Summary::of(&created),
            unavailable_answers: Summary::of(&refusals),
        })
    }
}

/// Two TCP ports on 127.0.0.1 that were free a moment ago: both are bound at once, so they
/// differ, then released for the driver to bind.
fn free_ports() -> Result<[SocketAddr; 2]> {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("binding 127.0.0.1:0: {e}"));
    let (a, b) = (bind()?, bind()?);
    let addr = |l: &TcpListener| l.local_addr().map_err(|e| format!("reading a bound port: {e}"));
    Ok([addr(&a)?, addr(&b)?])
}

/// Calls `attempt` every `every` until it answers `Some`, failing once `PLACE_TIMEOUT` has
/// passed since `since`; answers the value and how many attempts it took.
async fn poll<T, F, Fut>(what: &str, since: Instant, every: Duration, mut attempt: F) -> Result<(T, usize)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Some(v) = attempt().await? {
            return Ok((v, attempts));
        }
        if since.elapsed() > PLACE_TIMEOUT {
            return Err(format!("waited {PLACE_TIMEOUT:?} for {what}"));
        }
        crate::interrupted()?;
        tokio::time::sleep(every).await;
    }
}

/// `Some` once GetCapacity for the node's segment answers free space: the controller has
/// the node registered and reached its agent.
async fn registered(ctl: &Ctl) -> Result<Option<()>> {
    Ok((ctl.capacity().await? > 0).then_some(()))
}

/// The controller calls [`Csi`] does not make, on a channel of their own.
#[derive(Debug, Clone)]
struct Ctl {
    channel: Channel,
}

impl Ctl {
    async fn connect(socket: &Path) -> Result<Ctl> {
        Ok(Ctl { channel: connect(socket).await? })
    }

    fn client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    /// CreateVolume of an ext4 volume as `Csi::create` makes it: `Some(volume ID)`, or `None`
    /// while the controller answers UNAVAILABLE (no node yet, or the settle window).
    async fn try_create(&self, name: &str) -> Result<Option<String>> {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: VOLUME_BYTES as i64, limit_bytes: 0 }),
            volume_capabilities: vec![ext4_mount()],
            parameters: HashMap::from([("fsType".to_string(), "ext4".to_string())]),
            ..Default::default()
        };
        match self.client().create_volume(req).await {
            Ok(r) => r
                .into_inner()
                .volume
                .map(|v| Some(v.volume_id))
                .ok_or_else(|| "CreateVolume answered no volume".to_string()),
            Err(s) if s.code() == tonic::Code::Unavailable => Ok(None),
            Err(s) => Err(format!("CreateVolume: {:?}: {}", s.code(), s.message())),
        }
    }

    async fn get_volume(&self, id: &str) -> Result<()> {
        let req = csi::ControllerGetVolumeRequest { volume_id: id.into() };
        self.client()
            .controller_get_volume(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("ControllerGetVolume: {:?}: {}", s.code(), s.message()))
    }

    /// GetCapacity of ext4 volumes in the bench node's topology segment.
    async fn capacity(&self) -> Result<i64> {
        let req = csi::GetCapacityRequest {
            volume_capabilities: vec![ext4_mount()],
            parameters: HashMap::from([("fsType".to_string(), "ext4".to_string())]),
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), NODE_ID.to_string())]),
            }),
        };
        self.client()
            .get_capacity(req)
            .await
            .map(|r| r.into_inner().available_capacity)
            .map_err(|s| format!("GetCapacity: {:?}: {}", s.code(), s.message()))
    }
}

/// The text report.
pub fn print(r: &Report, out: &mut String) -> std::fmt::Result {
    writeln!(
        out,
        "6. Split roles (controller + node agent, mTLS on 127.0.0.1) vs all-in-one, {} MiB ext4, {} reps \
         alternated, heartbeat {} s (ms: median (min–max))",
        r.volume_bytes >> 20,
        r.reps,
        r.latency_heartbeat_s
    )?;
    writeln!(
        out,
        "   CreateVolume + DeleteVolume   split {}   all-in-one {}   ratio {:.2}",
        r.pair_split_ms.show(2),
        r.pair_all_in_one_ms.show(2),
        r.pair_ratio
    )?;
    writeln!(out, "   per call (median ms)              split  all-in-one    delta  ratio   split path")?;
    for c in &r.calls {
        writeln!(
            out,
            "     {:<28} {:>8.3} {:>11.3} {:>+8.3} {:>6.2}   {}",
            c.call,
            c.split_ms.median,
            c.all_in_one_ms.median,
            c.split_ms.median - c.all_in_one_ms.median,
            c.ratio,
            c.split_path
        )?;
    }
    for s in &r.restarts {
        writeln!(
            out,
            "   controller SIGKILL + restart, heartbeat {} s (settle window {} s), {} reps, ms from exec:",
            s.heartbeat_s, s.settle_s, s.reps
        )?;
        writeln!(out, "     Probe ready                  {}", s.exec_to_ready_ms.show(1))?;
        writeln!(
            out,
            "     node registered again        {}   (GetCapacity > 0: includes the first mTLS connection to the agent)",
            s.exec_to_registered_ms.show(1)
        )?;
        writeln!(
            out,
            "     first CreateVolume OK        {}   after {} UNAVAILABLE answers",
            s.exec_to_first_create_ms.show(1),
            s.unavailable_answers.show(0)
        )?;
    }
    let m = &r.memory;
    writeln!(
        out,
        "   idle VmRSS after {:.0} s (MiB): controller {:.2} + node agent {:.2} = {:.2}; all-in-one {:.2}; \
         ratio {:.2}",
        m.idle_s,
        m.controller_rss_mib,
        m.node_rss_mib,
        m.controller_rss_mib + m.node_rss_mib,
        m.all_in_one_rss_mib,
        m.ratio
    )?;
    writeln!(
        out,
        "   VmHWM (peak RSS) then (MiB): controller {:.2}, node agent {:.2}, all-in-one {:.2}",
        m.controller_hwm_mib, m.node_hwm_mib, m.all_in_one_hwm_mib
    )
}
