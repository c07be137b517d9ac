//! A running `ferrovol run` process and gRPC clients connected to it.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::{Cluster, ClusterOptions};
use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::ProbeRequest;
use crate::family::Family;
use crate::kernel::Leftovers;
use crate::sandbox::Sandbox;

/// How long start-up (reconcile included) may take before Probe must answer ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the driver may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for any single RPC, so a hung driver fails the test instead of hanging it.
const RPC_TIMEOUT: Duration = Duration::from_secs(180);

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    fn arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where the driver listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `unix://<sandbox>/sock/csi.sock`.
    Unix,
    /// `tcp://127.0.0.1:<free port>`.
    Tcp,
}

/// How to start the driver. `Default` gives a unique node ID, the default driver name and
/// the driver's default log settings on a unix socket.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub node_id: String,
    pub driver_name: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub transport: Transport,
    pub extra_args: Vec<String>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            node_id: unique_node_id(),
            driver_name: None,
            log_format: None,
            log_level: None,
            transport: Transport::Unix,
            extra_args: Vec::new(),
        }
    }
}

/// A node ID no other driver in this test run uses (short: it is part of every volume ID).
pub fn unique_node_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("e2e-{}-{n}", std::process::id())
}

/// The real `ferrovol` binary running on its own socket and data dir.
///
/// Dropping it kills the process (SIGKILL) and releases the mounts and loop devices left in
/// its sandbox; on a failing test it also prints the end of the driver's log.
///
/// For a split family ([`Family::split`]) the driver is a view of a [`Cluster`] it owns: the
/// Controller service is the controller's, Identity and Node are the focus node's, and the
/// sandbox, node ID, [`Driver::kill_9`] and [`Driver::restart`] are the focus node's.
#[derive(Debug)]
pub struct Driver {
    child: Option<Child>,
    channel: Channel,
    endpoint: String,
    args: Vec<String>,
    pub options: DriverOptions,
    /// The cluster of a split family; dropped before the sandbox.
    cluster: Option<Box<Cluster>>,
    /// Declared last so it is released after the process is gone. In split mode it is the
    /// focus node's sandbox, shared with the cluster.
    pub sandbox: Arc<Sandbox>,
}

impl Driver {
    /// Starts the driver for `family` and waits until Probe answers ready.
    pub async fn start(family: &Family, options: DriverOptions) -> Driver {
        Driver::start_in(Sandbox::new(), family, options).await
    }

    /// Starts the driver in a sandbox the caller prepared (for example with a stale socket).
    pub async fn start_in(sandbox: Sandbox, family: &Family, options: DriverOptions) -> Driver {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the kernel tests need root (loop devices, mkfs, mounts); run them as root"
        );
        if family.is_split() {
            return Driver::start_split(sandbox, family, options).await;
        }
        let (endpoint, listen) = match options.transport {
            Transport::Unix => {
                let socket = sandbox.socket_path();
                (format!("unix://{}", socket.display()), format!("unix://{}", socket.display()))
            }
            Transport::Tcp => {
                let port = free_tcp_port();
                (format!("http://127.0.0.1:{port}"), format!("tcp://127.0.0.1:{port}"))
            }
        };
        let mut args = vec![
            "run".to_owned(),
            "--endpoint".to_owned(),
            listen,
            "--node-id".to_owned(),
            options.node_id.clone(),
            "--data-dir".to_owned(),
            sandbox.data_dir().display().to_string(),
            // Staging and target paths must lie under a kubelet dir; the tests keep theirs
            // in the sandbox.
            "--kubelet-dir".to_owned(),
            sandbox.work_dir().display().to_string(),
        ];
        if let Some(name) = &options.driver_name {
            args.extend(["--driver-name".to_owned(), name.clone()]);
        }
        if let Some(format) = options.log_format {
            args.extend(["--log-format".to_owned(), format.arg().to_owned()]);
        }
        if let Some(level) = &options.log_level {
            args.extend(["--log-level".to_owned(), level.clone()]);
        }
        args.extend(family.driver_args.iter().cloned());
        args.extend(options.extra_args.iter().cloned());

