//! The driver under test: the real `ferrovol` binary started in a sandbox of its own (optionally
//! pinned to CPUs with `taskset`), stopped with SIGTERM on drop, and a small CSI client for the
//! calls a CO makes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrovol_proto::csi::v1 as csi;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::{Channel, Uri};

use crate::sandbox::Sandbox;
use crate::{Context, Result};
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;

/// The node ID the driver runs as; volume IDs are `loop.vol:<node>:<name>`.
pub const NODE_ID: &str = "bench-node";

/// How long a driver may take to answer ready before the bench gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Drivers running now, so the panic hook can kill them (drops do not run on abort).
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn lock_running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills every running driver at once (panic hook, Ctrl-C).
pub fn kill_all_running() {
    for pid in lock_running().drain(..) {
        signal_group(pid, Signal::SIGKILL);
    }
}

/// Signals the driver's process group (it leads its own): a wrapper given as FERROVOL_BIN,
/// such as strace, and the driver under it both get the signal.
fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(-pid), signal);
    }
}

/// Finds the driver binary: `$FERROVOL_BIN`, else `ferrovol` beside this executable.
pub fn binary() -> Result<PathBuf> {
    let path = match std::env::var_os("FERROVOL_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().context(|| "finding this executable".to_string())?.with_file_name("ferrovol"),
    };
    if !path.is_file() {
        return Err(format!(
            "driver binary {} not found: run `cargo build --release --bins` first, or set FERROVOL_BIN",
            path.display()
        ));
    }
    Ok(path)
}

/// A running driver and the directories it serves.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    pub socket: PathBuf,
    pub kubelet: PathBuf,
    /// When the process was spawned (just before fork/exec).
    pub spawned: Instant,
    /// How it was started, so [`Driver::respawn`] can start it again the same way.
    recipe: Recipe,
    // Dropped after `Drop::drop` has stopped the process: the sweep must come last.
    sandbox: Sandbox,
}

/// The command line of a driver, less the paths that come from its sandbox.
#[derive(Debug, Clone)]
struct Recipe {
    bin: PathBuf,
    cpus: Option<String>,
    extra: Vec<String>,
    log_level: String,
}

impl Recipe {
    /// Spawns the driver in the sandbox at `root`; its output goes to `root/driver.log`,
    /// appended to when `append` (a restart), else a fresh file.
    fn launch(&self, root: &Path, append: bool) -> Result<(Child, Instant)> {
        let log_path = root.join("driver.log");
        let log = if append {
            fs::OpenOptions::new().append(true).create(true).open(&log_path)
        } else {
            File::create(&log_path)
        }
        .context(|| "creating the driver log".to_string())?;
        let log2 = log.try_clone().context(|| "duplicating the driver log handle".to_string())?;
        let mut cmd = match &self.cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("run")
            .arg(format!("--endpoint=unix://{}", root.join("csi.sock").display()))
            .arg(format!("--node-id={NODE_ID}"))
            .arg(format!("--data-dir={}", root.join("data").display()))
            .arg(format!("--kubelet-dir={}", root.join("kubelet").display()))
            .arg(format!("--log-level={}", self.log_level))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C at the terminal reaches the bench, which then
            // stops the driver itself after taking its volumes down.
            .process_group(0);
        let spawned = Instant::now();
        let child = cmd.spawn().context(|| format!("starting {}", self.bin.display()))?;
        lock_running().push(child.id());
        Ok((child, spawned))
    }
}

impl Driver {
    /// Starts `bin run` in a fresh sandbox under `parent`, pinned to `cpus` (a `taskset -c`
    /// list) if given. Does not wait for it to be ready.
    pub fn spawn(bin: &Path, parent: &Path, label: &str, cpus: Option<&str>) -> Result<Driver> {
        Driver::spawn_with(bin, parent, label, cpus, &[], "warn")
    }

