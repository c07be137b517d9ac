//! The `fuser` adapter: translates FUSE callbacks into calls of the filesystem core
//! (`crate::fs`) and their results into replies. Callbacks are synchronous; each one spawns
//! its core call on the tokio runtime and replies from that task, so one slow S3 call never
//! holds up the others. Mounting is done here with mount(2) on our own `/dev/fuse` fd (we
//! are root), so the mounter alone decides when a mount ends.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, FsError, Kind, S3Fs};

/// How long the kernel may trust an entry or attribute we answered.
const TTL: Duration = Duration::from_secs(1);

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
        },
        perm: a.perm,
        nlink: match a.kind {
            Kind::File => 1,
            Kind::Dir => 2,
        },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn errno(op: &'static str, e: &FsError) -> Errno {
    crate::metrics::fs().error(op, e.errno);
    match e.errno {
        libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::EROFS => {
            tracing::debug!(op, error = %e, "refused");
        }
        _ => tracing::warn!(op, error = %e, "failed"),
    }
    Errno::from_i32(e.errno)
}

/// The process (thread group) of the thread `pid` that sent a request, as the kernel names
/// it in our pid namespace: files opened by one thread of a program may be closed by
/// another. `pid` itself when /proc cannot say (the thread is gone).
pub fn thread_group(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(pid)
}

type Listing = Arc<Vec<(u64, FileType, String)>>;

/// The FUSE face of one mounted volume.
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<S3Fs>,
    rt: tokio::runtime::Handle,
    dirs: Arc<Mutex<HashMap<u64, Listing>>>,
    next_dir: AtomicU64,
}

impl FuseFs {
    pub fn new(fs: Arc<S3Fs>, rt: tokio::runtime::Handle) -> Self {
        FuseFs { fs, rt, dirs: Arc::new(Mutex::new(HashMap::new())), next_dir: AtomicU64::new(1) }
    }

