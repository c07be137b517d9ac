//! The real mounter binary with real FUSE mounts over a real S3 server: files and
//! directories through std::fs, the quota, read-only mounts, a paused server, a killed
//! mounter and its successor's clean-up, and the protocol's errors. Every test undoes its
//! mounts and processes on every path (the `Mounter` guard).
#![cfg(all(feature = "kernel-tests", feature = "s3-tests"))]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrovol_core::error::Code;
use ferrovol_mounter::client::MounterClient;
use ferrovol_mounter::wire::MountSpec;
use ferrovol_s3::record::{S3VolumeRecord, VolumeState};
use ferrovol_s3::testing::S3Server;
use ferrovol_s3::{build_client, Timeouts};

static N: AtomicU32 = AtomicU32::new(0);

/// A running mounter; dropping it unmounts what it holds (SIGTERM), then lazily unmounts
/// every target a test used and kills the process.
struct Mounter {
    child: Option<Child>,
    socket: PathBuf,
    dir: tempfile::TempDir,
    targets: Vec<PathBuf>,
    /// A command the mounter runs under (`unshare …`), empty for none.
    wrapper: Vec<String>,
}

fn mounted(target: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    ferrovol_mounter::mountinfo::parse(&text).iter().any(|m| m.mount_point == target)
}

impl Mounter {
    fn start() -> Mounter {
        Mounter::start_under(&[])
    }

    /// Starts the mounter as the last argument of `wrapper`.
    fn start_under(wrapper: &[&str]) -> Mounter {
        let dir = tempfile::Builder::new().prefix("fvmnt-").tempdir().expect("tempdir");
        let socket = dir.path().join("mounter.sock");
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        let mut m = Mounter { child: None, socket, dir, targets: Vec::new(), wrapper };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mounter.log"))
            .expect("log file");
        let binary = env!("CARGO_BIN_EXE_ferrovol-mounter");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .args(["--log-level", "debug"])
            .env_remove("AWS_CA_BUNDLE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the ferrovol-mounter binary");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the mounter exited at start ({st}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the mounter did not listen on {} within 20 s: {}", self.socket.display(), self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mounter.log")).unwrap_or_default()
    }

    fn client(&self) -> MounterClient {
        MounterClient::new(self.socket.clone())
    }

    /// A new empty directory to mount on, cleaned up by the guard.
    fn target(&mut self) -> PathBuf {
        let t = self.dir.path().join(format!("t{}", self.targets.len()));
        std::fs::create_dir(&t).expect("target dir");
        self.targets.push(t.clone());
        t
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mounter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The mounter itself: the child, or the child's child under a wrapper (unshare
            // ignores SIGTERM while it waits for its child).
            let mut pids = vec![c.id()];
            if !self.wrapper.is_empty() {
                let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", c.id()));
                pids = children.unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect();
            }
            for pid in pids {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for t in &self.targets {
            while mounted(t) {
                if nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("--- mounter log ---\n{}", self.log());
        }
    }
}

/// Writes a volume's record into the server's bucket and returns a spec mounting it.
async fn volume(s: &S3Server, target: &Path, quota: u64, read_only: bool) -> MountSpec {
    let local = format!("pvc-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let id = format!("s3.vol:{}:{local}", s.bucket);
    let spec = MountSpec {
        volume_id: id,
        target: target.to_owned(),
        endpoint: s.endpoint.clone(),
        bucket: s.bucket.clone(),
        data_prefix: format!("ferrovol/volumes/{local}/fs/"),
        record_key: format!("ferrovol/volumes/{local}/volume.json"),
        read_only,
        uid: 1000,
        gid: 2000,
        file_mode: 0o640,
        dir_mode: 0o750,
        timeout_secs: 3,
    };
    write_record(s, &spec, quota).await;
    spec
}

async fn write_record(s: &S3Server, spec: &MountSpec, quota: u64) {
    let rec = S3VolumeRecord {
        version: 1,
        name: spec.volume_id.rsplit(':').next().unwrap_or_default().to_owned(),
        id: spec.volume_id.clone(),
        capacity_bytes: quota,
        own_bucket: false,
        state: VolumeState::Ready,
        source: None,
        parameters: Default::default(),
        created_unix: 0,
    };
    let body = serde_json::to_vec(&rec).expect("record json");
    build_client(&s.endpoint, Timeouts::default())
        .put_object()
        .bucket(&s.bucket)
        .key(&spec.record_key)
        .body(body.into())
        .send()
        .await
        .expect("put the volume record");
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 1000) % 253) as u8).collect()
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    r.map(|_| ()).expect_err("the operation should fail").raw_os_error().unwrap_or(0)
}

