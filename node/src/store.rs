//! The loop family's on-disk store: one directory per volume or snapshot under the data dir,
//! holding the sparse image and the JSON records that are the volume's only durable state.
//!
//! ```text
//! <data-dir>/volumes/<local>/image        the volume's sparse image
//! <data-dir>/volumes/<local>/volume.json  VolumeRecord (what the controller made)
//! <data-dir>/volumes/<local>/node.json    NodeState (where the node staged/published it)
//! <data-dir>/ephemeral/<local>/...        inline ephemeral volumes, same layout
//! <data-dir>/ephemeral/<local>.gone       tombstone of a deleted ephemeral volume (a day)
//! <data-dir>/snapshots/<local>/image      the snapshot's image (reflink or sparse copy)
//! <data-dir>/snapshots/<local>/snapshot.json
//! <data-dir>/tmp/                         work area; anything here at start-up is debris
//! ```
//!
//! A volume appears atomically: it is built in `tmp/` and renamed into place, so a crash
//! or a failed CreateVolume never leaves a half-made volume where lookups see it. Deletion
//! renames it back into `tmp/` first for the same reason. Records are written to a temp
//! file, fsynced and renamed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferrovol_core::ids::LocalName;
use ferrovol_core::volume::{AccessMode, SnapshotRecord, VolumeRecord};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Which directory a volume lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelf {
    /// Volumes made by CreateVolume.
    Volumes,
    /// Inline ephemeral volumes made by NodePublishVolume.
    Ephemeral,
    /// The node's mount state of LVM volumes (only `node.json`: the volume is its LV).
    Lvm,
}

/// Where the node staged a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub path: PathBuf,
    pub block: bool,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

/// One NodePublish target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub target: PathBuf,
    pub read_only: bool,
    pub block: bool,
    pub access_mode: AccessMode,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

/// The node's durable view of one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    #[serde(default)]
    pub staged: Option<Staged>,
    #[serde(default)]
    pub published: Vec<Published>,
}

/// The data dir of the loop family.
#[derive(Debug, Clone)]
pub struct LoopStore {
    root: PathBuf,
}

const IMAGE: &str = "image";
const VOLUME_RECORD: &str = "volume.json";
const NODE_RECORD: &str = "node.json";
const SNAPSHOT_RECORD: &str = "snapshot.json";

