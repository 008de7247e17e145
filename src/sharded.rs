//! Sharded std mutexes: a fixed number of independent locks, chosen by hashing a key, so no
//! lock is global. Each lock is held for a map operation only, never across an `.await`.
//!
//! Used by the write buffer, the read path's single-flight waiters and the per-peer stream
//! counts. A poisoned shard only means a thread panicked mid-update of plain data that is still
//! valid, so locking recovers it instead of cascading the panic.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};

pub struct Sharded<T> {
    shards: Vec<Mutex<T>>,
    hasher: RandomState,
}

impl<T> Sharded<T> {
    pub fn new(n: usize, mut init: impl FnMut() -> T) -> Self {
        Self { shards: (0..n).map(|_| Mutex::new(init())).collect(), hasher: RandomState::new() }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard `key` belongs to.
    pub fn index_of<K: Hash + ?Sized>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % self.shards.len()
    }

    pub fn lock(&self, idx: usize) -> MutexGuard<'_, T> {
        self.shards[idx].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock the shard `key` belongs to.
    pub fn lock_for<K: Hash + ?Sized>(&self, key: &K) -> MutexGuard<'_, T> {
        self.lock(self.index_of(key))
    }
}
