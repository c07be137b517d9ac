//! The loop family's node agent: creates, deletes, expands and snapshots image-file volumes
//! in this node's data dir. The controller calls it through `ferrovol_core::agent::NodeAgent`.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ferrovol_core::agent::{CapacityReport, NewVolume, NodeAgent, Source};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::guard::{InFlight, InFlightGuard};
use ferrovol_core::ids::{Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::VolumeParams;
use ferrovol_core::volume::{CapacityRange, Condition, ContentSource, SnapshotRecord, VolumeRecord, MIB};
use tokio::sync::Semaphore;

use crate::ledger::SpaceLedger;
use crate::store::{records, LoopStore, Shelf};
use crate::sys::{copy, freeze, loopdev, mountinfo};

/// How many image copies (snapshots, restores, clones) may run at once: they are disk-bound
/// and more in parallel only makes each slower.
const MAX_PARALLEL_COPIES: usize = 2;

/// The loop family's agent for one node.
#[derive(Debug, Clone)]
pub struct LoopAgent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    store: LoopStore,
    inflight: InFlight,
    ledger: Arc<SpaceLedger>,
    copies: Semaphore,
}

/// The in-flight key of a volume: shared with the Node service so that, say, DeleteVolume
/// and NodeStage of one volume never run at once.
pub fn volume_key(local: &LocalName) -> String {
    format!("vol:{local}")
}

fn snapshot_key(local: &LocalName) -> String {
    format!("snap:{local}")
}

fn io_err(op: &str, object: impl std::fmt::Display, e: io::Error) -> Error {
    Error::system(op, object, e)
}

