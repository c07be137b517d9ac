//! System seams of the loop family: loop devices, the mount table, mounts, image copies and filesystem freezing.
//!
//! Each module is a thin, documented wrapper over syscalls and kernel files. Errors are
//! `std::io::Error`s whose message says what failed on which path or device; the kernel's
//! errno stays reachable through [`errno`], because callers branch on it (EBUSY, EROFS, ...).

use std::fmt;
use std::io;

pub mod blockdev;
pub mod copy;
pub mod freeze;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;

#[cfg(all(test, feature = "kernel-tests"))]
mod test_fixtures;

/// An OS error together with the operation and object it happened on.
///
/// `io::Error::new` drops the raw errno of the error it wraps, so the original error is kept
/// here and [`errno`] digs it out again.
#[derive(Debug)]
struct ContextError {
    context: String,
    cause: io::Error,
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.cause)
    }
}

// The cause is part of Display, not `source()`: printing the chain would repeat it.
impl std::error::Error for ContextError {}

/// The errno behind an error from this module tree, if the kernel gave one.
pub fn errno(err: &io::Error) -> Option<i32> {
    err.raw_os_error().or_else(|| err.get_ref()?.downcast_ref::<ContextError>().and_then(|inner| errno(&inner.cause)))
}

/// Wraps `cause` with a description of the failed operation, keeping its kind and errno.
pub(crate) fn with_context(cause: impl Into<io::Error>, context: impl Into<String>) -> io::Error {
    let cause = cause.into();
    io::Error::new(cause.kind(), ContextError { context: context.into(), cause })
}

/// `.context(|| ...)` on results of syscalls, so each call site names its operation and object.
pub(crate) trait Context<T> {
    fn context<S: Into<String>>(self, describe: impl FnOnce() -> S) -> io::Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for Result<T, E> {
    fn context<S: Into<String>>(self, describe: impl FnOnce() -> S) -> io::Result<T> {
        self.map_err(|cause| with_context(cause, describe()))
    }
}

/// Turns the C convention (-1 and errno) of a raw syscall's return value into a `Result`.
pub(crate) fn check_syscall(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_kind_errno_and_names_the_object() {
        let err = with_context(io::Error::from_raw_os_error(libc::EBUSY), "unmount /mnt/x");
        assert_eq!(errno(&err), Some(libc::EBUSY));
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let text = err.to_string();
        assert!(text.starts_with("unmount /mnt/x: "), "{text}");

        let nested = with_context(err, "stage volume");
        assert_eq!(errno(&nested), Some(libc::EBUSY));
        assert!(nested.to_string().contains("unmount /mnt/x"));
    }

    #[test]
    fn context_on_nix_errno() {
        let result: Result<(), nix::errno::Errno> = Err(nix::errno::Errno::ENOENT);
        let err = result.context(|| "open /dev/loop9").unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOENT));
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
