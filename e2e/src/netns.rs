//! Private network namespaces for one test cluster: the controller's namespace holds a bridge
//! (the "switch"), every node has its own namespace wired to it by a veth pair.
//!
//! ```text
//!   controller ns: lo, br0 10.77.0.1/24, port p<tag>n<i> ──(veth)── node i ns: lo, e<tag>n<i> 10.77.0.(10+i)/24
//! ```
//!
//! Every cluster has its own namespaces, so clusters running in parallel reuse the same subnet
//! without seeing each other; the root namespace gets no address and no interface. Namespace
//! names carry the test process's pid and a counter. Interfaces are created directly inside
//! their namespaces (never in the root one), and their names are unique per cluster as well,
//! so a leftover is easy to attribute.
//!
//! Processes are put into a namespace with [`Net::enter`], which only switches the network
//! namespace (`setns(CLONE_NEWNET)` between fork and exec). `ip netns exec` ([`Net::exec_prefix`])
//! would also give the process a private mount namespace whose mounts never propagate back,
//! so the test could not see the mounts a node agent makes; it is fine for tools.

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use nix::sched::CloneFlags;

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The prefix of every namespace this harness makes.
pub const NETNS_PREFIX: &str = "fve2e";
/// The bridge in the controller's namespace.
const BRIDGE: &str = "br0";
/// The subnet's prefix length.
const PREFIX_LEN: u8 = 24;

/// `ip netns add` races with itself when /run/netns is first set up; one at a time per
/// process. The lock also guards the count of live [`Net`]s and whether /run/netns was a
/// mount point before this process first made a namespace.
static NETNS_SETUP: Mutex<Setup> = Mutex::new(Setup { live: 0, was_mounted: None });

/// What this process knows of /run/netns.
#[derive(Debug)]
struct Setup {
    /// [`Net`]s that exist now.
    live: usize,
    /// Whether /run/netns was a mount point before this process's first `ip netns add`,
    /// which makes it one (a shared bind mount of itself) and never takes it away.
    was_mounted: Option<bool>,
}

fn netns_dir_is_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(NETNS_DIR))
}

/// One cluster's namespaces and links. Dropping it deletes every namespace it made (also
/// while unwinding from a panic); the veth pairs go with them.
#[derive(Debug)]
pub struct Net {
    /// Short and unique per cluster in this test run: `<pid hex>x<counter hex>`.
    tag: String,
    controller: String,
    nodes: Vec<String>,
    /// Namespaces made so far, deleted on drop.
    made: Vec<String>,
}

impl Net {
    /// Makes the controller's namespace with its bridge and one namespace per node, each
    /// linked to the bridge, all with `lo` up. Panics (naming the failing command) if the
    /// kernel or `ip` refuses.
    pub fn new(nodes: usize) -> Net {
        assert!(nodes <= 200, "the /24 has room for 200 nodes, asked for {nodes}");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{n:x}", std::process::id());
        let controller = format!("{NETNS_PREFIX}-{tag}-c");
        let node_names = (0..nodes).map(|i| format!("{NETNS_PREFIX}-{tag}-n{i}")).collect();
        let mut net = Net { tag, controller, nodes: node_names, made: Vec::new() };
        net.build();
        net
    }

    fn build(&mut self) {
        {
            let mut setup = NETNS_SETUP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            setup.was_mounted.get_or_insert_with(netns_dir_is_mounted);
            setup.live += 1;
            for ns in std::iter::once(self.controller.clone()).chain(self.nodes.clone()) {
                ip(&["netns", "add", &ns]);
                self.made.push(ns);
            }
        }
        let c = self.controller.clone();
        ip(&["-n", &c, "link", "set", "lo", "up"]);
        ip(&["-n", &c, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", &c, "addr", "add", &format!("{}/{PREFIX_LEN}", Net::controller_ip()), "dev", BRIDGE]);
        ip(&["-n", &c, "link", "set", BRIDGE, "up"]);
        for i in 0..self.nodes.len() {
            let node_ns = self.nodes[i].clone();
            let (port, inner) = (self.port_name(i), self.inner_name(i));
            // Both ends are born in their own namespaces: nothing ever appears in the root one.
            ip(&["-n", &c, "link", "add", &port, "type", "veth", "peer", "name", &inner, "netns", &node_ns]);
            ip(&["-n", &c, "link", "set", &port, "master", BRIDGE]);
            ip(&["-n", &c, "link", "set", &port, "up"]);
            ip(&["-n", &node_ns, "link", "set", "lo", "up"]);
            ip(&["-n", &node_ns, "addr", "add", &format!("{}/{PREFIX_LEN}", Net::node_ip(i)), "dev", &inner]);
            ip(&["-n", &node_ns, "link", "set", &inner, "up"]);
        }
    }

    /// The bridge port (controller side) of node `i`'s link.
    fn port_name(&self, i: usize) -> String {
        let name = format!("p{}n{i}", self.tag);
        assert!(name.len() <= 15, "interface name {name:?} is over the kernel's 15 bytes");
        name
    }

    /// Node `i`'s end of its link, inside its namespace.
    fn inner_name(&self, i: usize) -> String {
        let name = format!("e{}n{i}", self.tag);
        assert!(name.len() <= 15, "interface name {name:?} is over the kernel's 15 bytes");
        name
    }

    /// The controller's namespace (it holds the bridge).
    pub fn controller_ns(&self) -> &str {
        &self.controller
    }

    /// Node `i`'s namespace.
    pub fn node_ns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// How many node namespaces there are.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The controller's address, on the bridge.
    pub fn controller_ip() -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 1)
    }

