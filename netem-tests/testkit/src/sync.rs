//! Locks for tests: a test that panicked while holding a lock has already failed, so the next
//! one takes the lock anyway instead of failing too.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning (the data of a test lock is still usable after a panic).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_taken() {
        let m = Mutex::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _g = m.lock().expect("fresh lock");
            panic!("poison it");
        });
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 1);
    }
}