fn now() -> (i64, i32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl LoopAgent {
    /// An agent over `store`, sharing `inflight` with the node service.
    pub fn new(node: NodeId, store: LoopStore, inflight: InFlight, ledger: Arc<SpaceLedger>) -> Self {
        LoopAgent {
            inner: Arc::new(Inner { node, store, inflight, ledger, copies: Semaphore::new(MAX_PARALLEL_COPIES) }),
        }
    }

    /// The store this agent manages.
    pub fn store(&self) -> &LoopStore {
        &self.inner.store
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        crate::on_blocking_thread(&self.inner, "node agent", f).await
    }

    fn ours(&self, node: &NodeId) -> bool {
        node == &self.inner.node
    }
}

impl Inner {
    fn volume_id(&self, local: &LocalName) -> VolumeId {
        VolumeId::new(Family::Loop, self.node.clone(), local.clone())
    }

    fn lock_volume(&self, local: &LocalName, id: &impl std::fmt::Display) -> Result<InFlightGuard> {
        self.inflight.try_acquire(&volume_key(local), || format!("volume {id}"))
    }

    fn read_volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        self.store.read_volume(Shelf::Volumes, id.local()).map_err(|e| io_err("read volume record", id, e))
    }

    fn require_volume(&self, id: &VolumeId) -> Result<VolumeRecord> {
        self.read_volume(id)?.ok_or_else(|| Error::VolumeNotFound { volume: id.to_string(), reason: String::new() })
    }

    /// Copies a volume's image, freezing its filesystem meanwhile if it is mounted, so the
    /// copy is consistent rather than merely crash-consistent.
    fn copy_volume_image(&self, local: &LocalName, id: &VolumeId, dst: &Path) -> Result<()> {
        let src = self.store.volume_image(Shelf::Volumes, local);
        let state = self.store.read_node_state(Shelf::Volumes, local).map_err(|e| io_err("read node state", id, e))?;
        let mount_point =
            state.staged.filter(|s| !s.block).map(|s| s.path).filter(|p| mountinfo::is_mount_point(p).unwrap_or(false));
        let frozen = match &mount_point {
            Some(mp) => Some(
                freeze::freeze(mp)
                    .map_err(|e| io_err("freeze filesystem", format!("volume {id} at {}", mp.display()), e))?,
            ),
            None => None,
        };
        let res = copy::clone_or_copy(&src, dst).map_err(|e| io_err("copy image", format!("volume {id}"), e));
        if let Some(f) = frozen {
            f.thaw().map_err(|e| io_err("thaw filesystem", format!("volume {id}"), e))?;
        }
        res.map(|_| ())
    }

    fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let id = self.volume_id(&req.local);
        let _g = self.lock_volume(&req.local, &id)?;
        let fs_type_explicit = req.params.recorded.contains_key("fsType");

        // What the source is, its size and filesystem; checked before anything is made.
        let (source, src_size, src_fs) = match &req.source {
            None => (None, None, None),
            Some(Source::Snapshot(sid)) => {
                let snap = (sid.node() == &self.node)
                    .then(|| self.store.read_snapshot(sid.local()))
                    .transpose()
                    .map_err(|e| io_err("read snapshot record", sid, e))?
                    .flatten()
                    .ok_or_else(|| Error::SnapshotNotFound {
                        snapshot: sid.to_string(),
                        reason: "requested as the content source".into(),
                    })?;
                (Some(ContentSource::Snapshot(sid.to_string())), Some(snap.size_bytes), Some(snap.fs_type))
            }
            Some(Source::Volume(vid)) => {
                let vol = if vid.node() == &self.node { self.read_volume(vid)? } else { None };
                let vol = vol.ok_or_else(|| Error::VolumeNotFound {
                    volume: vid.to_string(),
                    reason: "requested as the content source".into(),
                })?;
                (Some(ContentSource::Volume(vid.to_string())), Some(vol.capacity_bytes), Some(vol.fs_type))
            }
        };
        let fs_type = match src_fs {
            Some(fs) if fs_type_explicit && fs != req.params.fs_type => {
                return Err(Error::invalid(
                    "parameters",
                    format!(
                        "fsType {} differs from the content source's filesystem {fs} for volume {id}",
                        req.params.fs_type
                    ),
                ))
            }
            Some(fs) => fs,
            None => req.params.fs_type,
        };

        if let Some(existing) = self.read_volume(&id)? {
            let conflict = if !req.capacity.admits(existing.capacity_bytes) {
                Some(format!("it has {} bytes, outside the requested capacity range", existing.capacity_bytes))
            } else if existing.fs_type != fs_type {
                Some(format!("it has filesystem {}, the request asks for {fs_type}", existing.fs_type))
            } else if existing.source != source {
                Some(format!("it was made from {:?}, the request names {:?}", existing.source, source))
            } else if existing
                .parameters
                .iter()
                .filter(|(k, _)| !k.starts_with(ferrovol_core::params::CO_PREFIX))
                .ne(req.params.identity().iter())
            {
                Some("it was created with other parameters".to_string())
            } else {
                None
            };
            return match conflict {
                None => Ok(existing),
                Some(reason) => Err(Error::NameConflict { kind: "volume", name: req.name, reason }),
            };
        }

        let size = match src_size {
            None => req.capacity.pick(fs_type.min_bytes(), &id.to_string())?,
            Some(src) => {
                let want = req.capacity.required.map_or(src, |r| r.div_ceil(MIB) * MIB).max(src);
                if req.capacity.limit.is_some_and(|l| want > l) {
                    return Err(Error::CapacityOutOfRange {
                        volume: id.to_string(),
                        reason: format!(
                            "the content source holds {src} bytes, above limit_bytes {}",
                            req.capacity.limit.unwrap_or_default()
                        ),
                    });
                }
                want
            }
        };
        let _room = self.ledger.reserve(&self.store, &id.to_string(), size)?;

        let work = self.store.work_dir("create").map_err(|e| io_err("make work dir", &id, e))?;
        let image = work.path().join(records::IMAGE);
        match &req.source {
            None => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&image)
                    .map_err(|e| io_err("create image", &id, e))?;
                f.set_len(size).map_err(|e| io_err("size image", &id, e))?;
            }
            Some(Source::Snapshot(sid)) => {
                copy::clone_or_copy(&self.store.snapshot_image(sid.local()), &image)
                    .map_err(|e| io_err("copy snapshot image", format!("volume {id} from {sid}"), e))?;
            }
            Some(Source::Volume(vid)) => {
                let _src_guard = self.lock_volume(vid.local(), vid)?;
                self.copy_volume_image(vid.local(), vid, &image)?;
            }
        }
        if src_size.is_some_and(|s| size > s) {
            // Restoring into a larger volume: grow the image now; NodeStage grows the
            // filesystem to fill the device.
            let f = OpenOptions::new().write(true).open(&image).map_err(|e| io_err("open image", &id, e))?;
            f.set_len(size).map_err(|e| io_err("grow image", &id, e))?;
        }
        let rec = VolumeRecord {
            id: id.to_string(),
            name: req.name.clone(),
            capacity_bytes: size,
            fs_type,
            source,
            parameters: req.params.recorded.clone(),
            created_unix: now().0,
            published_nodes: vec![],
        };
        work.write_record(records::VOLUME, &rec).map_err(|e| io_err("write volume record", &id, e))?;
        self.store.commit_volume(work, Shelf::Volumes, &req.local).map_err(|e| io_err("commit volume", &id, e))?;
        tracing::info!(volume = %id, size, fs = %fs_type, "volume created");
        Ok(rec)
    }

    fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let _g = self.lock_volume(id.local(), id)?;
        let Some(rec) = self.read_volume(id)? else { return Ok(()) };
        let state =
            self.store.read_node_state(Shelf::Volumes, id.local()).map_err(|e| io_err("read node state", id, e))?;
        if let Some(st) = &state.staged {
            return Err(Error::precondition(
                format!("volume {id}"),
                format!("it is still staged at {} on node {}; NodeUnstageVolume first", st.path.display(), self.node),
            ));
        }
        let image = self.store.volume_image(Shelf::Volumes, id.local());
        if let Some(dev) = loopdev::find_by_backing(&image).map_err(|e| io_err("list loop devices", id, e))? {
            // Right after NodeUnstageVolume the device may still be held for a moment (udev
            // probes it after the unmount), so its detach is pending: wait that out briefly.
            let released = loopdev::autoclear(&dev)
                && loopdev::wait_released(&image, std::time::Duration::from_secs(3))
                    .map_err(|e| io_err("list loop devices", id, e))?;
            if !released {
                return Err(Error::precondition(
                    format!("volume {id}"),
                    format!("it is still attached as {}", dev.path().display()),
                ));
            }
        }
        if !rec.published_nodes.is_empty() {
            return Err(Error::precondition(
                format!("volume {id}"),
                format!(
                    "it is still ControllerPublished to {}; ControllerUnpublishVolume first",
                    rec.published_nodes.join(", ")
                ),
            ));
        }
        self.store.remove_volume(Shelf::Volumes, id.local()).map_err(|e| io_err("remove volume", id, e))?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    fn condition(&self, shelf: Shelf, local: &LocalName, rec: &VolumeRecord) -> Condition {
        let image = self.store.volume_image(shelf, local);
        match fs::metadata(&image) {
            Err(e) => Condition::abnormal(format!("image {} is unreadable: {e}", image.display())),
            Ok(m) if m.len() < rec.capacity_bytes => Condition::abnormal(format!(
                "image {} has {} bytes, the volume should have {}",
                image.display(),
                m.len(),
                rec.capacity_bytes
            )),
            Ok(_) => Condition::healthy(),
        }
    }

    fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64> {
        let _g = self.lock_volume(id.local(), id)?;
        let mut rec = self.require_volume(id)?;
        let Some(required) = range.required else {
            return Err(Error::invalid("capacity_range", format!("required_bytes must be set to expand volume {id}")));
        };
        let want = required.div_ceil(MIB) * MIB;
        if want <= rec.capacity_bytes {
            if range.limit.is_some_and(|l| rec.capacity_bytes > l) {
                return Err(Error::CapacityOutOfRange {
                    volume: id.to_string(),
                    reason: format!(
                        "it already has {} bytes, above limit_bytes; volumes never shrink",
                        rec.capacity_bytes
                    ),
                });
            }
            return Ok(rec.capacity_bytes);
        }
        if range.limit.is_some_and(|l| want > l) {
            return Err(Error::CapacityOutOfRange {
                volume: id.to_string(),
                reason: format!("{want} bytes (whole MiB) is above limit_bytes"),
            });
        }
        let _room = self.ledger.reserve(&self.store, &id.to_string(), want - rec.capacity_bytes)?;
        let image = self.store.volume_image(Shelf::Volumes, id.local());
        let f = OpenOptions::new().write(true).open(&image).map_err(|e| io_err("open image", id, e))?;
        f.set_len(want).map_err(|e| io_err("grow image", id, e))?;
        f.sync_all().map_err(|e| io_err("sync image", id, e))?;
        if let Some(dev) = loopdev::find_by_backing(&image).map_err(|e| io_err("list loop devices", id, e))? {
            loopdev::set_capacity(&dev)
                .map_err(|e| io_err("resize loop device", format!("volume {id} on {}", dev.path().display()), e))?;
        }
        rec.capacity_bytes = want;
        self.store.write_volume(Shelf::Volumes, id.local(), &rec).map_err(|e| io_err("write volume record", id, e))?;
        tracing::info!(volume = %id, size = want, "volume expanded");
        Ok(want)
    }

    fn set_published(&self, id: &VolumeId, node: &NodeId, published: bool) -> Result<()> {
        let _g = self.lock_volume(id.local(), id)?;
        let mut rec = self.require_volume(id)?;
        let has = rec.published_nodes.iter().any(|n| n == node.as_str());
        if has == published {
            return Ok(());
        }
        if published {
            rec.published_nodes.push(node.to_string());
        } else {
            rec.published_nodes.retain(|n| n != node.as_str());
        }
        self.store.write_volume(Shelf::Volumes, id.local(), &rec).map_err(|e| io_err("write volume record", id, e))
    }

    fn create_snapshot(&self, name: &str, local: &LocalName, source: &VolumeId) -> Result<SnapshotRecord> {
        let sid = SnapshotId::new(Family::Loop, self.node.clone(), local.clone());
        let _g = self.inflight.try_acquire_all(&[&snapshot_key(local), &volume_key(source.local())], || {
            format!("snapshot {sid} of volume {source}")
        })?;
        if let Some(existing) = self.store.read_snapshot(local).map_err(|e| io_err("read snapshot record", &sid, e))? {
            if existing.source_volume_id == source.to_string() {
                return Ok(existing);
            }
            return Err(Error::NameConflict {
                kind: "snapshot",
                name: name.to_owned(),
                reason: format!("it is a snapshot of {}, not of {source}", existing.source_volume_id),
            });
        }
        let vol = if source.node() == &self.node { self.read_volume(source)? } else { None };
        let vol = vol.ok_or_else(|| Error::VolumeNotFound {
            volume: source.to_string(),
            reason: "requested as the snapshot source".into(),
        })?;
        let allocated = fs::metadata(self.store.volume_image(Shelf::Volumes, source.local()))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .map_err(|e| io_err("stat image", source, e))?;
        // A sparse copy takes what the source has allocated (a reflink takes less).
        let _room = self.ledger.reserve(&self.store, &format!("snapshot {sid}"), allocated)?;
        let work = self.store.work_dir("snapshot").map_err(|e| io_err("make work dir", &sid, e))?;
        self.copy_volume_image(source.local(), source, &work.path().join(records::IMAGE))?;
        let (secs, nanos) = now();
        let rec = SnapshotRecord {
            id: sid.to_string(),
            name: name.to_owned(),
            source_volume_id: source.to_string(),
            size_bytes: vol.capacity_bytes,
            fs_type: vol.fs_type,
            created_unix: secs,
            created_nanos: nanos,
        };
        work.write_record(records::SNAPSHOT, &rec).map_err(|e| io_err("write snapshot record", &sid, e))?;
        self.store.commit_snapshot(work, local).map_err(|e| io_err("commit snapshot", &sid, e))?;
        tracing::info!(snapshot = %sid, volume = %source, "snapshot created");
        Ok(rec)
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let _g = self.inflight.try_acquire(&snapshot_key(id.local()), || format!("snapshot {id}"))?;
        self.store.remove_snapshot(id.local()).map_err(|e| io_err("remove snapshot", id, e))?;
        Ok(())
    }
}