    /// [`Driver::spawn`] with extra `run` arguments and a log level (tracing filter).
    pub fn spawn_with(
        bin: &Path,
        parent: &Path,
        label: &str,
        cpus: Option<&str>,
        extra: &[String],
        log_level: &str,
    ) -> Result<Driver> {
        let sandbox = Sandbox::new(parent, label)?;
        let root = sandbox.path();
        let recipe = Recipe {
            bin: bin.to_path_buf(),
            cpus: cpus.map(str::to_string),
            extra: extra.to_vec(),
            log_level: log_level.to_string(),
        };
        let (child, spawned) = recipe.launch(root, false)?;
        Ok(Driver { child, socket: root.join("csi.sock"), kubelet: root.join("kubelet"), spawned, recipe, sandbox })
    }

    /// Starts a driver and waits until its Probe answers ready.
    pub async fn start(bin: &Path, parent: &Path, label: &str, cpus: Option<&str>) -> Result<(Driver, Csi)> {
        let mut d = Driver::spawn(bin, parent, label, cpus)?;
        let csi = d.wait_ready().await?;
        Ok((d, csi))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Polls connect + Probe in a tight loop (200 µs apart, so the poller does not take a
    /// CPU from the driver it is waiting for) until Probe answers ready.
    pub async fn wait_ready(&mut self) -> Result<Csi> {
        let mut channel = None;
        loop {
            if let Some(status) = self.child.try_wait().context(|| "waiting on the driver".to_string())? {
                return Err(format!("the driver exited during start-up ({status}): {}", self.log_tail()));
            }
            if self.spawned.elapsed() > READY_TIMEOUT {
                return Err(format!("the driver was not ready after {READY_TIMEOUT:?}: {}", self.log_tail()));
            }
            if channel.is_none() {
                channel = connect(&self.socket).await.ok();
            }
            if let Some(ch) = &channel {
                let csi = Csi { channel: ch.clone() };
                match csi.probe().await {
                    Ok(true) => return Ok(csi),
                    Ok(false) => {}
                    Err(_) => channel = None,
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A field of the driver's `/proc/PID/status`, e.g. `VmRSS` or `Cpus_allowed_list`.
    pub fn status_field(&self, name: &str) -> Result<String> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context(|| "reading the driver's /proc status".to_string())?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("no {name} line in the driver's /proc status"))
    }

    /// The driver's resident memory now and its high-water mark (VmRSS, VmHWM), in kB.
    pub fn memory_kb(&self) -> Result<(u64, u64)> {
        let kb = |name: &str| -> Result<u64> {
            let v = self.status_field(name)?;
            v.trim_end_matches("kB").trim().parse().map_err(|_| format!("{name} is {v:?}, not a size in kB"))
        };
        Ok((kb("VmRSS")?, kb("VmHWM")?))
    }

    /// SIGTERM to its process group, then SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) -> Result<()> {
        let pid = self.child.id();
        if self.child.try_wait().ok().flatten().is_none() {
            signal_group(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    signal_group(pid, Signal::SIGKILL);
                    let _ = self.child.wait();
                    lock_running().retain(|p| *p != pid);
                    return Err("the driver did not stop within 10 s of SIGTERM; killed it".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        lock_running().retain(|p| *p != pid);
        Ok(())
    }

    /// SIGKILL to its process group, as a crash would be: no clean shutdown, the socket file
    /// stays behind.
    pub fn kill(&mut self) -> Result<()> {
        let pid = self.child.id();
        signal_group(pid, Signal::SIGKILL);
        let waited = self.child.wait().context(|| "waiting on the killed driver".to_string());
        lock_running().retain(|p| *p != pid);
        waited.map(|_| ())
    }

    /// Starts the same command again in the same sandbox, once the last process has exited
    /// ([`Driver::kill`], [`Driver::stop`]); resets `spawned` and appends to the same log.
    pub fn respawn(&mut self) -> Result<()> {
        if self.child.try_wait().context(|| "waiting on the driver".to_string())?.is_none() {
            return Err("respawn: the driver is still running".into());
        }
        let (child, spawned) = self.recipe.launch(self.sandbox.path(), true)?;
        self.child = child;
        self.spawned = spawned;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.sandbox.path().join("driver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        if tail.is_empty() {
            "(its log is empty)".into()
        } else {
            format!("its log ends:\n{tail}")
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("ferrovol-bench: {e}");
        }
    }
}

/// Connects a gRPC channel to a unix socket.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .context(|| format!("connecting to {}", socket.display()))
}

fn status(what: &'static str) -> impl Fn(tonic::Status) -> String {
    move |s| format!("{what}: {:?}: {}", s.code(), s.message())
}

pub fn ext4_mount() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
    }
}

/// The CSI calls of a volume's life, as a CO makes them, for ext4 mount volumes.
#[derive(Debug, Clone)]
pub struct Csi {
    channel: Channel,
}

impl Csi {
    pub async fn probe(&self) -> Result<bool> {
        let r = IdentityClient::new(self.channel.clone()).probe(csi::ProbeRequest {}).await.map_err(status("Probe"))?;
        Ok(r.into_inner().ready.unwrap_or(true))
    }

    /// CreateVolume; answers the volume ID.
    pub async fn create(&self, name: &str, bytes: u64) -> Result<String> {
        self.create_with(name, bytes, HashMap::from([("fsType".to_string(), "ext4".to_string())])).await
    }

    /// CreateVolume with these StorageClass parameters; answers the volume ID.
    pub async fn create_with(&self, name: &str, bytes: u64, parameters: HashMap<String, String>) -> Result<String> {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: i64::try_from(bytes).map_err(|_| format!("{bytes} bytes is too large"))?,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![ext4_mount()],
            parameters,
            ..Default::default()
        };
        let r = ControllerClient::new(self.channel.clone()).create_volume(req).await.map_err(status("CreateVolume"))?;
        r.into_inner().volume.map(|v| v.volume_id).ok_or_else(|| "CreateVolume answered no volume".into())
    }

    /// ControllerPublishVolume to the driver's node; answers the publish context.
    pub async fn controller_publish(&self, id: &str) -> Result<HashMap<String, String>> {
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE_ID.into(),
            volume_capability: Some(ext4_mount()),
            ..Default::default()
        };
        let r = ControllerClient::new(self.channel.clone())
            .controller_publish_volume(req)
            .await
            .map_err(status("ControllerPublishVolume"))?;
        Ok(r.into_inner().publish_context)
    }

    pub async fn stage(&self, id: &str, context: HashMap<String, String>, staging: &Path) -> Result<()> {
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            publish_context: context,
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(ext4_mount()),
            ..Default::default()
        };
        NodeClient::new(self.channel.clone()).node_stage_volume(req).await.map_err(status("NodeStageVolume"))?;
        Ok(())
    }

