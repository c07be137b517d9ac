//! The node's volume operations, free of protobuf: stage (attach + mkfs-if-blank + mount),
//! publish (bind mounts), their inverses, online expansion, stats, and inline ephemeral
//! volumes. Every operation is idempotent and repairs what a crash left half-done; the
//! durable record (`node.json`) is written only after the kernel state it describes exists,
//! and cleared only after that state is gone.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ferrovol_core::error::{Error, Result};
use ferrovol_core::guard::{InFlight, InFlightGuard, Slots};
use ferrovol_core::ids::{printable, Family, LocalName, NodeId, VolumeId};
use ferrovol_core::params::{parse_quantity, CO_PREFIX};
use ferrovol_core::volume::{AccessMode, AccessType, Capability, CapacityRange, Condition, FsType, VolumeRecord};
use nix::mount::MsFlags;

use crate::agent::volume_key;
use crate::command::Runner;
use crate::fs as vfs;
use crate::kernel::Kernel;
use crate::ledger::SpaceLedger;
use crate::lvm::groups::VolumeGroups;
use crate::lvm::tags::Content;
use crate::store::{records, LoopStore, NodeState, Published, Shelf, Staged};
use crate::sys::{loopdev, mount};

/// The volume-context key that marks an inline ephemeral volume.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// Volume-context keys an inline ephemeral volume may carry besides the orchestrator's.
pub const EPHEMERAL_PARAMETERS: &[(&str, &str)] =
    &[("size", "size of the volume, e.g. 256Mi (default 1Gi)"), ("fsType", "ext4 (default) or xfs")];

/// How many mkfs runs may go at once per CPU: they are CPU- and disk-bound, and more in
/// parallel only makes each slower.
const MKFS_PER_CPU: usize = 2;

/// A volume as the node resolved it from a request's volume ID.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub shelf: Shelf,
    pub local: LocalName,
    pub record: VolumeRecord,
    /// The ID as the CO sent it (ours, or the kubelet's for ephemeral volumes).
    pub id: String,
    pub backing: Backing,
}

impl Resolved {
    /// The file or device node behind the volume: its image, or its LV's device.
    pub fn backing_path(&self) -> &Path {
        match &self.backing {
            Backing::Image(p) => p,
            Backing::Lv { device, .. } => device,
        }
    }
}

/// What holds a volume's blocks.
#[derive(Debug, Clone)]
pub enum Backing {
    /// A sparse image file, attached as a loop device while staged.
    Image(PathBuf),
    /// A logical volume, active from its creation to its deletion. `health` is what the LVM
    /// report says of it (inactive, or its thin pool nearly full).
    Lv { vg: String, lv: String, device: PathBuf, health: Condition },
}

/// The block device a volume is served through while staged.
#[derive(Debug, Clone)]
struct Device {
    path: PathBuf,
    /// The loop device, for image volumes (detached at unstage); `None` for an LV.
    loop_dev: Option<loopdev::LoopDevice>,
}

impl Device {
    fn of_loop(dev: loopdev::LoopDevice) -> Self {
        Device { path: dev.path(), loop_dev: Some(dev) }
    }
}

/// What NodeGetVolumeStats answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stats {
    Filesystem(vfs::Usage),
    Block { total_bytes: u64 },
}

/// The node's volume operations over one data dir.
#[derive(Debug, Clone)]
pub struct NodeOps {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    store: LoopStore,
    inflight: InFlight,
    runner: Arc<dyn Runner>,
    /// Loop control and mounting; the real kernel except in unit tests.
    kernel: Arc<dyn Kernel>,
    /// Roots under which staging and target paths must lie (the kubelet's directory).
    path_roots: Vec<PathBuf>,
    mkfs: Slots,
    ledger: Arc<SpaceLedger>,
    /// The LVM volume groups this node serves, if any.
    lvm: Option<Arc<VolumeGroups>>,
}

fn io_err(op: &str, object: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::system(op, object, e)
}

/// Checks an untrusted path from a request: absolute, no `.`/`..` components, no NUL,
/// under one of `roots` even after resolving symlinks in its existing ancestors.
pub fn check_request_path(field: &'static str, raw: &str, roots: &[PathBuf]) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if raw.contains('\0') || raw.len() > 4096 {
        return Err(Error::invalid(field, format!("{:?} is not a usable path", printable(raw))));
    }
    let p = Path::new(raw);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(Error::invalid(
            field,
            format!("{:?} must be an absolute path without . or .. components", printable(raw)),
        ));
    }
    // Resolve symlinks in the part of the path that exists, so a link cannot lead outside.
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_owned()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = existing.canonicalize().map_err(|e| Error::invalid(field, format!("{}: {e}", p.display())))?;
    for n in rest.iter().rev() {
        resolved.push(n);
    }
    if !roots.iter().any(|r| resolved.starts_with(r)) {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(Error::invalid(
            field,
            format!("{} is outside the directories this driver serves ({})", p.display(), roots.join(", ")),
        ));
    }
    Ok(resolved)
}