        let channel = Endpoint::from_shared(endpoint.clone())
            .expect("a valid endpoint URI")
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let mut driver =
            Driver { child: None, channel, endpoint, args, options, cluster: None, sandbox: Arc::new(sandbox) };
        driver.spawn_and_wait_ready().await;
        driver
    }

    /// Starts the cluster of a split family, the focus node in `sandbox`.
    async fn start_split(sandbox: Sandbox, family: &Family, mut options: DriverOptions) -> Driver {
        let split = family.split.clone().expect("a split family");
        assert_eq!(split.focus, 0, "the cluster runs its focus node as node 0");
        assert_eq!(options.transport, Transport::Unix, "a split cluster serves its CSI endpoints on unix sockets only");
        let sandbox = Arc::new(sandbox);
        let cluster_options = ClusterOptions {
            node_ids: split.node_ids.clone(),
            driver_name: options.driver_name.clone(),
            log_format: options.log_format,
            log_level: options.log_level.clone(),
            node_extra_args: options.extra_args.clone(),
            ..ClusterOptions::new(0)
        };
        let cluster = Cluster::start_in(family, cluster_options, Some(Arc::clone(&sandbox))).await;
        options.node_id = split.focus_id().to_owned();
        let endpoint = format!("unix://{}", sandbox.socket_path().display());
        let channel = Endpoint::from_shared(endpoint.clone())
            .expect("a valid endpoint URI")
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        Driver { child: None, channel, endpoint, args: Vec::new(), options, cluster: Some(Box::new(cluster)), sandbox }
    }

    /// The cluster behind a split driver; `None` for an all-in-one driver.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_deref()
    }

    /// The cluster behind a split driver, mutably (to kill and restart its processes).
    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        self.cluster.as_deref_mut()
    }

    /// Whether this driver is a view of a split cluster.
    pub fn is_split(&self) -> bool {
        self.cluster.is_some()
    }

    async fn spawn_and_wait_ready(&mut self) {
        let binary = crate::binary::ferrovol_binary();
        let stderr = append(&self.sandbox.stderr_log());
        let stdout = append(&self.sandbox.stdout_log());
        let child = Command::new(&binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", binary.display()));
        self.child = Some(child);
        self.channel = Endpoint::from_shared(self.endpoint.clone())
            .expect("a valid endpoint URI")
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let label = format!("ferrovol {:?}", self.args);
        let identity = self.identity();
        wait_probe_ready(&label, identity, |want_log| {
            let status = self.try_wait();
            let log = if want_log || status.is_some() { self.log_tail(80) } else { String::new() };
            (status, log)
        })
        .await;
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().expect("query the driver process"))
    }

    /// The process ID, while the driver runs (split: the focus node's).
    pub fn pid(&self) -> Option<u32> {
        match &self.cluster {
            Some(cluster) => cluster.node_pid(0),
            None => self.child.as_ref().map(Child::id),
        }
    }

    /// The Identity service (split: the focus node's).
    pub fn identity(&self) -> IdentityClient<Channel> {
        match &self.cluster {
            Some(cluster) => cluster.identity(0),
            None => IdentityClient::new(self.channel.clone()),
        }
    }

    /// The Controller service (split: the controller's).
    pub fn controller(&self) -> ControllerClient<Channel> {
        match &self.cluster {
            Some(cluster) => cluster.controller(),
            None => ControllerClient::new(self.channel.clone()),
        }
    }

    /// The Node service (split: the focus node's).
    pub fn node(&self) -> NodeClient<Channel> {
        match &self.cluster {
            Some(cluster) => cluster.node(0),
            None => NodeClient::new(self.channel.clone()),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.options.node_id
    }

    pub fn data_dir(&self) -> PathBuf {
        self.sandbox.data_dir()
    }

    pub fn socket_path(&self) -> PathBuf {
        self.sandbox.socket_path()
    }

    pub fn staging_dir(&self, name: &str) -> PathBuf {
        self.sandbox.staging_dir(name)
    }

    pub fn target_path(&self, name: &str) -> PathBuf {
        self.sandbox.target_path(name)
    }

    /// Kills the driver with SIGKILL, as a crash or an OOM kill would, and reaps it (split:
    /// the focus node).
    pub fn kill_9(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.kill_node(0);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the driver if it runs, then starts it again with the same arguments, data dir
    /// and socket (the old socket file is left behind, as after a crash). Split: the focus
    /// node, ready and registered again (and the controller too if it was stopped).
    pub async fn restart(&mut self) {
        self.kill_9();
        if let Some(cluster) = &mut self.cluster {
            if !cluster.controller_running() {
                cluster.start_controller().await;
                cluster.start_node(0).await;
                cluster.wait_settled().await;
            } else {
                cluster.start_node(0).await;
            }
            return;
        }
        self.spawn_and_wait_ready().await;
    }

    /// Sends SIGTERM and asserts a clean shutdown: exit status 0 within the timeout and,
    /// on a unix socket, the socket file removed. Split: every process of the cluster, nodes
    /// first.
    pub async fn stop(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.stop_all().await;
            return;
        }
        let status = self.terminate().await;
        assert!(
            status.success(),
            "ferrovol exited with {status} after SIGTERM (expected 0); log:\n{}",
            self.log_tail(60)
        );
        if self.options.transport == Transport::Unix {
            assert!(
                !self.socket_path().exists(),
                "the socket {} is still there after a clean shutdown",
                self.socket_path().display()
            );
        }
    }

    /// Sends SIGTERM and waits for the exit without judging it (split: the focus node).
    pub async fn terminate(&mut self) -> ExitStatus {
        if let Some(cluster) = &mut self.cluster {
            return cluster.terminate_node(0).await;
        }
        let child = self.child.as_mut().expect("the driver is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        kill(pid, Signal::SIGTERM).expect("send SIGTERM to the driver");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let log = self.log_tail(60);
                self.kill_9();
                panic!("ferrovol did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the driver wrote to stderr and stdout so far (all runs).
    pub fn log_text(&self) -> String {
        let mut text = read_lossy(&self.sandbox.stderr_log());
        text.push_str(&read_lossy(&self.sandbox.stdout_log()));
        text
    }

    /// The driver's stderr log only.
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.sandbox.stderr_log())
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Asserts that nothing is mounted under the sandbox and no loop device is backed by a
    /// file in the data dir (waiting briefly for auto-clearing loop devices).
    pub fn assert_no_leaks(&self) {
        let left =
            crate::kernel::settled_leftovers(self.sandbox.root(), &self.sandbox.data_dir(), Duration::from_secs(5));
        assert!(left.is_empty(), "leaked kernel resources: {left:#?}");
        if let Some(cluster) = &self.cluster {
            cluster.assert_no_leaks();
        }
    }

    /// Releases everything under the sandbox without judging it (after a deliberate crash).
    pub fn release_kernel_resources(&self) -> Leftovers {
        self.sandbox.release()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill_9();
        // A cluster prints the logs of all its processes itself.
        if std::thread::panicking() && self.cluster.is_none() {
            eprintln!(
                "---- ferrovol log ({}) ----\n{}\n---- end of log ----",
                self.sandbox.root().display(),
                self.log_tail(120)
            );
        }
    }
}

/// Polls Probe until it answers ready; panics with the log when the process exits first or
/// the deadline passes. `process(want_log)` answers the exit status, if any, and the log
/// tail when asked for it or when the process has exited.
pub(crate) async fn wait_probe_ready(
    label: &str,
    mut identity: IdentityClient<Channel>,
    mut process: impl FnMut(bool) -> (Option<ExitStatus>, String),
) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let (Some(status), log) = process(false) {
            panic!("{label} exited with {status} before it was ready; log:\n{log}");
        }
        let probe = tokio::time::timeout(Duration::from_secs(5), identity.probe(ProbeRequest {})).await;
        let last = match probe {
            // An absent `ready` means ready (spec, ProbeResponse).
            Ok(Ok(response)) if response.get_ref().ready != Some(false) => return,
            Ok(Ok(_)) => "Probe answered ready=false".to_owned(),
            Ok(Err(status)) => format!("Probe failed: {status}"),
            Err(_) => "Probe did not answer within 5 s".to_owned(),
        };
        if Instant::now() >= deadline {
            let (_, log) = process(true);
            panic!("{label} was not ready within {READY_TIMEOUT:?} ({last}); log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn append(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|err| panic!("open log {}: {err}", path.display()))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}
