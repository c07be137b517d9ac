//! The LVM family's node agent: linear and thin logical volumes, their snapshots (thin
//! snapshots in thin pools; a full copy into a new LV for linear volumes, so snapshot and
//! restore work for every LVM volume), clones, expansion and capacity. The controller calls
//! it through `ferrovol_core::agent::NodeAgent`; the volume's state lives in its LV's tags
//! (`tags.rs`), the node's mount state in the data dir beside the loop family's.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ferrovol_core::agent::{CapacityReport, NewVolume, NodeAgent, Source};
use ferrovol_core::error::{Error, Result};
use ferrovol_core::guard::{InFlight, InFlightGuard};
use ferrovol_core::ids::{Family, LocalName, NodeId, SnapshotId, VolumeId};
use ferrovol_core::params::{LvmParams, VolumeParams, CO_PREFIX};
use ferrovol_core::volume::{CapacityRange, Condition, ContentSource, FsType, SnapshotRecord, VolumeRecord, MIB};
use tokio::sync::Semaphore;

use super::groups::{apply, lvm_err, Found, VolumeGroups};
use super::names::{LvName, VgName};
use super::report::{LvReport, Report};
use super::tags::{self, Content};
use super::{snapshot_lv, volume_lv};
use crate::agent::volume_key;
use crate::store::{LoopStore, Shelf};
use crate::sys::{blockdev, freeze, mountinfo};

/// Bytes zeroed at the head of a new linear LV: its extents may hold a deleted volume's
/// data, and the blank probe at stage time reads the first 128 KiB.
const ZEROED_HEAD: u64 = MIB;
/// Copies (snapshots of linear volumes, restores and clones across pools) at once.
const MAX_PARALLEL_COPIES: usize = 2;

/// The LVM family's agent for one node.
#[derive(Debug, Clone)]
pub struct LvmAgent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: NodeId,
    groups: Arc<VolumeGroups>,
    /// The data dir: the node's mount state of LVM volumes lives on its `lvm` shelf.
    store: LoopStore,
    inflight: InFlight,
    copies: Semaphore,
}

