//! The S3 filesystem core, without any FUSE type: inodes, lookups and listings built from
//! ListObjectsV2, a stat cache, streaming reads and writes, the quota, and errnos. The FUSE
//! adapter (`crate::fuse`) only translates calls; tests drive this core directly against a
//! real S3 server. What is and is not POSIX here is written in docs/S3-SEMANTICS.md.

pub mod budget;
pub mod paths;
pub mod read;
pub mod s3;
pub mod write;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use budget::Budget;
use read::Reader;
use s3::S3Ctx;
use write::Writer;

/// The root directory's inode.
pub const ROOT_INO: u64 = 1;

/// A failed operation: the errno the caller gets and what happened (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError { errno, message: message.into() }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, std::io::Error::from_raw_os_error(self.errno))
    }
}

impl std::error::Error for FsError {}

pub type FsResult<T> = Result<T, FsError>;

/// How one mount behaves.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// For messages.
    pub volume_id: String,
    pub bucket: String,
    /// What `/` shows: ends with `/`.
    pub data_prefix: String,
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// The bound on any one S3 call.
    pub timeout: Duration,
    /// How long a looked-up entry is trusted.
    pub stat_ttl: Duration,
    /// Multipart part size (at least 5 MiB).
    pub part_size: usize,
    /// Prefetch chunk size and how many chunks ahead.
    pub read_chunk: u64,
    pub read_depth: u64,
    /// The largest file a rename copies on the server; a larger one is EXDEV, so that `mv`
    /// copies it through the filesystem instead of waiting on one long CopyObject.
    pub rename_copy_max: u64,
    /// The most entries the stat cache keeps.
    pub cache_max: usize,
    /// The buffer budget shared by every mount of the process.
    pub budget: Budget,
}

/// Files larger than this are not renamed by CopyObject (EXDEV).
pub const RENAME_COPY_MAX: u64 = 256 << 20;

/// The longest name of one file or directory, in bytes (what `statfs` reports).
pub const NAME_MAX: usize = 255;

impl FsConfig {
    /// The defaults for everything but the volume's own settings.
    pub fn new(volume_id: &str, bucket: &str, data_prefix: &str, timeout: Duration) -> Self {
        FsConfig {
            volume_id: volume_id.to_owned(),
            bucket: bucket.to_owned(),
            data_prefix: data_prefix.to_owned(),
            read_only: false,
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            timeout,
            stat_ttl: Duration::from_secs(5),
            part_size: 8 << 20,
            read_chunk: 4 << 20,
            read_depth: 4,
            rename_copy_max: RENAME_COPY_MAX,
            cache_max: 64 * 1024,
            budget: Budget::global(),
        }
    }
}

/// File or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// What `statfs` shows, in blocks of `bsize` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub namelen: u32,
}

/// Usage and health of the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub quota_bytes: u64,
    pub inodes: u64,
    pub healthy: bool,
    pub message: String,
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    size: u64,
    mtime: SystemTime,
    /// The object's ETag, when known (the version a read-open pins).
    etag: Option<Arc<str>>,
}

impl Entry {
    fn dir(mtime: SystemTime) -> Entry {
        Entry { kind: Kind::Dir, size: 0, mtime, etag: None }
    }

    fn file(size: u64, mtime: SystemTime, etag: Option<&str>) -> Entry {
        Entry { kind: Kind::File, size, mtime, etag: etag.map(Arc::from) }
    }
}

/// The inodes the kernel holds: each with its path and lookup count. An inode goes when the
/// kernel forgets it (its count drops to 0), so the table holds what the kernel caches, not
/// every name ever seen. Numbers come from a hash of the path, so that a listing (which
/// hands out numbers without the kernel keeping them) and a later lookup agree.
#[derive(Debug, Default)]
struct Inodes {
    by_ino: HashMap<u64, (String, u64)>,
    by_path: HashMap<String, u64>,
    next: u64,
}

fn path_hash(path: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    (h.finish() & (u64::MAX >> 1)).max(ROOT_INO + 1)
}

impl Inodes {
    /// The number `path` has or would get, without taking a lookup (listings).
    fn peek(&self, path: &str) -> u64 {
        if path.is_empty() {
            return ROOT_INO;
        }
        self.by_path.get(path).copied().unwrap_or_else(|| path_hash(path))
    }

