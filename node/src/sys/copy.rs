//! Copies of image files for snapshots and clones: a reflink where the filesystem can share extents, else a copy that keeps the holes.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::{check_syscall, with_context, Context};

/// Buffer of the read/write fallback, used only when the kernel cannot copy in place.
const FALLBACK_BUFFER: usize = 1024 * 1024;
/// Bytes per copy_file_range call; the kernel copies at most about 2 GiB per call anyway.
const COPY_CHUNK: u64 = 1 << 30;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The copy shares the source's extents (FICLONE): instant, and costs no space until
    /// either side is written.
    Reflink,
    /// The data extents were copied and the holes left as holes.
    Sparse,
}

/// Copies `src` to the new file `dst`, by reflink where the filesystem supports it.
///
/// `dst` must not exist (it is created with O_EXCL, mode 0600: images hold tenants' data),
/// so a copy never overwrites a volume. The copy is fsynced, with its directory entry, before
/// this returns; on any error the partial `dst` is removed. The caller makes sure `src` does
/// not change meanwhile (a detached image, or a frozen filesystem on top of it).
pub fn clone_or_copy(src: &Path, dst: &Path) -> io::Result<CopyKind> {
    let source = File::open(src).context(|| format!("open copy source {}", src.display()))?;
    let meta = source.metadata().context(|| format!("stat copy source {}", src.display()))?;
    if !meta.is_file() {
        return Err(with_context(
            io::Error::from(io::ErrorKind::InvalidInput),
            format!("copy source {} is not a regular file", src.display()),
        ));
    }
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .context(|| format!("create copy target {}", dst.display()))?;
    let mut created = RemoveOnDrop::new(dst.to_path_buf());

    let kind = if try_reflink(&source, &target).context(|| format!("reflink {} to {}", src.display(), dst.display()))? {
        CopyKind::Reflink
    } else {
        copy_sparse(&source, &target, meta.len()).context(|| format!("copy {} to {}", src.display(), dst.display()))?;
        CopyKind::Sparse
    };
    target.sync_all().context(|| format!("fsync copy {}", dst.display()))?;
    sync_parent(dst)?;
    created.keep();
    Ok(kind)
}

/// Whether files in `dir` can be reflinked, probed with two scratch files that are removed
/// again. Any failure, including an unwritable `dir`, reads as "no".
pub fn reflink_supported(dir: &Path) -> bool {
    let probe = || -> io::Result<bool> {
        let name = |role: &str| dir.join(format!(".ferrovol-reflink-probe-{}-{role}", uuid::Uuid::new_v4()));
        let create = |path: &Path| OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path);
        let (source_path, target_path) = (name("src"), name("dst"));
        let source = create(&source_path)?;
        let _source_guard = RemoveOnDrop::new(source_path);
        // Some filesystems accept cloning an empty file without being able to share extents.
        source.write_all_at(&[0x5a; 4096], 0)?;
        let target = create(&target_path)?;
        let _target_guard = RemoveOnDrop::new(target_path);
        try_reflink(&source, &target)
    };
    probe().unwrap_or(false)
}

/// FICLONE; `Ok(false)` when this filesystem (or this pair of files) cannot share extents.
fn try_reflink(source: &File, target: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
    let result = check_syscall(unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) });
    match result {
        Ok(_) => Ok(true),
        Err(err)
            if matches!(err.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)) =>
        {
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// Copies the data extents of `source` (walking them with SEEK_DATA/SEEK_HOLE) and sets the
/// length, so holes stay holes and a mostly empty image stays small.
fn copy_sparse(source: &File, target: &File, len: u64) -> io::Result<()> {
    let fd = source.as_raw_fd();
    let mut offset: u64 = 0;
    while offset < len {
        let data = match lseek(fd, to_off(offset)?, Whence::SeekData) {
            Ok(data) => from_off(data)?,
            // No data after `offset`: the rest is one hole.
            Err(Errno::ENXIO) => break,
            Err(err) => return Err(with_context(err, "find the next data extent (SEEK_DATA)")),
        };
        let hole = from_off(
            lseek(fd, to_off(data)?, Whence::SeekHole).context(|| "find the end of a data extent (SEEK_HOLE)")?,
        )?
        .min(len);
        if data >= hole {
            break;
        }
        copy_range(source, target, data, hole - data)?;
        offset = hole;
    }
    target.set_len(len).context(|| "set the copy's length")
}

/// Copies one byte range in the kernel, falling back to read/write where copy_file_range
/// cannot work between these two files (across filesystems, or on old kernels).
fn copy_range(source: &File, target: &File, start: u64, count: u64) -> io::Result<()> {
    let mut done: u64 = 0;
    while done < count {
        let mut off_in = to_off(start + done)?;
        let mut off_out = off_in;
        let chunk = usize::try_from((count - done).min(COPY_CHUNK)).unwrap_or(usize::MAX);
        // SAFETY: both offsets point at live locals the kernel reads and updates; both fds are
        // open for the duration of the call.
        let copied = unsafe {
            libc::copy_file_range(source.as_raw_fd(), &mut off_in, target.as_raw_fd(), &mut off_out, chunk, 0)
        };
        match copied {
            0 => return Err(source_shrank()),
            -1 => {
                let err = io::Error::last_os_error();
                return match Errno::from_raw(err.raw_os_error().unwrap_or(0)) {
                    Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL => {
                        copy_range_by_reading(source, target, start + done, count - done)
                    }
                    _ => Err(with_context(err, "copy_file_range")),
                };
            }
            copied => done += copied.unsigned_abs() as u64,
        }
    }
    Ok(())
}

fn copy_range_by_reading(source: &File, target: &File, start: u64, count: u64) -> io::Result<()> {
    let mut buffer = vec![0u8; FALLBACK_BUFFER];
    let mut done: u64 = 0;
    while done < count {
        let want = usize::try_from(count - done).map_or(buffer.len(), |n| n.min(buffer.len()));
        let read = source.read_at(&mut buffer[..want], start + done).context(|| "read the source")?;
        if read == 0 {
            return Err(source_shrank());
        }
        target.write_all_at(&buffer[..read], start + done).context(|| "write the copy")?;
        done += read as u64;
    }
    Ok(())
}

fn source_shrank() -> io::Error {
    with_context(io::Error::from(io::ErrorKind::UnexpectedEof), "the source got shorter during the copy")
}

fn to_off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn from_off(offset: libc::off_t) -> io::Result<u64> {
    u64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Makes a new directory entry durable; without it a crash can lose a fully synced file.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|dir| dir.sync_all()).context(|| format!("fsync directory {}", parent.display()))
}

