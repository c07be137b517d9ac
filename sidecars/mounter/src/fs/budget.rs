//! The process-wide memory budget of the buffers that scale with open files: prefetched
//! read chunks and the parts of files being written. The mounter holds every S3 mount of a
//! node, so without it N open files could hold N times a file's buffers; with it the
//! buffers of all mounts together stay under one bound (`--buffer-budget-mib`). Prefetch
//! that finds the budget spent does not read ahead (reads go on, chunk by chunk); a write
//! waits for the budget up to the mount's bound and then fails with ENOMEM.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::FsError;

/// The default budget: 256 MiB for every mount of the process together.
pub const DEFAULT_BYTES: usize = 256 << 20;

/// A budget of bytes (a semaphore whose permits are bytes).
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

static GLOBAL: OnceLock<Budget> = OnceLock::new();

impl Budget {
    /// A budget of its own (tests).
    pub fn new(bytes: usize) -> Budget {
        Budget { sem: Arc::new(Semaphore::new(bytes)), total: bytes }
    }

    /// Sets the process-wide budget; false when it was already in use.
    pub fn set_global(bytes: usize) -> bool {
        GLOBAL.set(Budget::new(bytes)).is_ok()
    }

    /// The process-wide budget every mount shares.
    pub fn global() -> Budget {
        GLOBAL.get_or_init(|| Budget::new(DEFAULT_BYTES)).clone()
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not held now.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// `bytes` of the budget if they are free now.
    pub fn try_take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(bytes).ok()?;
        self.sem.clone().try_acquire_many_owned(n).ok()
    }

    /// `bytes` of the budget, waiting at most `bound` for them (ENOMEM after).
    pub async fn take(&self, bytes: u64, bound: Duration) -> Result<OwnedSemaphorePermit, FsError> {
        let n = u32::try_from(bytes).map_err(|_| FsError::new(libc::EINVAL, format!("a buffer of {bytes} bytes")))?;
        match tokio::time::timeout(bound, self.sem.clone().acquire_many_owned(n)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(FsError::new(libc::EIO, "the mounter's buffer budget is closed")),
            Err(_) => Err(FsError::new(
                libc::ENOMEM,
                format!(
                    "the mounter's buffer budget of {} MiB (for every open file of every mount) stayed spent for {bound:?}",
                    self.total >> 20
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_is_shared_and_returned() {
        let b = Budget::new(10);
        let p = b.try_take(8).expect("8 of 10");
        assert!(b.try_take(3).is_none(), "only 2 left");
        let e = b.take(3, Duration::from_millis(50)).await.expect_err("waits, then ENOMEM");
        assert_eq!(e.errno, libc::ENOMEM);
        drop(p);
        assert_eq!(b.available(), 10);
        assert!(b.take(10, Duration::from_millis(50)).await.is_ok());
    }
}
