//! A split ferrovol cluster on one machine: one `--roles controller` process and N
//! `--roles node` processes talking over mutual TLS across private network namespaces
//! ([`Net`]), each node with its own [`Sandbox`] (data dir, kubelet dir, socket, logs).
//!
//! The CSI endpoints are unix sockets, which every namespace shares, so the test process
//! talks to all of them from the root namespace; the cluster-internal ports (the controller's
//! Registry on 10.77.0.1:9470, each node's Agent on 10.77.0.(10+i):9471) are reachable only
//! inside the namespaces (see [`Net::run_in`]). Node processes share the test's mount
//! namespace, so their mounts and loop devices are checked as the all-in-one driver's are.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};

use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::{CreateVolumeRequest, GetCapacityRequest, Topology, TopologyRequirement};
use crate::driver::{unique_node_id, LogFormat};
use crate::family::Family;
use crate::netns::Net;
use crate::sandbox::Sandbox;

/// The controller's Registry port.
pub const REGISTRY_PORT: u16 = 9470;
/// Every node's Agent port.
pub const AGENT_PORT: u16 = 9471;
/// The heartbeat interval the test clusters run with: short, so that start-up (the settle
/// window is two heartbeats and a second) and lease expiry are quick, yet a lease (five
/// heartbeats) is long enough not to expire under a busy CI machine.
pub const TEST_HEARTBEAT: Duration = Duration::from_millis(200);
/// The driver's default heartbeat interval (`--heartbeat-interval`), for measurements that
/// go into the documentation.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a process may take until Probe answers ready.
/// How long nodes may take to appear in the controller after they are ready.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for any single RPC, so a hung process fails the test instead of hanging it.
const RPC_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one registration poll may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// The name of the CreateVolume that probes whether the settle window is over. It names a
/// topology no node has, so it can never create anything.
const SETTLE_PROBE_NAME: &str = "e2e-settle-probe";

/// How to start a cluster. [`ClusterOptions::new`] gives fresh node IDs, the test heartbeat,
/// and the driver's default name and log settings.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// One per node; their number is the number of nodes.
    pub node_ids: Vec<String>,
    /// `--heartbeat-interval` of the controller.
    pub heartbeat: Duration,
    /// Whether [`Cluster::start_with`] waits until the controller places new volumes (the
    /// settle window after its start); without it, only until every node is registered.
    pub wait_settled: bool,
    pub driver_name: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    /// Extra `ferrovol run` arguments of every node (after the family's `driver_args`).
    pub node_extra_args: Vec<String>,
}

impl ClusterOptions {
    /// `nodes` nodes with fresh IDs.
    pub fn new(nodes: usize) -> ClusterOptions {
        ClusterOptions {
            node_ids: (0..nodes).map(|_| unique_node_id()).collect(),
            heartbeat: TEST_HEARTBEAT,
            wait_settled: true,
            driver_name: None,
            log_format: None,
            log_level: None,
            node_extra_args: Vec::new(),
        }
    }
}

/// One process of the cluster.
#[derive(Debug)]
struct Member {
    /// For messages: `controller` or `node 1 (e2e-123-4)`.
    label: String,
    /// The network namespace it runs in.
    ns: String,
    args: Vec<String>,
    sandbox: Arc<Sandbox>,
    child: Option<Child>,
    channel: Channel,
}