    fn spawn<F>(&self, f: impl FnOnce(Arc<S3Fs>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f(self.fs.clone()));
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // O_TRUNC reaches open (instead of a separate truncation first).
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(|fs| async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&TTL, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn(|fs| async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&TTL, &to_attr(&a)),
                Err(e) => reply.error(errno("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.spawn(|fs| async move {
            match fs.setattr(ino.0, size, fh.map(|f| f.0)).await {
                Ok(a) => reply.attr(&TTL, &to_attr(&a)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(|fs| async move {
            match fs.mkdir(parent.0, &name).await {
                Ok(a) => reply.entry(&TTL, &to_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(|fs| async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn(|fs| async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.spawn(|fs| async move {
            match fs.rename(parent.0, &name, newparent.0, &newname, noreplace).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let pid = req.pid();
        self.spawn(|fs| async move {
            let acc = flags.0 & libc::O_ACCMODE;
            // Only a writer's opener matters (its close commits).
            let opener = if acc == libc::O_RDONLY { pid } else { thread_group(pid) };
            match fs.open(ino.0, flags.0, opener).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(|fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(b) => {
                    crate::metrics::fs().read(b.len());
                    reply.data(&b);
                }
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn(|fs| async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => {
                    crate::metrics::fs().written(n);
                    reply.written(n);
                }
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let pid = req.pid();
        // Read while the closing process still exists (it waits for this reply).
        let closer = thread_group(pid);
        self.spawn(|fs| async move {
            match fs.flush(fh.0, closer).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(|fs| async move {
            match fs.release(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Nothing is durable before close: an open file is committed when it is closed.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is taken once at opendir and served by offset until releasedir.
        let dir_fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        let dirs = self.dirs.clone();
        self.spawn(|fs| async move {
            match fs.readdir(ino.0).await {
                Ok(entries) => {
                    let mut v = Vec::with_capacity(entries.len() + 2);
                    v.push((ino.0, FileType::Directory, ".".to_owned()));
                    v.push((ino.0, FileType::Directory, "..".to_owned()));
                    for e in entries {
                        let kind = match e.kind {
                            Kind::File => FileType::RegularFile,
                            Kind::Dir => FileType::Directory,
                        };
                        v.push((e.ino, kind, e.name));
                    }
                    if let Ok(mut d) = dirs.lock() {
                        d.insert(dir_fh, Arc::new(v));
                    }
                    reply.opened(FileHandle(dir_fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno("readdir", &e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let listing = self.dirs.lock().ok().and_then(|d| d.get(&fh.0).cloned());
        let Some(listing) = listing else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        if let Ok(mut d) = self.dirs.lock() {
            d.remove(&fh.0);
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.to_owned();
        let opener = thread_group(req.pid());
        self.spawn(|fs| async move {
            match fs.create(parent.0, &name, flags, opener).await {
                Ok((a, fh)) => reply.created(&TTL, &to_attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }
}

/// The read-ahead of a mount, KiB: as large as one FUSE request may be (`max_write` sets
/// `max_pages` to 1 MiB), so that a sequential reader's requests are 1 MiB each.
const READ_AHEAD_KB: u32 = 1024;

/// The kernel reads ahead of a FUSE file no further than its bdi's `read_ahead_kb` (128 KiB
/// by default, whatever the init reply offers), which makes a sequential read cost one FUSE
/// request per 128 KiB. Best effort: a failure only costs throughput.
fn raise_read_ahead(dev: u64) {
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "cannot raise the mount's read-ahead");
    }
}

/// A mounted volume with its FUSE session running on a thread of its own.
#[derive(Debug)]
pub struct Mounted {
    pub target: PathBuf,
    /// The FUSE connection's number (the mount's device), as in /sys/fs/fuse/connections.
    pub conn: Option<u64>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

/// Mounts `fs` at `target` (source `ferrovol:<volume_id>`, type `fuse.ferrovol`,
/// `allow_other`, `default_permissions`, `nosuid`, `nodev`, and `ro` when read-only) and
/// starts its session. On failure nothing stays mounted.
pub fn mount(
    fs: Arc<S3Fs>,
    rt: tokio::runtime::Handle,
    target: &Path,
    volume_id: &str,
    read_only: bool,
) -> io::Result<Mounted> {
    use nix::mount::{MntFlags, MsFlags};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/fuse: {e}")))?;
    let fd: OwnedFd = dev.into();
    let root_mode = std::fs::metadata(target)?.mode() & libc::S_IFMT;
    let opts = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        fd.as_raw_fd(),
        root_mode,
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let source = format!("ferrovol:{volume_id}");
    nix::mount::mount(Some(source.as_str()), target, Some(crate::mountinfo::FSTYPE), flags, Some(opts.as_str()))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("mount(2) of {}: {e}", target.display())))?;
    let undo = |e: io::Error| {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        e
    };
    let mut config = fuser::Config::default();
    config.acl = SessionACL::All;
    let session = Session::from_fd(FuseFs::new(fs, rt), fd, SessionACL::All, config).map_err(undo)?;
    let thread = std::thread::Builder::new().name("fuse-session".into()).spawn(move || session.run()).map_err(undo)?;
    // Answered by the session now running (the root's attributes need no S3 call).
    let conn = std::fs::metadata(target).ok().map(|m| m.dev());
    if let Some(dev) = conn {
        raise_read_ahead(dev);
    }
    Ok(Mounted { target: target.to_owned(), conn, thread: Some(thread) })
}

impl Mounted {
    /// Unmounts (lazily when busy) and ends the session.
    pub fn unmount(mut self) -> io::Result<()> {
        self.detach()?;
        self.end_session();
        Ok(())
    }

    /// Unmounts, lazily when busy: answers whether it was busy (files were still open, and
    /// the kernel may go on serving them until the session ends).
    pub fn detach(&self) -> io::Result<bool> {
        use nix::mount::MntFlags;
        match nix::mount::umount2(&self.target, MntFlags::empty()) {
            Ok(()) => Ok(false),
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(target = %self.target.display(), "the mount is busy: detaching it lazily");
                nix::mount::umount2(&self.target, MntFlags::MNT_DETACH)?;
                Ok(true)
            }
            // Not mounted any more (someone unmounted it by hand).
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Ends the session after [`Mounted::detach`].
    pub fn end(mut self) {
        self.end_session();
    }

    fn wait(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the session to see the unmount; one held open by users of a lazily
    /// detached mount is aborted through fusectl when that is mounted.
    fn end_session(&mut self) {
        if !self.wait(Duration::from_secs(3)) {
            if let Some(conn) = self.conn {
                let abort = format!("/sys/fs/fuse/connections/{conn}/abort");
                if std::fs::write(&abort, "1").is_ok() {
                    tracing::info!(target = %self.target.display(), "aborted the FUSE connection of a detached mount");
                }
            }
            if !self.wait(Duration::from_secs(2)) {
                tracing::warn!(
                    target = %self.target.display(),
                    "the FUSE session still serves open files of the detached mount; it ends when they are closed"
                );
                return;
            }
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(target = %self.target.display(), error = %e, "the FUSE session ended with an error")
                }
                Err(_) => tracing::error!(target = %self.target.display(), "the FUSE session thread panicked"),
            }
        }
    }
}

/// Whether `path` is a mount whose FUSE server is gone (stat answers ENOTCONN). The stat
/// runs on a thread of its own so that a live but stuck server cannot hang the caller.
pub fn is_dead(path: &Path) -> bool {
    let p = path.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("stat-probe".into()).spawn(move || {
        let _ = tx.send(std::fs::metadata(&p).err().and_then(|e| e.raw_os_error()));
    });
    if spawned.is_err() {
        return false;
    }
    matches!(rx.recv_timeout(Duration::from_secs(2)), Ok(Some(libc::ENOTCONN)))
}

/// Logs every `fuse.ferrovol` mount whose server died (a previous mounter was killed) and
/// answers their paths. They are left in place on purpose: among them are the binds in the
/// pods' target directories, and taking one away would turn it into a plain directory on
/// the node's disk, where the pod's writes would land silently instead of failing. A dead
/// mount fails every access (ENOTCONN) until the node plugin's next NodeStageVolume or
/// NodePublishVolume replaces it (the node reports the volume abnormal meanwhile).
pub fn report_stale() -> Vec<PathBuf> {
    let mounts = match crate::mountinfo::read() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/self/mountinfo to look for dead mounts");
            return Vec::new();
        }
    };
    let mut dead = Vec::new();
    for m in mounts.into_iter().filter(|m| m.fstype == crate::mountinfo::FSTYPE) {
        if is_dead(&m.mount_point) {
            tracing::warn!(target = %m.mount_point.display(), source = %m.source,
                "a dead mount left by a previous mounter: it fails every access until the node plugin mounts it again");
            dead.push(m.mount_point);
        }
    }
    dead
}
