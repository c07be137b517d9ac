//! S3 volumes on the node. Staging asks the mounter (a process of its own, `sidecars/mounter`)
//! to mount the volume's prefix through our FUSE filesystem at the staging path; publishing
//! binds the staging mount to the target. The node plugin itself holds no FUSE session, so
//! it can be restarted or upgraded under live mounts. When the mounter dies, its mounts stop
//! answering (ENOTCONN): stats report the volume abnormal, and the next NodeStage or
//! NodePublish takes the dead mount away and mounts again.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use ferrovol_core::error::{Error, Result};
use ferrovol_core::ids::{printable, VolumeId};
use ferrovol_core::volume::{AccessType, Capability, Condition};
use ferrovol_mounter::client::MounterClient;
use ferrovol_mounter::wire::MountSpec;
use ferrovol_s3::{layout, S3Endpoint};
use nix::mount::MsFlags;

use crate::fs::Usage;
use crate::stage::Stats;
use crate::sys::{mount as sysmount, mountinfo};

/// The mount flags an S3 volume accepts (from the capability's `mount_flags`).
pub const MOUNT_FLAGS: &[(&str, &str)] = &[
    ("uid=N", "owner every file and directory shows (default 0)"),
    ("gid=N", "group every file and directory shows (default 0)"),
    ("file_mode=NNNN", "octal mode of files (default 0644)"),
    ("dir_mode=NNNN", "octal mode of directories (default 0755)"),
    ("ro", "mount read-only"),
];

/// S3 volumes on this node, through the mounter at `socket`.
#[derive(Debug, Clone)]
pub struct S3Node {
    mounter: Option<MounterClient>,
    socket: Option<PathBuf>,
    timeout_secs: u64,
    /// The spec of every staging mount this process made, by staging path: NodePublish
    /// mounts a dead staging mount again from it (the kubelet does not repeat NodeStage for
    /// a volume it considers staged). Memory only: it holds the node-stage secret, which
    /// never goes to disk; after a node-plugin restart only NodeStage can mount again.
    specs: std::sync::Arc<std::sync::Mutex<HashMap<PathBuf, MountSpec>>>,
}

/// The owner and modes a mount shows, from the mount flags. (The pod's fsGroup does not
/// reach S3 volumes: the driver does not advertise VOLUME_MOUNT_GROUP, and the filesystem
/// ignores chown and chmod; docs/S3.md says to set `gid=` and modes in the class instead.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presentation {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
    pub read_only: bool,
}

/// Parses an S3 volume's mount flags; anything else is INVALID_ARGUMENT naming the flag.
pub fn presentation(flags: &[String]) -> Result<Presentation> {
    let mut p = Presentation { uid: 0, gid: 0, file_mode: 0o644, dir_mode: 0o755, read_only: false };
    let (mut file_mode, mut dir_mode) = (None, None);
    let bad = |f: &str, why: &str| {
        Error::invalid(
            "volume_capability.mount.mount_flags",
            format!("{:?} {why} (s3 volumes take uid=N, gid=N, file_mode=NNNN, dir_mode=NNNN and ro)", printable(f)),
        )
    };
    for flag in flags.iter().flat_map(|f| f.split(',')).map(str::trim).filter(|f| !f.is_empty()) {
        let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
        let id = |v: &str| v.parse::<u32>().map_err(|_| bad(flag, "is not a number"));
        let mode = |v: &str| {
            u32::from_str_radix(v, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| bad(flag, "is not an octal mode"))
        };
        match (k, v.is_empty()) {
            ("uid", false) => p.uid = id(v)?,
            ("gid", false) => p.gid = id(v)?,
            ("file_mode", false) => file_mode = Some(mode(v)?),
            ("dir_mode", false) => dir_mode = Some(mode(v)?),
            ("ro", true) => p.read_only = true,
            ("rw", true) => {}
            _ => return Err(bad(flag, "is not a mount flag of s3 volumes")),
        }
    }
    p.file_mode = file_mode.unwrap_or(p.file_mode);
    p.dir_mode = dir_mode.unwrap_or(p.dir_mode);
    Ok(p)
}

/// How long a look at a FUSE path may take before the mount counts as stuck: a mounter
/// that is alive but not answering (stopped, frozen) would otherwise hold the thread.
const PROBE_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// What a look at a path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    /// It answered (or it does not exist).
    Answers,
    /// A mount whose FUSE server has gone: every access gives ENOTCONN.
    Dead,
    /// No answer within [`PROBE_BOUND`].
    Stuck,
}