impl NodeOps {
    /// Node operations for `store`; staging and target paths must lie under `path_roots`.
    pub fn new(
        node: NodeId,
        store: LoopStore,
        inflight: InFlight,
        ledger: Arc<SpaceLedger>,
        runner: Arc<dyn Runner>,
        kernel: Arc<dyn Kernel>,
        path_roots: Vec<PathBuf>,
    ) -> Self {
        NodeOps {
            inner: Arc::new(Inner {
                node,
                store,
                inflight,
                ledger,
                runner,
                kernel,
                path_roots,
                mkfs: Slots::new(MKFS_PER_CPU * std::thread::available_parallelism().map_or(1, |n| n.get())),
                lvm: None,
            }),
        }
    }

    /// Serves LVM volumes of `groups` too. Call right after `new`.
    pub fn with_lvm(mut self, groups: Arc<VolumeGroups>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.lvm = Some(groups);
        }
        self
    }

    /// After a reboot, mounts LVM volumes again that the node state calls staged (the loop
    /// family's equivalent is in `reconcile`). Answers what it did, for the start-up log.
    pub async fn restage_lvm(&self) -> Vec<String> {
        self.blocking(|i| Ok(i.restage_lvm())).await.unwrap_or_else(|e| vec![e.to_string()])
    }

    /// The node this serves.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.node
    }

    /// Checks a staging or target path from a request.
    pub fn check_path(&self, field: &'static str, raw: &str) -> Result<PathBuf> {
        check_request_path(field, raw, &self.inner.path_roots)
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        crate::on_blocking_thread(&self.inner, "node service", f).await
    }

    /// NodeStageVolume.
    pub async fn stage(&self, volume_id: String, staging: PathBuf, cap: Capability) -> Result<()> {
        self.blocking(move |i| {
            let vol = i.resolve(&volume_id)?;
            let _g = i.lock(&vol)?;
            i.stage(&vol, &staging, &cap)
        })
        .await
    }

    /// NodeUnstageVolume.
    pub async fn unstage(&self, volume_id: String, staging: PathBuf) -> Result<()> {
        self.blocking(move |i| {
            let vol = i.resolve(&volume_id)?;
            let _g = i.lock(&vol)?;
            i.unstage(&vol, &staging)
        })
        .await
    }

    /// NodePublishVolume (for volumes made by CreateVolume and staged first).
    pub async fn publish(
        &self,
        volume_id: String,
        staging: PathBuf,
        target: PathBuf,
        cap: Capability,
        read_only: bool,
    ) -> Result<()> {
        self.blocking(move |i| {
            let vol = i.resolve(&volume_id)?;
            let _g = i.lock(&vol)?;
            i.publish(&vol, &staging, &target, &cap, read_only)
        })
        .await
    }

    /// NodePublishVolume of an inline ephemeral volume: create, stage and publish in one.
    pub async fn publish_ephemeral(
        &self,
        volume_id: String,
        target: PathBuf,
        cap: Capability,
        read_only: bool,
        context: HashMap<String, String>,
    ) -> Result<()> {
        self.blocking(move |i| i.publish_ephemeral(&volume_id, &target, &cap, read_only, &context)).await
    }

    /// NodeUnpublishVolume; an ephemeral volume is unstaged and deleted with it.
    pub async fn unpublish(&self, volume_id: String, target: PathBuf) -> Result<()> {
        self.blocking(move |i| {
            let vol = match i.resolve(&volume_id) {
                Ok(v) => v,
                // An inline ephemeral volume is deleted with its last publication, so a
                // repeated unpublish (the answer to the first was lost) finds nothing: done.
                Err(Error::VolumeNotFound { .. })
                    if VolumeId::parse(&volume_id).is_err()
                        && i.store.ephemeral_buried(&LocalName::from_co_name(&volume_id))
                        && !i.is_mounted_path(&target)? =>
                {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let _g = i.lock(&vol)?;
            i.unpublish(&vol, &target)?;
            if vol.shelf == Shelf::Ephemeral {
                let state = i.state(&vol)?;
                if state.published.is_empty() {
                    let staging = i.ephemeral_staging(&vol.local);
                    i.unstage(&vol, &staging)?;
                    i.store.bury_ephemeral(&vol.local).map_err(|e| io_err("record ephemeral deletion", &vol.id, e))?;
                    i.store
                        .remove_volume(Shelf::Ephemeral, &vol.local)
                        .map_err(|e| io_err("delete ephemeral volume", &vol.id, e))?;
                    tracing::info!(volume = %vol.id, "ephemeral volume deleted");
                }
            }
            Ok(())
        })
        .await
    }

    /// NodeGetVolumeStats.
    pub async fn stats(&self, volume_id: String, path: PathBuf) -> Result<(Stats, Condition)> {
        self.blocking(move |i| {
            let vol = i.resolve(&volume_id)?;
            i.stats(&vol, &path)
        })
        .await
    }

    /// NodeExpandVolume: answers the device's new size.
    pub async fn expand(&self, volume_id: String, path: PathBuf, range: CapacityRange) -> Result<u64> {
        self.blocking(move |i| {
            let vol = i.resolve(&volume_id)?;
            let _g = i.lock(&vol)?;
            i.expand(&vol, &path, range)
        })
        .await
    }

    /// How many volumes this node has staged (for max_volumes_per_node accounting).
    pub fn store(&self) -> &LoopStore {
        &self.inner.store
    }
}

impl Inner {
    fn resolve(&self, raw: &str) -> Result<Resolved> {
        if raw.is_empty() {
            return Err(Error::invalid("volume_id", "must not be empty"));
        }
        let not_found = |reason: String| Error::VolumeNotFound { volume: printable(raw), reason };
        let (shelf, local) = match VolumeId::parse(raw) {
            Ok(id) if id.node() == &self.node && id.family() == Family::Lvm => return self.resolve_lv(&id),
            Ok(id) if id.node() == &self.node => (Shelf::Volumes, id.local().clone()),
            Ok(id) => return Err(not_found(format!("it lives on node {}, this is node {}", id.node(), self.node))),
            // Not one of our IDs: it can only be an inline ephemeral volume the kubelet named.
            Err(_) => (Shelf::Ephemeral, LocalName::from_co_name(raw)),
        };
        let record = self
            .store
            .read_volume(shelf, &local)
            .map_err(|e| io_err("read volume record", printable(raw), e))?
            .ok_or_else(|| not_found(String::new()))?;
        let backing = Backing::Image(self.store.volume_dir(shelf, &local).join(records::IMAGE));
        Ok(Resolved { shelf, local, record, id: printable(raw), backing })
    }

    fn resolve_lv(&self, id: &VolumeId) -> Result<Resolved> {
        let not_found = |reason: String| Error::VolumeNotFound { volume: id.to_string(), reason };
        let groups = self
            .lvm
            .as_ref()
            .ok_or_else(|| not_found(format!("the lvm family is not enabled on node {}", self.node)))?;
        let report = groups.report()?;
        // A name LVM reserves (`a_tmeta`) is no LV of ours: not found, like any other.
        let found = crate::lvm::volume_lv(id.local()).ok().and_then(|lv| groups.find(&report, &lv));
        let Some(found) = found else {
            let missing = groups.missing(&report);
            if !missing.is_empty() {
                return Err(Error::Unavailable {
                    reason: format!(
                        "volume {id} is not in the LVM report, but served volume group(s) {} are missing; cannot tell whether it exists",
                        missing.join(", ")
                    ),
                });
            }
            return Err(not_found(String::new()));
        };
        let record = match &found.owned.content {
            Content::Volume(rec) if !found.owned.creating => {
                let mut rec = rec.clone();
                rec.capacity_bytes = found.lv.size_bytes;
                rec
            }
            _ => return Err(not_found("its logical volume is not a finished volume".into())),
        };
        let health = match found.lv.pool.as_deref().and_then(|p| groups.pool_full(&report, &found.lv.vg, p)) {
            Some(reason) => Condition::abnormal(reason),
            None if !found.lv.active => {
                Condition::abnormal(format!("logical volume {}/{} is not active", found.lv.vg, found.lv.name))
            }
            None => Condition::healthy(),
        };
        let backing =
            Backing::Lv { vg: found.lv.vg.clone(), lv: found.lv.name.clone(), device: found.device(), health };
        Ok(Resolved { shelf: Shelf::Lvm, local: id.local().clone(), record, id: id.to_string(), backing })
    }

    fn restage_lvm(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let names = match self.store.node_state_names(Shelf::Lvm) {
            Ok(n) => n,
            Err(e) => return vec![format!("listing LVM node state failed: {e}")],
        };
        for local in names {
            let id = VolumeId::new(Family::Lvm, self.node.clone(), local.clone()).to_string();
            let Ok(st) = self.store.read_node_state(Shelf::Lvm, &local) else { continue };
            let Some(staged) = st.staged else { continue };
            let vol = match self.resolve(&id) {
                Ok(v) => v,
                Err(e) => {
                    notes.push(format!("staged volume {id} cannot be brought back: {e}"));
                    continue;
                }
            };
            if !staged.block && !staged.path.is_dir() {
                continue;
            }
            if !staged.block && self.is_mounted_path(&staged.path).unwrap_or(true) {
                // Still mounted: a process killed while it copied from this volume (a linear
                // snapshot or a clone) may have left its filesystem frozen.
                match crate::sys::freeze::thaw_if_frozen(&staged.path) {
                    Ok(true) => notes.push(format!(
                        "thawed volume {id} at {}, left frozen by an interrupted copy",
                        staged.path.display()
                    )),
                    Ok(false) => {}
                    Err(e) => notes.push(format!("thawing volume {id} at {} failed: {e}", staged.path.display())),
                }
                continue;
            }
            if staged.block && vol.backing_path().exists() {
                continue;
            }
            let cap = Capability {
                access_type: if staged.block {
                    AccessType::Block
                } else {
                    AccessType::Mount { fs_type: None, mount_flags: staged.mount_flags.clone() }
                },
                access_mode: AccessMode::SingleNodeWriter,
            };
            match self.lock(&vol).and_then(|_g| self.stage(&vol, &staged.path, &cap)) {
                Ok(()) => notes.push(format!("staged volume {id} brought back at {}", staged.path.display())),
                Err(e) => notes.push(format!("staged volume {id} could not be brought back: {e}")),
            }
        }
        notes
    }

    /// Whether something is mounted at `path`. Callers only ask about paths recorded for a
    /// volume, which the driver mounted itself.
    fn is_mounted_path(&self, path: &Path) -> Result<bool> {
        Ok(self.kernel.mount_at(path).map_err(|e| io_err("read mount table", path.display(), e))?.is_some())
    }

    fn lock(&self, vol: &Resolved) -> Result<InFlightGuard> {
        self.inflight.try_acquire(&volume_key(&vol.local), || format!("volume {}", vol.id))
    }

    fn state(&self, vol: &Resolved) -> Result<NodeState> {
        self.store.read_node_state(vol.shelf, &vol.local).map_err(|e| io_err("read node state", &vol.id, e))
    }

    fn save(&self, vol: &Resolved, st: &NodeState) -> Result<()> {
        self.store.write_node_state(vol.shelf, &vol.local, st).map_err(|e| io_err("write node state", &vol.id, e))
    }

    /// The block device serving the volume now, if any: its loop device, or its LV's
    /// device node while the LV is active.
    fn device(&self, vol: &Resolved) -> Result<Option<Device>> {
        match &vol.backing {
            Backing::Image(image) => Ok(self
                .kernel
                .find_by_backing(image)
                .map_err(|e| io_err("list loop devices", &vol.id, e))?
                .map(Device::of_loop)),
            Backing::Lv { device, .. } => Ok(device.exists().then(|| Device { path: device.clone(), loop_dev: None })),
        }
    }

    /// Makes the volume's block device: attaches its image, or activates its LV. Answers
    /// whether the device is new (to be taken down again if the stage fails).
    fn bring_up(&self, vol: &Resolved) -> Result<(Device, bool)> {
        match &vol.backing {
            Backing::Image(image) => {
                let dev = self
                    .kernel
                    .attach(image, false)
                    .map_err(|e| io_err("attach loop device", format!("volume {}", vol.id), e))?;
                Ok((Device::of_loop(dev), true))
            }
            Backing::Lv { vg, lv, device, .. } => {
                let groups = self.lvm.as_ref().ok_or_else(|| {
                    Error::precondition(format!("volume {}", vol.id), "the lvm family is not enabled on this node")
                })?;
                let (vgn, lvn) = crate::lvm::names::VgName::parse(vg)
                    .and_then(|v| Ok((v, crate::lvm::names::LvName::parse(lv)?)))
                    .map_err(|e| io_err("name logical volume", &vol.id, e))?;
                groups
                    .cli()
                    .activate(&vgn, &lvn)
                    .map_err(|e| io_err("activate logical volume", format!("volume {} ({vg}/{lv})", vol.id), e))?;
                Ok((Device { path: device.clone(), loop_dev: None }, false))
            }
        }
    }

    fn device_size(&self, vol: &Resolved, dev: &Device) -> Result<u64> {
        match &dev.loop_dev {
            Some(l) => self.kernel.device_size(l),
            None => loopdev::device_size(&dev.path),
        }
        .map_err(|e| io_err("read device size", &vol.id, e))
    }

    fn ephemeral_staging(&self, local: &LocalName) -> PathBuf {
        self.store.volume_dir(Shelf::Ephemeral, local).join("stage")
    }

    /// Unmounts, riding out brief EBUSY: a process forked while a file in the mount was open
    /// holds a copy of that descriptor until it execs, and device probes come and go. A mount
    /// still busy after about a second is reported (the CO retries); it is never detached
    /// lazily, which would hide a workload still writing.
    fn unmount_patiently(&self, path: &Path) -> io::Result<bool> {
        let mut tries = 0;
        loop {
            match self.kernel.unmount(path) {
                Err(e) if crate::sys::errno(&e) == Some(libc::EBUSY) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// The loop device bound onto a block target file (the mount's root is `/loopN` in devtmpfs).
    fn bound_device(&self, target: &Path) -> Result<Option<loopdev::LoopDevice>> {
        let entry = self.kernel.mount_at(target).map_err(|e| io_err("read mount table", target.display(), e))?;
        Ok(entry
            .and_then(|m| m.root.to_str()?.strip_prefix("/loop")?.parse::<u32>().ok())
            .map(|number| loopdev::LoopDevice { number })
            .filter(|d| self.kernel.read_only(d)))
    }

    fn stage(&self, vol: &Resolved, staging: &Path, cap: &Capability) -> Result<()> {
        cap.check_local(vol.record.fs_type)?;
        let mut state = self.state(vol)?;
        let (flags, data) = mount_options(cap, &vol.id)?;
        let mount_flags = match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => vec![],
        };
        if let Some(st) = &state.staged {
            if st.path != staging {
                return Err(Error::precondition(
                    format!("volume {}", vol.id),
                    format!("it is already staged at {} on this node; unstage it first", st.path.display()),
                ));
            }
            if st.block != cap.is_block() || st.mount_flags != mount_flags {
                return Err(Error::PublishedIncompatible {
                    volume: vol.id.clone(),
                    path: staging.display().to_string(),
                    reason: format!(
                        "staged as {}",
                        if st.block { "a block device" } else { "a filesystem with other mount flags" }
                    ),
                });
            }
        }
        let (dev, fresh) = match self.device(vol)? {
            Some(d) => (d, false),
            None => self.bring_up(vol)?,
        };
        let result = self.stage_on_device(vol, &dev, staging, cap, flags, &data);
        if let (Err(_), true, Some(l)) = (&result, fresh, &dev.loop_dev) {
            // Leave nothing behind: the device this call attached goes away with its failure.
            let _ = self.kernel.detach(l);
        }
        result?;
        state.staged = Some(Staged { path: staging.to_path_buf(), block: cap.is_block(), mount_flags });
        self.save(vol, &state)?;
        tracing::info!(volume = %vol.id, device = %dev.path.display(), staging = %staging.display(), "volume staged");
        Ok(())
    }

    fn stage_on_device(
        &self,
        vol: &Resolved,
        dev: &Device,
        staging: &Path,
        cap: &Capability,
        flags: MsFlags,
        data: &str,
    ) -> Result<()> {
        if cap.is_block() {
            return Ok(());
        }
        let devpath = dev.path.clone();
        if !staging.is_dir() {
            fs::create_dir_all(staging).map_err(|e| io_err("create staging directory", staging.display(), e))?;
        }
        if self.is_mounted_path(staging)? {
            return Ok(());
        }
        let fs_type = vol.record.fs_type;
        let dev_size = self.device_size(vol, dev)?;
        let fresh = match self.kernel.probe(&devpath).map_err(|e| io_err("probe filesystem", format!("volume {}", vol.id), e))? {
            vfs::Probe::Blank => {
                let _slot = self.mkfs.take();
                vfs::make(self.runner.as_ref(), fs_type, &devpath)
                    .map_err(|e| io_err("make filesystem", format!("volume {}", vol.id), e))?;
                true
            }
            vfs::Probe::Found(t) if t == fs_type.as_str() => false,
            vfs::Probe::Found(t) => {
                return Err(Error::precondition(
                    format!("volume {}", vol.id),
                    format!("its device holds a {t} signature, not the {fs_type} filesystem the volume was made for; refusing to mount or format it"),
                ))
            }
        };
        // A volume restored or cloned into a larger size, or expanded while unstaged, has a
        // filesystem smaller than its device: grow it (ext4 before mounting, xfs after).
        if !fresh && fs_type == FsType::Ext4 {
            let grew = vfs::grow_ext4_offline(self.runner.as_ref(), &devpath, dev_size)
                .map_err(|e| io_err("grow filesystem", format!("volume {}", vol.id), e))?;
            if grew {
                tracing::info!(volume = %vol.id, dev_size, "filesystem grown to fill its device");
            }
        }
        let full = vfs::mount_data(fs_type, data);
        if let Err(e) = self.kernel.mount_fs(&devpath, staging, fs_type.as_str(), flags, &full) {
            return Err(self.explain_mount_failure(vol, &devpath, staging, fs_type, data, e));
        }
        if !fresh && fs_type == FsType::Xfs {
            if let Err(e) = vfs::grow(self.runner.as_ref(), fs_type, &devpath, staging) {
                let _ = self.kernel.unmount(staging);
                return Err(io_err("grow filesystem", format!("volume {}", vol.id), e));
            }
        }
        Ok(())
    }

    /// A mount refused with EINVAL may be the CO's mount options (the filesystem rejects
    /// options it does not know) or a damaged filesystem. Mounting once without the CO's
    /// options tells which: then the caller gets INVALID_ARGUMENT naming the options instead
    /// of INTERNAL.
    fn explain_mount_failure(
        &self,
        vol: &Resolved,
        dev: &Path,
        staging: &Path,
        fs_type: FsType,
        co_data: &str,
        err: io::Error,
    ) -> Error {
        let failed = io_err("mount", format!("volume {}", vol.id), &err);
        if co_data.is_empty() || crate::sys::errno(&err) != Some(libc::EINVAL) {
            return failed;
        }
        let plain = vfs::mount_data(fs_type, "");
        if self.kernel.mount_fs(dev, staging, fs_type.as_str(), MsFlags::MS_RDONLY, &plain).is_err() {
            return failed;
        }
        let _ = self.kernel.unmount(staging);
        Error::invalid(
            "volume_capability.mount.mount_flags",
            format!("the {fs_type} filesystem of volume {} refuses the mount options {co_data:?}", vol.id),
        )
    }

    fn unstage(&self, vol: &Resolved, staging: &Path) -> Result<()> {
        let mut state = self.state(vol)?;
        if let Some(st) = &state.staged {
            if st.path != staging {
                // The spec: not staged at this path means there is nothing to undo here.
                tracing::info!(volume = %vol.id, staged = %st.path.display(), asked = %staging.display(), "not staged at this path; nothing to do");
                return Ok(());
            }
        }
        // Forget publications whose mounts are gone; refuse while any is still live.
        let live: Vec<&Published> =
            state.published.iter().filter(|p| self.kernel.is_mount_point(&p.target).unwrap_or(false)).collect();
        if !live.is_empty() {
            let targets: Vec<String> = live.iter().map(|p| p.target.display().to_string()).collect();
            return Err(Error::precondition(
                format!("volume {}", vol.id),
                format!("it is still published at {}; NodeUnpublishVolume first", targets.join(", ")),
            ));
        }
        let block = state.staged.as_ref().is_some_and(|s| s.block);
        if !block {
            while self.is_mounted_path(staging)? {
                self.unmount_patiently(staging)
                    .map_err(|e| io_err("unmount staging path", format!("volume {}", vol.id), e))?;
            }
        }
        if let Some(dev) = self.device(vol)?.and_then(|d| d.loop_dev) {
            self.kernel.detach(&dev).map_err(|e| {
                io_err("detach loop device", format!("volume {} ({})", vol.id, dev.path().display()), e)
            })?;
        }
        if state.staged.is_some() || !state.published.is_empty() {
            state.staged = None;
            state.published.clear();
            self.save(vol, &state)?;
        }
        tracing::info!(volume = %vol.id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }

    fn publish(&self, vol: &Resolved, staging: &Path, target: &Path, cap: &Capability, read_only: bool) -> Result<()> {
        cap.check_local(vol.record.fs_type)?;
        let mut state = self.state(vol)?;
        match &state.staged {
            Some(st) if st.path == staging && st.block == cap.is_block() => {}
            Some(st) if st.path == staging => {
                return Err(Error::precondition(
                    format!("volume {}", vol.id),
                    format!(
                        "it is staged as {}, the publish asks for the other access type",
                        if st.block { "a block device" } else { "a filesystem" }
                    ),
                ))
            }
            _ => {
                return Err(Error::precondition(
                    format!("volume {}", vol.id),
                    format!("it is not staged at {}; NodeStageVolume first", staging.display()),
                ))
            }
        }
        self.publish_staged(vol, &mut state, staging, target, cap, read_only)
    }

    fn publish_staged(
        &self,
        vol: &Resolved,
        state: &mut NodeState,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<()> {
        let read_only = read_only || cap.access_mode.is_read_only();
        let mount_flags = match &cap.access_type {
            AccessType::Mount { mount_flags, .. } => mount_flags.clone(),
            AccessType::Block => vec![],
        };
        let want = Published {
            target: target.to_path_buf(),
            read_only,
            block: cap.is_block(),
            access_mode: cap.access_mode,
            mount_flags,
        };
        if let Some(existing) = state.published.iter().find(|p| p.target == target) {
            if *existing != want {
                return Err(Error::PublishedIncompatible {
                    volume: vol.id.clone(),
                    path: target.display().to_string(),
                    reason: "the capability, read-only flag or mount flags differ".into(),
                });
            }
            if self.is_mounted_path(target)? {
                return Ok(());
            }
        } else if let Some(other) = state
            .published
            .iter()
            .find(|p| p.access_mode.is_single_publisher() || want.access_mode.is_single_publisher())
        {
            return Err(Error::precondition(
                format!("volume {}", vol.id),
                format!(
                    "it is single-node-single-writer (ReadWriteOncePod) and already published at {}",
                    other.target.display()
                ),
            ));
        }
        let (extra, _) = mount_options(cap, &vol.id)?;
        if cap.is_block() {
            let dev = self.device(vol)?.ok_or_else(|| {
                Error::precondition(
                    format!("volume {}", vol.id),
                    "its block device is not there (loop device detached or LV inactive); NodeStageVolume again",
                )
            })?;
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| io_err("create target parent", parent.display(), e))?;
            }
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(target)
                .map_err(|e| io_err("create block target", target.display(), e))?;
            // A read-only bind mount does not stop writes to a device node, so a read-only
            // block publication gets its own read-only loop device over the same image or LV.
            let (source, own) = if read_only {
                let ro = self
                    .kernel
                    .attach(vol.backing_path(), true)
                    .map_err(|e| io_err("attach read-only loop device", format!("volume {}", vol.id), e))?;
                (ro.path(), Some(ro))
            } else {
                (dev.path, None)
            };
            if let Err(e) = self.kernel.bind(&source, target, read_only, MsFlags::empty()) {
                if let Some(own) = own {
                    let _ = self.kernel.detach(&own);
                }
                return Err(io_err("bind device", format!("volume {}", vol.id), e));
            }
        } else {
            fs::create_dir_all(target).map_err(|e| io_err("create target directory", target.display(), e))?;
            self.kernel
                .bind(staging, target, read_only, extra)
                .map_err(|e| io_err("bind mount", format!("volume {}", vol.id), e))?;
        }
        if !state.published.iter().any(|p| p.target == target) {
            state.published.push(want);
        }
        if let Err(e) = self.save(vol, state) {
            // Undo this publication whole, including a read-only block view's own device.
            let ro_device = if cap.is_block() && read_only { self.bound_device(target).ok().flatten() } else { None };
            let _ = self.kernel.unmount(target);
            if let Some(dev) = ro_device {
                let _ = self.kernel.detach(&dev);
            }
            return Err(e);
        }
        tracing::info!(volume = %vol.id, target = %target.display(), read_only, "volume published");
        Ok(())
    }

    fn unpublish(&self, vol: &Resolved, target: &Path) -> Result<()> {
        let mut state = self.state(vol)?;
        let Some(pos) = state.published.iter().position(|p| p.target == target) else {
            // Never published here (or already undone): nothing of ours to take down.
            return Ok(());
        };
        let ro_device = if state.published[pos].block && state.published[pos].read_only {
            self.bound_device(target)?
        } else {
            None
        };
        while self.is_mounted_path(target)? {
            self.unmount_patiently(target).map_err(|e| io_err("unmount target", format!("volume {}", vol.id), e))?;
        }
        if let Some(dev) = ro_device {
            let image =
                loopdev::ImageId::of(vol.backing_path()).map_err(|e| io_err("stat backing device", &vol.id, e))?;
            self.kernel
                .detach_if_attached_to(&dev, image)
                .map_err(|e| io_err("detach read-only loop device", format!("volume {}", vol.id), e))?;
        }
        let removed = if state.published[pos].block { fs::remove_file(target) } else { fs::remove_dir(target) };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove target path", target.display(), e)),
        }
        state.published.remove(pos);
        self.save(vol, &state)?;
        tracing::info!(volume = %vol.id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    fn publish_ephemeral(
        &self,
        raw_id: &str,
        target: &Path,
        cap: &Capability,
        read_only: bool,
        ctx: &HashMap<String, String>,
    ) -> Result<()> {
        let mut size = None;
        let mut fs_type = FsType::Ext4;
        for (k, v) in ctx {
            match k.as_str() {
                "size" => size = Some(parse_quantity(v, "volume_context size")?),
                "fsType" => fs_type = FsType::parse(v, "volume_context fsType")?,
                _ if k.starts_with(CO_PREFIX) => {}
                _ => {
                    return Err(Error::UnknownParameter {
                        key: printable(k),
                        known: EPHEMERAL_PARAMETERS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
                    })
                }
            }
        }
        if let AccessType::Mount { fs_type: Some(f), .. } = &cap.access_type {
            fs_type = *f;
        }
        if cap.is_block() {
            return Err(Error::UnsupportedCapability {
                reason: "inline ephemeral volumes are filesystems; block access is not offered".into(),
            });
        }
        let local = LocalName::from_co_name(raw_id);
        let _g = self.inflight.try_acquire(&volume_key(&local), || format!("volume {}", printable(raw_id)))?;
        if self
            .store
            .read_volume(Shelf::Ephemeral, &local)
            .map_err(|e| io_err("read volume record", printable(raw_id), e))?
            .is_none()
        {
            let bytes = CapacityRange { required: size, limit: None }.pick(fs_type.min_bytes(), raw_id)?;
            self.create_ephemeral(raw_id, &local, bytes, fs_type)?;
        }
        let vol = self.resolve(raw_id)?;
        let staging = self.ephemeral_staging(&local);
        let stage_cap = Capability {
            access_type: AccessType::Mount { fs_type: None, mount_flags: vec![] },
            access_mode: AccessMode::SingleNodeWriter,
        };
        let staged = self.state(&vol)?.staged.is_some();
        if !staged || !self.is_mounted_path(&staging)? {
            self.stage(&vol, &staging, &stage_cap)?;
        }
        let mut state = self.state(&vol)?;
        self.publish_staged(&vol, &mut state, &staging, target, cap, read_only)
    }

    fn create_ephemeral(&self, raw_id: &str, local: &LocalName, bytes: u64, fs_type: FsType) -> Result<()> {
        let _room = self.ledger.reserve(&self.store, &printable(raw_id), bytes)?;
        self.store.unbury_ephemeral(local).map_err(|e| io_err("clear ephemeral tombstone", printable(raw_id), e))?;
        let work = self.store.work_dir("ephemeral").map_err(|e| io_err("make work dir", printable(raw_id), e))?;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(work.path().join(records::IMAGE))
            .map_err(|e| io_err("create image", printable(raw_id), e))?;
        f.set_len(bytes).map_err(|e| io_err("size image", printable(raw_id), e))?;
        let rec = VolumeRecord {
            id: raw_id.to_owned(),
            name: raw_id.to_owned(),
            capacity_bytes: bytes,
            fs_type,
            source: None,
            parameters: Default::default(),
            created_unix: 0,
            published_nodes: vec![],
        };
        work.write_record(records::VOLUME, &rec).map_err(|e| io_err("write volume record", printable(raw_id), e))?;
        self.store
            .commit_volume(work, Shelf::Ephemeral, local)
            .map_err(|e| io_err("commit volume", printable(raw_id), e))?;
        tracing::info!(volume = %printable(raw_id), size = bytes, "ephemeral volume created");
        Ok(())
    }

    fn stats(&self, vol: &Resolved, path: &Path) -> Result<(Stats, Condition)> {
        let state = self.state(vol)?;
        let staged = state.staged.as_ref().filter(|s| s.path == path);
        let published = state.published.iter().find(|p| p.target == path);
        let block = match (staged, published) {
            (Some(s), _) => s.block,
            (None, Some(p)) => p.block,
            (None, None) => {
                return Err(Error::VolumeNotFound {
                    volume: vol.id.clone(),
                    reason: format!("it is neither staged nor published at {}", path.display()),
                })
            }
        };
        if !path.exists() {
            return Err(Error::VolumeNotFound {
                volume: vol.id.clone(),
                reason: format!("{} does not exist", path.display()),
            });
        }
        let dev = self.device(vol)?;
        let mounted = block && staged.is_some() || self.is_mounted_path(path)?;
        let condition = match (&dev, mounted, &vol.backing) {
            (None, _, Backing::Image(image)) => {
                Condition::abnormal(format!("no loop device is attached to the image {}", image.display()))
            }
            (None, _, Backing::Lv { vg, lv, .. }) => {
                Condition::abnormal(format!("logical volume {vg}/{lv} has no device node (not active)"))
            }
            (Some(_), false, _) => Condition::abnormal(format!("{} is not mounted", path.display())),
            (Some(_), true, Backing::Lv { health, .. }) => health.clone(),
            (Some(_), true, Backing::Image(_)) => Condition::healthy(),
        };
        let stats = if block {
            let total_bytes = match &dev {
                Some(d) => self.device_size(vol, d)?,
                None => 0,
            };
            Stats::Block { total_bytes }
        } else {
            Stats::Filesystem(vfs::usage(path).map_err(|e| io_err("statvfs", path.display(), e))?)
        };
        Ok((stats, condition))
    }

    fn expand(&self, vol: &Resolved, path: &Path, range: CapacityRange) -> Result<u64> {
        let state = self.state(vol)?;
        let Some(staged) = state.staged.as_ref() else {
            return Err(Error::precondition(
                format!("volume {}", vol.id),
                "it is not staged on this node; nothing to expand here",
            ));
        };
        if staged.path != path && !state.published.iter().any(|p| p.target == path) {
            return Err(Error::VolumeNotFound {
                volume: vol.id.clone(),
                reason: format!("it is neither staged nor published at {}", path.display()),
            });
        }
        let dev = self.device(vol)?.ok_or_else(|| {
            Error::precondition(
                format!("volume {}", vol.id),
                "its block device is not there (loop device detached or LV inactive)",
            )
        })?;
        if let Some(l) = &dev.loop_dev {
            // An LV's device grows with lvextend; a loop device re-reads its image's size.
            self.kernel.set_capacity(l).map_err(|e| io_err("resize loop device", format!("volume {}", vol.id), e))?;
        }
        let size = self.device_size(vol, &dev)?;
        if let Some(req) = range.required {
            if size < req {
                return Err(Error::CapacityOutOfRange {
                    volume: vol.id.clone(),
                    reason: format!(
                        "the device has {size} bytes, below required_bytes {req}; ControllerExpandVolume first"
                    ),
                });
            }
        }
        if !staged.block {
            vfs::grow(self.runner.as_ref(), vol.record.fs_type, &dev.path, &staged.path)
                .map_err(|e| io_err("grow filesystem", format!("volume {}", vol.id), e))?;
        }
        tracing::info!(volume = %vol.id, size, "volume expanded on node");
        Ok(size)
    }
}

/// Mount flags of a capability, checked.
fn mount_options(cap: &Capability, volume: &str) -> Result<(MsFlags, String)> {
    match &cap.access_type {
        AccessType::Block => Ok((MsFlags::empty(), String::new())),
        AccessType::Mount { mount_flags, .. } => mount::parse_options(mount_flags).map_err(|reason| {
            Error::invalid("volume_capability.mount.mount_flags", format!("{reason} (volume {volume})"))
        }),
    }
}

#[cfg(test)]
mod fault_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrovol_core::error::Code;

    #[test]
    fn request_paths_must_stay_under_the_roots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let roots = vec![root.join("kubelet")];
        fs::create_dir_all(root.join("kubelet/pods")).unwrap();
        let ok = format!("{}/kubelet/pods/x/mount", root.display());
        assert_eq!(check_request_path("target_path", &ok, &roots).unwrap(), root.join("kubelet/pods/x/mount"));
        for bad in ["", "relative/path", "/etc", &format!("{}/kubelet/../etc", root.display()), "/x\0y"] {
            let e = check_request_path("target_path", bad, &roots).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        }
        // A symlink inside the root that points outside it does not let a path escape.
        std::os::unix::fs::symlink("/etc", root.join("kubelet/pods/evil")).unwrap();
        let e =
            check_request_path("target_path", &format!("{}/kubelet/pods/evil/x", root.display()), &roots).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
    }
}