#[async_trait]
impl NodeAgent for LoopAgent {
    fn node_id(&self) -> &NodeId {
        &self.inner.node
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let _permit = match req.source {
            Some(_) => self.inner.copies.acquire().await.ok(),
            None => None,
        };
        self.blocking(move |i| i.create_volume(req)).await
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        if !self.ours(id.node()) {
            return Ok(());
        }
        let id = id.clone();
        self.blocking(move |i| i.delete_volume(&id)).await
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<(VolumeRecord, Condition)> {
        if !self.ours(id.node()) {
            return Err(Error::VolumeNotFound {
                volume: id.to_string(),
                reason: format!("node {} is not served here", id.node()),
            });
        }
        let id = id.clone();
        self.blocking(move |i| {
            let rec = i.require_volume(&id)?;
            let cond = i.condition(Shelf::Volumes, id.local(), &rec);
            Ok((rec, cond))
        })
        .await
    }

    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>> {
        self.blocking(|i| {
            let list = i
                .store
                .list_volumes(Shelf::Volumes)
                .map_err(|e| io_err("list volumes", i.store.root().display(), e))?;
            Ok(list
                .into_iter()
                .map(|(local, rec)| {
                    let c = i.condition(Shelf::Volumes, &local, &rec);
                    (rec, c)
                })
                .collect())
        })
        .await
    }

    async fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64> {
        if !self.ours(id.node()) {
            return Err(Error::VolumeNotFound {
                volume: id.to_string(),
                reason: format!("node {} is not served here", id.node()),
            });
        }
        let id = id.clone();
        self.blocking(move |i| i.expand_volume(&id, range)).await
    }

    async fn publish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        let (id, node) = (id.clone(), node.clone());
        self.blocking(move |i| i.set_published(&id, &node, true)).await
    }