/// Removes a file this module created unless told to keep it.
#[derive(Debug)]
struct RemoveOnDrop {
    path: PathBuf,
    keep: bool,
}

impl RemoveOnDrop {
    fn new(path: PathBuf) -> Self {
        Self { path, keep: false }
    }

    fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::sys::errno;
    use crate::sys::test_fixtures::{ScratchFs, MIB};

    /// Bytes that differ from offset to offset, so misplaced data shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8)).collect()
    }

    /// A 24 MiB file with 4 KiB of data at 0, 64 KiB at 10 MiB, and a hole at the end.
    fn mostly_holes(path: &Path) {
        let file = File::create(path).unwrap();
        file.write_all_at(&pattern(4096, 1), 0).unwrap();
        file.write_all_at(&pattern(64 * 1024, 2), 10 * MIB).unwrap();
        file.set_len(24 * MIB).unwrap();
        file.sync_all().unwrap();
    }

    #[test]
    fn sparse_copy_on_ext4_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "ext4-copy", "ext4", 64 * MIB);
        let src = scratch.root().join("source.img");
        let dst = scratch.root().join("copy.img");
        mostly_holes(&src);

        assert!(!reflink_supported(scratch.root()));
        assert_eq!(clone_or_copy(&src, &dst).unwrap(), CopyKind::Sparse);

        assert_eq!(fs::read(&dst).unwrap(), fs::read(&src).unwrap());
        let meta = fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 24 * MIB);
        // 68 KiB of data; allow for metadata blocks, but nowhere near the 24 MiB length.
        assert!(meta.blocks() * 512 <= 256 * 1024, "copy uses {} bytes on disk", meta.blocks() * 512);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // No probe files are left behind.
        let mut names: Vec<_> =
            fs::read_dir(scratch.root()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, vec!["copy.img", "lost+found", "source.img"]);
    }

    #[test]
    fn reflink_on_xfs() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "xfs-copy", "xfs", 320 * MIB);
        let src = scratch.root().join("source.img");
        let dst = scratch.root().join("clone.img");
        mostly_holes(&src);

        assert!(reflink_supported(scratch.root()));
        assert_eq!(clone_or_copy(&src, &dst).unwrap(), CopyKind::Reflink);
        assert_eq!(fs::read(&dst).unwrap(), fs::read(&src).unwrap());
        assert_eq!(fs::metadata(&dst).unwrap().len(), 24 * MIB);

        // Copy on write: changing the clone leaves the source alone.
        let before = fs::read(&src).unwrap();
        File::options().write(true).open(&dst).unwrap().write_all_at(&[0xee; 4096], 0).unwrap();
        assert_eq!(fs::read(&src).unwrap(), before);
    }

    #[test]
    fn never_overwrites_an_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let dst = dir.path().join("dst.img");
        fs::write(&src, b"new").unwrap();
        fs::write(&dst, b"precious").unwrap();

        let err = clone_or_copy(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("dst.img"), "{err}");
        assert_eq!(fs::read(&dst).unwrap(), b"precious");
    }

    #[test]
    fn missing_source_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst.img");
        let err = clone_or_copy(&dir.path().join("nope.img"), &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope.img"), "{err}");
        assert!(!dst.exists());
    }

    #[test]
    fn failed_copy_removes_the_partial_target() {
        let dir = tempfile::tempdir().unwrap();
        // 48 MiB of data cannot fit a 32 MiB filesystem; copying across filesystems also
        // takes the read/write fallback.
        let scratch = ScratchFs::new(dir.path(), "small", "ext4", 32 * MIB);
        let src = dir.path().join("big.img");
        let file = File::create(&src).unwrap();
        let block = pattern(MIB as usize, 7);
        for i in 0..48 {
            file.write_all_at(&block, i * MIB).unwrap();
        }
        drop(file);
        let dst = scratch.root().join("partial.img");

        let err = clone_or_copy(&src, &dst).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOSPC), "{err}");
        assert!(err.to_string().contains("partial.img"), "{err}");
        assert!(!dst.exists(), "the partial copy is removed");
    }
}