/// Runs `op` on a thread and returns its result, or None when it did not return in `limit`.
fn within<T: Send + 'static>(limit: Duration, op: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    rx.recv_timeout(limit).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_directories_work_through_a_real_mount() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let quota = 256 << 20;
    let spec = volume(&s, &t, quota, false).await;
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    c.mount(&spec).await.expect("a repeat of the same mount is OK");
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info.lines().find(|l| l.contains(&*t.to_string_lossy())).expect("the mount is listed");
    assert!(line.contains(&format!("fuse.ferrovol ferrovol:{}", spec.volume_id)), "{line}");

    std::fs::create_dir(t.join("d")).expect("mkdir");
    std::fs::write(t.join("d/a.txt"), b"hello, s3").expect("write small");
    assert_eq!(std::fs::read(t.join("d/a.txt")).expect("read small"), b"hello, s3");
    let big = pattern(20 * 1024 * 1024 + 4321); // more than two 8 MiB parts
    let w = Instant::now();
    std::fs::write(t.join("d/big"), &big).expect("write big");
    let wrote = w.elapsed();
    let r = Instant::now();
    let back = std::fs::read(t.join("d/big")).expect("read big");
    let read = r.elapsed();
    assert!(back == big, "the big file read back differs ({} vs {} bytes)", back.len(), big.len());
    eprintln!("20 MiB through FUSE on {}: write {wrote:?}, read {read:?}", s.server.name());

    let mut names: Vec<String> = std::fs::read_dir(t.join("d"))
        .expect("ls d")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "big"]);
    let md = std::fs::metadata(t.join("d/a.txt")).expect("stat file");
    assert_eq!((md.uid(), md.gid(), md.permissions().mode() & 0o7777, md.len()), (1000, 2000, 0o640, 9));
    let md = std::fs::metadata(t.join("d")).expect("stat dir");
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.gid(), md.permissions().mode() & 0o7777), (1000, 2000, 0o750));

    std::fs::rename(t.join("d/a.txt"), t.join("b.txt")).expect("rename");
    assert_eq!(std::fs::read(t.join("b.txt")).expect("read renamed"), b"hello, s3");
    assert_eq!(errno(std::fs::metadata(t.join("d/a.txt"))), libc::ENOENT);
    assert_eq!(errno(std::fs::remove_dir(t.join("d"))), libc::ENOTEMPTY);
    std::fs::remove_file(t.join("d/big")).expect("unlink");
    std::fs::remove_dir(t.join("d")).expect("rmdir");
    assert_eq!(errno(std::fs::metadata(t.join("d"))), libc::ENOENT);

    let vfs = nix::sys::statvfs::statvfs(&t).expect("statfs");
    assert_eq!(vfs.blocks() as u64 * vfs.fragment_size() as u64, quota);
    let stats = c.stats(&t).await.expect("stats");
    assert_eq!((stats.used_bytes, stats.quota_bytes, stats.healthy), (9, quota, true));
    assert_eq!(vfs.blocks_free() as u64 * vfs.fragment_size() as u64, quota - 4096);
    assert_eq!(c.list().await.expect("list").len(), 1);

    // Another volume cannot take the target.
    let mut other = volume(&s, &t, quota, false).await;
    other.target = t.clone();
    assert_eq!(c.mount(&other).await.expect_err("taken").code(), Code::FailedPrecondition);

    c.unmount(&t).await.expect("unmount");
    assert!(!mounted(&t), "nothing left in mountinfo");
    c.unmount(&t).await.expect("a repeat of the unmount is OK");
    assert_eq!(c.stats(&t).await.expect_err("not mounted").code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_stops_writes_with_enospc_until_it_is_raised() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 4 << 20, false).await;
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    std::fs::write(t.join("a"), pattern(3 << 20)).expect("3 MiB fits");
    let e = std::fs::write(t.join("b"), pattern(2 << 20)).expect_err("over the quota");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(errno(std::fs::metadata(t.join("b"))), libc::ENOENT, "nothing was committed");
    write_record(&s, &spec, 16 << 20).await;
    assert_eq!(c.refresh_quota(&t).await.expect("refresh"), 16 << 20);
    std::fs::write(t.join("b"), pattern(2 << 20)).expect("fits after the refresh");
    assert_eq!(c.stats(&t).await.expect("stats").used_bytes, 5 << 20);
    c.unmount(&t).await.expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_mount_refuses_writes_with_erofs() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 1 << 30, true).await;
    build_client(&s.endpoint, Timeouts::default())
        .put_object()
        .bucket(&s.bucket)
        .key(format!("{}f.txt", spec.data_prefix))
        .body(b"read me".to_vec().into())
        .send()
        .await
        .expect("put");
    let c = m.client();
    c.mount(&spec).await.expect("mount read-only");
    assert_eq!(std::fs::read(t.join("f.txt")).expect("read"), b"read me");
    assert_eq!(errno(std::fs::write(t.join("g.txt"), b"x")), libc::EROFS);
    assert_eq!(errno(std::fs::write(t.join("f.txt"), b"x")), libc::EROFS);
    assert_eq!(errno(std::fs::create_dir(t.join("d"))), libc::EROFS);
    assert_eq!(errno(std::fs::remove_file(t.join("f.txt"))), libc::EROFS);
    c.unmount(&t).await.expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_makes_ls_and_cat_fail_with_eio_within_the_bound() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 1 << 30, false).await;
    let bound = Duration::from_secs(spec.timeout_secs);
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    std::fs::write(t.join("f"), b"some data").expect("write");
    s.pause();
    // SIGSTOP takes effect when the server's threads are next scheduled: let it settle.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let (t1, t2) = (t.clone(), t.clone());
    let ls = within(bound + Duration::from_secs(3), move || std::fs::read_dir(&t1).map(|d| d.count()));
    let ls_took = start.elapsed();
    let start = Instant::now();
    let cat = within(bound + Duration::from_secs(3), move || std::fs::read(t2.join("f")));
    let cat_took = start.elapsed();
    let stats = c.stats(&t).await.expect("stats");
    s.resume();
    let ls = ls.unwrap_or_else(|| panic!("ls hung past {:?}", bound + Duration::from_secs(3)));
    let cat = cat.unwrap_or_else(|| panic!("cat hung past {:?}", bound + Duration::from_secs(3)));
    assert_eq!(errno(ls), libc::EIO, "ls after {ls_took:?}");
    assert_eq!(errno(cat), libc::EIO, "cat after {cat_took:?}");
    eprintln!("paused server: ls failed in {ls_took:?}, cat in {cat_took:?} (bound {bound:?})");
    assert!(!stats.healthy && !stats.message.is_empty(), "{stats:?}");
    assert!(!stats.message.contains(&s.endpoint.secret_access_key));
    assert_eq!(std::fs::read(t.join("f")).expect("works again after resume"), b"some data");
    c.unmount(&t).await.expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_mounter_leaves_enotconn_and_the_next_mount_replaces_it() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 1 << 30, false).await;
    m.client().mount(&spec).await.expect("mount");
    std::fs::write(t.join("f"), b"kept in S3").expect("write");
    m.kill9();
    assert_eq!(errno(std::fs::metadata(&t)), libc::ENOTCONN);
    assert!(mounted(&t), "the dead mount stays until someone removes it");
    m.spawn(); // same socket: the stale socket is replaced
               // Dead mounts stay until they are mounted again: one may be a pod's target, and a bare
               // directory there would take the pod's writes onto the node's disk silently.
    assert!(mounted(&t), "the new mounter leaves the dead mount in place");
    assert_eq!(errno(std::fs::metadata(&t)), libc::ENOTCONN, "and it still fails every access");
    // The report is logged right after the socket is bound: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.log().contains("a dead mount left by a previous mounter") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(m.log().contains("a dead mount left by a previous mounter"), "it reports it in its log");
    m.client().mount(&spec).await.expect("mount again");
    assert_eq!(std::fs::read(t.join("f")).expect("read"), b"kept in S3");
    m.client().unmount(&t).await.expect("unmount");
    assert!(!mounted(&t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_errors_name_the_volume_and_the_cause() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let c = m.client();
    let t = m.target();
    let mut spec = volume(&s, &t, 1 << 30, false).await;

    let mut missing = spec.clone();
    missing.record_key = "ferrovol/volumes/nope/volume.json".into();
    let e = c.mount(&missing).await.expect_err("no record");
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.to_string().contains(&spec.volume_id), "{e}");

    std::fs::write(t.join("x"), b"x").expect("make the target non-empty");
    let e = c.mount(&spec).await.expect_err("not empty");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("not empty"), "{e}");
    std::fs::remove_file(t.join("x")).expect("rm");

    let mut unreachable = spec.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    unreachable.endpoint.endpoint = format!("http://127.0.0.1:{port}");
    unreachable.timeout_secs = 2;
    let e = c.mount(&unreachable).await.expect_err("unreachable");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(!e.to_string().contains(&s.endpoint.secret_access_key), "{e}");
    assert!(!m.log().contains(&s.endpoint.secret_access_key), "no secret in the mounter's log");
    assert!(!mounted(&t));

    spec.target = PathBuf::from("relative/path");
    assert_eq!(c.mount(&spec).await.expect_err("relative").code(), Code::InvalidArgument);
}