    /// Node `i`'s address.
    pub fn node_ip(i: usize) -> Ipv4Addr {
        let last = u8::try_from(10 + i).expect("at most 200 nodes");
        Ipv4Addr::new(10, 77, 0, last)
    }

    /// The file that pins a namespace (for `setns`).
    pub fn ns_path(ns: &str) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(ns)
    }

    /// `ip netns exec NAME`: a prefix for running a tool inside a namespace. The tool gets a
    /// private mount namespace too (see the module documentation); drivers are started with
    /// [`Net::enter`] instead.
    pub fn exec_prefix(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns].iter().map(|s| (*s).to_owned()).collect()
    }

    /// Makes `command` start inside the network namespace `ns` (and nothing else changes:
    /// the mount namespace stays the test's own).
    pub fn enter(command: &mut Command, ns: &str) {
        let path = Net::ns_path(ns);
        let file = File::open(&path).unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
        // SAFETY: the closure runs between fork and exec in the child, where only
        // async-signal-safe work is allowed: it makes one setns(2) system call on a file
        // descriptor opened beforehand, allocates nothing and takes no lock. The descriptor is
        // close-on-exec, so the driver does not inherit it.
        unsafe {
            command.pre_exec(move || nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
        }
    }

    /// Cuts node `i`'s link by taking its bridge port down, like a pulled cable: packets are
    /// dropped silently in both directions (neither side gets an error, both see timeouts),
    /// and the node keeps its address and routes, so [`Net::restore`] brings it all back.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.controller, "link", "set", &self.port_name(i), "down"]);
    }

    /// Undoes [`Net::cut`].
    pub fn restore(&self, i: usize) {
        ip(&["-n", &self.controller, "link", "set", &self.port_name(i), "up"]);
    }

    /// Runs `work` on a thread of its own that has entered the namespace `ns`, on a
    /// current-thread tokio runtime, so the sockets it opens live in that namespace; answers
    /// its result. A panic in `work` is re-raised here.
    pub async fn run_in<F, Fut, T>(&self, ns: &str, work: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = Net::ns_path(ns);
        let thread = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn(move || {
                let file = File::open(&path).unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
                // Only this thread moves: a network namespace is a per-thread attribute.
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|err| panic!("setns into {}: {err}", path.display()));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                runtime.block_on(work())
            })
            .expect("spawn a thread for the namespace");
        let joined = tokio::task::spawn_blocking(move || thread.join()).await.expect("join the namespace thread");
        match joined {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let mut setup = NETNS_SETUP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for ns in self.made.drain(..).rev() {
            let status = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::piped()).output();
            match status {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("ip netns del {ns}: {}", String::from_utf8_lossy(&out.stderr).trim()),
                Err(err) => eprintln!("ip netns del {ns}: {err}"),
            }
        }
        setup.live = setup.live.saturating_sub(1);
        // The last cluster of this process takes away the /run/netns mount that its first
        // `ip netns add` made, once no namespace (of anyone) is left in it.
        let empty = std::fs::read_dir(NETNS_DIR).map(|mut d| d.next().is_none()).unwrap_or(false);
        if setup.live == 0 && setup.was_mounted == Some(false) && empty && netns_dir_is_mounted() {
            if let Err(err) = nix::mount::umount2(NETNS_DIR, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmount {NETNS_DIR}: {err}");
            }
        }
    }
}

/// Runs `ip` with `args`; panics with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run ip {}: {err} (is iproute2 installed?)", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Namespaces this harness made that still exist (for checks that nothing is left behind).
pub fn existing_namespaces(tag_prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(tag_prefix))
        .collect();
    names.sort();
    names
}

impl Net {
    /// The prefix of this cluster's namespace names (for [`existing_namespaces`]).
    pub fn name_prefix(&self) -> String {
        format!("{NETNS_PREFIX}-{}-", self.tag)
    }
}