    /// The number of `path`, counting one lookup the kernel now holds.
    fn hold(&mut self, path: &str) -> u64 {
        if path.is_empty() {
            return ROOT_INO;
        }
        if let Some(i) = self.by_path.get(path) {
            if let Some(e) = self.by_ino.get_mut(i) {
                e.1 += 1;
            }
            return *i;
        }
        let mut i = path_hash(path);
        while self.by_ino.contains_key(&i) || i <= ROOT_INO {
            // A hash collision: a number of our own.
            self.next = self.next.max(ROOT_INO) + 1;
            i = self.next;
        }
        self.by_path.insert(path.to_owned(), i);
        self.by_ino.insert(i, (path.to_owned(), 1));
        i
    }

    /// The kernel dropped `n` lookups of `ino`.
    fn forget(&mut self, ino: u64, n: u64) {
        let Some(e) = self.by_ino.get_mut(&ino) else { return };
        e.1 = e.1.saturating_sub(n);
        if e.1 == 0 {
            if let Some((path, _)) = self.by_ino.remove(&ino) {
                if self.by_path.get(&path) == Some(&ino) {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    fn rename(&mut self, from: &str, to: &str) {
        if let Some(i) = self.by_path.remove(to) {
            self.by_ino.remove(&i);
        }
        if let Some(i) = self.by_path.remove(from) {
            if let Some(e) = self.by_ino.get_mut(&i) {
                e.0 = to.to_owned();
            }
            self.by_path.insert(to.to_owned(), i);
        }
    }
}

/// Looked-up entries, each trusted for the TTL; expired entries are swept out and the map
/// never holds more than `max`.
#[derive(Debug)]
struct Cache {
    map: HashMap<String, (Entry, Instant)>,
    max: usize,
    inserts: u64,
}

impl Cache {
    fn get(&self, path: &str, ttl: Duration) -> Option<Entry> {
        self.map.get(path).filter(|(_, at)| at.elapsed() < ttl).map(|(e, _)| e.clone())
    }

    fn insert(&mut self, path: &str, e: Entry, ttl: Duration) {
        self.inserts += 1;
        if self.map.len() >= self.max || self.inserts.is_multiple_of(1024) {
            self.map.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        if self.map.len() >= self.max {
            self.map.clear();
        }
        self.map.insert(path.to_owned(), (e, Instant::now()));
    }
}
#[derive(Debug)]
struct Space {
    /// Bytes of committed objects.
    used: u64,
    /// Bytes written to files not yet committed.
    pending: u64,
    /// Bytes of objects that open truncating writers will replace.
    released: u64,
    quota: u64,
    /// Objects (files and directory markers).
    objects: u64,
}

impl Space {
    fn taken(&self) -> u64 {
        (self.used + self.pending).saturating_sub(self.released)
    }
}

/// An open file.
#[derive(Debug)]
struct Handle {
    path: String,
    /// The process that opened it (its thread group): only its close commits a file being
    /// written, since every close of every copy of the descriptor (dup, fork, exec) flushes.
    opener: u32,
    reader: Option<Reader>,
    writer: Option<tokio::sync::Mutex<Writer>>,
    /// The size of the object the writer replaces (counted as released until commit).
    replaces: Option<u64>,
    /// Written bytes, for `stat` while the file is being written.
    written: Arc<AtomicU64>,
}

/// One mounted volume's filesystem.
#[derive(Debug)]
pub struct S3Fs {
    cfg: FsConfig,
    ctx: Arc<S3Ctx>,
    mounted_at: SystemTime,
    inodes: Mutex<Inodes>,
    cache: Mutex<Cache>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Paths being written through this mount, with their written bytes.
    writing: Mutex<HashMap<String, Arc<AtomicU64>>>,
    /// Paths a rename is moving (its source and target), locked after `writing`.
    renaming: Mutex<HashSet<String>>,
    next_fh: AtomicU64,
    space: Mutex<Space>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn erofs(what: &str) -> FsError {
    FsError::new(libc::EROFS, format!("{what}: the volume is mounted read-only"))
}

impl S3Fs {
    /// The filesystem over `client` with quota `quota_bytes`; [`S3Fs::scan_usage`] must run
    /// before it serves writes, so that the quota counts what the volume holds.
    pub fn new(client: aws_sdk_s3::Client, cfg: FsConfig, quota_bytes: u64) -> Arc<S3Fs> {
        let ctx = Arc::new(S3Ctx::new(client, &cfg.bucket, cfg.timeout));
        Arc::new(S3Fs {
            ctx,
            mounted_at: SystemTime::now(),
            inodes: Mutex::new(Inodes::default()),
            cache: Mutex::new(Cache { map: HashMap::new(), max: cfg.cache_max.max(1), inserts: 0 }),
            handles: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
            renaming: Mutex::new(HashSet::new()),
            next_fh: AtomicU64::new(1),
            space: Mutex::new(Space { used: 0, pending: 0, released: 0, quota: quota_bytes, objects: 0 }),
            cfg,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Lists every object of the volume and counts their bytes: the usage the quota checks.
    /// Page by page: only the sums are kept, never the keys.
    pub async fn scan_usage(&self) -> FsResult<()> {
        let (mut used, mut objects, mut token) = (0u64, 0u64, None);
        loop {
            let page = self.ctx.list_page(&self.cfg.data_prefix, false, token, None).await?;
            used += page.objects.iter().map(|(_, m)| m.size).sum::<u64>();
            objects += page.objects.len() as u64;
            match page.next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut s = lock(&self.space);
        s.used = used;
        s.objects = objects;
        Ok(())
    }

    /// The inodes the kernel holds lookups of (tests, and a bound the table keeps).
    pub fn inodes_held(&self) -> usize {
        lock(&self.inodes).by_ino.len()
    }

    /// Entries in the stat cache (tests).
    pub fn cached_entries(&self) -> usize {
        lock(&self.cache).map.len()
    }

    /// The kernel forgot `nlookup` lookups of `ino`: at 0 the inode goes.
    pub fn forget(&self, ino: u64, nlookup: u64) {
        if ino != ROOT_INO {
            lock(&self.inodes).forget(ino, nlookup);
        }
    }

    /// Sets the quota (after the record was read again).
    pub fn set_quota(&self, quota_bytes: u64) {
        lock(&self.space).quota = quota_bytes;
    }

    /// Usage and health.
    pub fn usage(&self) -> Usage {
        let (healthy, message) = self.ctx.health.report();
        let s = lock(&self.space);
        Usage { used_bytes: s.used, quota_bytes: s.quota, inodes: s.objects + 1, healthy, message }
    }

    pub fn statfs(&self) -> StatFs {
        let s = lock(&self.space);
        let bsize = 4096u64;
        let blocks = s.quota / bsize;
        let bfree = s.quota.saturating_sub(s.taken()) / bsize;
        let ffree = 1u64 << 20;
        StatFs { bsize: bsize as u32, blocks, bfree, files: s.objects + 1 + ffree, ffree, namelen: NAME_MAX as u32 }
    }

    fn attr(&self, ino: u64, e: Entry) -> Attr {
        let perm = match e.kind {
            Kind::File => self.cfg.file_mode,
            Kind::Dir => self.cfg.dir_mode,
        };
        Attr {
            ino,
            kind: e.kind,
            size: e.size,
            mtime: e.mtime,
            perm: (perm & 0o7777) as u16,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
        }
    }

    fn path_of(&self, ino: u64) -> FsResult<String> {
        if ino == ROOT_INO {
            return Ok(String::new());
        }
        lock(&self.inodes)
            .by_ino
            .get(&ino)
            .map(|(p, _)| p.clone())
            .ok_or_else(|| FsError::new(libc::ENOENT, format!("inode {ino} is no longer known (it was removed)")))
    }

    /// The inode of `path`, counting a lookup the kernel will hold (lookup, create, mkdir).
    fn hold_ino(&self, path: &str) -> u64 {
        lock(&self.inodes).hold(path)
    }

    fn cached(&self, path: &str) -> Option<Entry> {
        lock(&self.cache).get(path, self.cfg.stat_ttl)
    }

    fn remember(&self, path: &str, e: Entry) {
        lock(&self.cache).insert(path, e, self.cfg.stat_ttl);
    }

    fn forget_path(&self, path: &str) {
        lock(&self.cache).map.remove(path);
    }

    /// EBUSY when `path` is being written or renamed through this mount.
    fn check_idle(&self, path: &str) -> FsResult<()> {
        let w = lock(&self.writing);
        let r = lock(&self.renaming);
        if w.contains_key(path) || r.contains(path) {
            return Err(FsError::new(
                libc::EBUSY,
                format!("{path:?} is being written or renamed through this mount; try again once that is done"),
            ));
        }
        Ok(())
    }

    fn child(&self, parent: u64, name: &OsStr) -> FsResult<String> {
        let dir = self.path_of(parent)?;
        paths::check_name(&self.cfg.data_prefix, &dir, name)
    }

    /// What `path` is now: a file being written here, a cached entry, or S3's answer (a
    /// directory when anything lies under `path/`, else a file when the object exists).
    async fn resolve(&self, path: &str) -> FsResult<Option<Entry>> {
        if path.is_empty() {
            return Ok(Some(Entry::dir(self.mounted_at)));
        }
        if let Some(w) = lock(&self.writing).get(path) {
            return Ok(Some(Entry::file(w.load(Ordering::Relaxed), SystemTime::now(), None)));
        }
        if let Some(e) = self.cached(path) {
            return Ok(Some(e));
        }
        let file_key = paths::file_key(&self.cfg.data_prefix, path);
        let dir_prefix = paths::dir_prefix(&self.cfg.data_prefix, path);
        let (head, list) = tokio::join!(self.ctx.head(&file_key), self.ctx.list_page(&dir_prefix, true, None, Some(1)));
        let list = list?;
        let e = if !list.objects.is_empty() || !list.prefixes.is_empty() {
            Some(Entry::dir(self.mounted_at))
        } else {
            head?.map(|m| Entry::file(m.size, m.mtime, m.etag.as_deref()))
        };
        if let Some(e) = &e {
            self.remember(path, e.clone());
        }
        Ok(e)
    }

    async fn resolve_existing(&self, path: &str) -> FsResult<Entry> {
        self.resolve(path).await?.ok_or_else(|| {
            FsError::new(libc::ENOENT, format!("{path:?} does not exist on volume {}", self.cfg.volume_id))
        })
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let path = self.child(parent, name)?;
        let e = self.resolve_existing(&path).await?;
        Ok(self.attr(self.hold_ino(&path), e))
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let path = self.path_of(ino)?;
        let e = self.resolve_existing(&path).await?;
        Ok(self.attr(ino, e))
    }

    /// Every entry of directory `ino` (without `.` and `..`).
    pub async fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let path = self.path_of(ino)?;
        if self.resolve_existing(&path).await?.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, format!("{path:?} is a file")));
        }
        let prefix = paths::dir_prefix(&self.cfg.data_prefix, &path);
        let page = self.ctx.list_all(&prefix, true).await?;
        let mut out: HashMap<String, Entry> = HashMap::new();
        for p in &page.prefixes {
            if let Some(name) = paths::entry_name(&prefix, p) {
                out.insert(name.to_owned(), Entry::dir(self.mounted_at));
            }
        }
        for (key, m) in &page.objects {
            if key.ends_with('/') {
                continue;
            }
            if let Some(name) = paths::entry_name(&prefix, key) {
                // A directory of the same name wins over the file.
                out.entry(name.to_owned()).or_insert(Entry::file(m.size, m.mtime, m.etag.as_deref()));
            }
        }
        for (p, w) in lock(&self.writing).iter() {
            let (dir, name) = paths::split(p);
            if dir == path {
                out.entry(name.to_owned()).or_insert(Entry::file(w.load(Ordering::Relaxed), SystemTime::now(), None));
            }
        }
        let mut entries: Vec<DirEntry> = out
            .into_iter()
            .map(|(name, e)| {
                let child = paths::join(&path, &name);
                let kind = e.kind;
                self.remember(&child, e);
                DirEntry { ino: lock(&self.inodes).peek(&child), name, kind }
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles).get(&fh).cloned().ok_or_else(|| FsError::new(libc::EBADF, format!("no open file {fh}")))
    }

    /// A writer for `path`, which replaces an object of `replaces` bytes if any; opened by
    /// process `opener`, committed only if no object is there when `exclusive`.
    fn start_writer(&self, path: &str, replaces: Option<u64>, opener: u32, exclusive: bool) -> FsResult<Handle> {
        let written = Arc::new(AtomicU64::new(0));
        {
            let mut w = lock(&self.writing);
            let r = lock(&self.renaming);
            if w.contains_key(path) {
                return Err(FsError::new(libc::EBUSY, format!("{path:?} is already being written through this mount")));
            }
            if r.contains(path) {
                return Err(FsError::new(libc::EBUSY, format!("{path:?} is being renamed through this mount")));
            }
            w.insert(path.to_owned(), written.clone());
        }
        if let Some(r) = replaces {
            lock(&self.space).released += r;
        }
        let key = paths::file_key(&self.cfg.data_prefix, path);
        Ok(Handle {
            path: path.to_owned(),
            opener,
            reader: None,
            writer: Some(tokio::sync::Mutex::new(Writer::new(
                key,
                self.cfg.part_size,
                exclusive,
                self.cfg.budget.clone(),
            ))),
            replaces,
            written,
        })
    }

    /// Creates (or truncates) file `name` in `parent` and opens it for writing, for process
    /// `opener` (see [`S3Fs::flush`]). With `O_EXCL` in `flags` the commit stores the file
    /// only if no object of that name appeared meanwhile (EEXIST otherwise).
    pub async fn create(&self, parent: u64, name: &OsStr, flags: i32, opener: u32) -> FsResult<(Attr, u64)> {
        let path = self.child(parent, name)?;
        if self.cfg.read_only {
            return Err(erofs(&format!("creating {path:?}")));
        }
        self.check_idle(&path)?;
        let exclusive = flags & libc::O_EXCL != 0;
        let replaces = match self.resolve(&path).await? {
            Some(Entry { kind: Kind::Dir, .. }) => {
                return Err(FsError::new(libc::EISDIR, format!("{path:?} is a directory")))
            }
            Some(_) if exclusive => return Err(FsError::new(libc::EEXIST, format!("{path:?} exists (O_EXCL)"))),
            Some(e) => Some(e.size),
            None => None,
        };
        let h = self.start_writer(&path, replaces, opener, exclusive)?;
        let fh = self.add_handle(h);
        let ino = self.hold_ino(&path);
        Ok((self.attr(ino, Entry::file(0, SystemTime::now(), None)), fh))
    }

    /// Opens file `ino` with open(2) `flags` for process `opener`. Writing needs `O_TRUNC`
    /// or an empty file; reading a file being written through this mount is EBUSY.
    pub async fn open(&self, ino: u64, flags: i32, opener: u32) -> FsResult<u64> {
        let path = self.path_of(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let writes = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if writes && self.cfg.read_only {
            return Err(erofs(&format!("opening {path:?} for writing")));
        }
        if writes {
            self.check_idle(&path)?;
        } else if lock(&self.writing).contains_key(&path) {
            return Err(FsError::new(
                libc::EBUSY,
                format!("{path:?} is being written through this mount; it can be read once it is closed"),
            ));
        }
        let e = match self.resolve(&path).await? {
            Some(e) => e,
            // The kernel still knows a file whose commit failed (or that another client
            // removed): opening it for writing makes it anew.
            None if writes => {
                let h = self.start_writer(&path, None, opener, false)?;
                return Ok(self.add_handle(h));
            }
            None => {
                return Err(FsError::new(
                    libc::ENOENT,
                    format!("{path:?} does not exist on volume {}", self.cfg.volume_id),
                ))
            }
        };
        if e.kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, format!("{path:?} is a directory")));
        }
        let key = paths::file_key(&self.cfg.data_prefix, &path);
        let h = if writes {
            if flags & libc::O_TRUNC == 0 && e.size > 0 {
                return Err(FsError::new(
                    libc::EOPNOTSUPP,
                    format!("{path:?}: an existing file can be written only when truncated (O_TRUNC); objects cannot be changed in place"),
                ));
            }
            self.start_writer(&path, Some(e.size), opener, false)?
        } else {
            // The version read is pinned by its ETag; without one from the lookup, ask.
            let (size, etag) = match e.etag {
                Some(t) => (e.size, Some(t.to_string())),
                None => match self.ctx.head(&key).await? {
                    Some(m) => {
                        self.remember(&path, Entry::file(m.size, m.mtime, m.etag.as_deref()));
                        (m.size, m.etag)
                    }
                    None => {
                        self.forget_path(&path);
                        return Err(FsError::new(
                            libc::ENOENT,
                            format!("{path:?} does not exist on volume {}", self.cfg.volume_id),
                        ));
                    }
                },
            };
            Handle {
                path: path.clone(),
                opener,
                reader: Some(Reader::new(
                    key,
                    size,
                    etag,
                    self.cfg.read_chunk,
                    self.cfg.read_depth,
                    self.cfg.budget.clone(),
                )),
                writer: None,
                replaces: None,
                written: Arc::new(AtomicU64::new(0)),
            }
        };
        Ok(self.add_handle(h))
    }

    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> FsResult<Bytes> {
        let h = self.handle(fh)?;
        match &h.reader {
            Some(r) => r.read(&self.ctx, offset, len as u64).await,
            None => Err(FsError::new(
                libc::EOPNOTSUPP,
                format!("{:?} is open for writing; it can be read once it is closed", h.path),
            )),
        }
    }

    /// Chunks the read handle `fh` holds (tests).
    pub fn chunks_held(&self, fh: u64) -> usize {
        self.handle(fh).ok().and_then(|h| h.reader.as_ref().map(Reader::chunks_held)).unwrap_or(0)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        let Some(w) = &h.writer else {
            return Err(FsError::new(libc::EBADF, format!("{:?} is not open for writing", h.path)));
        };
        let mut w = w.lock().await;
        w.check(offset)?;
        {
            let mut s = lock(&self.space);
            let len = data.len() as u64;
            if s.taken() + len > s.quota {
                let e = FsError::new(
                    libc::ENOSPC,
                    format!(
                        "volume {} is at its quota of {} bytes ({} used): {:?} cannot grow",
                        self.cfg.volume_id,
                        s.quota,
                        s.taken(),
                        h.path
                    ),
                );
                drop(s);
                w.fail(e.clone());
                return Err(e);
            }
            s.pending += len;
        }
        let before = w.written();
        let r = w.write(&self.ctx, data).await;
        if w.written() == before {
            // Not taken (the budget was spent): not pending either.
            let mut s = lock(&self.space);
            s.pending = s.pending.saturating_sub(data.len() as u64);
        }
        h.written.store(w.written(), Ordering::Relaxed);
        r.map(|()| data.len() as u32)
    }

    /// A close of a descriptor of `fh` by process `closer`. Every close of every copy of a
    /// descriptor flushes (a dup, a child that inherited it and exits, close-on-exec), so
    /// only the opener's close commits a file being written, and only once something was
    /// written (shells open, dup2 and close the original before writing); the others do
    /// nothing, and [`S3Fs::release`] commits at the last close whatever happened. Once a
    /// commit was tried, every close answers its result again (a failed commit is reported
    /// by every later close).
    pub async fn flush(&self, fh: u64, closer: u32) -> FsResult<()> {
        let h = self.handle(fh)?;
        let Some(w) = &h.writer else { return Ok(()) };
        let mut w = w.lock().await;
        if let Some(r) = w.outcome() {
            return r.map(|_| ());
        }
        if closer != h.opener {
            return Ok(());
        }
        if w.written() == 0 && !w.has_failed() {
            // Shells open a file, dup2 it onto a descriptor and close the original before
            // writing anything: an empty file is committed at its last close (release).
            return Ok(());
        }
        self.commit(&h, &mut w).await
    }

    /// Commits the writer of `h` and settles the usage.
    async fn commit(&self, h: &Handle, w: &mut Writer) -> FsResult<()> {
        let r = w.commit(&self.ctx).await;
        let written = w.written();
        lock(&self.writing).remove(&h.path);
        let replaces = h.replaces.unwrap_or(0);
        {
            let mut s = lock(&self.space);
            s.pending = s.pending.saturating_sub(written);
            s.released = s.released.saturating_sub(replaces);
            if r.is_ok() {
                s.used = (s.used + written).saturating_sub(replaces);
                if h.replaces.is_none() {
                    s.objects += 1;
                }
            }
        }
        match r {
            Ok(write::Outcome::Committed(size, etag)) => {
                self.remember(&h.path, Entry::file(size, SystemTime::now(), etag.as_deref()));
                Ok(())
            }
            Err(e) => {
                self.forget_path(&h.path);
                Err(e)
            }
        }
    }

    /// The last close of an open file: commits it if no flush did (whoever closes last),
    /// and answers the commit's result.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let r = match self.handle(fh) {
            Ok(h) => match &h.writer {
                Some(w) => {
                    let mut w = w.lock().await;
                    match w.outcome() {
                        Some(r) => r.map(|_| ()),
                        None => self.commit(&h, &mut w).await,
                    }
                }
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        lock(&self.handles).remove(&fh);
        r
    }

    /// Settles every file still open for writing when the mount ends: with `closed` (a
    /// clean unmount: the kernel closed them all, but may have dropped a last release) they
    /// are committed; otherwise they are discarded, their multipart uploads aborted and
    /// nothing committed (their later writes and closes fail with EIO). Answers how many.
    pub async fn settle_writers(&self, closed: bool) -> usize {
        let all: Vec<Arc<Handle>> = lock(&self.handles).values().filter(|h| h.writer.is_some()).cloned().collect();
        let mut n = 0;
        for h in all {
            let Some(w) = &h.writer else { continue };
            let mut w = w.lock().await;
            if w.is_committed() {
                continue;
            }
            n += 1;
            if closed {
                if let Err(e) = self.commit(&h, &mut w).await {
                    tracing::warn!(path = %h.path, error = %e, "a closed file could not be committed at unmount");
                }
                continue;
            }
            let why = FsError::new(
                libc::EIO,
                format!(
                    "volume {} was unmounted before {:?} was closed: nothing was stored",
                    self.cfg.volume_id, h.path
                ),
            );
            w.discard(&self.ctx, why).await;
            lock(&self.writing).remove(&h.path);
            let mut s = lock(&self.space);
            s.pending = s.pending.saturating_sub(w.written());
            s.released = s.released.saturating_sub(h.replaces.unwrap_or(0));
        }
        n
    }

    /// `truncate`/`chmod`/`chown`/`utimes`: only a size of 0 (or the current size) changes
    /// anything; mode, owner and times are fixed by the mount and the call is a no-op.
    pub async fn setattr(&self, ino: u64, size: Option<u64>, fh: Option<u64>) -> FsResult<Attr> {
        let path = self.path_of(ino)?;
        let Some(size) = size else { return self.getattr(ino).await };
        if self.cfg.read_only {
            return Err(erofs(&format!("truncating {path:?}")));
        }
        // A file being written here: truncation to 0 starts it over.
        let writer = fh
            .and_then(|fh| self.handle(fh).ok())
            .filter(|h| h.writer.is_some())
            .or_else(|| lock(&self.handles).values().find(|h| h.path == path && h.writer.is_some()).cloned());
        if let Some(h) = writer {
            if let Some(w) = &h.writer {
                let mut w = w.lock().await;
                if size == w.written() {
                    drop(w);
                    return self.getattr(ino).await;
                }
                if size != 0 || w.is_committed() {
                    return Err(FsError::new(
                        libc::EOPNOTSUPP,
                        format!("{path:?}: a file being written can only be truncated to 0"),
                    ));
                }
                let had = w.written();
                w.reset(&self.ctx).await;
                h.written.store(0, Ordering::Relaxed);
                let mut s = lock(&self.space);
                s.pending = s.pending.saturating_sub(had);
            }
            return self.getattr(ino).await;
        }
        self.check_idle(&path)?;
        let e = self.resolve_existing(&path).await?;
        if e.kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, format!("{path:?} is a directory")));
        }
        if size == e.size {
            return Ok(self.attr(ino, e));
        }
        if size != 0 {
            return Err(FsError::new(
                libc::EOPNOTSUPP,
                format!("{path:?}: files can be truncated only to 0 bytes (S3 objects cannot be resized)"),
            ));
        }
        let etag = self.ctx.put(&paths::file_key(&self.cfg.data_prefix, &path), Bytes::new(), false).await?;
        {
            let mut s = lock(&self.space);
            s.used = s.used.saturating_sub(e.size);
        }
        let e = Entry::file(0, SystemTime::now(), etag.as_deref());
        self.remember(&path, e.clone());
        Ok(self.attr(ino, e))
    }

    /// Makes directory `name` in `parent` (its marker object `name/`).
    pub async fn mkdir(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let path = self.child(parent, name)?;
        if self.cfg.read_only {
            return Err(erofs(&format!("making directory {path:?}")));
        }
        if self.resolve(&path).await?.is_some() {
            return Err(FsError::new(libc::EEXIST, format!("{path:?} exists")));
        }
        self.ctx.put(&paths::dir_prefix(&self.cfg.data_prefix, &path), Bytes::new(), false).await?;
        lock(&self.space).objects += 1;
        let e = Entry::dir(self.mounted_at);
        self.remember(&path, e.clone());
        Ok(self.attr(self.hold_ino(&path), e))
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let path = self.child(parent, name)?;
        if self.cfg.read_only {
            return Err(erofs(&format!("removing {path:?}")));
        }
        self.check_idle(&path)?;
        // Fresh from S3: the size taken off the usage must be the object's.
        self.forget_path(&path);
        let e = self.resolve_existing(&path).await?;
        if e.kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, format!("{path:?} is a directory")));
        }
        self.ctx.delete(&paths::file_key(&self.cfg.data_prefix, &path)).await?;
        {
            let mut s = lock(&self.space);
            s.used = s.used.saturating_sub(e.size);
            s.objects = s.objects.saturating_sub(1);
        }
        self.forget_path(&path);
        Ok(())
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let path = self.child(parent, name)?;
        if self.cfg.read_only {
            return Err(erofs(&format!("removing directory {path:?}")));
        }
        self.forget_path(&path);
        let e = self.resolve_existing(&path).await?;
        if e.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, format!("{path:?} is a file")));
        }
        let marker = paths::dir_prefix(&self.cfg.data_prefix, &path);
        let page = self.ctx.list_page(&marker, false, None, Some(2)).await?;
        let busy = lock(&self.writing).keys().any(|p| p.starts_with(&format!("{path}/")));
        if busy || page.objects.iter().any(|(k, _)| *k != marker) {
            return Err(FsError::new(libc::ENOTEMPTY, format!("directory {path:?} is not empty")));
        }
        let had_marker = page.objects.iter().any(|(k, _)| *k == marker);
        self.ctx.delete(&marker).await?;
        if had_marker {
            let mut s = lock(&self.space);
            s.objects = s.objects.saturating_sub(1);
        }
        self.forget_path(&path);
        Ok(())
    }

    /// Renames a file (CopyObject, then DeleteObject). Directories, and files larger than
    /// `rename_copy_max`, are refused with EXDEV, so `mv` falls back to copying them through
    /// the filesystem; `noreplace` is RENAME_NOREPLACE. Both names are busy meanwhile: an
    /// open for writing of either is EBUSY until the rename is done.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        if self.cfg.read_only {
            return Err(erofs(&format!("renaming {from:?}")));
        }
        let _busy = RenameGuard::take(self, &from, &to)?;
        self.forget_path(&from);
        self.forget_path(&to);
        let src = self.resolve_existing(&from).await?;
        if src.kind == Kind::Dir {
            return Err(FsError::new(
                libc::EXDEV,
                format!("{from:?} is a directory: S3 cannot rename a prefix at once (mv copies it instead)"),
            ));
        }
        if src.size > self.cfg.rename_copy_max {
            return Err(FsError::new(
                libc::EXDEV,
                format!(
                    "{from:?} has {} bytes, more than the {} a rename copies on the server (mv copies it instead)",
                    src.size, self.cfg.rename_copy_max
                ),
            ));
        }
        if from == to {
            return Ok(());
        }
        let replaced = match self.resolve(&to).await? {
            Some(Entry { kind: Kind::Dir, .. }) => {
                return Err(FsError::new(libc::EISDIR, format!("{to:?} is a directory")))
            }
            Some(_) if noreplace => return Err(FsError::new(libc::EEXIST, format!("{to:?} exists"))),
            Some(e) => Some(e.size),
            None => None,
        };
        let (fk, tk) = (paths::file_key(&self.cfg.data_prefix, &from), paths::file_key(&self.cfg.data_prefix, &to));
        self.ctx.copy(&fk, &tk).await?;
        if let Err(e) = self.ctx.delete(&fk).await {
            // Both now exist: the usage counts both until the source goes.
            let mut s = lock(&self.space);
            s.used = (s.used + src.size).saturating_sub(replaced.unwrap_or(0));
            if replaced.is_none() {
                s.objects += 1;
            }
            return Err(e);
        }
        if let Some(r) = replaced {
            let mut s = lock(&self.space);
            s.used = s.used.saturating_sub(r);
            s.objects = s.objects.saturating_sub(1);
        }
        self.forget_path(&from);
        // The copy's ETag is not known here: a read-open asks for it.
        self.remember(&to, Entry::file(src.size, SystemTime::now(), None));
        lock(&self.inodes).rename(&from, &to);
        Ok(())
    }

    /// Forgets every cached entry (tests, and after a failure).
    pub fn drop_caches(&self) {
        lock(&self.cache).map.clear();
    }
}

/// The two names of a rename under way, busy until it is dropped.
struct RenameGuard<'a> {
    fs: &'a S3Fs,
    paths: [String; 2],
}

impl<'a> RenameGuard<'a> {
    fn take(fs: &'a S3Fs, from: &str, to: &str) -> FsResult<RenameGuard<'a>> {
        let w = lock(&fs.writing);
        let mut r = lock(&fs.renaming);
        for p in [from, to] {
            if w.contains_key(p) || r.contains(p) {
                return Err(FsError::new(libc::EBUSY, format!("{p:?} is being written or renamed through this mount")));
            }
        }
        r.insert(from.to_owned());
        r.insert(to.to_owned());
        Ok(RenameGuard { fs, paths: [from.to_owned(), to.to_owned()] })
    }
}

impl Drop for RenameGuard<'_> {
    fn drop(&mut self) {
        let mut r = lock(&self.fs.renaming);
        for p in &self.paths {
            r.remove(p);
        }
    }
}