/// Runs `exec >out; echo one; /bin/true; echo two` in bash: /bin/true inherits bash's
/// descriptor of `out` and closes it between the two writes.
fn inherited_fd_script(out: &Path) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("exec >{}; echo one; /bin/true; echo two", out.display()))
        .output()
        .expect("bash")
}

/// Unfinished multipart uploads under `prefix` in the test bucket.
async fn unfinished_uploads(s: &S3Server, prefix: &str) -> usize {
    let s3 = build_client(&s.endpoint, Timeouts::default());
    let u = s3.list_multipart_uploads().bucket(&s.bucket).prefix(prefix).send().await.expect("list uploads");
    u.uploads().len()
}

fn close(fd: i32) -> Result<(), i32> {
    // SAFETY: `fd` is a descriptor this test opened (or dup'd) and closes exactly once.
    let r = unsafe { libc::close(fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_openers_close_commits_and_a_failed_commit_is_reported_by_every_close() {
    use std::os::fd::IntoRawFd;
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 4 << 20, false).await;
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    // /bin/true inherits bash's fd 1 and closes it when it exits: that close must not
    // commit the file, or "echo two" would fail.
    let out = t.join("out.log");
    let st = inherited_fd_script(&out).status;
    assert!(st.success(), "{st}");
    assert_eq!(std::fs::read(&out).expect("read out.log"), b"one\ntwo\n");

    // A commit that fails (past the quota) is reported by close, and again by the close
    // of a dup.
    let f = std::fs::File::create(t.join("big")).expect("create big");
    let fd = f.into_raw_fd();
    // SAFETY: dup of a descriptor we own; the copy is closed below.
    let dup = unsafe { libc::dup(fd) };
    assert!(dup >= 0);
    let chunk = pattern(1 << 20);
    let mut refused = None;
    for _ in 0..6 {
        // SAFETY: writes from a live buffer of the given length to our descriptor.
        let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            refused = std::io::Error::last_os_error().raw_os_error();
            break;
        }
    }
    assert_eq!(refused, Some(libc::ENOSPC));
    assert_eq!(close(fd), Err(libc::ENOSPC), "close reports the failed commit");
    assert_eq!(close(dup), Err(libc::ENOSPC), "and so does the close of the dup");
    assert_eq!(errno(std::fs::metadata(t.join("big"))), libc::ENOENT, "nothing was committed");
    c.unmount(&t).await.expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmount_aborts_the_upload_of_a_file_left_open() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let t = m.target();
    let spec = volume(&s, &t, 1 << 30, false).await;
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    let uploads = || unfinished_uploads(&s, &spec.data_prefix);
    let mut f = std::fs::File::create(t.join("open")).expect("create");
    // More than one 8 MiB part: a multipart upload is under way.
    std::io::Write::write_all(&mut f, &pattern(9 << 20)).expect("write");
    assert_eq!(uploads().await, 1, "one part uploaded");
    // The mount is busy (the file is open): detached, its session aborted, the writer discarded.
    c.unmount(&t).await.expect("unmount");
    assert!(!mounted(&t));
    assert_eq!(uploads().await, 0, "the unmount aborted the upload");
    drop(f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_unmounts_everything_and_aborts_the_uploads_of_open_files() {
    let s = S3Server::start();
    let mut m = Mounter::start();
    let (t1, t2) = (m.target(), m.target());
    let (spec1, spec2) = (volume(&s, &t1, 1 << 30, false).await, volume(&s, &t2, 1 << 30, false).await);
    let c = m.client();
    c.mount(&spec1).await.expect("mount 1");
    c.mount(&spec2).await.expect("mount 2");
    std::fs::write(t2.join("closed"), b"committed before the signal").expect("write a file");
    let mut f = std::fs::File::create(t1.join("open")).expect("create");
    std::io::Write::write_all(&mut f, &pattern(9 << 20)).expect("write");
    let s3 = build_client(&s.endpoint, Timeouts::default());
    let uploads = || unfinished_uploads(&s, &spec1.data_prefix);
    assert_eq!(uploads().await, 1, "one part uploaded");

    let mut child = m.child.take().expect("the mounter runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "the mounter did not exit within 20 s of SIGTERM: {}", m.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "SIGTERM exits 0: {status}; {}", m.log());
    assert!(!mounted(&t1) && !mounted(&t2), "both mounts are gone");
    assert_eq!(uploads().await, 0, "the open file's upload was aborted");
    let objects = s3.list_objects_v2().bucket(&s.bucket).prefix(&spec1.data_prefix).send().await.expect("list");
    assert!(objects.contents().is_empty(), "the open file was not committed: {:?}", objects.contents());
    let kept = s3.get_object().bucket(&s.bucket).key(format!("{}closed", spec2.data_prefix)).send().await;
    assert!(kept.is_ok(), "a file closed before the signal stays");
    assert!(!m.socket.exists(), "the socket is removed");
    drop(f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_mounters_pid_namespace_the_first_close_after_a_write_commits() {
    let s = S3Server::start();
    // The mounter in a pid namespace of its own: FUSE reports this test's processes with
    // pid 0, as it reports pods' processes to a mounter without the host's pids.
    let mut m = Mounter::start_under(&["unshare", "--pid", "--fork", "--kill-child=SIGTERM"]);
    let t = m.target();
    let spec = volume(&s, &t, 1 << 30, false).await;
    let c = m.client();
    c.mount(&spec).await.expect("mount");
    // The script of `only_the_openers_close_commits_…`, where it stores "one\ntwo\n": here
    // /bin/true's close of the inherited fd cannot be told from bash's and commits "one",
    // and bash's next write fails with EINVAL.
    let out = t.join("out.log");
    let run = inherited_fd_script(&out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("Invalid argument"), "{}: {stderr}", run.status);
    assert_eq!(std::fs::read(&out).expect("read out.log"), b"one\n");
    let s3 = build_client(&s.endpoint, Timeouts::default());
    let got = s3.get_object().bucket(&s.bucket).key(format!("{}out.log", spec.data_prefix)).send().await.expect("get");
    assert_eq!(got.body.collect().await.expect("body").into_bytes().as_ref(), b"one\n");
    c.unmount(&t).await.expect("unmount");
}

#[test]
fn a_metrics_address_in_use_stops_the_start_and_leaves_no_socket() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::Builder::new().prefix("fvmnt-").tempdir().expect("tempdir");
    let socket = dir.path().join("mounter.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol-mounter"))
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-listen", &addr.to_string()])
        .output()
        .expect("run the mounter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not serve without its metrics port: {stderr}");
    assert!(stderr.contains(&format!("--metrics-listen {addr}")), "the error names the flag: {stderr}");
    assert!(!socket.exists(), "no socket is left that nobody serves");
}