impl LoopStore {
    /// Opens (and lays out) the store, clearing debris a crash left in `tmp/`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for d in ["volumes", "ephemeral", "snapshots", "lvm", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        let root = root.canonicalize()?;
        let store = LoopStore { root };
        store.clear_tmp()?;
        store.prune_tombstones()?;
        Ok(store)
    }

    fn tombstone_path(&self, local: &LocalName) -> PathBuf {
        self.shelf_dir(Shelf::Ephemeral).join(format!("{local}.gone"))
    }

    /// Marks an inline ephemeral volume as deleted, so that a repeated NodeUnpublishVolume
    /// (whose first answer was lost) is told OK rather than NOT_FOUND.
    pub fn bury_ephemeral(&self, local: &LocalName) -> io::Result<()> {
        File::create(self.tombstone_path(local))?.sync_all()?;
        sync_dir(&self.shelf_dir(Shelf::Ephemeral))
    }

    /// Whether an inline ephemeral volume of this name was deleted recently.
    pub fn ephemeral_buried(&self, local: &LocalName) -> bool {
        self.tombstone_path(local).exists()
    }

    /// Forgets a tombstone (a new ephemeral volume of the same name is being made).
    pub fn unbury_ephemeral(&self, local: &LocalName) -> io::Result<()> {
        match fs::remove_file(self.tombstone_path(local)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Tombstones last a day: the kubelet retries an unpublish for minutes, not days.
    fn prune_tombstones(&self) -> io::Result<()> {
        let day = std::time::Duration::from_secs(24 * 3600);
        for e in fs::read_dir(self.shelf_dir(Shelf::Ephemeral))? {
            let e = e?;
            if !e.file_name().to_string_lossy().ends_with(".gone") {
                continue;
            }
            let old = e.metadata()?.modified()?.elapsed().is_ok_and(|age| age > day);
            if old {
                fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    /// The canonical data dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clear_tmp(&self) -> io::Result<()> {
        for e in fs::read_dir(self.root.join("tmp"))? {
            let p = e?.path();
            if p.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    fn shelf_dir(&self, shelf: Shelf) -> PathBuf {
        self.root.join(match shelf {
            Shelf::Volumes => "volumes",
            Shelf::Ephemeral => "ephemeral",
            Shelf::Lvm => "lvm",
        })
    }

    /// The directory of a volume (whether or not it exists).
    pub fn volume_dir(&self, shelf: Shelf, local: &LocalName) -> PathBuf {
        self.shelf_dir(shelf).join(local.as_str())
    }

    /// The image of a volume.
    pub fn volume_image(&self, shelf: Shelf, local: &LocalName) -> PathBuf {
        self.volume_dir(shelf, local).join(IMAGE)
    }

    fn snapshot_dir(&self, local: &LocalName) -> PathBuf {
        self.root.join("snapshots").join(local.as_str())
    }

    /// The image of a snapshot.
    pub fn snapshot_image(&self, local: &LocalName) -> PathBuf {
        self.snapshot_dir(local).join(IMAGE)
    }

    /// A fresh, empty work directory in `tmp/`, removed on drop unless committed.
    pub fn work_dir(&self, purpose: &str) -> io::Result<WorkDir> {
        let path = self.root.join("tmp").join(format!("{purpose}.{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir(&path)?;
        Ok(WorkDir { path: Some(path) })
    }

    /// Moves a finished work dir into place as volume `local`. Fails if it exists.
    pub fn commit_volume(&self, work: WorkDir, shelf: Shelf, local: &LocalName) -> io::Result<()> {
        let target = self.volume_dir(shelf, local);
        work.commit(&target)
    }

    /// Moves a finished work dir into place as snapshot `local`.
    pub fn commit_snapshot(&self, work: WorkDir, local: &LocalName) -> io::Result<()> {
        work.commit(&self.snapshot_dir(local))
    }

    /// Reads a volume's record; `None` if the volume does not exist.
    pub fn read_volume(&self, shelf: Shelf, local: &LocalName) -> io::Result<Option<VolumeRecord>> {
        read_json(&self.volume_dir(shelf, local).join(VOLUME_RECORD))
    }

    /// Replaces a volume's record.
    pub fn write_volume(&self, shelf: Shelf, local: &LocalName, rec: &VolumeRecord) -> io::Result<()> {
        write_json(&self.volume_dir(shelf, local), VOLUME_RECORD, rec)
    }

    /// Reads the node's state for a volume (default when never staged).
    pub fn read_node_state(&self, shelf: Shelf, local: &LocalName) -> io::Result<NodeState> {
        Ok(read_json(&self.volume_dir(shelf, local).join(NODE_RECORD))?.unwrap_or_default())
    }

    /// Replaces the node's state for a volume. On the LVM shelf the volume's directory holds
    /// only this record, so the first write makes it.
    pub fn write_node_state(&self, shelf: Shelf, local: &LocalName, st: &NodeState) -> io::Result<()> {
        let dir = self.volume_dir(shelf, local);
        if shelf == Shelf::Lvm && !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            sync_dir(&self.shelf_dir(shelf))?;
        }
        write_json(&dir, NODE_RECORD, st)
    }

    /// Local names with node state on a shelf, sorted.
    pub fn node_state_names(&self, shelf: Shelf) -> io::Result<Vec<LocalName>> {
        list_names(&self.shelf_dir(shelf))
    }

    /// Removes a volume: renamed into `tmp/` (atomic disappearance), then deleted.
    pub fn remove_volume(&self, shelf: Shelf, local: &LocalName) -> io::Result<bool> {
        self.remove_dir_atomically(&self.volume_dir(shelf, local), "deleting")
    }

    /// Removes a snapshot.
    pub fn remove_snapshot(&self, local: &LocalName) -> io::Result<bool> {
        self.remove_dir_atomically(&self.snapshot_dir(local), "deleting")
    }

    fn remove_dir_atomically(&self, dir: &Path, purpose: &str) -> io::Result<bool> {
        let grave = self.root.join("tmp").join(format!("{purpose}.{}", uuid::Uuid::new_v4().simple()));
        match fs::rename(dir, &grave) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        fs::remove_dir_all(&grave)?;
        Ok(true)
    }

    /// Reads a snapshot's record; `None` if it does not exist.
    pub fn read_snapshot(&self, local: &LocalName) -> io::Result<Option<SnapshotRecord>> {
        read_json(&self.snapshot_dir(local).join(SNAPSHOT_RECORD))
    }

    /// Every volume on a shelf, sorted by local name.
    pub fn list_volumes(&self, shelf: Shelf) -> io::Result<Vec<(LocalName, VolumeRecord)>> {
        let mut out = Vec::new();
        for name in list_names(&self.shelf_dir(shelf))? {
            if let Some(rec) = self.read_volume(shelf, &name)? {
                out.push((name, rec));
            }
        }
        Ok(out)
    }

    /// Every snapshot, sorted by local name.
    pub fn list_snapshots(&self) -> io::Result<Vec<(LocalName, SnapshotRecord)>> {
        let mut out = Vec::new();
        for name in list_names(&self.root.join("snapshots"))? {
            if let Some(rec) = self.read_snapshot(&name)? {
                out.push((name, rec));
            }
        }
        Ok(out)
    }

    /// Bytes promised to existing volumes but not yet allocated in their sparse images:
    /// free space that is already spoken for.
    pub fn unallocated_promises(&self) -> io::Result<u64> {
        let mut total = 0u64;
        for shelf in [Shelf::Volumes, Shelf::Ephemeral] {
            for (local, rec) in self.list_volumes(shelf)? {
                let allocated = match fs::metadata(self.volume_image(shelf, &local)) {
                    Ok(m) => m.blocks() * 512,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                    Err(e) => return Err(e),
                };
                total = total.saturating_add(rec.capacity_bytes.saturating_sub(allocated));
            }
        }
        Ok(total)
    }
}

/// A directory being built in `tmp/`; removed on drop unless committed.
#[derive(Debug)]
pub struct WorkDir {
    path: Option<PathBuf>,
}

impl WorkDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Writes a JSON record into the work dir.
    pub fn write_record<T: Serialize>(&self, name: &str, value: &T) -> io::Result<()> {
        write_json(self.path(), name, value)
    }

    fn commit(mut self, target: &Path) -> io::Result<()> {
        let Some(path) = self.path.take() else { return Err(io::Error::other("work dir already committed")) };
        sync_dir(&path)?;
        // rename(2) of a directory onto an existing non-empty directory fails, so a
        // concurrent creator of the same name can never be overwritten.
        if let Err(e) = fs::rename(&path, target) {
            let _ = fs::remove_dir_all(&path);
            return Err(e);
        }
        if let Some(parent) = target.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// The record file names, for callers building a work dir.
pub mod records {
    pub const VOLUME: &str = super::VOLUME_RECORD;
    pub const SNAPSHOT: &str = super::SNAPSHOT_RECORD;
    pub const IMAGE: &str = super::IMAGE;
}

fn list_names(dir: &Path) -> io::Result<Vec<LocalName>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only directories whose names are valid local names (kept or hashed) are ours.
        if let Some(local) = LocalName::parse(name) {
            names.push(local);
        }
    }
    names.sort();
    Ok(names)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrovol_core::volume::FsType;

    fn rec(id: &str, cap: u64) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: id.into(),
            capacity_bytes: cap,
            fs_type: FsType::Ext4,
            source: None,
            parameters: Default::default(),
            created_unix: 0,
            published_nodes: vec![],
        }
    }

    #[test]
    fn a_volume_appears_only_when_committed() {
        let d = tempfile::tempdir().unwrap();
        let s = LoopStore::open(d.path()).unwrap();
        let local = LocalName::from_co_name("pvc-a");
        let w = s.work_dir("create").unwrap();
        w.write_record(records::VOLUME, &rec("a", 1 << 20)).unwrap();
        assert!(s.read_volume(Shelf::Volumes, &local).unwrap().is_none());
        s.commit_volume(w, Shelf::Volumes, &local).unwrap();
        assert_eq!(s.read_volume(Shelf::Volumes, &local).unwrap().unwrap().id, "a");
        // A second commit of the same name fails and leaves no debris.
        let w = s.work_dir("create").unwrap();
        assert!(s.commit_volume(w, Shelf::Volumes, &local).is_err());
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(s.list_volumes(Shelf::Volumes).unwrap().len(), 1);
        assert!(s.remove_volume(Shelf::Volumes, &local).unwrap());
        assert!(!s.remove_volume(Shelf::Volumes, &local).unwrap());
    }

    #[test]
    fn volumes_with_hashed_names_are_listed() {
        let d = tempfile::tempdir().unwrap();
        let s = LoopStore::open(d.path()).unwrap();
        let local = LocalName::from_co_name("Not A DNS Label");
        assert!(local.as_str().starts_with("h_"));
        let w = s.work_dir("create").unwrap();
        w.write_record(records::VOLUME, &rec("hashed", 1 << 20)).unwrap();
        s.commit_volume(w, Shelf::Volumes, &local).unwrap();
        let listed = s.list_volumes(Shelf::Volumes).unwrap();
        assert_eq!(listed.len(), 1, "a volume whose CO name was hashed is still listed");
        assert_eq!(listed[0].0, local);
    }

    #[test]
    fn dropped_work_dirs_and_crash_debris_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = LoopStore::open(d.path()).unwrap();
        let w = s.work_dir("create").unwrap();
        let p = w.path().to_path_buf();
        drop(w);
        assert!(!p.exists());
        fs::create_dir(d.path().join("tmp/leftover")).unwrap();
        LoopStore::open(d.path()).unwrap();
        assert!(!d.path().join("tmp/leftover").exists());
    }

    #[test]
    fn promises_count_unallocated_bytes() {
        let d = tempfile::tempdir().unwrap();
        let s = LoopStore::open(d.path()).unwrap();
        let local = LocalName::from_co_name("pvc-b");
        let w = s.work_dir("create").unwrap();
        w.write_record(records::VOLUME, &rec("b", 64 << 20)).unwrap();
        File::create(w.path().join(records::IMAGE)).unwrap().set_len(64 << 20).unwrap();
        s.commit_volume(w, Shelf::Volumes, &local).unwrap();
        let p = s.unallocated_promises().unwrap();
        assert!(p > 60 << 20 && p <= 64 << 20, "{p}");
    }
}
