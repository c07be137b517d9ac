//! The volume groups this node serves and one cached LVM report of them.
//!
//! Every lvm command costs a process and a metadata scan (0.3–1.5 s under emulation), so the
//! report of all served VGs is read with one `lvm fullreport`, cached, and kept current by
//! applying our own changes to it; it is read again when it is older than [`REPORT_TTL`]
//! (to notice an administrator's changes) or after a command failed. A create on the steady
//! path so costs the `lvcreate` and the removal of its `fv.creating` tag, nothing else.
//!
//! Changes to one VG are serialized by that VG's mutex, with the check of its free space,
//! so parallel creates cannot both take the last extents; changes to different VGs run in
//! parallel. A report refresh takes every VG's mutex, so it never sees half of a change that
//! is about to be applied to the cache a second time.
//!
//! The last step of a linear create, taking `fv.creating` off the finished LV, is a group
//! commit: every create of a VG that finishes while one such `lvchange` runs (or waits for
//! the VG) is done by the next one, for all of them at once. Under concurrent creates the
//! second command per create so shrinks to a few per burst.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferrovol_core::error::{Error, Result};

use super::cli::{LvmCli, LvmError, Refusal};
use super::names::{LvName, VgName};
use super::report::{LvReport, Report, VgReport};
use super::tags::{self, Owned, Owner};

/// How long a report is trusted without our own changes explaining the VG's state.
pub const REPORT_TTL: Duration = Duration::from_secs(15);

/// A logical volume of ours, found in the report.
#[derive(Debug, Clone)]
pub struct Found {
    pub lv: LvReport,
    pub owned: Owned,
}

impl Found {
    /// The device node of the LV, present while it is active.
    pub fn device(&self) -> PathBuf {
        device_path(&self.lv.vg, &self.lv.name)
    }
}

/// The device node of an LV: `/dev/mapper/<vg>-<lv>` with `-` doubled inside each name.
/// device-mapper makes this node itself; the `/dev/<vg>/<lv>` links come from udev, which a
/// minimal host or container may not run.
pub fn device_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from("/dev/mapper").join(format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--")))
}

/// Ends a group-commit batch whose runner panicked.
struct BatchEnd<'a> {
    batch: &'a Mutex<Finishing>,
    turn: &'a Condvar,
    lvs: &'a [LvName],
    armed: bool,
}

impl Drop for BatchEnd<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut b = lock(self.batch);
        b.running = false;
        for l in self.lvs {
            b.done.insert(l.as_str().to_owned(), Err("the lvchange batch failed unexpectedly".into()));
        }
        self.turn.notify_all();
    }
}

/// The group commit of `fv.creating` removals in one VG.
#[derive(Debug, Default)]
struct Finishing {
    /// LVs whose creates wait for the next `lvchange`.
    pending: Vec<LvName>,
    /// Whether a caller is running (or about to run) the `lvchange` for a batch.
    running: bool,
    /// Outcomes of finished batches, by LV name, until each waiter takes its own.
    done: HashMap<String, std::result::Result<(), String>>,
}

#[derive(Debug)]
struct Cached {
    at: Instant,
    report: Report,
}

/// The served volume groups and their cached report.
#[derive(Debug)]
pub struct VolumeGroups {
    cli: LvmCli,
    /// Whose LVs are ours: the driver name and node ID our tags carry.
    owner: Owner,
    served: Vec<VgName>,
    /// One mutex per served VG (sorted by name: refresh takes them in this order).
    locks: BTreeMap<String, Mutex<()>>,
    cache: Mutex<Option<Cached>>,
    /// Per served VG: the LVs waiting for their `fv.creating` to be taken off.
    finishing: BTreeMap<String, (Mutex<Finishing>, Condvar)>,
    /// Data or metadata use (percent) of a thin pool at which new thin volumes are refused
    /// and volumes in it are reported abnormal.
    pub thin_full_percent: f64,
}

