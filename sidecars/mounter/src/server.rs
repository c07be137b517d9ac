//! The mounter daemon: serves `wire` requests (one JSON line in, one JSON line out) on a
//! unix socket and holds every FUSE session by its target path. Mount is idempotent, the
//! quota comes from the volume's record, and on SIGTERM/SIGINT everything is unmounted. At
//! start-up, mounts left behind by a mounter that died are removed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrovol_core::error::Error;
use ferrovol_s3::error::{classify, Kind};
use ferrovol_s3::record::{S3VolumeRecord, VolumeState};
use ferrovol_s3::{build_client, Timeouts};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::fs::{FsConfig, S3Fs};
use crate::fuse::Mounted;
use crate::wire::{Envelope, MountSpec, MountStats, Request, Response, PROTOCOL_VERSION};

/// The longest request line taken (a mount spec is well under 4 KiB).
const MAX_LINE: u64 = 64 * 1024;
/// The longest bound on S3 calls a spec may ask for.
const MAX_TIMEOUT_SECS: u64 = 300;

#[derive(Debug)]
struct Live {
    spec: MountSpec,
    fs: Arc<S3Fs>,
    mounted: Mounted,
}

#[derive(Debug, Default)]
struct State {
    mounts: HashMap<PathBuf, Live>,
    /// Targets with a mount or unmount in progress.
    busy: HashSet<PathBuf>,
}

/// The mounter's state, shared by its connections.
#[derive(Debug, Default)]
pub struct Mounter {
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prepares the socket path: a stale socket (nobody answering) is replaced, a live one is
/// refused.
async fn bind(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if socket.exists() {
        match UnixStream::connect(socket).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another mounter is serving {}", socket.display()),
                ))
            }
            Err(_) => {
                tracing::info!(socket = %socket.display(), "replacing a stale socket");
                std::fs::remove_file(socket)?;
            }
        }
    }
    let l = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves `socket` until SIGTERM or SIGINT, then unmounts everything. With `metrics`,
