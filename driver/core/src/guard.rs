//! Per-object in-flight guards: a second call on the same volume, snapshot or name while
//! the first is still running gets ABORTED instead of queueing behind it (the CO retries),
//! and calls on different objects never wait for each other.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::{Error, Result};

/// The set of keys with an operation in flight. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation on one key runs; dropping it frees the key.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Takes `key`, or fails with [`Error::InProgress`] naming `what` if it is taken.
    pub fn try_acquire(&self, key: &str, what: impl FnOnce() -> String) -> Result<InFlightGuard> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.insert(key.to_owned()) {
            return Err(Error::InProgress { what: what() });
        }
        Ok(InFlightGuard { keys: Arc::clone(&self.keys), key: key.to_owned() })
    }

    /// Takes several keys at once (all or none), e.g. a clone's source and target.
    pub fn try_acquire_all(&self, keys: &[&str], what: impl FnOnce() -> String) -> Result<Vec<InFlightGuard>> {
        let mut set = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.iter().any(|k| set.contains(*k)) {
            return Err(Error::InProgress { what: what() });
        }
        let mut guards = Vec::with_capacity(keys.len());
        for k in keys {
            if set.insert((*k).to_owned()) {
                guards.push(InFlightGuard { keys: Arc::clone(&self.keys), key: (*k).to_owned() });
            }
        }
        Ok(guards)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// A counting semaphore for blocking threads: bounds expensive work (mkfs, image copies)
/// so that many parallel calls share the machine instead of thrashing it.
#[derive(Debug)]
pub struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    slots: &'a Slots,
}

impl Slots {
    /// `n` slots (at least one).
    pub fn new(n: usize) -> Self {
        Slots { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    /// Waits for a free slot and takes it.
    pub fn take(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Slot { slots: self }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.slots.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.slots.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn second_acquire_is_aborted_until_the_first_is_dropped() {
        let f = InFlight::default();
        let g = f.try_acquire("v1", || "volume v1".into()).expect("first");
        let e = f.try_acquire("v1", || "volume v1".into()).expect_err("second");
        assert_eq!(e.code(), Code::Aborted);
        assert!(e.to_string().contains("volume v1"));
        assert!(f.try_acquire("v2", || "volume v2".into()).is_ok(), "other keys are free");
        drop(g);
        assert!(f.try_acquire("v1", || "volume v1".into()).is_ok());
    }

    #[test]
    fn acquire_all_takes_none_when_one_is_busy() {
        let f = InFlight::default();
        let _g = f.try_acquire("b", || "b".into()).expect("b");
        assert!(f.try_acquire_all(&["a", "b"], || "a and b".into()).is_err());
        assert!(f.try_acquire("a", || "a".into()).is_ok(), "a was not left taken");
    }

    #[test]
    fn slots_bound_concurrency() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let slots = Arc::new(Slots::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (slots, running, peak) = (Arc::clone(&slots), Arc::clone(&running), Arc::clone(&peak));
                std::thread::spawn(move || {
                    let _s = slots.take();
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }
}