fn now() -> (i64, i32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn snapshot_key(local: &LocalName) -> String {
    format!("snap:{local}")
}

/// What a create or snapshot makes its content from.
#[derive(Debug)]
enum Origin {
    Nothing,
    /// Another LV of ours: `lv` is its report line, `volume` set if it is a live volume
    /// (its filesystem is frozen during a copy).
    Lv {
        lv: Box<LvReport>,
        volume: Option<LocalName>,
    },
}

impl LvmAgent {
    /// An agent over `groups`, sharing `inflight` with the node service.
    pub fn new(node: NodeId, groups: Arc<VolumeGroups>, store: LoopStore, inflight: InFlight) -> Self {
        LvmAgent {
            inner: Arc::new(Inner { node, groups, store, inflight, copies: Semaphore::new(MAX_PARALLEL_COPIES) }),
        }
    }

    /// The volume groups this agent serves.
    pub fn groups(&self) -> &Arc<VolumeGroups> {
        &self.inner.groups
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        crate::on_blocking_thread(&self.inner, "lvm agent", f).await
    }

    fn ours(&self, node: &NodeId) -> bool {
        node == &self.inner.node
    }

    /// Removes LVs of ours that a crash left half-made (`fv.creating` with no call working
    /// on them); answers what it did and what it could not read, for the start-up log.
    pub async fn clean_up_debris(&self) -> Result<Vec<String>> {
        self.blocking(|i| i.clean_up_debris()).await
    }
}

/// The record of a volume LV as the CO sees it: size from the LV, publications from tags.
fn volume_record(found: &Found) -> Option<VolumeRecord> {
    match &found.owned.content {
        Content::Volume(rec) if !found.owned.creating => {
            let mut rec = rec.clone();
            rec.capacity_bytes = found.lv.size_bytes;
            rec.published_nodes = found.owned.published.clone();
            Some(rec)
        }
        _ => None,
    }
}

fn snapshot_record(found: &Found) -> Option<SnapshotRecord> {
    match &found.owned.content {
        Content::Snapshot(rec) if !found.owned.creating => Some(rec.clone()),
        _ => None,
    }
}

/// Where an existing volume lives, with the overprovisioning ratio it was created under.
fn placed(lv: &LvReport, rec: &VolumeRecord) -> LvmParams {
    let recorded = VolumeParams::parse(&rec.parameters.clone().into_iter().collect()).ok().and_then(|p| p.lvm);
    LvmParams {
        volume_group: lv.vg.clone(),
        thin_pool: lv.pool.clone(),
        overprovision_milli: recorded
            .map_or(ferrovol_core::params::DEFAULT_OVERPROVISION_MILLI, |l| l.overprovision_milli),
    }
}

/// A failed lvcreate: an LV of that name that the cached report did not show (made since by
/// someone else) is a name conflict, not an internal error.
fn create_err(op: &str, vg: &VgName, name: &LvName, object: &str, e: super::cli::LvmError) -> Error {
    if e.refusal() == Some(super::cli::Refusal::AlreadyExists) {
        return Error::NameConflict {
            kind: "logical volume",
            name: format!("{vg}/{name}"),
            reason: format!("it exists and was not made by this driver on this node ({object})"),
        };
    }
    lvm_err(op, object, e)
}

fn round_up(bytes: u64, extent: u64) -> u64 {
    let unit = extent.max(MIB);
    bytes.div_ceil(unit) * unit
}

impl Inner {
    fn volume_id(&self, local: &LocalName) -> VolumeId {
        VolumeId::new(Family::Lvm, self.node.clone(), local.clone())
    }

    fn lock_volume(&self, local: &LocalName, id: &impl std::fmt::Display) -> Result<InFlightGuard> {
        self.inflight.try_acquire(&volume_key(local), || format!("volume {id}"))
    }

    fn report(&self) -> Result<Report> {
        self.groups.report()
    }

    /// Our volume LV of this local name. A local name from a request may hold a word LVM
    /// reserves (`a_tmeta`); no LV of ours can have such a name, so it is simply not found.
    /// When a served VG is missing from the report, "not found" cannot be told from "on the
    /// missing disk": UNAVAILABLE, so a DeleteVolume does not answer OK for a volume that
    /// is only out of sight.
    fn find_volume(&self, report: &Report, local: &LocalName) -> Result<Option<Found>> {
        let found = volume_lv(local).ok().and_then(|lv| self.groups.find(report, &lv));
        self.unless_vg_missing(report, found, &format!("volume {}", self.volume_id(local)))
    }

    fn find_snapshot(&self, report: &Report, local: &LocalName) -> Result<Option<Found>> {
        let found = snapshot_lv(local).ok().and_then(|lv| self.groups.find(report, &lv));
        let sid = SnapshotId::new(Family::Lvm, self.node.clone(), local.clone());
        self.unless_vg_missing(report, found, &format!("snapshot {sid}"))
    }

    fn unless_vg_missing(&self, report: &Report, found: Option<Found>, object: &str) -> Result<Option<Found>> {
        if found.is_some() {
            return Ok(found);
        }
        let missing = self.groups.missing(report);
        if missing.is_empty() {
            return Ok(None);
        }
        Err(Error::Unavailable {
            reason: format!(
                "{object} is not in the LVM report, but served volume group(s) {} are missing (a disk not attached yet?); cannot tell whether it exists",
                missing.join(", ")
            ),
        })
    }

    fn require_volume(&self, report: &Report, id: &VolumeId) -> Result<(Found, VolumeRecord)> {
        let found = self.find_volume(report, id.local())?;
        match found.as_ref().and_then(|f| volume_record(f).map(|r| (f.clone(), r))) {
            Some(v) => Ok(v),
            None => Err(Error::VolumeNotFound { volume: id.to_string(), reason: String::new() }),
        }
    }

    fn vg_name(&self, lv: &LvReport) -> Result<VgName> {
        VgName::parse(&lv.vg).map_err(|e| Error::system("read LVM report", format!("volume group {:?}", lv.vg), e))
    }

    fn lv_name(name: &str) -> Result<LvName> {
        LvName::parse(name).map_err(|e| Error::system("read LVM report", format!("logical volume {name:?}"), e))
    }

    /// Health of a volume LV: active, and its thin pool (if any) below the threshold.
    fn condition(&self, report: &Report, lv: &LvReport) -> Condition {
        if !lv.active {
            return Condition::abnormal(format!("logical volume {}/{} is not active", lv.vg, lv.name));
        }
        if let Some(pool) = lv.pool.as_deref() {
            if let Some(reason) = self.groups.pool_full(report, &lv.vg, pool) {
                return Condition::abnormal(reason);
            }
        }
        Condition::healthy()
    }

    /// Room a thin pool has for `bytes` more of virtual size: pool size × ratio minus what
    /// its thin volumes already promise, and never when the pool is at its threshold.
    fn thin_room(&self, report: &Report, vg: &str, pool: &str, milli: u32) -> Result<u64> {
        let Some(p) = report.lvs.iter().find(|l| l.vg == vg && l.name == pool && l.is_thin_pool()) else {
            return Err(Error::invalid(
                "parameters",
                format!("thinPool {pool:?} does not exist in volume group {vg} or is not a thin pool"),
            ));
        };
        if let Some(reason) = self.groups.pool_full(report, vg, pool) {
            return Err(Error::PoolExhausted { object: format!("thin pool {vg}/{pool}"), reason });
        }
        let promised: u64 = report
            .lvs
            .iter()
            .filter(|l| l.vg == vg && l.pool.as_deref() == Some(pool) && l.is_thin_volume())
            .map(|l| l.size_bytes)
            .sum();
        let limit = (p.size_bytes as u128 * milli as u128 / 1000) as u64;
        Ok(limit.saturating_sub(promised))
    }

    /// Room for `bytes` more in the VG or thin pool `lvm` names, or RESOURCE_EXHAUSTED.
    fn check_room(&self, report: &Report, lvm: &LvmParams, bytes: u64, what: &str) -> Result<()> {
        let (room, place) = match &lvm.thin_pool {
            Some(pool) => (
                self.thin_room(report, &lvm.volume_group, pool, lvm.overprovision_milli)?,
                format!(
                    "thin pool {}/{pool} (overprovisioning {:.3}×)",
                    lvm.volume_group,
                    lvm.overprovision_milli as f64 / 1000.0
                ),
            ),
            None => {
                let free = report.vgs.iter().find(|v| v.name == lvm.volume_group).map_or(0, |v| v.free_bytes);
                (free, format!("volume group {}", lvm.volume_group))
            }
        };
        if bytes > room {
            return Err(Error::PoolExhausted {
                object: what.to_owned(),
                reason: format!("it needs {bytes} bytes, {place} has {room} left on node {}", self.node),
            });
        }
        Ok(())
    }

    fn new_lv_report(
        vg: &VgName,
        name: &LvName,
        size: u64,
        tag_list: &[super::names::Tag],
        pool: Option<&str>,
        active: bool,
    ) -> LvReport {
        // What `lvs` would now say of the LV this agent just made (not open).
        LvReport {
            vg: vg.as_str().to_owned(),
            name: name.as_str().to_owned(),
            uuid: String::new(),
            size_bytes: size,
            attr: match (pool.is_some(), active) {
                (true, true) => "Vwi-a-tz--",
                (true, false) => "Vwi---tz--",
                (false, _) => "-wi-a-----",
            }
            .to_owned(),
            segtype: if pool.is_some() { "thin" } else { "linear" }.to_owned(),
            tags: tag_list.iter().map(|t| t.as_str().to_owned()).collect(),
            pool: pool.map(str::to_owned),
            origin: None,
            data_percent: None,
            metadata_percent: None,
            active,
            path: Some(super::groups::device_path(vg.as_str(), name.as_str()).display().to_string()),
            dm_path: None,
        }
    }

    /// Takes the `fv.creating` tag off a finished LV (a group commit with the VG's other
    /// finishing creates; see `groups`).
    fn finish(&self, vg: &VgName, lv: &LvName) -> Result<()> {
        self.groups.finish_creating(vg, lv)
    }

    /// Removes an LV of ours (after a failed create, or debris of a crash).
    fn remove_lv(&self, vg: &VgName, lv: &LvName, object: &str) -> Result<()> {
        let out = self.groups.change(
            vg,
            |_| Ok(()),
            |cli| cli.remove(vg, lv),
            |r, _| apply::removed(r, vg.as_str(), lv.as_str()),
        )?;
        match out {
            Ok(()) => Ok(()),
            // Gone already (removed since the cached report was read): what was asked.
            Err(e) if e.refusal() == Some(super::cli::Refusal::LvNotFound) => Ok(()),
            Err(e) => Err(lvm_err("remove logical volume", object, e)),
        }
    }

    /// Fills a new LV from `origin` (or zeroes its head), freezing a live source filesystem
    /// during the copy so the copy is consistent, not merely crash-consistent.
    fn fill(&self, dst: &LvReport, origin: &Origin, thin_target: bool, object: &str) -> Result<()> {
        let dst_dev = super::groups::device_path(&dst.vg, &dst.name);
        match origin {
            Origin::Nothing => {
                if !thin_target {
                    blockdev::zero_head(&dst_dev, ZEROED_HEAD)
                        .map_err(|e| Error::system("zero new volume", object, e))?;
                }
                Ok(())
            }
            Origin::Lv { lv, volume } => {
                let src_vg = self.vg_name(lv)?;
                let src_lv = Self::lv_name(&lv.name)?;
                if !lv.active {
                    self.groups
                        .cli()
                        .activate(&src_vg, &src_lv)
                        .map_err(|e| lvm_err("activate copy source", format!("{}/{}", lv.vg, lv.name), e))?;
                }
                let mount_point = match volume {
                    Some(local) => self
                        .store
                        .read_node_state(Shelf::Lvm, local)
                        .map_err(|e| Error::system("read node state", object, e))?
                        .staged
                        .filter(|s| !s.block)
                        .map(|s| s.path)
                        .filter(|p| mountinfo::is_mount_point(p).unwrap_or(false)),
                    None => None,
                };
                let frozen = match &mount_point {
                    Some(mp) => Some(freeze::freeze(mp).map_err(|e| {
                        Error::system("freeze filesystem", format!("{object}: source at {}", mp.display()), e)
                    })?),
                    None => None,
                };
                let src_dev = super::groups::device_path(&lv.vg, &lv.name);
                let res = blockdev::copy_device(&src_dev, &dst_dev, lv.size_bytes, thin_target);
                if let Some(f) = frozen {
                    f.thaw().map_err(|e| Error::system("thaw filesystem", object, e))?;
                }
                let stats = res.map_err(|e| Error::system("copy logical volume", object, e))?;
                tracing::info!(object, written = stats.written, zero = stats.zero, "copied");
                Ok(())
            }
        }
    }

    /// Makes a new LV `name` in the place `lvm` names with `tag_list`, filled from `origin`.
    /// A thin snapshot is taken when source and target share the thin pool; anything else
    /// is a new LV and a copy. Whatever fails after `lvcreate` removes the new LV again.
    #[allow(clippy::too_many_arguments)]
    fn make_lv(
        &self,
        lvm: &LvmParams,
        vg: &VgName,
        name: &LvName,
        size: u64,
        tag_list: Vec<super::names::Tag>,
        origin: &Origin,
        object: &str,
        active: bool,
    ) -> Result<()> {
        let pool = lvm.thin_pool.as_deref();
        let snap_of = match (origin, pool) {
            (Origin::Lv { lv, .. }, Some(p)) if lv.vg == vg.as_str() && lv.pool.as_deref() == Some(p) => Some(lv),
            _ => None,
        };
        let needs_finish = tag_list.iter().any(|t| t.as_str() == tags::CREATING);
        let cached_tags = tag_list.clone();
        if let Some(src) = snap_of {
            let src_lv = Self::lv_name(&src.name)?;
            let created = self.groups.change(
                vg,
                |r| self.check_room(r, lvm, src.size_bytes, object),
                |cli| cli.create_thin_snapshot(vg, &src_lv, name, &tag_list),
                |r, _| apply::created(r, Self::new_lv_report(vg, name, src.size_bytes, &cached_tags, pool, false)),
            )?;
            created.map_err(|e| create_err("create thin snapshot", vg, name, object, e))?;
            let grown = if size > src.size_bytes {
                self.groups
                    .change(
                        vg,
                        |r| self.check_room(r, lvm, size - src.size_bytes, object),
                        |cli| cli.extend(vg, name, size),
                        |r, _| apply::resized(r, vg.as_str(), name.as_str(), size),
                    )
                    .and_then(|out| out.map_err(|e| lvm_err("extend logical volume", object, e)))
            } else {
                Ok(())
            };
            // A volume is active from its creation to its deletion, like every other; a thin
            // snapshot stays inactive, costing no device, until a restore reads it.
            let activated = grown.and_then(|_| {
                if !active {
                    return Ok(());
                }
                self.groups
                    .change(
                        vg,
                        |_| Ok(()),
                        |cli| cli.activate(vg, name),
                        |r, _| apply::activated(r, vg.as_str(), name.as_str()),
                    )
                    .and_then(|out| out.map_err(|e| lvm_err("activate logical volume", object, e)))
            });
            let done = activated.and_then(|_| if needs_finish { self.finish(vg, name) } else { Ok(()) });
            if let Err(e) = done {
                if let Err(undo) = self.remove_lv(vg, name, object) {
                    tracing::error!(object, lv = %format!("{vg}/{name}"), error = %undo, "could not remove the half-made logical volume; start-up clean-up will");
                }
                return Err(e);
            }
            return Ok(());
        }
        let created = self.groups.change(
            vg,
            |r| self.check_room(r, lvm, size, object),
            |cli| match pool {
                Some(p) => {
                    // Checked against LVM's rules when the parameters were parsed.
                    match LvName::parse(p) {
                        Ok(pool_lv) => cli.create_thin(vg, &pool_lv, name, size, &tag_list),
                        Err(source) => {
                            Err(super::cli::LvmError::Name { command: format!("lvcreate in pool {p:?}"), source })
                        }
                    }
                }
                None => cli.create_linear(vg, name, size, &tag_list),
            },
            |r, _| apply::created(r, Self::new_lv_report(vg, name, size, &cached_tags, pool, true)),
        )?;
        created.map_err(|e| create_err("create logical volume", vg, name, object, e))?;
        let dst = Self::new_lv_report(vg, name, size, &[], pool, true);
        let done = self.fill(&dst, origin, pool.is_some(), object).and_then(|_| {
            if needs_finish {
                self.finish(vg, name)
            } else {
                Ok(())
            }
        });
        if let Err(e) = done {
            if let Err(undo) = self.remove_lv(vg, name, object) {
                tracing::error!(object, error = %undo, "could not remove the half-made logical volume; start-up clean-up will");
            }
            return Err(e);
        }
        Ok(())
    }

    fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let id = self.volume_id(&req.local);
        let object = format!("volume {id}");
        let _g = self.lock_volume(&req.local, &id)?;
        // The source is guarded before it is looked at, so it cannot be deleted between the
        // check and the copy.
        let _src_guard = match &req.source {
            Some(Source::Volume(vid)) => Some(self.lock_volume(vid.local(), vid)?),
            Some(Source::Snapshot(sid)) => {
                Some(self.inflight.try_acquire(&snapshot_key(sid.local()), || format!("snapshot {sid}"))?)
            }
            None => None,
        };
        let foreign = match &req.source {
            Some(Source::Volume(v)) if v.family() != Family::Lvm => Some(("volume", v.family())),
            Some(Source::Snapshot(s)) if s.family() != Family::Lvm => Some(("snapshot", s.family())),
            _ => None,
        };
        if let Some((kind, family)) = foreign {
            return Err(Error::invalid(
                "volume_content_source",
                format!("volume {id}: an lvm volume cannot be made from a {kind} of the {} family", family.as_str()),
            ));
        }
        let lvm = req
            .params
            .lvm
            .clone()
            .ok_or_else(|| Error::invalid("parameters", format!("volume {id}: type lvm needs volumeGroup")))?;
        let fs_type_explicit = req.params.recorded.contains_key("fsType");
        // A thin pool fills as its volumes are written, which the cache cannot know: read
        // its use afresh before promising more of it.
        let report = if lvm.thin_pool.is_some() { self.groups.refresh()? } else { self.report()? };
        let (vg, vg_report) = self.groups.check_vg(&report, &lvm.volume_group)?;
        let extent = vg_report.extent_size_bytes;
        if let Some(pool) = &lvm.thin_pool {
            // Fails with a message naming the pool when it is missing.
            self.thin_room(&report, vg.as_str(), pool, lvm.overprovision_milli).or_else(|e| match e {
                Error::PoolExhausted { .. } => Ok(0),
                other => Err(other),
            })?;
        }

        // The source, checked before anything is made.
        let (source, origin, src_fs) = match &req.source {
            None => (None, Origin::Nothing, None),
            Some(Source::Snapshot(sid)) => {
                let found = (sid.family() == Family::Lvm && sid.node() == &self.node)
                    .then(|| self.find_snapshot(&report, sid.local()))
                    .transpose()?
                    .flatten();
                let snap = found.as_ref().and_then(|f| snapshot_record(f).map(|r| (f.lv.clone(), r)));
                let (lv, rec) = snap.ok_or_else(|| Error::SnapshotNotFound {
                    snapshot: sid.to_string(),
                    reason: "requested as the content source".into(),
                })?;
                (
                    Some(ContentSource::Snapshot(sid.to_string())),
                    Origin::Lv { lv: Box::new(lv), volume: None },
                    Some(rec.fs_type),
                )
            }
            Some(Source::Volume(vid)) => {
                let found = (vid.family() == Family::Lvm && vid.node() == &self.node)
                    .then(|| self.find_volume(&report, vid.local()))
                    .transpose()?
                    .flatten();
                let vol = found.as_ref().and_then(|f| volume_record(f).map(|r| (f.lv.clone(), r)));
                let (lv, rec) = vol.ok_or_else(|| Error::VolumeNotFound {
                    volume: vid.to_string(),
                    reason: "requested as the content source".into(),
                })?;
                (
                    Some(ContentSource::Volume(vid.to_string())),
                    Origin::Lv { lv: Box::new(lv), volume: Some(vid.local().clone()) },
                    Some(rec.fs_type),
                )
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

        let name = volume_lv(&req.local)?;
        // Among the VGs that are there: a missing one cannot hold a compatible volume (the
        // request names a VG that is present, or check_vg refused it above).
        if let Some(found) = self.groups.find(&report, &name) {
            match (&found.owned.content, found.owned.creating) {
                (Content::Volume(_), true) => {
                    // A create that died half-way (we hold the volume's guard, so no call is
                    // working on it): nothing was answered for it, so start over.
                    tracing::warn!(volume = %id, "removing a half-made logical volume left by an earlier attempt");
                    self.remove_lv(&self.vg_name(&found.lv)?, &name, &object)?;
                }
                (Content::Volume(_), false) => {
                    let existing = volume_record(&found).unwrap_or_else(|| unreachable!("checked above"));
                    return self.compare_existing(&req, existing, fs_type, &source);
                }
                (Content::Snapshot(_), _) | (Content::Unreadable(_), _) => {
                    return Err(Error::precondition(
                        &object,
                        format!(
                            "logical volume {}/{} carries our tag but is not a readable volume",
                            found.lv.vg, found.lv.name
                        ),
                    ))
                }
            }
        } else if let Some(foreign) = report.lvs.iter().find(|l| l.name == name.as_str() && l.vg == vg.as_str()) {
            return Err(Error::NameConflict {
                kind: "volume",
                name: req.name,
                reason: format!(
                    "logical volume {}/{} exists and was not made by this driver",
                    foreign.vg, foreign.name
                ),
            });
        }

        let src_size = match &origin {
            Origin::Lv { lv, .. } => Some(lv.size_bytes),
            Origin::Nothing => None,
        };
        let picked = match src_size {
            None => req.capacity.pick(fs_type.min_bytes(), &id.to_string())?,
            Some(src) => req.capacity.required.map_or(src, |r| r.div_ceil(MIB) * MIB).max(src),
        };
        let size = round_up(picked, extent);
        if req.capacity.limit.is_some_and(|l| size > l) {
            return Err(Error::CapacityOutOfRange {
                volume: id.to_string(),
                reason: format!(
                    "{size} bytes (whole extents of {extent} bytes{}) is above limit_bytes {}",
                    if src_size.is_some() { ", at least the content source's size" } else { "" },
                    req.capacity.limit.unwrap_or_default()
                ),
            });
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
        // A thin volume made from nothing is complete when lvcreate returns (it reads as
        // zeros): no `fv.creating`, one command.
        let creating = lvm.thin_pool.is_none() || !matches!(origin, Origin::Nothing);
        self.make_lv(
            &lvm,
            &vg,
            &name,
            size,
            tags::volume_tags(self.groups.owner(), &rec, creating),
            &origin,
            &object,
            true,
        )?;
        tracing::info!(volume = %id, vg = %vg.as_str(), size, fs = %fs_type, thin = lvm.thin_pool.is_some(), "volume created");
        Ok(rec)
    }

    fn compare_existing(
        &self,
        req: &NewVolume,
        existing: VolumeRecord,
        fs_type: FsType,
        source: &Option<ContentSource>,
    ) -> Result<VolumeRecord> {
        let conflict = if !req.capacity.admits(existing.capacity_bytes) {
            Some(format!("it has {} bytes, outside the requested capacity range", existing.capacity_bytes))
        } else if existing.fs_type != fs_type {
            Some(format!("it has filesystem {}, the request asks for {fs_type}", existing.fs_type))
        } else if &existing.source != source {
            Some(format!("it was made from {:?}, the request names {:?}", existing.source, source))
        } else if existing.parameters.iter().filter(|(k, _)| !k.starts_with(CO_PREFIX)).ne(req.params.identity().iter())
        {
            Some("it was created with other parameters".to_string())
        } else {
            None
        };
        match conflict {
            None => Ok(existing),
            Some(reason) => Err(Error::NameConflict { kind: "volume", name: req.name.clone(), reason }),
        }
    }

    fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let object = format!("volume {id}");
        let _g = self.lock_volume(id.local(), id)?;
        let report = self.report()?;
        let Some(found) = self.find_volume(&report, id.local())? else {
            self.forget_node_state(id.local(), &object)?;
            return Ok(());
        };
        let state = self
            .store
            .read_node_state(Shelf::Lvm, id.local())
            .map_err(|e| Error::system("read node state", &object, e))?;
        if let Some(st) = &state.staged {
            return Err(Error::precondition(
                &object,
                format!("it is still staged at {} on node {}; NodeUnstageVolume first", st.path.display(), self.node),
            ));
        }
        if !found.owned.published.is_empty() {
            return Err(Error::precondition(
                &object,
                format!(
                    "it is still ControllerPublished to {}; ControllerUnpublishVolume first",
                    found.owned.published.join(", ")
                ),
            ));
        }
        // Asked of the kernel, not of the cached report (whose open flag may be from before
        // an unstage): a mounted filesystem or any exclusive holder makes an O_EXCL open fail.
        // A plain open by some process is caught by lvremove's own refusal (also
        // FAILED_PRECONDITION).
        if blockdev::is_held(&found.device()).map_err(|e| Error::system("check device", &object, e))? {
            return Err(Error::precondition(
                &object,
                format!("logical volume {}/{} is in use (mounted or held open)", found.lv.vg, found.lv.name),
            ));
        }
        self.remove_lv(&self.vg_name(&found.lv)?, &volume_lv(id.local())?, &object)?;
        self.forget_node_state(id.local(), &object)?;
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    fn forget_node_state(&self, local: &LocalName, object: &str) -> Result<()> {
        self.store.remove_volume(Shelf::Lvm, local).map_err(|e| Error::system("remove node state", object, e))?;
        Ok(())
    }

    fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64> {
        let object = format!("volume {id}");
        let _g = self.lock_volume(id.local(), id)?;
        let report = self.report()?;
        let (found, rec) = self.require_volume(&report, id)?;
        let Some(required) = range.required else {
            return Err(Error::invalid("capacity_range", format!("required_bytes must be set to expand volume {id}")));
        };
        let current = rec.capacity_bytes;
        let extent = report.vgs.iter().find(|v| v.name == found.lv.vg).map_or(MIB, |v| v.extent_size_bytes);
        let want = round_up(required, extent);
        if required <= current {
            if range.limit.is_some_and(|l| current > l) {
                return Err(Error::CapacityOutOfRange {
                    volume: id.to_string(),
                    reason: format!("it already has {current} bytes, above limit_bytes; volumes never shrink"),
                });
            }
            return Ok(current);
        }
        if range.limit.is_some_and(|l| want > l) {
            return Err(Error::CapacityOutOfRange {
                volume: id.to_string(),
                reason: format!("{want} bytes (whole extents of {extent} bytes) is above limit_bytes"),
            });
        }
        let lvm = placed(&found.lv, &rec);
        let vg = self.vg_name(&found.lv)?;
        let name = volume_lv(id.local())?;
        self.groups
            .change(
                &vg,
                |r| self.check_room(r, &lvm, want - current, &object),
                |cli| cli.extend(&vg, &name, want),
                |r, _| apply::resized(r, vg.as_str(), name.as_str(), want),
            )?
            .or_else(|e| match e.refusal() {
                // Already that large (grown since the cached report was read): done.
                Some(super::cli::Refusal::SizeNotLarger) => {
                    self.groups.invalidate();
                    Ok(())
                }
                _ => Err(lvm_err("extend logical volume", &object, e)),
            })?;
        tracing::info!(volume = %id, size = want, "volume expanded");
        Ok(want)
    }

    fn set_published(&self, id: &VolumeId, node: &NodeId, published: bool) -> Result<()> {
        let object = format!("volume {id}");
        let _g = self.lock_volume(id.local(), id)?;
        let report = self.report()?;
        let (found, rec) = self.require_volume(&report, id)?;
        if rec.published_nodes.iter().any(|n| n == node.as_str()) == published {
            return Ok(());
        }
        let vg = self.vg_name(&found.lv)?;
        let name = volume_lv(id.local())?;
        let tag = [tags::published_tag(node.as_str())];
        let text = vec![tag[0].as_str().to_owned()];
        self.groups
            .change(
                &vg,
                |_| Ok(()),
                |cli| if published { cli.add_tags(&vg, &name, &tag) } else { cli.delete_tags(&vg, &name, &tag) },
                |r, _| {
                    if published {
                        apply::retagged(r, vg.as_str(), name.as_str(), &text, &[])
                    } else {
                        apply::retagged(r, vg.as_str(), name.as_str(), &[], &text)
                    }
                },
            )?
            .map_err(|e| lvm_err("record ControllerPublish", &object, e))
    }

    fn create_snapshot(&self, name: &str, local: &LocalName, source: &VolumeId) -> Result<SnapshotRecord> {
        let sid = SnapshotId::new(Family::Lvm, self.node.clone(), local.clone());
        let object = format!("snapshot {sid}");
        let _g = self.inflight.try_acquire_all(&[&snapshot_key(local), &volume_key(source.local())], || {
            format!("snapshot {sid} of volume {source}")
        })?;
        // Fresh, for a thin source's pool use (see create_volume).
        let report = self.groups.refresh()?;
        let lv_name = snapshot_lv(local)?;
        if let Some(found) = self.groups.find(&report, &lv_name) {
            match (&found.owned.content, found.owned.creating) {
                (Content::Snapshot(_), true) => {
                    tracing::warn!(snapshot = %sid, "removing a half-made snapshot left by an earlier attempt");
                    self.remove_lv(&self.vg_name(&found.lv)?, &lv_name, &object)?;
                }
                (Content::Snapshot(existing), false) => {
                    if existing.source_volume_id == source.to_string() {
                        return Ok(existing.clone());
                    }
                    return Err(Error::NameConflict {
                        kind: "snapshot",
                        name: name.to_owned(),
                        reason: format!("it is a snapshot of {}, not of {source}", existing.source_volume_id),
                    });
                }
                _ => {
                    return Err(Error::precondition(
                        &object,
                        format!(
                            "logical volume {}/{} carries our tag but is not a readable snapshot",
                            found.lv.vg, found.lv.name
                        ),
                    ))
                }
            }
        }
        let src = (source.family() == Family::Lvm && source.node() == &self.node)
            .then(|| self.find_volume(&report, source.local()))
            .transpose()?
            .flatten();
        let (found, vol) = src.as_ref().and_then(|f| volume_record(f).map(|r| (f.clone(), r))).ok_or_else(|| {
            Error::VolumeNotFound { volume: source.to_string(), reason: "requested as the snapshot source".into() }
        })?;
        let vg = self.vg_name(&found.lv)?;
        let (secs, nanos) = now();
        let rec = SnapshotRecord {
            id: sid.to_string(),
            name: name.to_owned(),
            source_volume_id: source.to_string(),
            size_bytes: found.lv.size_bytes,
            fs_type: vol.fs_type,
            created_unix: secs,
            created_nanos: nanos,
        };
        let thin = found.lv.pool.is_some();
        let params = placed(&found.lv, &vol);
        let origin = Origin::Lv { lv: Box::new(found.lv.clone()), volume: Some(source.local().clone()) };
        // A thin snapshot is whole when lvcreate returns (lvm suspends the origin, which
        // freezes its filesystem); a linear volume's snapshot is a copy, made under the tag.
        let tag_list = tags::snapshot_tags(self.groups.owner(), &rec, !thin);
        self.make_lv(&params, &vg, &lv_name, found.lv.size_bytes, tag_list, &origin, &object, false)?;
        tracing::info!(snapshot = %sid, volume = %source, thin, "snapshot created");
        Ok(rec)
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let object = format!("snapshot {id}");
        let _g = self.inflight.try_acquire(&snapshot_key(id.local()), || object.clone())?;
        let report = self.report()?;
        let Some(found) = self.find_snapshot(&report, id.local())? else { return Ok(()) };
        self.remove_lv(&self.vg_name(&found.lv)?, &snapshot_lv(id.local())?, &object)?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    fn capacity(&self, lvm: &LvmParams) -> Result<CapacityReport> {
        let report = if lvm.thin_pool.is_some() { self.groups.refresh()? } else { self.report()? };
        let (_, vg) = self.groups.check_vg(&report, &lvm.volume_group)?;
        let available = match &lvm.thin_pool {
            Some(pool) => match self.thin_room(&report, vg.name.as_str(), pool, lvm.overprovision_milli) {
                Ok(room) => room,
                Err(Error::PoolExhausted { .. }) => 0,
                Err(e) => return Err(e),
            },
            None => vg.free_bytes,
        };
        let unit = vg.extent_size_bytes.max(MIB);
        let available = available / unit * unit;
        Ok(CapacityReport { available, maximum_volume_size: available })
    }

    fn clean_up_debris(&self) -> Result<Vec<String>> {
        let report = self.groups.refresh()?;
        let mut notes = Vec::new();
        for found in self.groups.ours(&report) {
            let what = format!("{}/{}", found.lv.vg, found.lv.name);
            if let Content::Unreadable(reason) = &found.owned.content {
                notes.push(format!("logical volume {what} carries our tag but {reason}; left alone"));
                continue;
            }
            if !found.owned.creating {
                continue;
            }
            let vg = self.vg_name(&found.lv)?;
            let lv = Self::lv_name(&found.lv.name)?;
            match self.remove_lv(&vg, &lv, &what) {
                Ok(()) => notes.push(format!("removed {what}, half-made when the previous process stopped")),
                Err(e) => notes.push(format!("could not remove half-made {what}: {e}")),
            }
        }
        Ok(notes)
    }
}

#[async_trait]
impl NodeAgent for LvmAgent {
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
            let report = i.report()?;
            let (found, rec) = i.require_volume(&report, &id)?;
            Ok((rec, i.condition(&report, &found.lv)))
        })
        .await
    }

    async fn list_volumes(&self) -> Result<Vec<(VolumeRecord, Condition)>> {
        self.blocking(|i| {
            let report = i.report()?;
            let mut out: Vec<(VolumeRecord, Condition)> = i
                .groups
                .ours(&report)
                .iter()
                .filter_map(|f| volume_record(f).map(|r| (r, i.condition(&report, &f.lv))))
                .collect();
            out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            Ok(out)
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
        let found = self
            .blocking(move |i| {
                let report = i.report()?;
                Ok(i.find_snapshot(&report, &local)?.as_ref().and_then(snapshot_record))
            })
            .await?;
        found.ok_or_else(not_found)
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.blocking(|i| {
            let report = i.report()?;
            let mut out: Vec<SnapshotRecord> = i.groups.ours(&report).iter().filter_map(snapshot_record).collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
        .await
    }

    async fn capacity(&self, params: &VolumeParams) -> Result<CapacityReport> {
        let lvm = params
            .lvm
            .clone()
            .ok_or_else(|| Error::invalid("parameters", "GetCapacity of type lvm needs volumeGroup"))?;
        self.blocking(move |i| i.capacity(&lvm)).await
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
