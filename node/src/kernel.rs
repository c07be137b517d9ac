//! The kernel seam of the Node service: loop control, mounting, the mount table and the
//! blank-device probe behind one small trait, so the stage/publish logic in `stage.rs` can
//! be unit-tested against a fault-injecting fake (`kernel::fake`, tests only) as well as
//! end-to-end on the real kernel. `SystemKernel` delegates to `sys::` and `fs::probe`
//! unchanged.

use std::fmt::Debug;
use std::io;
use std::path::Path;

use nix::mount::MsFlags;

use crate::fs as vfs;
use crate::sys::loopdev::{self, ImageId, LoopDevice};
use crate::sys::mount;
use crate::sys::mountinfo::{self, MountEntry};

#[cfg(test)]
pub mod fake;

/// The kernel operations `NodeOps` needs. Each method mirrors one `sys::` function; see
/// there for the exact semantics the real kernel gives.
pub trait Kernel: Send + Sync + Debug {
    /// Attaches `image` to a free loop device (`loopdev::attach`).
    fn attach(&self, image: &Path, read_only: bool) -> io::Result<LoopDevice>;
    /// The read-write loop device serving `image`, if any (`loopdev::find_by_backing`).
    fn find_by_backing(&self, image: &Path) -> io::Result<Option<LoopDevice>>;
    /// Detaches `dev` (`loopdev::detach`).
    fn detach(&self, dev: &LoopDevice) -> io::Result<()>;
    /// Detaches `dev` only if it still serves `image` (`loopdev::detach_if_attached_to`).
    fn detach_if_attached_to(&self, dev: &LoopDevice, image: ImageId) -> io::Result<bool>;
    /// Re-reads the backing file's size (`LOOP_SET_CAPACITY`).
    fn set_capacity(&self, dev: &LoopDevice) -> io::Result<()>;
    /// The device's size in bytes.
    fn device_size(&self, dev: &LoopDevice) -> io::Result<u64>;
    /// Whether `dev` was attached read-only.
    fn read_only(&self, dev: &LoopDevice) -> bool;
    /// What the device's first 128 KiB hold (`fs::probe`).
    fn probe(&self, device: &Path) -> io::Result<vfs::Probe>;
    /// mount(2) of a filesystem.
    fn mount_fs(&self, source: &Path, target: &Path, fs_type: &str, flags: MsFlags, data: &str) -> io::Result<()>;
    /// A bind mount, optionally read-only.
    fn bind(&self, source: &Path, target: &Path, read_only: bool, extra: MsFlags) -> io::Result<()>;
    /// Unmounts the top mount at `target`; tells whether there was one.
    fn unmount(&self, target: &Path) -> io::Result<bool>;
    /// The visible mount at exactly `path` (a canonical path), from the mount table.
    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>>;
    /// Whether something is mounted at `path` (`mountinfo::is_mount_point`).
    fn is_mount_point(&self, path: &Path) -> io::Result<bool>;
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemKernel;

impl Kernel for SystemKernel {
    fn attach(&self, image: &Path, read_only: bool) -> io::Result<LoopDevice> {
        loopdev::attach(image, read_only)
    }

    fn find_by_backing(&self, image: &Path) -> io::Result<Option<LoopDevice>> {
        loopdev::find_by_backing(image)
    }

    fn detach(&self, dev: &LoopDevice) -> io::Result<()> {
        loopdev::detach(dev)
    }

    fn detach_if_attached_to(&self, dev: &LoopDevice, image: ImageId) -> io::Result<bool> {
        loopdev::detach_if_attached_to(dev, image)
    }

    fn set_capacity(&self, dev: &LoopDevice) -> io::Result<()> {
        loopdev::set_capacity(dev)
    }

    fn device_size(&self, dev: &LoopDevice) -> io::Result<u64> {
        loopdev::device_size(&dev.path())
    }

    fn read_only(&self, dev: &LoopDevice) -> bool {
        loopdev::read_only(dev)
    }

    fn probe(&self, device: &Path) -> io::Result<vfs::Probe> {
        vfs::probe(device)
    }

    fn mount_fs(&self, source: &Path, target: &Path, fs_type: &str, flags: MsFlags, data: &str) -> io::Result<()> {
        mount::mount_fs(source, target, fs_type, flags, data)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool, extra: MsFlags) -> io::Result<()> {
        mount::bind(source, target, read_only, extra)
    }

    fn unmount(&self, target: &Path) -> io::Result<bool> {
        mount::unmount(target)
    }

    fn mount_at(&self, path: &Path) -> io::Result<Option<MountEntry>> {
        let entries = mountinfo::read()?;
        Ok(mountinfo::find_by_mount_point(&entries, path).cloned())
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        mountinfo::is_mount_point(path)
    }
}