/// An lvm failure as the driver's error, naming the operation and object: out of space is
/// RESOURCE_EXHAUSTED (another writer took the extents since our report), in use is
/// FAILED_PRECONDITION, anything else INTERNAL with lvm's own message.
pub fn lvm_err(op: &str, object: impl std::fmt::Display, e: LvmError) -> Error {
    match e.refusal() {
        Some(Refusal::NoSpace) => Error::PoolExhausted { object: object.to_string(), reason: format!("{op}: {e}") },
        Some(Refusal::InUse) => Error::precondition(object.to_string(), format!("{op}: {e}")),
        _ => Error::system(op, object, e),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VolumeGroups {
    /// Serves `served` VGs with lvm through `cli`, tagging LVs with `owner`.
    pub fn new(cli: LvmCli, owner: Owner, served: Vec<VgName>, thin_full_percent: f64) -> Self {
        let locks = served.iter().map(|v| (v.as_str().to_owned(), Mutex::new(()))).collect();
        let finishing = served
            .iter()
            .map(|v| (v.as_str().to_owned(), (Mutex::new(Finishing::default()), Condvar::new())))
            .collect();
        VolumeGroups { cli, owner, served, locks, cache: Mutex::new(None), finishing, thin_full_percent }
    }

    /// Whose LVs are ours.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The VGs this node serves.
    pub fn served(&self) -> &[VgName] {
        &self.served
    }

    /// The lvm CLI.
    pub fn cli(&self) -> &LvmCli {
        &self.cli
    }

    /// A current report: the cached one if it is younger than the TTL, else a fresh one.
    pub fn report(&self) -> Result<Report> {
        {
            let cache = lock(&self.cache);
            if let Some(c) = cache.as_ref().filter(|c| c.at.elapsed() < REPORT_TTL) {
                return Ok(c.report.clone());
            }
        }
        self.refresh()
    }

    /// Reads the report now (waiting for changes in progress to finish first). A served VG
    /// that does not exist fails lvm's whole report; then each VG is read alone and the
    /// missing ones are left out, so the others keep working and a request naming a missing
    /// one is told so by [`VolumeGroups::check_vg`].
    pub fn refresh(&self) -> Result<Report> {
        let _all: Vec<MutexGuard<'_, ()>> = self.locks.values().map(lock).collect();
        let object = || format!("volume groups {}", self.served_list());
        let report = match self.cli.report(&self.served) {
            Ok(r) => r,
            Err(e) if e.refusal() == Some(Refusal::VgNotFound) => {
                let mut merged = Report::default();
                for vg in &self.served {
                    match self.cli.report(std::slice::from_ref(vg)) {
                        Ok(r) => {
                            merged.vgs.extend(r.vgs);
                            merged.lvs.extend(r.lvs);
                        }
                        Err(e) if e.refusal() == Some(Refusal::VgNotFound) => {
                            tracing::warn!(vg = vg.as_str(), "a served volume group does not exist");
                        }
                        Err(e) => return Err(lvm_err("read LVM report", object(), e)),
                    }
                }
                merged
            }
            Err(e) => return Err(lvm_err("read LVM report", object(), e)),
        };
        *lock(&self.cache) = Some(Cached { at: Instant::now(), report: report.clone() });
        Ok(report)
    }

    /// Forgets the cached report (after a command failed: the VG may be in any state).
    pub fn invalidate(&self) {
        *lock(&self.cache) = None;
    }

    fn served_list(&self) -> String {
        self.served.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Checks a VG named by a request: one we serve and that exists.
    pub fn check_vg<'r>(&self, report: &'r Report, name: &str) -> Result<(VgName, &'r VgReport)> {
        let Some(vg) = self.served.iter().find(|v| v.as_str() == name) else {
            return Err(Error::invalid(
                "parameters",
                format!(
                    "volumeGroup {name:?} is not a volume group this node serves (served: {}; see --lvm-volume-group)",
                    self.served_list()
                ),
            ));
        };
        let Some(rep) = report.vgs.iter().find(|v| v.name == name) else {
            return Err(Error::invalid(
                "parameters",
                format!("volumeGroup {name:?} does not exist on this node (vgs does not list it)"),
            ));
        };
        Ok((vg.clone(), rep))
    }

    /// Served VGs the report does not have (their disks missing).
    pub fn missing(&self, report: &Report) -> Vec<String> {
        self.served
            .iter()
            .filter(|v| !report.vgs.iter().any(|r| r.name == v.as_str()))
            .map(|v| v.as_str().to_owned())
            .collect()
    }

    /// Our LV named `name` in any served VG.
    pub fn find(&self, report: &Report, name: &LvName) -> Option<Found> {
        report
            .lvs
            .iter()
            .filter(|lv| lv.name == name.as_str())
            .find_map(|lv| tags::decode(&self.owner, &lv.tags).map(|owned| Found { lv: lv.clone(), owned }))
    }

    /// Every LV of ours, sorted by LV name.
    pub fn ours(&self, report: &Report) -> Vec<Found> {
        let mut out: Vec<Found> = report
            .lvs
            .iter()
            .filter_map(|lv| tags::decode(&self.owner, &lv.tags).map(|owned| Found { lv: lv.clone(), owned }))
            .collect();
        out.sort_by(|a, b| a.lv.name.cmp(&b.lv.name));
        out
    }

    /// Data and metadata use of a thin pool, in percent, if the report has it.
    pub fn pool_use(report: &Report, vg: &str, pool: &str) -> Option<(f64, f64)> {
        let p = report.lvs.iter().find(|l| l.vg == vg && l.name == pool && l.is_thin_pool())?;
        Some((p.data_percent.unwrap_or(0.0), p.metadata_percent.unwrap_or(0.0)))
    }

    /// Why a thin pool takes no new volumes (data or metadata use at the threshold), if so.
    pub fn pool_full(&self, report: &Report, vg: &str, pool: &str) -> Option<String> {
        let (data, meta) = Self::pool_use(report, vg, pool)?;
        let limit = self.thin_full_percent;
        (data >= limit || meta >= limit).then(|| {
            format!(
                "thin pool {vg}/{pool} is {data:.1}% full of data and {meta:.1}% of metadata (limit {limit:.0}%); extend the pool"
            )
        })
    }

    /// Takes `fv.creating` off `lv` (its content is complete), in one `lvchange` with every
    /// other LV of `vg` finishing meanwhile. Returns once `lv`'s tag is gone, or with the
    /// batch's error.
    pub fn finish_creating(&self, vg: &VgName, lv: &LvName) -> Result<()> {
        let object = || format!("logical volume {vg}/{lv}");
        let Some((batch, turn)) = self.finishing.get(vg.as_str()) else {
            return Err(Error::system("finish logical volume", object(), "its volume group is not served"));
        };
        let mut b = lock(batch);
        b.pending.push(lv.clone());
        loop {
            if let Some(outcome) = b.done.remove(lv.as_str()) {
                return outcome.map_err(|reason| Error::system("finish logical volume", object(), reason));
            }
            if b.running {
                b = turn.wait(b).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // This caller runs the next batch: everything pending now, its own LV included.
            b.running = true;
            let lvs = std::mem::take(&mut b.pending);
            drop(b);
            // Should anything below panic, the batch still ends: its waiters get an error and
            // the next finisher runs, instead of every create of the VG waiting forever.
            let mut unwinding = BatchEnd { batch, turn, lvs: &lvs, armed: true };
            let done = [tags::creating_tag()];
            let removed = [tags::CREATING.to_owned()];
            let outcome = self
                .change(
                    vg,
                    |_| Ok(()),
                    |cli| cli.delete_tags_from_many(vg, &lvs, &done),
                    |r, _| {
                        for l in &lvs {
                            apply::retagged(r, vg.as_str(), l.as_str(), &[], &removed);
                        }
                    },
                )
                .and_then(|out| out.map_err(|e| lvm_err("finish logical volumes", vg, e)))
                .map_err(|e| e.to_string());
            unwinding.armed = false;
            b = lock(batch);
            b.running = false;
            for l in &lvs {
                b.done.insert(l.as_str().to_owned(), outcome.clone());
            }
            turn.notify_all();
        }
    }

    /// Runs one changing command on `vg` under its mutex, after `check` approved it against
    /// the cached report, and applies `update` to the cache when it succeeded. On failure the
    /// cache is dropped: the VG may be in any state.
    pub fn change<T>(
        &self,
        vg: &VgName,
        check: impl FnOnce(&Report) -> Result<()>,
        run: impl FnOnce(&LvmCli) -> std::result::Result<T, LvmError>,
        update: impl FnOnce(&mut Report, &T),
    ) -> Result<std::result::Result<T, LvmError>> {
        let report = self.report()?;
        let _vg = self.locks.get(vg.as_str()).map(lock);
        // Within the VG's mutex, the cache holds every change made to this VG so far.
        let current = lock(&self.cache).as_ref().map(|c| c.report.clone()).unwrap_or(report);
        check(&current)?;
        let out = run(&self.cli);
        let mut cache = lock(&self.cache);
        match &out {
            Ok(v) => {
                if let Some(c) = cache.as_mut() {
                    update(&mut c.report, v);
                }
            }
            Err(_) => *cache = None,
        }
        Ok(out)
    }
}

/// Cache updates for the changes the agent makes.
pub mod apply {
    use super::*;

    /// A new LV (linear: the VG loses its extents; thin: the pool's promise grows).
    pub fn created(report: &mut Report, lv: LvReport) {
        if lv.is_linear() {
            if let Some(vg) = report.vgs.iter_mut().find(|v| v.name == lv.vg) {
                vg.free_bytes = vg.free_bytes.saturating_sub(lv.size_bytes);
            }
        }
        report.lvs.retain(|l| !(l.vg == lv.vg && l.name == lv.name));
        report.lvs.push(lv);
    }

    /// An LV removed.
    pub fn removed(report: &mut Report, vg: &str, name: &str) {
        if let Some(pos) = report.lvs.iter().position(|l| l.vg == vg && l.name == name) {
            let lv = report.lvs.remove(pos);
            if lv.is_linear() {
                if let Some(v) = report.vgs.iter_mut().find(|v| v.name == vg) {
                    v.free_bytes = v.free_bytes.saturating_add(lv.size_bytes);
                }
            }
        }
    }

    /// An LV grown to `size`.
    pub fn resized(report: &mut Report, vg: &str, name: &str, size: u64) {
        let Some(lv) = report.lvs.iter_mut().find(|l| l.vg == vg && l.name == name) else { return };
        let grown = size.saturating_sub(lv.size_bytes);
        lv.size_bytes = size;
        if lv.is_linear() {
            if let Some(v) = report.vgs.iter_mut().find(|v| v.name == vg) {
                v.free_bytes = v.free_bytes.saturating_sub(grown);
            }
        }
    }

    /// An LV activated.
    pub fn activated(report: &mut Report, vg: &str, name: &str) {
        if let Some(lv) = report.lvs.iter_mut().find(|l| l.vg == vg && l.name == name) {
            lv.active = true;
        }
    }

    /// Tags added to and removed from an LV.
    pub fn retagged(report: &mut Report, vg: &str, name: &str, add: &[String], remove: &[String]) {
        let Some(lv) = report.lvs.iter_mut().find(|l| l.vg == vg && l.name == name) else { return };
        lv.tags.retain(|t| !remove.contains(t));
        for t in add {
            if !lv.tags.contains(t) {
                lv.tags.push(t.clone());
            }
        }
    }
}
