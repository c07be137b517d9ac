//! A private scratch directory per driver or raw run, and the sweep that takes down every
//! mount and loop device under it, on the normal path, on error, on panic and on Ctrl-C.
//!
//! Ownership is by path: the directory is made fresh with a unique name, so every mount point
//! below it and every loop device backed by a file below it was made by this run. Nothing
//! else is ever touched.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

use crate::{Context, Result};

/// Sandboxes alive now, so the panic hook and the Ctrl-C path can sweep them.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A fresh directory that is swept and removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    root: PathBuf,
}

impl Sandbox {
    /// Makes `parent/ferrovol-bench-LABEL.XXXXXX`.
    pub fn new(parent: &Path, label: &str) -> Result<Sandbox> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferrovol-bench-{label}."))
            .tempdir_in(parent)
            .context(|| format!("making a scratch directory in {}", parent.display()))?
            .keep();
        // Mount points in /proc/self/mountinfo are canonical paths; compare like with like.
        let root = dir.canonicalize().context(|| format!("resolving {}", dir.display()))?;
        lock_live().push(root.clone());
        Ok(Sandbox { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Takes down what is left under the sandbox now, answering what that was.
    pub fn sweep(&self) -> Swept {
        sweep(&self.root)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let swept = sweep(&self.root);
        if !swept.failures.is_empty() {
            // Removing files under a mount that would not go away would delete volume data;
            // leave the directory for a person to look at.
            eprintln!("ferrovol-bench: keeping {}: {}", self.root.display(), swept.failures.join("; "));
        } else if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("ferrovol-bench: removing {}: {e}", self.root.display());
        }
        lock_live().retain(|p| p != &self.root);
    }
}

fn lock_live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A poisoned list is still the right list: the panic happened elsewhere.
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sweeps every live sandbox (the panic hook and Ctrl-C call this; drops may not run there).
pub fn sweep_all_live() {
    let roots = lock_live().clone();
    for root in roots {
        let s = sweep(&root);
        for f in s.failures {
            eprintln!("ferrovol-bench: cleanup: {f}");
        }
    }
}

/// What a sweep took down, and what it could not.
#[derive(Debug, Default)]
pub struct Swept {
    pub mounts: usize,
    pub loops: usize,
    pub failures: Vec<String>,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.mounts == 0 && self.loops == 0 && self.failures.is_empty()
    }
}

/// Unmounts every mount point under `root` (deepest first) and detaches every loop device
/// whose backing file lies under `root`.
pub fn sweep(root: &Path) -> Swept {
    let mut out = Swept::default();
    // Several rounds: a path can carry stacked mounts.
    for _ in 0..8 {
        let mut points = match mounts_under(root) {
            Ok(p) => p,
            Err(e) => {
                out.failures.push(format!("reading /proc/self/mountinfo: {e}"));
                break;
            }
        };
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            match umount2(&p, MntFlags::empty()) {
                Ok(()) => out.mounts += 1,
                // Something still holds it open: detach it lazily, it goes when released.
                Err(Errno::EBUSY) => match umount2(&p, MntFlags::MNT_DETACH) {
                    Ok(()) => out.mounts += 1,
                    Err(e) => out.failures.push(format!("unmounting {}: {e}", p.display())),
                },
                Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(e) => out.failures.push(format!("unmounting {}: {e}", p.display())),
            }
        }
    }
    if let Ok(left) = mounts_under(root) {
        if !left.is_empty() {
            out.failures.push(format!("{} mount(s) under {} would not go away", left.len(), root.display()));
        }
    }
    match loops_under(root) {
        Ok(devs) => {
            for dev in devs {
                match Command::new("losetup").arg("-d").arg(&dev).output() {
                    Ok(o) if o.status.success() => out.loops += 1,
                    Ok(o) => out.failures.push(format!(
                        "losetup -d {}: {}",
                        dev.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => out.failures.push(format!("running losetup -d {}: {e}", dev.display())),
                }
            }
        }
        Err(e) => out.failures.push(format!("listing loop devices: {e}")),
    }
    out
}

/// Mount points at or below `root`, from this process's mount table.
pub fn mounts_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(root))
        .collect())
}

/// Loop devices (`/dev/loopN`) whose backing file lies below `root`.
pub fn loops_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        // Absent when the device is not attached.
        let Ok(backing) = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) else { continue };
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if Path::new(backing).starts_with(root) {
            out.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    Ok(out)
}

/// Undoes the octal escapes the kernel writes for space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }
}
