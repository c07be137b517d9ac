//! Start-up reconcile: rebuilds the node's view from the volumes' records, the loop devices
//! and the mount table, so that a restart or a reboot never leaks a device and never leaves
//! a staged volume without the device it needs.
//!
//! Rules, in order:
//! 1. A loop device backed by an image in our data dir that no record calls staged and that
//!    nothing mounts is debris of a crash between attach and record: detach it.
//! 2. A staged volume with no loop device (the node rebooted) is attached again, and its
//!    filesystem mounted again at the staging path if that directory still exists.
//! 3. A staged filesystem left frozen by a process killed during a snapshot is thawed
//!    (otherwise every write of the workload hangs).
//! 4. Publish records whose mounts are gone are kept: the kubelet repeats NodePublishVolume,
//!    which repairs them.

use std::path::Path;

use ferrovol_core::ids::LocalName;
use ferrovol_core::volume::FsType;
use nix::mount::MsFlags;

use crate::store::{LoopStore, Shelf};
use crate::sys::{freeze, loopdev, mount, mountinfo};

/// What reconcile did, for the start-up log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub detached: Vec<String>,
    pub reattached: Vec<String>,
    pub remounted: Vec<String>,
    pub thawed: Vec<String>,
    pub problems: Vec<String>,
}

/// Runs the reconcile over `store`.
pub fn run(store: &LoopStore) -> Report {
    let mut report = Report::default();
    let attached = match loopdev::list_attached() {
        Ok(a) => a,
        Err(e) => {
            report.problems.push(format!("listing loop devices failed: {e}"));
            return report;
        }
    };
    let mounts = mountinfo::read().unwrap_or_default();
    let root = store.root();

    // Rule 1: unrecorded, unmounted devices of ours.
    for (dev, backing) in &attached {
        let backing_str = backing.to_string_lossy();
        let path = Path::new(backing_str.trim_end_matches(" (deleted)"));
        if !path.starts_with(root) {
            continue;
        }
        let staged = owner(store, path)
            .and_then(|(shelf, local)| store.read_node_state(shelf, &local).ok())
            .is_some_and(|s| s.staged.is_some());
        if staged {
            continue;
        }
        let in_use = device_mounted(&mounts, dev);
        if in_use {
            report.problems.push(format!(
                "{} backs {} and is mounted, but no record says it is staged; left alone",
                dev.path().display(),
                path.display()
            ));
            continue;
        }
        match loopdev::detach(dev) {
            Ok(()) => report.detached.push(format!("{} ({})", dev.path().display(), path.display())),
            Err(e) => report.problems.push(format!("detaching {} failed: {e}", dev.path().display())),
        }
    }

    // Rule 2: staged volumes without their device.
    for shelf in [Shelf::Volumes, Shelf::Ephemeral] {
        let Ok(volumes) = store.list_volumes(shelf) else { continue };
        for (local, rec) in volumes {
            let Ok(state) = store.read_node_state(shelf, &local) else { continue };
            let Some(staged) = state.staged else { continue };
            let image = store.volume_image(shelf, &local);
            let dev = match loopdev::find_by_backing(&image) {
                Ok(Some(d)) => d,
                Ok(None) => match loopdev::attach(&image, false) {
                    Ok(d) => {
                        report.reattached.push(format!("{} on {}", rec.id, d.path().display()));
                        d
                    }
                    Err(e) => {
                        report.problems.push(format!("re-attaching volume {} failed: {e}", rec.id));
                        continue;
                    }
                },
                Err(e) => {
                    report.problems.push(format!("listing loop devices for {} failed: {e}", rec.id));
                    continue;
                }
            };
            if staged.block || !staged.path.is_dir() {
                continue;
            }
            if mountinfo::find_by_mount_point(&mounts, &staged.path).is_some() {
                // Rule 3.
                match freeze::thaw_if_frozen(&staged.path) {
                    Ok(true) => report.thawed.push(format!("{} at {}", rec.id, staged.path.display())),
                    Ok(false) => {}
                    Err(e) => report.problems.push(format!("thawing volume {} failed: {e}", rec.id)),
                }
                continue;
            }
            match remount(&dev, &staged.path, rec.fs_type, &staged.mount_flags) {
                Ok(()) => report.remounted.push(format!("{} at {}", rec.id, staged.path.display())),
                Err(e) => report.problems.push(format!(
                    "re-mounting volume {} at {} failed: {e}",
                    rec.id,
                    staged.path.display()
                )),
            }
        }
    }
    for line in &report.detached {
        tracing::warn!(device = %line, "detached a loop device no staged volume needs");
    }
    for line in &report.reattached {
        tracing::info!(volume = %line, "re-attached a staged volume");
    }
    for line in &report.remounted {
        tracing::info!(volume = %line, "re-mounted a staged volume");
    }
    for line in &report.thawed {
        tracing::warn!(volume = %line, "thawed a filesystem left frozen by an interrupted snapshot");
    }
    for line in &report.problems {
        tracing::error!(problem = %line, "reconcile");
    }
    report
}

fn owner(store: &LoopStore, image: &Path) -> Option<(Shelf, LocalName)> {
    let dir = image.parent()?;
    let name = dir.file_name()?.to_str()?;
    let local = LocalName::from_co_name(name);
    if local.as_str() != name {
        return None;
    }
    [Shelf::Volumes, Shelf::Ephemeral].into_iter().find(|s| store.volume_dir(*s, &local) == dir).map(|s| (s, local))
}

fn device_mounted(mounts: &[mountinfo::MountEntry], dev: &loopdev::LoopDevice) -> bool {
    let Ok(st) = nix::sys::stat::stat(&dev.path()) else { return false };
    let (major, minor) = (nix::sys::stat::major(st.st_rdev) as u32, nix::sys::stat::minor(st.st_rdev) as u32);
    let devpath = dev.path();
    !mountinfo::mounts_of_device(mounts, major, minor).is_empty()
        || mounts.iter().any(|m| {
            m.source == devpath.to_string_lossy()
                || m.root == Path::new("/").join(devpath.file_name().unwrap_or_default())
        })
}

fn remount(dev: &loopdev::LoopDevice, at: &Path, fs: FsType, flags: &[String]) -> std::io::Result<()> {
    let (ms, data) = mount::parse_options(flags).map_err(std::io::Error::other)?;
    mount::mount_fs(&dev.path(), at, fs.as_str(), ms | MsFlags::empty(), &crate::fs::mount_data(fs, &data))
}
