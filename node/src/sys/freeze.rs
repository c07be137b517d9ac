//! Freezing a mounted filesystem (FIFREEZE/FITHAW) so a copy of the image under it is consistent.
//!
//! While frozen, every write to the filesystem blocks: hold the guard only for the copy, and
//! never write to the frozen filesystem from the thread that holds it. The kernel does not
//! thaw on close or exit, so a process that dies holding a freeze leaves it frozen until
//! someone thaws it (`fsfreeze -u`); the guard's Drop covers panics and early returns.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{check_syscall, Context};

const FIFREEZE: libc::Ioctl =
    nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<libc::c_int>()) as libc::Ioctl;
const FITHAW: libc::Ioctl = nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<libc::c_int>()) as libc::Ioctl;

/// A frozen filesystem; thawed by [`FrozenFs::thaw`], or on drop.
///
/// The freeze applies to the whole filesystem (the superblock), not only to the mount that
/// was named: other mounts of it, such as a pod's bind mount, block as well.
#[derive(Debug)]
pub struct FrozenFs {
    /// `None` once thawed.
    dir: Option<File>,
    mount_point: PathBuf,
}

/// Freezes the filesystem mounted at `mount_point`, after flushing its dirty data.
///
/// EBUSY means it is frozen already (by someone else: freezes do not nest here), EOPNOTSUPP
/// that the filesystem cannot be frozen.
pub fn freeze(mount_point: &Path) -> io::Result<FrozenFs> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(mount_point)
        .context(|| format!("open mount point {}", mount_point.display()))?;
    // SAFETY: FIFREEZE ignores its argument; `dir` is an open fd we own.
    check_syscall(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) })
        .context(|| format!("freeze the filesystem at {}", mount_point.display()))?;
    Ok(FrozenFs { dir: Some(dir), mount_point: mount_point.to_path_buf() })
}

/// Thaws the filesystem at `mount_point` if it is frozen; answers whether it was.
///
/// For start-up: a process killed while holding a freeze leaves the filesystem frozen, and
/// every write of the workload hangs until someone thaws it.
pub fn thaw_if_frozen(mount_point: &Path) -> io::Result<bool> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(mount_point)
        .context(|| format!("open mount point {}", mount_point.display()))?;
    // SAFETY: FITHAW ignores its argument; `dir` is an open fd we own.
    match check_syscall(unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) }) {
        Ok(_) => Ok(true),
        // EINVAL: not frozen.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e).context(|| format!("thaw the filesystem at {}", mount_point.display())),
    }
}

impl FrozenFs {
    /// The mount point the freeze was asked for.
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Thaws the filesystem and reports whether that worked.
    pub fn thaw(mut self) -> io::Result<()> {
        self.thaw_now().context(|| format!("thaw the filesystem at {}", self.mount_point.display()))
    }

    fn thaw_now(&mut self) -> io::Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        // SAFETY: FITHAW ignores its argument; `dir` is an open fd we own.
        check_syscall(unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) })?;
        Ok(())
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        // Nobody can be told about an error here; `thaw` is the way to hear of one.
        let _ = self.thaw_now();
    }
}

#[cfg(all(test, feature = "kernel-tests"))]
#[allow(clippy::unwrap_used)]
mod kernel_tests {
    use std::fs;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::sys::errno;
    use crate::sys::test_fixtures::{ScratchFs, MIB};

    #[test]
    fn a_forgotten_freeze_is_thawed_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "forgotten", "ext4", 32 * MIB);
        let root = scratch.root().to_path_buf();
        assert!(!thaw_if_frozen(&root).unwrap(), "not frozen yet");
        // A holder that dies without thawing, as a killed process would.
        std::mem::forget(freeze(&root).unwrap());
        assert!(thaw_if_frozen(&root).unwrap(), "it was frozen");
        fs::write(root.join("after"), b"writable again").unwrap();
        assert!(!thaw_if_frozen(&root).unwrap());
    }

    #[test]
    fn freeze_blocks_writes_until_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "freeze", "ext4", 32 * MIB);
        let root = scratch.root().to_path_buf();
        fs::write(root.join("before"), b"flushed").unwrap();

        let frozen = freeze(&root).unwrap();
        assert_eq!(frozen.mount_point(), root);
        // Frozen already: a second freeze is refused.
        let err = freeze(&root).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EBUSY), "{err}");
        assert_eq!(fs::read(root.join("before")).unwrap(), b"flushed");

        let (done_tx, done_rx) = mpsc::channel();
        let writer_root = root.clone();
        let writer = thread::spawn(move || {
            let result = fs::write(writer_root.join("during"), b"waited");
            done_tx.send(()).unwrap();
            result
        });
        assert_eq!(
            done_rx.recv_timeout(Duration::from_millis(500)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "a write went through while frozen"
        );

        frozen.thaw().unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(fs::read(root.join("during")).unwrap(), b"waited");
    }

    #[test]
    fn dropping_the_guard_thaws() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = ScratchFs::new(dir.path(), "freeze-drop", "ext4", 32 * MIB);
        drop(freeze(scratch.root()).unwrap());
        // Freezing again only works if the drop thawed.
        let again = freeze(scratch.root()).unwrap();
        again.thaw().unwrap();
        fs::write(scratch.root().join("after"), b"ok").unwrap();
    }

    #[test]
    fn freeze_of_a_missing_path_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = freeze(&dir.path().join("not-mounted")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("not-mounted"), "{err}");
    }
}
