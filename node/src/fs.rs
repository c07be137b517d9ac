//! Filesystems on block devices: probing for an existing one, making one only on a blank
//! device, growing one online, and reading usage statistics.

use std::path::Path;

use ferrovol_core::volume::FsType;

use crate::command::{CommandError, Runner};

/// What is on a device, judged from its first 128 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The first 128 KiB are all zero: nothing any filesystem, partition table or volume
    /// manager would leave there.
    Blank,
    /// A recognised signature (`ext4`, `xfs`, `btrfs`, `swap`, `LVM2_member`, `gpt`, `dos`),
    /// or `unknown data` for any other non-zero content.
    Found(String),
}

/// How much of the device the probe reads. Every common on-disk format puts a signature in
/// this window (btrfs's is the deepest, at 64 KiB + 64).
pub const PROBE_BYTES: usize = 128 << 10;

/// Probes a device by reading its first 128 KiB. This is the guard that keeps mkfs off a
/// device with data, so it is deliberately stricter than blkid: any non-zero byte means "not
/// blank", whether or not a signature is recognised. It costs one read, where `blkid -p`
/// costs a process and ~5 ms.
pub fn probe(device: &Path) -> std::io::Result<Probe> {
    use std::io::Read;
    let mut buf = vec![0u8; PROBE_BYTES];
    let mut f = std::fs::File::open(device)?;
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(classify(&buf[..filled]))
}

/// Classifies the first bytes of a device.
pub fn classify(head: &[u8]) -> Probe {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let found = |name: &str| Probe::Found(name.to_owned());
    if at(1080, &[0x53, 0xEF]) {
        return found("ext4");
    }
    if at(0, b"XFSB") {
        return found("xfs");
    }
    if at(65536 + 64, b"_BHRfS_M") {
        return found("btrfs");
    }
    if at(4096 - 10, b"SWAPSPACE2") {
        return found("swap");
    }
    if at(512 + 24, b"LVM2 001") || at(512, b"LABELONE") {
        return found("LVM2_member");
    }
    if at(512, b"EFI PART") {
        return found("gpt");
    }
    if at(510, &[0x55, 0xAA]) {
        return found("dos");
    }
    if head.iter().all(|b| *b == 0) {
        Probe::Blank
    } else {
        found("unknown data")
    }
}

/// The mount data string for a volume's filesystem. xfs always gets `nouuid`: a restored or
/// cloned volume carries its source's UUID, and xfs refuses to mount a second filesystem
/// with a UUID that is already mounted.
pub fn mount_data(fs: FsType, data: &str) -> String {
    match (fs, data.is_empty()) {
        (FsType::Ext4, _) => data.to_owned(),
        (FsType::Xfs, true) => "nouuid".to_owned(),
        (FsType::Xfs, false) => format!("{data},nouuid"),
    }
}

/// Makes a filesystem. Callers probe first: this never runs on a device with data.
pub fn make(runner: &dyn Runner, fs: FsType, device: &Path) -> Result<(), CommandError> {
    let dev = device.to_string_lossy();
    match fs {
        // lazy_itable_init keeps mkfs fast; the kernel zeroes inode tables in the background.
        FsType::Ext4 => {
            runner.run("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-m", "0", &dev])
        }
        FsType::Xfs => runner.run("mkfs.xfs", &["-q", &dev]),
    }
    .map(|_| ())
}

/// Grows a mounted filesystem to fill its device. Online ext4 growth needs
/// CAP_SYS_RESOURCE; without it the kernel answers EPERM, and the error says so.
pub fn grow(runner: &dyn Runner, fs: FsType, device: &Path, mount_point: &Path) -> Result<(), CommandError> {
    match fs {
        FsType::Ext4 => runner.run("resize2fs", &[&device.to_string_lossy()]).map_err(|e| match e {
            CommandError::Exit { program, status, code, stderr } if stderr.contains("Permission denied") => {
                CommandError::Exit {
                    program,
                    status,
                    code,
                    stderr: format!(
                        "{stderr} (online ext4 growth needs the CAP_SYS_RESOURCE capability, which this process lacks)"
                    ),
                }
            }
            other => other,
        }),
        FsType::Xfs => runner.run("xfs_growfs", &[&mount_point.to_string_lossy()]),
    }
    .map(|_| ())
}

