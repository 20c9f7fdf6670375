//! A bounded pool of byte buffers, so that hot paths reuse memory the allocator has
//! already faulted in instead of asking for fresh pages for every buffer.
//!
//! Why: the shipper builds every data frame (about [`crate::shipper::FRAME_PLAIN_BYTES_MAX`]
//! bytes) in a `Vec` of its own. Buffers that size come from memory the allocator maps
//! fresh (or gave back to the kernel when the last one was freed), so every frame paid a
//! page fault and a zeroed page for each 4 KiB it held: ~9% of the process server's CPU in
//! a profile of the replication benchmark. With the pool, the encoder threads take a
//! buffer, the sender gives it back once its bytes are on the socket, and the next frame
//! is written into warm memory.
//!
//! Bounds: the pool keeps at most `buffers_max` buffers, each with a capacity between
//! `capacity_min_bytes` and `capacity_max_bytes`; a buffer given back beyond either
//! bound is dropped, so the memory the pool holds between uses is at most
//! `buffers_max * capacity_max_bytes`. An empty pool is no error: [`BufferPool::take`]
//! then returns a new, empty `Vec`. Buffers come back cleared (length 0), never with
//! the bytes of their last use visible.

use std::sync::Mutex;

/// A bounded free list of `Vec<u8>`; see the module doc. Shared between threads.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    buffers_max: usize,
    capacity_min_bytes: usize,
    capacity_max_bytes: usize,
}

impl BufferPool {
    /// A pool that keeps up to `buffers_max` buffers whose capacity lies in
    /// `capacity_min_bytes..=capacity_max_bytes`.
    pub fn new(buffers_max: usize, capacity_min_bytes: usize, capacity_max_bytes: usize) -> Self {
        Self {
            free: Mutex::new(Vec::with_capacity(buffers_max)),
            buffers_max,
            capacity_min_bytes,
            capacity_max_bytes,
        }
    }

    /// An empty buffer: one given back earlier (with its capacity), or a new one.
    pub fn take(&self) -> Vec<u8> {
        // A poisoned lock only means another thread panicked while pushing or popping
        // a Vec; the list itself is still a valid list of buffers.
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.pop().unwrap_or_default()
    }

    /// Gives a buffer back for reuse; it is dropped when the pool is full or its
    /// capacity lies outside the pool's bounds.
    pub fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < self.capacity_min_bytes || cap > self.capacity_max_bytes {
            return;
        }
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.buffers_max {
            free.push(buf);
        }
    }

    /// Buffers held for reuse now.
    pub fn len(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no buffer is held for reuse.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves a buffer given back is handed out again with its memory (same allocation,
    /// same capacity) and without its old contents.
    #[test]
    fn reuses_given_buffers_cleared() {
        let pool = BufferPool::new(4, 16, 1 << 20);
        let mut b = pool.take();
        assert_eq!(b.capacity(), 0, "an empty pool hands out a new buffer");
        b.extend_from_slice(&[7u8; 1000]);
        let (ptr, cap) = (b.as_ptr(), b.capacity());
        pool.give(b);
        assert_eq!(pool.len(), 1);
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.capacity()), (ptr, cap));
        assert!(again.is_empty(), "a reused buffer comes back cleared");
        assert!(pool.is_empty());
    }

    /// Proves the pool never holds more than its bound of buffers, and drops buffers
    /// too small to be worth keeping or too large to keep.
    #[test]
    fn stays_within_its_bounds() {
        let pool = BufferPool::new(3, 64, 4096);
        for _ in 0..10 {
            pool.give(Vec::with_capacity(1024));
        }
        assert_eq!(pool.len(), 3);
        let pool = BufferPool::new(3, 64, 4096);
        pool.give(Vec::with_capacity(8));
        pool.give(Vec::with_capacity(8192));
        assert!(
            pool.is_empty(),
            "buffers outside the capacity bounds are dropped"
        );
        pool.give(Vec::with_capacity(64));
        pool.give(Vec::with_capacity(4096));
        assert_eq!(pool.len(), 2);
    }

    /// Proves the pool works across threads: every buffer taken is either new or one
    /// given back, and the bound holds after concurrent use.
    #[test]
    fn shared_between_threads() {
        let pool = BufferPool::new(8, 1, 1 << 16);
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let pool = &pool;
                s.spawn(move || {
                    for _ in 0..1000 {
                        let mut b = pool.take();
                        assert!(b.is_empty());
                        b.resize(100, t);
                        pool.give(b);
                    }
                });
            }
        });
        // Four threads never hold more than four buffers at once, all given back.
        assert!((1..=4).contains(&pool.len()), "{} buffers", pool.len());
    }
}