    async fn unpublish_volume(&self, id: &VolumeId, node: &NodeId) -> Result<()> {
        let (id, node) = (id.clone(), node.clone());
        self.blocking(move |i| match i.set_published(&id, &node, false) {
            Err(Error::VolumeNotFound { .. }) => Ok(()),
            other => other,
        })
        .await
    }

    async fn create_snapshot(&self, name: &str, local: LocalName, source: &VolumeId) -> Result<SnapshotRecord> {
        let _permit = self.inner.copies.acquire().await;
        let (name, source) = (name.to_owned(), source.clone());
        self.blocking(move |i| i.create_snapshot(&name, &local, &source)).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if !self.ours(id.node()) {
            return Ok(());
        }
        let id = id.clone();
        self.blocking(move |i| i.delete_snapshot(&id)).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord> {
        let not_found = || Error::SnapshotNotFound { snapshot: id.to_string(), reason: String::new() };
        if !self.ours(id.node()) {
            return Err(not_found());
        }
        let local = id.local().clone();
        let idc = id.clone();
        self.blocking(move |i| i.store.read_snapshot(&local).map_err(|e| io_err("read snapshot record", &idc, e)))
            .await?
            .ok_or_else(not_found)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.blocking(|i| {
            let list = i.store.list_snapshots().map_err(|e| io_err("list snapshots", i.store.root().display(), e))?;
            Ok(list.into_iter().map(|(_, r)| r).collect())
        })
        .await
    }

    async fn capacity(&self, _params: &VolumeParams) -> Result<CapacityReport> {
        let available = self.blocking(|i| i.ledger.available(&i.store)).await?;
        let available = available / MIB * MIB;
        Ok(CapacityReport { available, maximum_volume_size: available })
    }
}
