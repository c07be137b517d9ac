//! Fixtures for the kernel tests of the sys seams: images, loop devices and mounts that clean up after themselves.
//!
//! Every guard undoes only what its own test created, on success and on panic alike.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::mount::{umount2, MntFlags};

use super::loopdev::{self, ImageId, LoopDevice};
use super::mount;

pub const MIB: u64 = 1024 * 1024;

/// Creates a sparse image file of `size` bytes; the name must be unique within `dir`.
pub fn sparse_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(size).unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
    path
}

/// Runs `mkfs.<fs_type> -q` on a device; panics with mkfs's own output on failure.
pub fn mkfs(fs_type: &str, device: &Path) {
    let program = format!("mkfs.{fs_type}");
    let mut command = Command::new(&program);
    command.arg("-q");
    if fs_type == "ext4" {
        command.arg("-F");
    } else {
        command.arg("-f");
    }
    let output = command.arg(device).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        device.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until `dev` no longer serves `image` (the kernel releases an image at the device's
/// last close). Not "until it is free": another process may take the number at once.
pub fn wait_until_detached(dev: &LoopDevice, image: ImageId) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while loopdev::image_id(dev).unwrap_or_else(|e| panic!("{e}")) == Some(image) {
        assert!(Instant::now() < deadline, "{} still attached after 10 s", dev.path().display());
        thread::sleep(Duration::from_millis(20));
    }
}

/// A loop device this test attached; detached on drop, but only while it still serves the
/// test's image: the number may have been released and handed to another process meanwhile.
#[derive(Debug)]
pub struct AttachedLoop {
    pub dev: LoopDevice,
    image: ImageId,
}

impl AttachedLoop {
    pub fn attach(image: &Path, read_only: bool) -> Self {
        let id = ImageId::of(image).unwrap_or_else(|e| panic!("{e}"));
        let dev = loopdev::attach(image, read_only).unwrap_or_else(|e| panic!("attach {}: {e}", image.display()));
        Self { dev, image: id }
    }

    /// Takes charge of a device the test attached through the code under test.
    pub fn adopt(dev: LoopDevice, image: &Path) -> Self {
        let id = ImageId::of(image).unwrap_or_else(|e| panic!("{e}"));
        Self { dev, image: id }
    }

    /// Detaches now and checks that the device was released.
    pub fn detach(self) {
        assert!(
            loopdev::detach_if_attached_to(&self.dev, self.image).unwrap_or_else(|e| panic!("{e}")),
            "{} no longer served the test's image",
            self.dev.path().display()
        );
        wait_until_detached(&self.dev, self.image);
    }
}

impl Drop for AttachedLoop {
    fn drop(&mut self) {
        let _ = loopdev::detach_if_attached_to(&self.dev, self.image);
    }
}

/// A mount this test made; unmounted on drop (lazily if something still holds it).
#[derive(Debug)]
pub struct Mounted {
    pub target: PathBuf,
    unmounted: bool,
}

impl Mounted {
    pub fn new(source: &Path, target: &Path, fs_type: &str, flags: MsFlags, data: &str) -> Self {
        mount::mount_fs(source, target, fs_type, flags, data).unwrap_or_else(|e| panic!("{e}"));
        Self::adopt(target)
    }

    pub fn ext4(source: &Path, target: &Path) -> Self {
        Self::new(source, target, "ext4", MsFlags::empty(), "")
    }

    /// Takes charge of a mount the test made through the code under test.
    pub fn adopt(target: &Path) -> Self {
        Self { target: target.to_path_buf(), unmounted: false }
    }

    pub fn unmount(mut self) {
        self.unmounted = true;
        assert!(
            mount::unmount(&self.target).unwrap_or_else(|e| panic!("{e}")),
            "{} was not mounted",
            self.target.display()
        );
    }

    /// For tests that unmount through the code under test themselves.
    pub fn forget(mut self) {
        self.unmounted = true;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.unmounted && mount::unmount(&self.target).is_err() {
            let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

/// Makes a filesystem on a fresh loop device over a sparse image in `dir` and mounts it at
/// `dir/<name>-mnt`. Field order matters: the mount is dropped before the device.
#[derive(Debug)]
pub struct ScratchFs {
    pub mounted: Mounted,
    /// Held for its Drop, which detaches the device after the unmount.
    _device: AttachedLoop,
}

impl ScratchFs {
    pub fn new(dir: &Path, name: &str, fs_type: &str, size: u64) -> Self {
        Self::with_flags(dir, name, fs_type, size, MsFlags::empty())
    }

    pub fn with_flags(dir: &Path, name: &str, fs_type: &str, size: u64, flags: MsFlags) -> Self {
        let image = sparse_image(dir, &format!("{name}.img"), size);
        let device = AttachedLoop::attach(&image, false);
        mkfs(fs_type, &device.dev.path());
        let target = dir.join(format!("{name}-mnt"));
        fs::create_dir(&target).unwrap_or_else(|e| panic!("mkdir {}: {e}", target.display()));
        let mounted = Mounted::new(&device.dev.path(), &target, fs_type, flags, "");
        Self { mounted, _device: device }
    }

    pub fn root(&self) -> &Path {
        &self.mounted.target
    }
}