/// Looks at `path` on a blocking thread, bounded by [`PROBE_BOUND`], so that a stuck
/// mounter never blocks the node plugin's async workers (and with them every family).
async fn liveness(path: &Path) -> Liveness {
    let p = path.to_path_buf();
    // statfs, not stat: FUSE answers stat from the kernel's attribute cache for a while
    // after its server died, while every statfs is a request to the server.
    let look = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&p).err().map(|e| e as i32));
    match tokio::time::timeout(PROBE_BOUND, look).await {
        Ok(Ok(Some(libc::ENOTCONN))) => Liveness::Dead,
        Ok(_) => Liveness::Answers,
        Err(_) => Liveness::Stuck,
    }
}

fn stuck(id: &VolumeId, path: &Path) -> Error {
    Error::Unavailable {
        reason: format!(
            "volume {id}: the S3 mount at {} does not answer within {}s (is ferrovol-mounter stopped?)",
            path.display(),
            PROBE_BOUND.as_secs()
        ),
    }
}

/// Takes away a mount whose FUSE server is gone; a live or absent mount is left alone.
async fn clear_dead_mount(id: &VolumeId, path: &Path) -> Result<()> {
    match liveness(path).await {
        Liveness::Answers => Ok(()),
        Liveness::Stuck => Err(stuck(id, path)),
        Liveness::Dead => {
            tracing::warn!(volume = %id, path = %path.display(), "taking away a mount whose S3 mounter has gone");
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| Error::system("unmount the dead S3 mount", path.display(), e))
        }
    }
}

const NO_USAGE: Usage =
    Usage { total_bytes: 0, used_bytes: 0, available_bytes: 0, total_inodes: 0, used_inodes: 0, free_inodes: 0 };

/// What NodeGetVolumeStats answers for a mount whose mounter has gone: no usage, abnormal.
fn dead_mount_stats(id: &VolumeId) -> (Stats, Condition) {
    let cond = Condition {
        abnormal: true,
        message: format!(
            "the S3 mounter holding volume {id} has gone: its mount does not answer; NodeStageVolume or NodePublishVolume mounts it again"
        ),
    };
    (Stats::Filesystem(NO_USAGE), cond)
}

/// What NodeGetVolumeStats answers for a mount whose mounter does not answer in time.
fn stuck_mount_stats(id: &VolumeId, path: &Path) -> (Stats, Condition) {
    (Stats::Filesystem(NO_USAGE), Condition { abnormal: true, message: stuck(id, path).to_string() })
}

fn mounted_at(path: &Path) -> Result<Option<mountinfo::MountEntry>> {
    let entries = mountinfo::read().map_err(|e| Error::system("read the mount table", "/proc/self/mountinfo", e))?;
    Ok(mountinfo::find_by_mount_point(&entries, path).cloned())
}

fn is_ours(entry: &mountinfo::MountEntry, id: &VolumeId) -> bool {
    entry.fs_type == "fuse.ferrovol" && entry.source == format!("ferrovol:{id}")
}

impl S3Node {
    /// S3 volumes through the mounter listening at `socket`; `None`: this node serves no
    /// S3 volumes (every S3 call says how to enable them). `timeout` bounds each S3 call.
    pub fn new(socket: Option<PathBuf>, timeout: std::time::Duration) -> Self {
        S3Node {
            mounter: socket.clone().map(MounterClient::new),
            socket,
            timeout_secs: timeout.as_secs().max(1),
            specs: Default::default(),
        }
    }

    fn mounter(&self, id: &VolumeId) -> Result<&MounterClient> {
        self.mounter.as_ref().ok_or_else(|| {
            Error::precondition(
                format!("volume {id}"),
                "this node serves no s3 volumes: start the driver with --mounter-socket pointing at a running ferrovol-mounter",
            )
        })
    }