impl Member {
    fn new(label: String, ns: String, args: Vec<String>, sandbox: Arc<Sandbox>) -> Member {
        let channel = unix_channel(&sandbox.socket_path());
        Member { label, ns, args, sandbox, child: None, channel }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.label);
        let binary = crate::binary::ferrovol_binary();
        let mut command = Command::new(&binary);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(append(&self.sandbox.stdout_log()))
            .stderr(append(&self.sandbox.stderr_log()));
        Net::enter(&mut command, &self.ns);
        let child =
            command.spawn().unwrap_or_else(|err| panic!("spawn {} for {}: {err}", binary.display(), self.label));
        self.child = Some(child);
        // A fresh channel: the old one may hold a connection to the previous process.
        self.channel = unix_channel(&self.sandbox.socket_path());
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().expect("query a cluster process"))
    }

    fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    async fn wait_ready(&mut self) {
        let label = format!("{} ({:?})", self.label, self.args);
        let identity = self.identity();
        crate::driver::wait_probe_ready(&label, identity, |want_log| {
            let status = self.try_wait();
            let log = if want_log || status.is_some() { self.log_tail(80) } else { String::new() };
            (status, log)
        })
        .await;
    }

    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and a clean exit: status 0 within the timeout and the socket removed.
    async fn stop(&mut self) {
        let child = self.child.as_mut().unwrap_or_else(|| panic!("{} is not running", self.label));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        kill(pid, Signal::SIGTERM).unwrap_or_else(|err| panic!("SIGTERM {}: {err}", self.label));
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                break status;
            }
            if Instant::now() >= deadline {
                let log = self.log_tail(60);
                self.kill_9();
                panic!("{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{log}", self.label);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM (expected 0); log:\n{}",
            self.label,
            self.log_tail(60)
        );
        assert!(
            !self.sandbox.socket_path().exists(),
            "{}: the socket {} is still there after a clean shutdown",
            self.label,
            self.sandbox.socket_path().display()
        );
    }

    fn log_text(&self) -> String {
        let mut text = read_lossy(&self.sandbox.stderr_log());
        text.push_str(&read_lossy(&self.sandbox.stdout_log()));
        text
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A running split cluster. Dropping it kills every process (SIGKILL), releases the mounts
/// and loop devices left in the node sandboxes and deletes the namespaces; on a failing test
/// it also prints the end of every process's log.
#[derive(Debug)]
pub struct Cluster {
    family: Family,
    heartbeat: Duration,
    node_ids: Vec<String>,
    /// When the controller process was last spawned (its settle window starts then).
    controller_spawned: Instant,
    controller: Member,
    nodes: Vec<Member>,
    /// Declared last: the namespaces go after the processes in them.
    net: Net,
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes serving `family` and waits until every node is
    /// registered and the controller places volumes.
    pub async fn start(family: &Family, nodes: usize) -> Cluster {
        Cluster::start_with(family, ClusterOptions::new(nodes)).await
    }

    /// Starts a cluster as `options` say.
    pub async fn start_with(family: &Family, options: ClusterOptions) -> Cluster {
        Cluster::start_in(family, options, None).await
    }

    /// Starts a cluster whose node 0 runs in `focus` (a sandbox the caller prepared).
    pub(crate) async fn start_in(family: &Family, options: ClusterOptions, focus: Option<Arc<Sandbox>>) -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the cluster tests need root (network namespaces, loop devices, mounts); run them as root"
        );
        let count = options.node_ids.len();
        assert!(count > 0, "a cluster needs at least one node");
        let net = Net::new(count);
        let controller_sandbox = Arc::new(Sandbox::new());
        let certs = certs_dir(&controller_sandbox);
        generate_certs(&certs);

        let mut common = Vec::new();
        if let Some(name) = &options.driver_name {
            common.extend(["--driver-name".to_owned(), name.clone()]);
        }
        if let Some(format) = options.log_format {
            let format = match format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            };
            common.extend(["--log-format".to_owned(), format.to_owned()]);
        }
        if let Some(level) = &options.log_level {
            common.extend(["--log-level".to_owned(), level.clone()]);
        }

        let mut controller_args = strings(&["run", "--roles", "controller", "--endpoint"]);
        controller_args.push(format!("unix://{}", controller_sandbox.socket_path().display()));
        controller_args.extend([
            "--tls-dir".to_owned(),
            certs.join("controller").display().to_string(),
            "--cluster-listen".to_owned(),
            Cluster::registry_address().to_string(),
            "--heartbeat-interval".to_owned(),
            format!("{}", options.heartbeat.as_secs_f64()),
        ]);
        controller_args.extend(common.iter().cloned());
        let controller =
            Member::new("controller".to_owned(), net.controller_ns().to_owned(), controller_args, controller_sandbox);

        let mut focus = focus;
        let mut nodes = Vec::with_capacity(count);
        for (i, node_id) in options.node_ids.iter().enumerate() {
            let sandbox = match (i, focus.take()) {
                (0, Some(sandbox)) => sandbox,
                _ => Arc::new(Sandbox::new()),
            };
            let mut args = strings(&["run", "--roles", "node", "--endpoint"]);
            args.push(format!("unix://{}", sandbox.socket_path().display()));
            args.extend([
                "--node-id".to_owned(),
                node_id.clone(),
                "--data-dir".to_owned(),
                sandbox.data_dir().display().to_string(),
                // Staging and target paths must lie under a kubelet dir; the tests keep theirs
                // in the sandbox.
                "--kubelet-dir".to_owned(),
                sandbox.work_dir().display().to_string(),
                "--tls-dir".to_owned(),
                certs.join("node").display().to_string(),
                "--cluster-listen".to_owned(),
                Cluster::agent_address(i).to_string(),
                "--controller-address".to_owned(),
                Cluster::registry_address().to_string(),
            ]);
            args.extend(common.iter().cloned());
            args.extend(family.driver_args.iter().cloned());
            args.extend(options.node_extra_args.iter().cloned());
            nodes.push(Member::new(format!("node {i} ({node_id})"), net.node_ns(i).to_owned(), args, sandbox));
        }

        let mut cluster = Cluster {
            family: family.clone(),
            heartbeat: options.heartbeat,
            node_ids: options.node_ids.clone(),
            controller_spawned: Instant::now(),
            controller,
            nodes,
            net,
        };
        // The controller first, so that the nodes' first Register finds it listening (a
        // failed one is retried only a second later).
        cluster.controller_spawned = Instant::now();
        cluster.controller.spawn();
        cluster.controller.wait_ready().await;
        for node in &mut cluster.nodes {
            node.spawn();
        }
        for node in &mut cluster.nodes {
            node.wait_ready().await;
        }
        let all: Vec<usize> = (0..count).collect();
        cluster.wait_registered(&all).await;
        if options.wait_settled {
            cluster.wait_settled().await;
        }
        cluster
    }

    /// Where the controller's Registry listens (inside the controller's namespace).
    pub fn registry_address() -> SocketAddr {
        SocketAddr::from((Net::controller_ip(), REGISTRY_PORT))
    }

    /// Where node `i`'s Agent service listens (inside its namespace).
    pub fn agent_address(i: usize) -> SocketAddr {
        SocketAddr::from((Net::node_ip(i), AGENT_PORT))
    }

    /// The namespaces and links.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The family the nodes were started for.
    pub fn family(&self) -> &Family {
        &self.family
    }

    /// The heartbeat interval the controller asks for.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// How long a registration lives without a heartbeat (five heartbeats).
    pub fn lease(&self) -> Duration {
        self.heartbeat * 5
    }

    /// How long after its start the controller refuses to place new volumes.
    pub fn settle_window(&self) -> Duration {
        self.heartbeat * 2 + Duration::from_secs(1)
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`Cluster::start_with`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node_id(&self, i: usize) -> &str {
        &self.node_ids[i]
    }

    pub fn node_ids(&self) -> &[String] {
        &self.node_ids
    }

    /// The index of the node with this ID.
    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.node_ids.iter().position(|id| id == node_id)
    }

    /// The topology segment of node `i`.
    pub fn segment(&self, i: usize) -> Topology {
        let key = self.family.topology_key.expect("a cluster serves node-local families");
        Topology { segments: HashMap::from([(key.to_owned(), self.node_ids[i].clone())]) }
    }

    /// The controller's CSI Controller service.
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.controller.channel.clone())
    }

    /// The controller's CSI Identity service.
    pub fn controller_identity(&self) -> IdentityClient<Channel> {
        self.controller.identity()
    }

    /// Node `i`'s CSI Node service.
    pub fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(self.nodes[i].channel.clone())
    }

    /// Node `i`'s CSI Identity service.
    pub fn identity(&self, i: usize) -> IdentityClient<Channel> {
        self.nodes[i].identity()
    }

    /// Node `i`'s sandbox (data dir, staging and target paths, logs).
    pub fn sandbox(&self, i: usize) -> &Sandbox {
        &self.nodes[i].sandbox
    }

    /// The controller's sandbox (its socket, its logs and the certificates).
    pub fn controller_sandbox(&self) -> &Sandbox {
        &self.controller.sandbox
    }

    /// Where `ferrovol certs generate` wrote this cluster's certificates.
    pub fn certs_dir(&self) -> PathBuf {
        certs_dir(&self.controller.sandbox)
    }

    /// Node `i`'s data dir.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].sandbox.data_dir()
    }

    /// The process ID of node `i`, while it runs.
    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// The process ID of the controller, while it runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.pid()
    }

    /// Whether node `i`'s process runs.
    pub fn node_running(&mut self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Whether the controller process runs.
    pub fn controller_running(&mut self) -> bool {
        self.controller.is_running()
    }

    /// Kills node `i` with SIGKILL, as a crash would, and reaps it.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill_9();
    }

    /// Starts node `i` again with the same arguments and waits until it is ready and
    /// registered with the controller.
    pub async fn start_node(&mut self, i: usize) {
        self.start_node_unregistered(i).await;
        self.wait_registered(&[i]).await;
    }

    /// Starts node `i` again and waits only until its Probe answers ready (it may not be
    /// registered yet).
    pub async fn start_node_unregistered(&mut self, i: usize) {
        self.nodes[i].spawn();
        self.nodes[i].wait_ready().await;
    }

    /// Kills node `i` (if it runs) and starts it again, ready and registered.
    pub async fn restart_node(&mut self, i: usize) {
        self.kill_node(i);
        self.start_node(i).await;
    }

    /// Stops node `i` with SIGTERM and asserts a clean shutdown.
    pub async fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    /// Sends SIGTERM to node `i` and waits for its exit without judging it.
    pub async fn terminate_node(&mut self, i: usize) -> ExitStatus {
        let member = &mut self.nodes[i];
        let child = member.child.as_mut().unwrap_or_else(|| panic!("{} is not running", member.label));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"));
        kill(pid, Signal::SIGTERM).expect("send SIGTERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = member.try_wait() {
                member.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let log = member.log_tail(60);
                member.kill_9();
                panic!("{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{log}", member.label);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the controller with SIGKILL and reaps it.
    pub fn kill_controller(&mut self) {
        self.controller.kill_9();
    }

    /// Starts the controller again and waits until its Probe answers ready; the nodes
    /// register again on their own (see [`Cluster::wait_registered`]) and new volumes are
    /// placed once the settle window is over (see [`Cluster::wait_settled`]).
    pub async fn start_controller(&mut self) {
        self.controller_spawned = Instant::now();
        self.controller.spawn();
        self.controller.wait_ready().await;
    }

    /// When the controller was last started.
    pub fn controller_started_at(&self) -> Instant {
        self.controller_spawned
    }

    /// Stops every process with SIGTERM (nodes first) and asserts each shuts down cleanly.
    pub async fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_running() {
                self.nodes[i].stop().await;
            }
        }
        if self.controller.is_running() {
            self.controller.stop().await;
        }
    }

    /// Cuts node `i`'s network link (see [`Net::cut`]).
    pub fn cut_link(&self, i: usize) {
        self.net.cut(i);
    }

    /// Restores node `i`'s network link.
    pub fn restore_link(&self, i: usize) {
        self.net.restore(i);
    }

    /// GetCapacity for node `i`'s segment: what the controller offers on that node (0 when it
    /// is not registered).
    pub async fn capacity_of(&self, i: usize) -> Result<i64, tonic::Status> {
        let request = GetCapacityRequest { accessible_topology: Some(self.segment(i)), ..Default::default() };
        self.controller().get_capacity(request).await.map(|answer| answer.into_inner().available_capacity)
    }

    /// Whether the controller counts node `i` as registered now. A GetCapacity that does not
    /// answer within a second (the node is registered but cut off) counts as "not yet".
    pub async fn is_registered(&self, i: usize) -> bool {
        matches!(tokio::time::timeout(POLL_TIMEOUT, self.capacity_of(i)).await, Ok(Ok(capacity)) if capacity > 0)
    }

    /// Waits until the controller counts every node in `which` as registered (GetCapacity
    /// for its segment is positive); answers how long that took. Panics after a timeout.
    pub async fn wait_registered(&mut self, which: &[usize]) -> Duration {
        self.wait_registered_within(which, REGISTER_TIMEOUT).await
    }

    /// Like [`Cluster::wait_registered`] with a deadline of the caller's.
    pub async fn wait_registered_within(&mut self, which: &[usize], patience: Duration) -> Duration {
        let started = Instant::now();
        let mut pending: Vec<usize> = which.to_vec();
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                if !self.is_registered(i).await {
                    still.push(i);
                }
            }
            pending = still;
            if pending.is_empty() {
                return started.elapsed();
            }
            self.check_alive();
            if started.elapsed() >= patience {
                let logs: Vec<String> = pending
                    .iter()
                    .map(|&i| format!("{}:\n{}", self.nodes[i].label, self.nodes[i].log_tail(30)))
                    .collect();
                panic!(
                    "nodes {:?} were not registered within {patience:?}; controller log:\n{}\n{}",
                    pending.iter().map(|&i| self.node_ids[i].clone()).collect::<Vec<_>>(),
                    self.controller.log_tail(40),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the controller no longer counts node `i` as registered; answers how long
    /// that took. Panics after `patience`.
    pub async fn wait_unregistered(&self, i: usize, patience: Duration) -> Duration {
        let started = Instant::now();
        loop {
            // While the lease runs, the controller still asks the node, which may hang (a cut
            // link); such a poll is abandoned and repeated.
            if let Ok(Ok(0)) = tokio::time::timeout(POLL_TIMEOUT, self.capacity_of(i)).await {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < patience,
                "node {} is still registered {patience:?} after its agent went away",
                self.node_ids[i]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the controller's settle window is over: a CreateVolume that no node can
    /// take no longer answers UNAVAILABLE. Answers how long after the controller's start
    /// that was.
    pub async fn wait_settled(&mut self) -> Duration {
        let opens = self.controller_spawned + self.settle_window();
        let now = Instant::now();
        if opens > now {
            tokio::time::sleep(opens - now).await;
        }
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        loop {
            match self.controller().create_volume(self.settle_probe()).await {
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    assert!(
                        Instant::now() < deadline,
                        "the controller still answers UNAVAILABLE {:?} after its start: {}; log:\n{}",
                        self.controller_spawned.elapsed(),
                        status.message(),
                        self.controller.log_tail(40)
                    );
                    self.check_alive();
                }
                Err(_) => return self.controller_spawned.elapsed(),
                Ok(answer) => panic!(
                    "the settle probe {SETTLE_PROBE_NAME:?}, whose requisite topology no node has, created a volume: \
                     {:?}",
                    answer.get_ref()
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A CreateVolume whose requisite topology no node has.
    fn settle_probe(&self) -> CreateVolumeRequest {
        let nowhere = Topology { segments: HashMap::from([("e2e.ferrovol.dev/nowhere".to_owned(), "x".to_owned())]) };
        CreateVolumeRequest {
            name: SETTLE_PROBE_NAME.to_owned(),
            volume_capabilities: vec![crate::requests::mount_capability("ext4", Mode::SingleNodeWriter)],
            parameters: self.family.parameters.clone(),
            accessibility_requirements: Some(TopologyRequirement { requisite: vec![nowhere], preferred: Vec::new() }),
            ..Default::default()
        }
    }

    /// Panics with the log if a process that should run has exited.
    fn check_alive(&mut self) {
        if let Some(status) = self.controller.try_wait() {
            panic!("the controller exited with {status}; log:\n{}", self.controller.log_tail(80));
        }
        for node in &mut self.nodes {
            if let Some(status) = node.try_wait() {
                panic!("{} exited with {status}; log:\n{}", node.label, node.log_tail(80));
            }
        }
    }

    /// Everything node `i` wrote to stderr and stdout so far (all runs).
    pub fn node_log(&self, i: usize) -> String {
        self.nodes[i].log_text()
    }

    /// Everything the controller wrote so far (all runs).
    pub fn controller_log(&self) -> String {
        self.controller.log_text()
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.nodes[i].log_tail(lines)
    }

    /// The last `lines` lines of the controller's log.
    pub fn controller_log_tail(&self, lines: usize) -> String {
        self.controller.log_tail(lines)
    }

    /// Asserts that nothing is mounted under any node's sandbox and no loop device is backed
    /// by a file in any node's data dir.
    pub fn assert_no_leaks(&self) {
        for node in &self.nodes {
            let left =
                crate::kernel::settled_leftovers(node.sandbox.root(), &node.sandbox.data_dir(), Duration::from_secs(5));
            assert!(left.is_empty(), "{}: leaked kernel resources: {left:#?}", node.label);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill_9();
        }
        self.controller.kill_9();
        if std::thread::panicking() {
            for member in std::iter::once(&self.controller).chain(self.nodes.iter()) {
                eprintln!(
                    "---- ferrovol {} log ({}) ----\n{}\n---- end of log ----",
                    member.label,
                    member.sandbox.root().display(),
                    member.log_tail(60)
                );
            }
        }
        for node in &self.nodes {
            let left = node.sandbox.release();
            if !left.is_empty() {
                eprintln!("{}: could not release {left:?}", node.label);
            }
        }
    }
}

/// Runs `ferrovol certs generate --out <dir>`: a CA and a controller and a node certificate.
pub fn generate_certs(dir: &Path) {
    let binary = crate::binary::ferrovol_binary();
    let out = Command::new(&binary)
        .args(["certs", "generate", "--out"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {} certs generate: {err}", binary.display()));
    assert!(
        out.status.success(),
        "ferrovol certs generate --out {} failed ({}): {}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn certs_dir(controller: &Sandbox) -> PathBuf {
    controller.root().join("certs")
}

fn unix_channel(socket: &Path) -> Channel {
    Endpoint::from_shared(format!("unix://{}", socket.display()))
        .expect("a valid endpoint URI")
        .timeout(RPC_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
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
