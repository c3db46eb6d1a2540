//! The log's tail, kept in memory: the buffers of the last written batches, so a record read
//! right after it was appended (a consumer waiting on its queue, above all a lite topic's
//! subscriber) is answered without an O_DIRECT read. Bounded by the buffers' real size.

use std::collections::VecDeque;
use std::ops::Deref;
use std::rc::Rc;

use glommio::io::{DmaBuffer, ReadResult};

/// Bytes of written log: read from disk, or a slice of a batch buffer still in the tail cache.
pub enum LogBytes {
    Read(ReadResult),
    Cached { buf: Rc<DmaBuffer>, start: usize, len: usize },
}

impl Deref for LogBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            LogBytes::Read(read) => read,
            LogBytes::Cached { buf, start, len } => &buf.as_bytes()[*start..*start + *len],
        }
    }
}

impl std::fmt::Debug for LogBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if matches!(self, LogBytes::Read(_)) { "read" } else { "cached" };
        write!(f, "LogBytes({kind}, {} bytes)", self.len())
    }
}

/// One written batch: log bytes `[position, position + len)` at `prefix_len` in `buf`.
struct CachedBatch {
    position: u64,
    len: usize,
    prefix_len: usize,
    buf: Rc<DmaBuffer>,
    /// What the buffer really holds of memory: its allocation rounded up to a power of two, as
    /// glommio's buddy allocator hands out blocks of its I/O memory.
    charged_bytes: usize,
}

pub struct TailCache {
    /// Oldest first; positions increase.
    batches: VecDeque<CachedBatch>,
    held_bytes: usize,
    capacity_bytes_max: usize,
    hits: u64,
    misses: u64,
}

impl TailCache {
    /// A cache holding at most `capacity_bytes_max` bytes of buffers (0: off).
    pub fn new(capacity_bytes_max: usize) -> TailCache {
        TailCache { batches: VecDeque::new(), held_bytes: 0, capacity_bytes_max, hits: 0, misses: 0 }
    }

    /// Remembers a batch just written; forgets the oldest ones beyond the bound. Batches come
    /// in log order.
    pub fn insert(&mut self, position: u64, len: usize, prefix_len: usize, buf: Rc<DmaBuffer>, capacity_bytes: usize) {
        let charged_bytes = capacity_bytes.next_power_of_two();
        if charged_bytes > self.capacity_bytes_max {
            return;
        }
        assert!(prefix_len + len <= buf.len(), "a cached batch lies inside its buffer");
        if let Some(last) = self.batches.back() {
            assert!(last.position + last.len as u64 <= position, "tail cache batches must come in log order");
        }
        self.batches.push_back(CachedBatch { position, len, prefix_len, buf, charged_bytes });
        self.held_bytes += charged_bytes;
        while self.held_bytes > self.capacity_bytes_max {
            let Some(oldest) = self.batches.pop_front() else { break };
            self.held_bytes -= oldest.charged_bytes;
        }
    }

    /// The bytes `[position, position + len)` if one cached batch holds all of them.
    pub fn get(&mut self, position: u64, len: usize) -> Option<LogBytes> {
        let after = self.batches.partition_point(|b| b.position <= position);
        let found = after
            .checked_sub(1)
            .map(|i| &self.batches[i])
            .filter(|b| position + len as u64 <= b.position + b.len as u64);
        match found {
            Some(batch) => {
                self.hits += 1;
                let start = batch.prefix_len + (position - batch.position) as usize;
                Some(LogBytes::Cached { buf: batch.buf.clone(), start, len })
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Forgets every batch before `position` (retention deleted them).
    pub fn forget_before(&mut self, position: u64) {
        while self.batches.front().is_some_and(|b| b.position < position) {
            if let Some(oldest) = self.batches.pop_front() {
                self.held_bytes -= oldest.charged_bytes;
            }
        }
    }

    /// (hits, misses, bytes held).
    pub fn stats(&self) -> (u64, u64, usize) {
        (self.hits, self.misses, self.held_bytes)
    }
}