/// Grows an unmounted ext4 filesystem that is smaller than its device (a volume restored or
/// cloned into a larger size, or expanded while unstaged). Offline growth needs no
/// CAP_SYS_RESOURCE, which online growth does. Answers whether it grew.
pub fn grow_ext4_offline(runner: &dyn Runner, device: &Path, device_bytes: u64) -> Result<bool, CommandError> {
    let dev = device.to_string_lossy();
    let out = runner.run("dumpe2fs", &["-h", &dev])?;
    let field =
        |name: &str| out.stdout.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
    let (Some(blocks), Some(block_size)) = (field("Block count:"), field("Block size:")) else {
        return Ok(false);
    };
    if blocks.saturating_mul(block_size) + block_size > device_bytes {
        return Ok(false);
    }
    // resize2fs insists on a freshly checked filesystem; -p repairs only what is safe and
    // exit code 1 means it did.
    match runner.run("e2fsck", &["-f", "-p", &dev]) {
        Ok(_) => {}
        Err(e) if e.exit_code() == Some(1) => {}
        Err(e) => return Err(e),
    }
    runner.run("resize2fs", &[&dev])?;
    Ok(true)
}

/// Usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub used_inodes: u64,
    pub free_inodes: u64,
}

/// Reads usage with statvfs.
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frsize = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frsize;
    let free = st.blocks_free() as u64 * frsize;
    let avail = st.blocks_available() as u64 * frsize;
    Ok(Usage {
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: avail,
        total_inodes: st.files() as u64,
        used_inodes: (st.files() as u64).saturating_sub(st.files_free() as u64),
        free_inodes: st.files_free() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Output;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Scripted {
        calls: Mutex<Vec<String>>,
        answer: Option<(Option<i32>, String)>,
    }

    impl Runner for Scripted {
        fn run(&self, program: &str, args: &[&str]) -> Result<Output, CommandError> {
            self.calls.lock().expect("lock").push(format!("{program} {}", args.join(" ")));
            match &self.answer {
                None => Ok(Output::default()),
                Some((None, out)) => Ok(Output { stdout: out.clone() }),
                Some((code, _)) => Err(CommandError::Exit {
                    program: program.into(),
                    status: "x".into(),
                    code: *code,
                    stderr: String::new(),
                }),
            }
        }
    }

    #[test]
    fn only_an_all_zero_head_is_blank() {
        let mut head = vec![0u8; PROBE_BYTES];
        assert_eq!(classify(&head), Probe::Blank);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(classify(&head), Probe::Found("ext4".into()));
        let mut head = vec![0u8; PROBE_BYTES];
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&head), Probe::Found("xfs".into()));
        let mut head = vec![0u8; PROBE_BYTES];
        head[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        assert_eq!(classify(&head), Probe::Found("btrfs".into()));
        // Data without any signature is still data: never formatted over.
        let mut head = vec![0u8; PROBE_BYTES];
        head[PROBE_BYTES - 1] = 1;
        assert_eq!(classify(&head), Probe::Found("unknown data".into()));
    }

    #[test]
    fn grow_uses_the_right_tool_per_filesystem() {
        let r = Scripted::default();
        grow(&r, FsType::Ext4, Path::new("/dev/loop3"), Path::new("/m")).expect("ext4");
        grow(&r, FsType::Xfs, Path::new("/dev/loop3"), Path::new("/m")).expect("xfs");
        let calls = r.calls.lock().expect("lock").clone();
        assert_eq!(calls, vec!["resize2fs /dev/loop3".to_string(), "xfs_growfs /m".to_string()]);
    }
}