    /// NodeStageVolume of an S3 volume: mounts it at `staging` through the mounter.
    pub async fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        cap: &Capability,
        secrets: &HashMap<String, String>,
    ) -> Result<()> {
        let flags = match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags,
            AccessType::Block => {
                return Err(Error::UnsupportedCapability {
                    reason: format!("volume {id} is an s3 volume: it can be mounted only, not used as a block device"),
                })
            }
        };
        let mut look = presentation(flags)?;
        look.read_only |= cap.access_mode.is_read_only();
        let mounter = self.mounter(id)?;
        let endpoint = S3Endpoint::from_secrets("secrets", secrets).map_err(|e| match e {
            Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field, reason: format!("volume {id}: {reason} (the node-stage secret)") }
            }
            other => other,
        })?;
        clear_dead_mount(id, staging).await?;
        if !staging.exists() {
            std::fs::create_dir_all(staging)
                .map_err(|e| Error::system("create the staging directory", staging.display(), e))?;
        }
        let spec = MountSpec {
            volume_id: id.to_string(),
            target: staging.to_path_buf(),
            endpoint,
            bucket: layout::volume_bucket(id).to_owned(),
            data_prefix: layout::volume_data_prefix(id.local()),
            record_key: layout::volume_record_key(id.local()),
            read_only: look.read_only,
            uid: look.uid,
            gid: look.gid,
            file_mode: look.file_mode,
            dir_mode: look.dir_mode,
            timeout_secs: self.timeout_secs,
        };
        mounter.mount(&spec).await?;
        self.remember(staging, Some(spec));
        Ok(())
    }

    fn remember(&self, staging: &Path, spec: Option<MountSpec>) {
        let mut specs = self.specs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match spec {
            Some(s) => specs.insert(staging.to_path_buf(), s),
            None => specs.remove(staging),
        };
    }

    fn remembered(&self, staging: &Path, id: &VolumeId) -> Option<MountSpec> {
        let specs = self.specs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        specs.get(staging).filter(|s| s.volume_id == id.to_string()).cloned()
    }

    /// NodeUnstageVolume: the mounter unmounts; a mount it no longer knows (it was
    /// restarted) is taken away here.
    pub async fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        if let Some(m) = &self.mounter {
            m.unmount(staging).await?;
        }
        self.remember(staging, None);
        clear_dead_mount(id, staging).await?;
        if let Some(entry) = mounted_at(staging)? {
            if !is_ours(&entry, id) {
                return Err(Error::precondition(
                    format!("volume {id}"),
                    format!(
                        "{} holds a mount of {} ({}), not this volume",
                        staging.display(),
                        entry.source,
                        entry.fs_type
                    ),
                ));
            }
            sysmount::unmount(staging).map_err(|e| Error::system("unmount", staging.display(), e))?;
        }
        match std::fs::remove_dir(staging) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // The kubelet owns the staging directory's parent; a directory it refilled is its own.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
            Err(e) => Err(Error::system("remove the staging directory", staging.display(), e)),
        }
    }

    /// NodePublishVolume: binds the staging mount at `target` (read-only if asked).
    pub async fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        readonly: bool,
    ) -> Result<()> {
        if matches!(cap.access_type, AccessType::Block) {
            return Err(Error::UnsupportedCapability {
                reason: format!("volume {id} is an s3 volume: it can be mounted only, not used as a block device"),
            });
        }
        let read_only = readonly || cap.access_mode.is_read_only();
        clear_dead_mount(id, target).await?;
        let staged = matches!(mounted_at(staging)?, Some(e) if is_ours(&e, id));
        let live = match liveness(staging).await {
            Liveness::Stuck => return Err(stuck(id, staging)),
            l => l == Liveness::Answers,
        };
        if !(staged && live) {
            // The mounter died (or was restarted) under a staged volume: mount it again
            // from what NodeStage was given, as the kubelet will not stage it again.
            let Some(spec) = self.remembered(staging, id) else {
                return Err(Error::precondition(
                    format!("volume {id}"),
                    format!("it is not staged at {} (NodeStageVolume first)", staging.display()),
                ));
            };
            tracing::warn!(volume = %id, staging = %staging.display(), "mounting a dead staging mount again");
            clear_dead_mount(id, staging).await?;
            self.mounter(id)?.mount(&spec).await?;
        }
        if let Some(existing) = mounted_at(target)? {
            if !is_ours(&existing, id) {
                return Err(Error::PublishedIncompatible {
                    volume: id.to_string(),
                    path: target.display().to_string(),
                    reason: format!(
                        "something else is mounted there ({} of type {})",
                        existing.source, existing.fs_type
                    ),
                });
            }
            let ro_now = existing.options.split(',').any(|o| o == "ro");
            if ro_now != read_only {
                return Err(Error::PublishedIncompatible {
                    volume: id.to_string(),
                    path: target.display().to_string(),
                    reason: format!("it is published {} there", if ro_now { "read-only" } else { "read-write" }),
                });
            }
            return Ok(());
        }
        if !target.exists() {
            std::fs::create_dir_all(target)
                .map_err(|e| Error::system("create the target directory", target.display(), e))?;
        }
        sysmount::bind(staging, target, read_only, MsFlags::empty())
            .map_err(|e| Error::system("bind the staged volume", target.display(), e))
    }

    /// NodeUnpublishVolume: unmounts the target (a dead one too) and removes it.
    pub async fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        clear_dead_mount(id, target).await?;
        if let Some(entry) = mounted_at(target)? {
            if !is_ours(&entry, id) {
                return Err(Error::precondition(
                    format!("volume {id}"),
                    format!(
                        "{} holds a mount of {} ({}), not this volume",
                        target.display(),
                        entry.source,
                        entry.fs_type
                    ),
                ));
            }
            sysmount::unmount(target).map_err(|e| Error::system("unmount", target.display(), e))?;
        }
        match std::fs::remove_dir(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::system("remove the target directory", target.display(), e)),
        }
    }

    /// NodeGetVolumeStats: usage against the quota from the filesystem itself, and the
    /// condition: a dead mount, or the mounter's last S3 errors, make it abnormal.
    pub async fn stats(&self, id: &VolumeId, path: &Path) -> Result<(Stats, Condition)> {
        match liveness(path).await {
            Liveness::Dead => return Ok(dead_mount_stats(id)),
            Liveness::Stuck => return Ok(stuck_mount_stats(id, path)),
            Liveness::Answers => {}
        }
        match mounted_at(path)? {
            Some(e) if is_ours(&e, id) => {}
            _ => {
                return Err(Error::VolumeNotFound {
                    volume: id.to_string(),
                    reason: format!("it is not mounted at {}", path.display()),
                })
            }
        }
        let p = path.to_path_buf();
        let usage =
            match tokio::time::timeout(PROBE_BOUND, tokio::task::spawn_blocking(move || crate::fs::usage(&p))).await {
                Ok(Ok(Ok(u))) => u,
                // The mounter died between the look above and now.
                Ok(Ok(Err(e))) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(dead_mount_stats(id)),
                Ok(Ok(Err(e))) => return Err(Error::system("read the usage", path.display(), e)),
                Ok(Err(e)) => return Err(Error::system("read the usage", path.display(), e)),
                Err(_) => return Ok(stuck_mount_stats(id, path)),
            };
        let mut cond = Condition::healthy();
        if let Some(m) = &self.mounter {
            // Bounded like the probes above: the mounter may stop between them and this.
            match m.list_within(PROBE_BOUND).await {
                Ok(mounts) => {
                    if let Some(s) = mounts.iter().find(|s| s.volume_id == id.to_string() && !s.healthy) {
                        cond = Condition { abnormal: true, message: s.message.clone() };
                    }
                }
                Err(e) => {
                    cond = Condition { abnormal: true, message: format!("the S3 mounter does not answer: {e}") };
                }
            }
        }
        Ok((Stats::Filesystem(usage), cond))
    }

    /// NodeExpandVolume: the controller raised the quota in the volume's record; the
    /// mounter reads it again. Answers the new quota.
    pub async fn expand(&self, id: &VolumeId) -> Result<u64> {
        let mounter = self.mounter(id)?;
        let mounts = mounter.list().await?;
        let stats = mounts.iter().find(|s| s.volume_id == id.to_string()).ok_or_else(|| Error::VolumeNotFound {
            volume: id.to_string(),
            reason: "it is not staged on this node".into(),
        })?;
        mounter.refresh_quota(&stats.target).await
    }

    /// The socket of the mounter, for the start-up log.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_flags_set_owner_and_modes() {
        let p = presentation(&flags(&["uid=1000,gid=2000", "file_mode=0600", "dir_mode=0700", "ro"])).expect("ok");
        assert_eq!(p, Presentation { uid: 1000, gid: 2000, file_mode: 0o600, dir_mode: 0o700, read_only: true });
        let d = presentation(&[]).expect("defaults");
        assert_eq!((d.uid, d.gid, d.file_mode, d.dir_mode, d.read_only), (0, 0, 0o644, 0o755, false));
    }

    #[test]
    fn unknown_or_malformed_flags_are_refused_by_name() {
        for bad in ["noatime", "uid=x", "file_mode=999", "dir_mode=77777", "allow_other"] {
            let e = presentation(&flags(&[bad])).expect_err(bad);
            assert_eq!(e.code(), ferrovol_core::error::Code::InvalidArgument, "{bad}");
            assert!(e.to_string().contains(bad.split('=').next().unwrap_or(bad)), "{e}");
        }
    }
}
