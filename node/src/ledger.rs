//! The space ledger: how much of the data dir's filesystem a new volume may still take.
//!
//! Images are sparse, so free space alone would let volumes be promised more than the disk
//! holds and later fail with I/O errors inside a pod. The ledger counts, as used, the part
//! of every image that is promised but not yet allocated, plus the reservations of creates
//! still in progress, so that two parallel creates cannot both take the last free bytes.

use std::sync::{Mutex, PoisonError};

use ferrovol_core::error::{Error, Result};

use crate::store::LoopStore;

/// Shared by the agent and the node service of one data dir.
#[derive(Debug, Default)]
pub struct SpaceLedger {
    reserved: Mutex<u64>,
}

/// Space held for a create in progress; released on drop (by then the new image counts).
#[derive(Debug)]
pub struct Reservation<'a> {
    ledger: &'a SpaceLedger,
    bytes: u64,
}

impl SpaceLedger {
    /// Bytes a new volume can take now.
    pub fn available(&self, store: &LoopStore) -> Result<u64> {
        let reserved = *self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Self::unreserved(store)?.saturating_sub(reserved))
    }

    fn unreserved(store: &LoopStore) -> Result<u64> {
        let root = store.root();
        let usage = crate::fs::usage(root).map_err(|e| Error::system("statvfs", root.display(), e))?;
        let promised =
            store.unallocated_promises().map_err(|e| Error::system("sum volume sizes", root.display(), e))?;
        Ok(usage.available_bytes.saturating_sub(promised))
    }

    /// Reserves `bytes` for `volume`, or fails with RESOURCE_EXHAUSTED.
    pub fn reserve(&self, store: &LoopStore, volume: &str, bytes: u64) -> Result<Reservation<'_>> {
        // Held across the free-space read, so parallel reservations see each other.
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        let available = Self::unreserved(store)?.saturating_sub(*reserved);
        if bytes > available {
            return Err(Error::InsufficientCapacity { volume: volume.to_owned(), requested: bytes, available });
        }
        *reserved += bytes;
        Ok(Reservation { ledger: self, bytes })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.ledger.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrovol_core::error::Code;

    #[test]
    fn reservations_count_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let store = LoopStore::open(d.path()).unwrap();
        let ledger = SpaceLedger::default();
        let free = ledger.available(&store).unwrap();
        assert!(free > 1 << 20, "the test needs some free space");
        let half = free / 2 + 1;
        let r = ledger.reserve(&store, "a", half).unwrap();
        let e = ledger.reserve(&store, "b", half).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.to_string().contains("\"b\""), "{e}");
        drop(r);
        ledger.reserve(&store, "b", half).unwrap();
    }
}