    pub async fn publish(
        &self,
        id: &str,
        context: HashMap<String, String>,
        staging: &Path,
        target: &Path,
    ) -> Result<()> {
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            publish_context: context,
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(ext4_mount()),
            ..Default::default()
        };
        NodeClient::new(self.channel.clone()).node_publish_volume(req).await.map_err(status("NodePublishVolume"))?;
        Ok(())
    }

    pub async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let req = csi::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.display().to_string() };
        NodeClient::new(self.channel.clone())
            .node_unpublish_volume(req)
            .await
            .map_err(status("NodeUnpublishVolume"))?;
        Ok(())
    }

    pub async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let req =
            csi::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.display().to_string() };
        NodeClient::new(self.channel.clone()).node_unstage_volume(req).await.map_err(status("NodeUnstageVolume"))?;
        Ok(())
    }

    pub async fn controller_unpublish(&self, id: &str) -> Result<()> {
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: NODE_ID.into(),
            ..Default::default()
        };
        ControllerClient::new(self.channel.clone())
            .controller_unpublish_volume(req)
            .await
            .map_err(status("ControllerUnpublishVolume"))?;
        Ok(())
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let req = csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() };
        ControllerClient::new(self.channel.clone()).delete_volume(req).await.map_err(status("DeleteVolume"))?;
        Ok(())
    }
}

/// Where a CO would stage and publish volume `name` under the driver's kubelet dir.
pub fn paths_for(kubelet: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        kubelet.join("plugins/kubernetes.io/csi/ferrovol").join(name).join("globalmount"),
        kubelet.join("pods").join(name).join("volumes/kubernetes.io~csi").join(name).join("mount"),
    )
}