/// also serves `/metrics` and `/healthz` on that address over plain HTTP.
pub async fn serve(socket: PathBuf, metrics: Option<SocketAddr>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = bind(&socket).await?;
    let dead = tokio::task::spawn_blocking(crate::fuse::report_stale).await.unwrap_or_default();
    let mounter = Arc::new(Mounter::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let web = match metrics {
        Some(addr) => {
            let source = Arc::new(crate::metrics::MounterSource::new(Arc::clone(&mounter)));
            let stopped = move || {
                let mut rx = stopped.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            };
            match ferrovol_metrics::http::start(addr, source, stopped).await {
                Ok(task) => Some(task),
                Err(e) => {
                    // Leave no socket behind that nobody serves.
                    let _ = std::fs::remove_file(&socket);
                    return Err(io::Error::new(e.kind(), format!("--metrics-listen {addr}: {e}")));
                }
            }
        }
        None => None,
    };
    tracing::info!(socket = %socket.display(), dead_mounts = dead.len(), "the mounter is serving");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let m = mounter.clone();
                    tokio::spawn(async move { m.connection(stream).await });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = term.recv() => { tracing::info!("SIGTERM: unmounting everything"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: unmounting everything"); break; }
        }
    }
    mounter.unmount_all().await;
    let _ = std::fs::remove_file(&socket);
    let _ = stop.send(true);
    if let Some(web) = web {
        let _ = web.await;
    }
    Ok(())
}

/// A request line's parse error without the line's contents (which may hold a secret).
fn parse_error(e: &serde_json::Error) -> String {
    format!(
        "the request is not a mounter request ({:?} error at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    )
}

fn error_response(e: &Error) -> Response {
    Response::Error { code: e.code(), message: e.to_string() }
}

impl Mounter {
    /// FUSE sessions held now.
    pub fn mount_count(&self) -> usize {
        lock(&self.state).mounts.len()
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE * 16)).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Envelope>(&line) {
                Err(e) => error_response(&Error::invalid("request", parse_error(&e))),
                Ok(env) if env.version != PROTOCOL_VERSION => error_response(&Error::precondition(
                    "the mounter",
                    format!("the request speaks protocol version {}, this mounter {PROTOCOL_VERSION}", env.version),
                )),
                Ok(env) => self.clone().handle(env.request).await,
            };
            let mut out = match serde_json::to_string(&resp) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a response");
                    return;
                }
            };
            out.push('\n');
            if w.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        let r = match req {
            Request::Mount { spec } => self.mount(spec).await.map(|()| Response::Ok),
            Request::Unmount { target } => self.unmount(target).await.map(|()| Response::Ok),
            Request::Stats { target } => self.stats(&target).map(|stats| Response::Stats { stats }),
            Request::RefreshQuota { target } => {
                self.refresh_quota(&target).await.map(|q| Response::Quota { quota_bytes: q })
            }
            Request::List => Ok(Response::Mounts { mounts: self.list() }),
        };
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "request failed");
            error_response(&e)
        })
    }

    fn list(&self) -> Vec<MountStats> {
        let st = lock(&self.state);
        let mut v: Vec<MountStats> = st.mounts.values().map(stats_of).collect();
        v.sort_by(|a, b| a.target.cmp(&b.target));
        v
    }

    fn stats(&self, target: &Path) -> Result<MountStats, Error> {
        let st = lock(&self.state);
        st.mounts.get(target).map(stats_of).ok_or_else(|| not_mounted(target))
    }

    async fn refresh_quota(&self, target: &Path) -> Result<u64, Error> {
        let (spec, fs) = {
            let st = lock(&self.state);
            let l = st.mounts.get(target).ok_or_else(|| not_mounted(target))?;
            (l.spec.clone(), l.fs.clone())
        };
        let client = build_client(&spec.endpoint, Timeouts::within(Duration::from_secs(spec.timeout_secs)));
        let rec = read_record(&client, &spec).await?;
        fs.set_quota(rec.capacity_bytes);
        tracing::info!(volume = %spec.volume_id, quota_bytes = rec.capacity_bytes, "quota refreshed");
        Ok(rec.capacity_bytes)
    }

    fn begin(&self, target: &Path) -> Result<(), Error> {
        let mut st = lock(&self.state);
        if !st.busy.insert(target.to_owned()) {
            return Err(Error::InProgress { what: format!("the mount at {}", target.display()) });
        }
        Ok(())
    }

    fn end(&self, target: &Path) {
        lock(&self.state).busy.remove(target);
    }

    async fn mount(&self, spec: MountSpec) -> Result<(), Error> {
        check_spec(&spec)?;
        self.begin(&spec.target)?;
        let r = self.mount_inner(&spec).await;
        self.end(&spec.target);
        r
    }

    async fn mount_inner(&self, spec: &MountSpec) -> Result<(), Error> {
        {
            let st = lock(&self.state);
            if let Some(l) = st.mounts.get(&spec.target) {
                if l.spec == *spec {
                    return Ok(());
                }
                let why = if l.spec.volume_id != spec.volume_id {
                    format!("volume {:?} is mounted there", l.spec.volume_id)
                } else {
                    "the volume is mounted there with other settings (read-only, owner, modes, bucket, prefix or credentials)".to_owned()
                };
                return Err(Error::precondition(
                    format!("volume {:?}", spec.volume_id),
                    format!("cannot mount at {}: {why}", spec.target.display()),
                ));
            }
        }
        let target = spec.target.clone();
        tokio::task::spawn_blocking(move || check_target(&target))
            .await
            .map_err(|e| Error::system("check the target", "the mounter", e))??;
        let bound = Duration::from_secs(spec.timeout_secs);
        let client = build_client(&spec.endpoint, Timeouts::within(bound));
        let rec = read_record(&client, spec).await?;
        let mut cfg = FsConfig::new(&spec.volume_id, &spec.bucket, &spec.data_prefix, bound);
        cfg.read_only = spec.read_only;
        cfg.uid = spec.uid;
        cfg.gid = spec.gid;
        cfg.file_mode = spec.file_mode;
        cfg.dir_mode = spec.dir_mode;
        let fs = S3Fs::new(client, cfg, rec.capacity_bytes);
        fs.scan_usage().await.map_err(|e| {
            let reason =
                format!("counting the volume's bytes under s3://{}/{}: {}", spec.bucket, spec.data_prefix, e.message);
            match e.errno {
                libc::EACCES => Error::precondition(format!("volume {:?}", spec.volume_id), reason),
                libc::ENOENT => Error::VolumeNotFound { volume: spec.volume_id.clone(), reason },
                _ => Error::Unavailable { reason: format!("volume {:?}: {reason}", spec.volume_id) },
            }
        })?;
        let (fs2, target, vol, ro) = (fs.clone(), spec.target.clone(), spec.volume_id.clone(), spec.read_only);
        let rt = tokio::runtime::Handle::current();
        let mounted = tokio::task::spawn_blocking(move || crate::fuse::mount(fs2, rt, &target, &vol, ro))
            .await
            .map_err(|e| Error::system("mount", format!("volume {:?}", spec.volume_id), e))?
            .map_err(|e| {
                Error::system(
                    format!("FUSE mount at {}", spec.target.display()),
                    format!("volume {:?}", spec.volume_id),
                    e,
                )
            })?;
        let usage = fs.usage();
        tracing::info!(volume = %spec.volume_id, target = %spec.target.display(), read_only = spec.read_only,
            quota_bytes = usage.quota_bytes, used_bytes = usage.used_bytes, "mounted");
        lock(&self.state).mounts.insert(spec.target.clone(), Live { spec: spec.clone(), fs, mounted });
        Ok(())
    }

    async fn unmount(&self, target: PathBuf) -> Result<(), Error> {
        self.begin(&target)?;
        let live = lock(&self.state).mounts.remove(&target);
        if let Some(l) = live {
            let r = end_mount(l).await;
            self.end(&target);
            return r;
        }
        let t = target.clone();
        // A mount a dead mounter left there goes too; anything else is not ours.
        let r = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            if let Ok(m) = crate::mountinfo::read() {
                if let Some(m) = crate::mountinfo::at(&m, &t) {
                    if m.fstype == crate::mountinfo::FSTYPE && crate::fuse::is_dead(&t) {
                        nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH)
                            .map_err(|e| Error::system("unmount of a dead mount", t.display(), e))?;
                        tracing::info!(target = %t.display(), "removed a dead mount left by a previous mounter");
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::system("unmount", target.display(), e));
        self.end(&target);
        r?
    }

    /// Unmounts everything (shutdown), aborting the uploads of files left open.
    pub async fn unmount_all(&self) {
        let all: Vec<Live> = lock(&self.state).mounts.drain().map(|(_, l)| l).collect();
        for l in all {
            if let Err(e) = end_mount(l).await {
                tracing::error!(error = %e, "unmount failed");
            }
        }
    }
}

