//! Locking that survives poisoning: the one helper every crate of the workspace uses.
//!
//! A std lock is poisoned when a thread panics while holding it, and every later `lock()`
//! then returns an error. The state behind our locks is left consistent by each critical
//! section (a few field updates, one insert or remove), so a panic in one thread (a vCPU,
//! an iothread, an API handler) must not cascade into panics in every other thread that
//! touches the same lock. These helpers take the data regardless of poisoning, instead of
//! each module carrying its own `unwrap_or_else(|e| e.into_inner())`.

use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
    WaitTimeoutResult,
};
use std::time::Duration;

/// Locks `m`, ignoring poisoning.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks `m` if it is free now (None when another thread holds it), ignoring poisoning.
pub fn try_lock<T: ?Sized>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The data of a mutex held exclusively, ignoring poisoning.
pub fn get_mut<T: ?Sized>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|e| e.into_inner())
}

/// Takes `l` for reading, ignoring poisoning.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Takes `l` for writing, ignoring poisoning.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard`, ignoring poisoning.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard` for at most `timeout`, ignoring poisoning.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex, RwLock};
    use std::time::Duration;

    /// Poisons `m` by panicking in a thread that holds it.
    fn poison<T: Send + 'static>(m: &Arc<Mutex<T>>) {
        let m2 = Arc::clone(m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(m.is_poisoned());
    }

    #[test]
    fn poisoned_locks_still_yield_their_data() {
        let m = Arc::new(Mutex::new(1));
        poison(&m);
        *super::lock(&m) += 1;
        assert_eq!(super::try_lock(&m).map(|g| *g), Some(2));
        let held = super::lock(&m);
        assert!(super::try_lock(&m).is_none());
        drop(held);
        assert_eq!(*super::lock(&m), 2);
        let cv = Condvar::new();
        let (g, res) = super::wait_timeout(&cv, super::lock(&m), Duration::from_millis(1));
        assert!(res.timed_out());
        assert_eq!(*g, 2);
        drop(g);
        let mut m = Arc::try_unwrap(m).unwrap();
        *super::get_mut(&mut m) = 3;
        assert_eq!(*super::lock(&m), 3);

        let l = Arc::new(RwLock::new(5));
        let l2 = Arc::clone(&l);
        let _ = std::thread::spawn(move || {
            let _g = l2.write();
            panic!("poison the rwlock");
        })
        .join();
        assert!(l.is_poisoned());
        *super::write(&l) += 1;
        assert_eq!(*super::read(&l), 6);
    }
}
