//! An in-memory `Kernel` for unit tests: it records attached loop devices and mounts, and can
//! be told to fail any one operation, so the failure paths of `stage.rs` (what is undone, what
//! is recorded) can be checked without root. The real kernel is covered by the e2e suites.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::mount::MsFlags;

use super::Kernel;
use crate::fs::Probe;
use crate::sys::loopdev::{ImageId, LoopDevice};
use crate::sys::mountinfo::MountEntry;

/// An operation of the fake that a test can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Attach,
    Detach,
    SetCapacity,
    Probe,
    MountFs,
    Bind,
    Unmount,
}

#[derive(Debug, Clone)]
struct Device {
    image: PathBuf,
    id: ImageId,
    read_only: bool,
}

#[derive(Debug, Clone)]
struct Mount {
    source: PathBuf,
    target: PathBuf,
    /// `/loopN` for a device node bound onto a file (as devtmpfs shows it), else `/`.
    root: PathBuf,
    fs_type: String,
    read_only: bool,
}

#[derive(Debug, Default)]
struct State {
    next_number: u32,
    devices: BTreeMap<u32, Device>,
    mounts: Vec<Mount>,
    /// What `probe` finds on a device, by image path; absent means blank.
    contents: HashMap<PathBuf, Probe>,
    failing: HashSet<Op>,
    /// How many times each operation was called (including failed calls).
    calls: HashMap<Op, usize>,
}

/// The fake kernel. Device numbers are never reused, so a stale number cannot alias.
#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

fn injected(op: Op) -> io::Error {
    io::Error::other(format!("injected failure of {op:?}"))
}

fn number_of(device: &Path) -> Option<u32> {
    device.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

impl FakeKernel {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock already failed; its state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call and answers the injected failure, if any.
    fn enter(&self, op: Op) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        *st.calls.entry(op).or_default() += 1;
        if st.failing.contains(&op) {
            return Err(injected(op));
        }
        Ok(st)
    }

    /// Makes every later call of `op` fail.
    pub fn fail(&self, op: Op) {
        self.lock().failing.insert(op);
    }

    /// Lets `op` succeed again.
    pub fn heal(&self, op: Op) {
        self.lock().failing.remove(&op);
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Makes `probe` find `what` on any device serving `image`.
    pub fn set_content(&self, image: &Path, what: Probe) {
        self.lock().contents.insert(image.to_path_buf(), what);
    }

    /// The attached devices and their images, by device number.
    pub fn attached(&self) -> Vec<(LoopDevice, PathBuf)> {
        self.lock().devices.iter().map(|(n, d)| (LoopDevice { number: *n }, d.image.clone())).collect()
    }

    /// How many mounts are stacked at `target`.
    pub fn mounts_at(&self, target: &Path) -> usize {
        self.lock().mounts.iter().filter(|m| m.target == target).count()
    }

    /// Every mount, as (source, target).
    pub fn mounts(&self) -> Vec<(PathBuf, PathBuf)> {
        self.lock().mounts.iter().map(|m| (m.source.clone(), m.target.clone())).collect()
    }
}

impl Kernel for FakeKernel {
    fn attach(&self, image: &Path, read_only: bool) -> io::Result<LoopDevice> {
        let mut st = self.enter(Op::Attach)?;
        // The real attach opens the image, so a missing image fails here too.
        let id = ImageId::of(image)?;
        let number = st.next_number;
        st.next_number += 1;
        st.devices.insert(number, Device { image: image.to_path_buf(), id, read_only });
        Ok(LoopDevice { number })
    }

    fn find_by_backing(&self, image: &Path) -> io::Result<Option<LoopDevice>> {
        let st = self.lock();
        Ok(st.devices.iter().find(|(_, d)| d.image == image && !d.read_only).map(|(n, _)| LoopDevice { number: *n }))
    }

    fn detach(&self, dev: &LoopDevice) -> io::Result<()> {
        let mut st = self.enter(Op::Detach)?;
        st.devices.remove(&dev.number).map(|_| ()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))
    }

    fn detach_if_attached_to(&self, dev: &LoopDevice, image: ImageId) -> io::Result<bool> {
        let mut st = self.enter(Op::Detach)?;
        if st.devices.get(&dev.number).is_some_and(|d| d.id == image) {
            st.devices.remove(&dev.number);
            return Ok(true);
        }
        Ok(false)
    }

    fn set_capacity(&self, dev: &LoopDevice) -> io::Result<()> {
        let st = self.enter(Op::SetCapacity)?;
        if st.devices.contains_key(&dev.number) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ENXIO))
        }
    }

    fn device_size(&self, dev: &LoopDevice) -> io::Result<u64> {
        let image = self.lock().devices.get(&dev.number).map(|d| d.image.clone());
        let image = image.ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))?;
        Ok(fs::metadata(image)?.len())
    }

    fn read_only(&self, dev: &LoopDevice) -> bool {
        self.lock().devices.get(&dev.number).is_some_and(|d| d.read_only)
    }

    fn probe(&self, device: &Path) -> io::Result<Probe> {
        let st = self.enter(Op::Probe)?;
        let image = number_of(device)
            .and_then(|n| st.devices.get(&n))
            .map(|d| d.image.clone())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))?;
        Ok(st.contents.get(&image).cloned().unwrap_or(Probe::Blank))
    }

    fn mount_fs(&self, source: &Path, target: &Path, fs_type: &str, flags: MsFlags, _data: &str) -> io::Result<()> {
        let mut st = self.enter(Op::MountFs)?;
        if !number_of(source).is_some_and(|n| st.devices.contains_key(&n)) {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        st.mounts.push(Mount {
            source: source.to_path_buf(),
            target: target.to_path_buf(),
            root: PathBuf::from("/"),
            fs_type: fs_type.to_owned(),
            read_only: flags.contains(MsFlags::MS_RDONLY),
        });
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool, _extra: MsFlags) -> io::Result<()> {
        let mut st = self.enter(Op::Bind)?;
        let (root, fs_type) = match number_of(source) {
            Some(n) => (PathBuf::from(format!("/loop{n}")), "devtmpfs".to_owned()),
            None => {
                // A bind of a directory shows the filesystem mounted there.
                let under = st.mounts.iter().rev().find(|m| m.target == source).map(|m| m.fs_type.clone());
                (PathBuf::from("/"), under.unwrap_or_else(|| "tmpfs".to_owned()))
            }
        };
        st.mounts.push(Mount { source: source.to_path_buf(), target: target.to_path_buf(), root, fs_type, read_only });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<bool> {
        let mut st = self.enter(Op::Unmount)?;
        match st.mounts.iter().rposition(|m| m.target == target) {
            Some(i) => {
                st.mounts.remove(i);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>> {
        let st = self.lock();
        Ok(st.mounts.iter().enumerate().rev().find(|(_, m)| m.target == path).map(|(i, m)| MountEntry {
            mount_id: 1000 + i as u32,
            parent_id: 1,
            major: 7,
            minor: number_of(&m.source).unwrap_or(0),
            root: m.root.clone(),
            mount_point: m.target.clone(),
            options: if m.read_only { "ro" } else { "rw" }.to_owned(),
            optional_fields: vec![],
            fs_type: m.fs_type.clone(),
            source: m.source.display().to_string(),
            super_options: "rw".to_owned(),
        }))
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        Ok(self.lock().mounts.iter().any(|m| m.target == path))
    }
}
