//! Block-device content operations for LVM volumes: a copy from one device to another that
//! leaves zero regions to the kernel (never through user space), and zeroing a device's
//! head so a new volume probes as blank. Works on any block device, so the kernel tests run
//! it on loop devices and the VM tier on logical volumes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{check_syscall, loopdev, Context};

/// Bytes per read and write of a copy.
const CHUNK: usize = 1 << 20;
/// `BLKZEROOUT` (`_IO(0x12, 127)`): zero a byte range; the kernel uses the device's
/// write-zeroes or discard support where it has them, else writes zero pages itself.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// What a copy did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source and written to the destination.
    pub written: u64,
    /// Bytes that were zero in the source and were zeroed by the kernel or skipped.
    pub zero: u64,
}

/// Zeroes `len` bytes at `offset` of the open device with BLKZEROOUT.
fn zero_range(dev: &File, path: &Path, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, which points at `range`.
    check_syscall(unsafe { libc::ioctl(dev.as_raw_fd(), BLKZEROOUT, range.as_ptr()) })
        .context(|| format!("zero {len} bytes at {offset} of {} (BLKZEROOUT)", path.display()))?;
    Ok(())
}

/// Zeroes the first `len` bytes of the device at `path` (or all of it if smaller) and
/// flushes, so the blank probe at stage time sees an empty device.
pub fn zero_head(path: &Path, len: u64) -> io::Result<()> {
    let dev = OpenOptions::new().write(true).open(path).context(|| format!("open {}", path.display()))?;
    let size = loopdev::device_size(path)?;
    zero_range(&dev, path, 0, len.min(size))?;
    dev.sync_all().context(|| format!("flush {}", path.display()))
}

/// Whether something holds the block device at `path` exclusively (a mounted filesystem,
/// a device-mapper or md user, another O_EXCL opener): an O_EXCL open then fails with EBUSY.
/// A device node that does not exist (an inactive LV) is held by nobody.
pub fn is_held(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(path) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(super::with_context(e, format!("open {} exclusively", path.display()))),
    }
}

/// Copies the first `len` bytes of block device `src` onto block device `dst`.
///
/// Zero chunks of the source are not written: when `dst_reads_zero` (a new thin volume,
/// whose unprovisioned blocks read as zero) they are skipped, costing no pool space; else
/// the kernel zeroes them with BLKZEROOUT. The destination is flushed before this returns.
/// The caller keeps the source still (a frozen filesystem, or a snapshot) meanwhile.
pub fn copy_device(src: &Path, dst: &Path, len: u64, dst_reads_zero: bool) -> io::Result<CopyStats> {
    let source = File::open(src).context(|| format!("open copy source {}", src.display()))?;
    let target = OpenOptions::new().write(true).open(dst).context(|| format!("open copy target {}", dst.display()))?;
    let dst_size = loopdev::device_size(dst)?;
    if dst_size < len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("copy target {} has {dst_size} bytes, the copy needs {len}", dst.display()),
        ));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut stats = CopyStats::default();
    let mut offset = 0u64;
    // A run of zero chunks is zeroed in one ioctl.
    let mut zero_run: Option<u64> = None;
    while offset < len {
        let want = (len - offset).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..want];
        source.read_exact_at(chunk, offset).context(|| format!("read {} at {offset}", src.display()))?;
        if chunk.iter().all(|b| *b == 0) {
            zero_run.get_or_insert(offset);
            stats.zero += want as u64;
        } else {
            if let Some(start) = zero_run.take() {
                if !dst_reads_zero {
                    zero_range(&target, dst, start, offset - start)?;
                }
            }
            target.write_all_at(chunk, offset).context(|| format!("write {} at {offset}", dst.display()))?;
            stats.written += want as u64;
        }
        offset += want as u64;
    }
    if let Some(start) = zero_run {
        if !dst_reads_zero {
            zero_range(&target, dst, start, len - start)?;
        }
    }
    target.sync_all().context(|| format!("flush {}", dst.display()))?;
    Ok(stats)
}

#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use super::*;
    use crate::sys::test_fixtures::{sparse_image, AttachedLoop};

    fn device(dir: &Path, name: &str, bytes: u64) -> AttachedLoop {
        AttachedLoop::attach(&sparse_image(dir, name, bytes), false)
    }

    #[test]
    fn copy_reproduces_data_and_zeroes_stale_regions() {
        let dir = tempfile::tempdir().unwrap();
        let src = device(dir.path(), "src", 8 << 20);
        let dst = device(dir.path(), "dst", 12 << 20);
        // The source: data at 0 and 5 MiB, zeros elsewhere. The target: stale bytes everywhere.
        let s = OpenOptions::new().write(true).open(src.dev.path()).unwrap();
        s.write_all_at(&[0xab; 4096], 0).unwrap();
        s.write_all_at(&[0xcd; 4096], 5 << 20).unwrap();
        s.sync_all().unwrap();
        let d = OpenOptions::new().write(true).open(dst.dev.path()).unwrap();
        d.write_all_at(&vec![0xee; 12 << 20], 0).unwrap();
        d.sync_all().unwrap();

        let stats = copy_device(&src.dev.path(), &dst.dev.path(), 8 << 20, false).unwrap();
        assert_eq!(stats.written, 2 << 20, "two 1 MiB chunks hold data");
        assert_eq!(stats.zero, 6 << 20);
        let mut got = vec![0u8; 8 << 20];
        File::open(dst.dev.path()).unwrap().read_exact_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 8 << 20];
        want[..4096].fill(0xab);
        want[5 << 20..(5 << 20) + 4096].fill(0xcd);
        assert!(got == want, "the target's first 8 MiB equal the source, stale bytes zeroed");
        let mut tail = vec![0u8; 4096];
        File::open(dst.dev.path()).unwrap().read_exact_at(&mut tail, 10 << 20).unwrap();
        assert!(tail.iter().all(|b| *b == 0xee), "beyond the copied length the target is untouched");

        zero_head(&dst.dev.path(), 1 << 20).unwrap();
        let mut head = vec![1u8; 1 << 20];
        File::open(dst.dev.path()).unwrap().read_exact_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|b| *b == 0));
        assert!(
            copy_device(&dst.dev.path(), &src.dev.path(), 12 << 20, false).is_err(),
            "a target too small is refused"
        );
    }

    #[test]
    fn a_mounted_device_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(dir.path(), "held", 32 << 20);
        assert!(!is_held(&dev.dev.path()).unwrap());
        crate::sys::test_fixtures::mkfs("ext4", &dev.dev.path());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted =
            crate::sys::test_fixtures::Mounted::new(&dev.dev.path(), &mnt, "ext4", nix::mount::MsFlags::empty(), "");
        assert!(is_held(&dev.dev.path()).unwrap(), "a mounted filesystem holds its device");
        drop(mounted);
        assert!(!is_held(&dev.dev.path()).unwrap());
        assert!(!is_held(Path::new("/dev/mapper/ferrovol-no-such-device")).unwrap());
    }
}