/// Unmounts `l`, settles the files still open for writing, then ends its session. After a
/// clean unmount every file was closed (a close whose release the kernel dropped at the
/// unmount is committed now); after a busy one (detached lazily) the files still open are
/// discarded and their multipart uploads aborted, so that nothing is left in the bucket.
async fn end_mount(l: Live) -> Result<(), Error> {
    let (vol, t) = (l.spec.volume_id.clone(), l.spec.target.clone());
    let mounted = Arc::new(l.mounted);
    let m = mounted.clone();
    let busy = tokio::task::spawn_blocking(move || m.detach())
        .await
        .map_err(|e| Error::system("unmount", t.display(), e))?
        .map_err(|e| Error::system(format!("unmount of {}", t.display()), format!("volume {vol:?}"), e))?;
    let n = l.fs.settle_writers(!busy).await;
    if busy && n > 0 {
        tracing::warn!(volume = %vol, target = %t.display(), files = n,
            "files still open for writing at unmount were discarded (their uploads aborted)");
    }
    match Arc::try_unwrap(mounted) {
        Ok(m) => {
            let _ = tokio::task::spawn_blocking(move || m.end()).await;
        }
        Err(_) => tracing::warn!(target = %t.display(), "the session of an unmounted volume is still referenced"),
    }
    tracing::info!(volume = %vol, target = %t.display(), "unmounted");
    Ok(())
}

fn not_mounted(target: &Path) -> Error {
    Error::VolumeNotFound {
        volume: target.display().to_string(),
        reason: "nothing is mounted there by this mounter".into(),
    }
}

fn stats_of(l: &Live) -> MountStats {
    let u = l.fs.usage();
    MountStats {
        volume_id: l.spec.volume_id.clone(),
        target: l.spec.target.clone(),
        used_bytes: u.used_bytes,
        quota_bytes: u.quota_bytes,
        inodes: u.inodes,
        healthy: u.healthy,
        message: u.message,
    }
}

