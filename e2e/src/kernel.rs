//! What the kernel reports about mounts and loop devices, and the cleanup of what a test left.
//!
//! Everything here is scoped to paths inside one test's sandbox: a test never unmounts or
//! detaches anything it did not create, because other tests (and other people's work) run on
//! the same machine at the same time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// The path inside the source filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: String,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub mount_options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// Whether this mount is read-only.
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|option| option == "ro")
    }
}

/// Undoes the octal escapes the kernel uses for spaces and friends in mountinfo paths.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|digit| (b'0'..=b'7').contains(digit)) {
                let value = digits.iter().fold(0u32, |acc, digit| acc * 8 + u32::from(digit - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All mounts of this process's mount namespace (the driver shares it).
pub fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let tail: Vec<&str> = after.split(' ').collect();
    if fields.len() < 6 || tail.len() < 2 {
        return None;
    }
    Some(MountEntry {
        mount_point: PathBuf::from(unescape_mount_path(fields[4])),
        root: unescape_mount_path(fields[3]),
        mount_options: fields[5].to_owned(),
        fs_type: tail[0].to_owned(),
        source: unescape_mount_path(tail[1]),
    })
}

/// Mounts at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<MountEntry> {
    mounts().into_iter().filter(|mount| mount.mount_point.starts_with(dir)).collect()
}

/// Mounts stacked exactly at `path` (more than one means a call mounted twice).
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mounts().into_iter().filter(|mount| mount.mount_point == path).collect()
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts_at(path).pop()
}

/// A bound loop device and the file behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file as sysfs reports it (with ` (deleted)` if it was unlinked).
    pub backing_file: PathBuf,
}

/// All bound loop devices on the machine.
pub fn loop_devices() -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut devices = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        if backing.is_empty() {
            continue;
        }
        devices
            .push(LoopDevice { device: PathBuf::from(format!("/dev/{name}")), backing_file: PathBuf::from(backing) });
    }
    devices
}

/// Loop devices whose backing file lies under `dir`.
pub fn loop_devices_under(dir: &Path) -> Vec<LoopDevice> {
    loop_devices().into_iter().filter(|device| device.backing_file.starts_with(dir)).collect()
}

/// What a test left behind in the kernel.
#[derive(Debug, Default)]
pub struct Leftovers {
    pub mounts: Vec<MountEntry>,
    pub loop_devices: Vec<LoopDevice>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.loop_devices.is_empty()
    }
}

/// Mounts under `root` and loop devices backed by files under `data_dir`.
pub fn leftovers(root: &Path, data_dir: &Path) -> Leftovers {
    Leftovers { mounts: mounts_under(root), loop_devices: loop_devices_under(data_dir) }
}

/// Waits up to `patience` for the leftovers to go (auto-clearing loop devices detach
/// asynchronously after their last user closes them), then answers what is still there.
pub fn settled_leftovers(root: &Path, data_dir: &Path, patience: Duration) -> Leftovers {
    let deadline = Instant::now() + patience;
    loop {
        let found = leftovers(root, data_dir);
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Unmounts everything under `root` (deepest first, lazily) and detaches loop devices backed
/// by files under `data_dir`. Answers what could not be released.
pub fn release(root: &Path, data_dir: &Path) -> Leftovers {
    for _ in 0..3 {
        let mut found = mounts_under(root);
        if found.is_empty() {
            break;
        }
        found.sort_by_key(|mount| std::cmp::Reverse(mount.mount_point.components().count()));
        // FUSE mounts cannot be frozen, and a look at one whose server is stopped would wait
        // for that server.
        for mount in found.iter().filter(|m| !m.fs_type.starts_with("fuse")) {
            // A driver killed during a snapshot may leave its filesystem frozen; a frozen
            // filesystem detached lazily would pin its loop device for good.
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&mount.mount_point)
                .stderr(std::process::Stdio::null())
                .status();
        }
        for mount in found {
            // Lazy detach: a file still open in a killed process must not keep it mounted.
            let _ = nix::mount::umount2(&mount.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for device in loop_devices_under(data_dir) {
        let _ = Command::new("losetup").arg("-d").arg(&device.device).status();
    }
    settled_leftovers(root, data_dir, Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_mountinfo_line_with_an_escaped_space() {
        let line = "36 35 98:0 / /tmp/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue";
        let entry = parse_mountinfo_line(line).expect("a valid line parses");
        assert_eq!(entry.mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(entry.fs_type, "ext4");
        assert_eq!(entry.source, "/dev/loop3");
        assert_eq!(entry.root, "/");
        assert!(!entry.read_only());
    }

    #[test]
    fn parses_a_read_only_bind_mount() {
        let line = "40 35 7:3 /dev/loop3 /tmp/t ro,relatime shared:7 - devtmpfs udev rw";
        let entry = parse_mountinfo_line(line).expect("a valid line parses");
        assert!(entry.read_only());
        assert_eq!(entry.root, "/dev/loop3");
    }
}