fn check_spec(s: &MountSpec) -> Result<(), Error> {
    let bad = |why: String| Err(Error::invalid("mount spec", format!("volume {:?}: {why}", s.volume_id)));
    if s.volume_id.is_empty() {
        return Err(Error::invalid("mount spec", "the volume ID is empty"));
    }
    if !s.target.is_absolute() {
        return bad(format!("the target {} is not an absolute path", s.target.display()));
    }
    if s.bucket.is_empty() {
        return bad("the bucket is empty".into());
    }
    if !s.data_prefix.ends_with('/') || s.data_prefix.starts_with('/') {
        return bad(format!("the data prefix {:?} must end with / and not start with it", s.data_prefix));
    }
    if s.record_key.is_empty() {
        return bad("the record key is empty".into());
    }
    if s.timeout_secs == 0 || s.timeout_secs > MAX_TIMEOUT_SECS {
        return bad(format!("timeout_secs {} is not within 1..={MAX_TIMEOUT_SECS}", s.timeout_secs));
    }
    if s.file_mode > 0o7777 || s.dir_mode > 0o7777 {
        return bad(format!("the modes {:o}/{:o} are not permission bits", s.file_mode, s.dir_mode));
    }
    Ok(())
}

/// The target must be an existing, empty directory that nothing is mounted on (a mount a
/// dead mounter left there is removed first).
fn check_target(target: &Path) -> Result<(), Error> {
    let what = || format!("target {}", target.display());
    let md = std::fs::metadata(target);
    if let Err(e) = &md {
        if e.raw_os_error() == Some(libc::ENOTCONN) && crate::fuse::is_dead(target) {
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| Error::system("unmount of a dead mount", what(), e))?;
            tracing::info!(target = %target.display(), "removed a dead mount left by a previous mounter");
            return check_target(target);
        }
    }
    let md = md.map_err(|e| Error::precondition(what(), format!("cannot be used as a mount point: {e}")))?;
    if !md.is_dir() {
        return Err(Error::precondition(what(), "is not a directory"));
    }
    let mounts = crate::mountinfo::read().map_err(|e| Error::system("read /proc/self/mountinfo", what(), e))?;
    if let Some(m) = crate::mountinfo::at(&mounts, target) {
        return Err(Error::precondition(what(), format!("already has a {} mount of {:?} on it", m.fstype, m.source)));
    }
    let mut entries =
        std::fs::read_dir(target).map_err(|e| Error::precondition(what(), format!("cannot be listed: {e}")))?;
    if entries.next().is_some() {
        return Err(Error::precondition(what(), "is not empty"));
    }
    Ok(())
}

/// Reads the volume's record: a missing record is NOT_FOUND naming the volume, an
/// unreachable server UNAVAILABLE, refused credentials FAILED_PRECONDITION naming the call.
async fn read_record(client: &aws_sdk_s3::Client, spec: &MountSpec) -> Result<S3VolumeRecord, Error> {
    let what = format!("{}/{}", spec.bucket, spec.record_key);
    let vol = format!("volume {:?}", spec.volume_id);
    let bound = Duration::from_secs(spec.timeout_secs);
    let fetch = async {
        let out = client.get_object().bucket(&spec.bucket).key(&spec.record_key).send().await.map_err(|e| {
            let f = classify("GetObject", &what, &e);
            match f.kind {
                Kind::NotFound => Error::VolumeNotFound {
                    volume: spec.volume_id.clone(),
                    reason: format!("its record s3://{what} does not exist ({})", f.message),
                },
                Kind::Unreachable => Error::Unavailable { reason: format!("{vol}: {}", f.message) },
                Kind::Denied => {
                    Error::precondition(vol.clone(), format!("the credentials were refused: {}", f.message))
                }
                Kind::Conflict | Kind::Refused => Error::system("read the volume record", &vol, f.message),
            }
        })?;
        let body =
            out.body.collect().await.map_err(|e| Error::Unavailable {
                reason: format!("{vol}: reading its record s3://{what} failed: {e}"),
            })?;
        Ok::<_, Error>(body.into_bytes())
    };
    let body = tokio::time::timeout(bound, fetch).await.map_err(|_| Error::Unavailable {
        reason: format!("{vol}: S3 GetObject on {what} did not answer within {} s", spec.timeout_secs),
    })??;
    let rec: S3VolumeRecord = serde_json::from_slice(&body).map_err(|e| {
        Error::system("read the volume record", &vol, format!("s3://{what} is not a volume record: {e}"))
    })?;
    if rec.id != spec.volume_id {
        return Err(Error::precondition(vol, format!("its record s3://{what} belongs to volume {:?}", rec.id)));
    }
    match rec.state {
        VolumeState::Ready => Ok(rec),
        VolumeState::Creating => Err(Error::precondition(vol, "its content is still being copied in (state creating)")),
        VolumeState::Deleting => Err(Error::precondition(vol, "it is being deleted")),
    }
}
