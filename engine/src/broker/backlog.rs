//! The read-ahead backlog of a prioritized (group, queue): messages scanned from the queue
//! index and not yet leased, taken highest priority first and, within one priority, in offset
//! order. Bounded by the caller (`QueueLimits::backlog_max`), so priority decides among the
//! next `backlog_max` undelivered messages of a queue, not the whole queue: a message further
//! back waits until the backlog reaches it.
//!
//! Pure state; `GroupQueue` owns one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::index::QueueEntry;

/// Order of the backlog: higher priority first (RocketMQ: a larger value is more urgent),
/// then lower offset.
type Rank = (Reverse<i32>, u64);

#[derive(Debug, Clone, Default)]
pub struct Backlog {
    by_rank: BTreeMap<Rank, QueueEntry>,
    /// The same entries by offset, for the group's floor and for retention.
    offsets: BTreeSet<u64>,
}

impl Backlog {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn push(&mut self, entry: QueueEntry) {
        let fresh = self.offsets.insert(entry.offset);
        assert!(fresh, "offset {} entered the backlog twice", entry.offset);
        self.by_rank.insert(rank(&entry), entry);
        debug_assert_eq!(self.by_rank.len(), self.offsets.len());
    }

    /// The entry that goes next.
    pub fn best(&self) -> Option<&QueueEntry> {
        self.by_rank.values().next()
    }

    pub fn take_best(&mut self) -> Option<QueueEntry> {
        let (_, entry) = self.by_rank.pop_first()?;
        let was = self.offsets.remove(&entry.offset);
        assert!(was, "a ranked entry is indexed by offset");
        Some(entry)
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.offsets.contains(&offset)
    }

    /// The lowest offset waiting here.
    pub fn min_offset(&self) -> Option<u64> {
        self.offsets.first().copied()
    }

    /// Forgets entries below `offset` (retention removed them). Returns how many.
    pub fn forget_below(&mut self, offset: u64) -> usize {
        let keep = self.offsets.split_off(&offset);
        let gone = std::mem::replace(&mut self.offsets, keep);
        self.by_rank.retain(|(_, o), _| *o >= offset);
        debug_assert_eq!(self.by_rank.len(), self.offsets.len());
        gone.len()
    }
}

fn rank(entry: &QueueEntry) -> Rank {
    (Reverse(entry.priority), entry.offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(offset: u64, priority: i32) -> QueueEntry {
        QueueEntry { offset, priority, ..QueueEntry::default() }
    }

    #[test]
    fn highest_priority_first_then_offset_order() {
        let mut b = Backlog::default();
        for (offset, priority) in [(0, 1), (1, 5), (2, 1), (3, 9), (4, 5), (5, 0)] {
            b.push(entry(offset, priority));
        }
        assert_eq!(b.min_offset(), Some(0));
        let order: Vec<(u64, i32)> = std::iter::from_fn(|| b.take_best()).map(|e| (e.offset, e.priority)).collect();
        assert_eq!(order, [(3, 9), (1, 5), (4, 5), (0, 1), (2, 1), (5, 0)]);
        assert!(b.is_empty() && b.min_offset().is_none());
    }

    #[test]
    fn forgetting_below_an_offset_keeps_the_rest_in_rank() {
        let mut b = Backlog::default();
        for (offset, priority) in [(10, 0), (11, 7), (12, 3), (13, 7)] {
            b.push(entry(offset, priority));
        }
        assert_eq!(b.forget_below(12), 2);
        assert_eq!(b.min_offset(), Some(12));
        assert_eq!(b.best().map(|e| e.offset), Some(13));
        assert_eq!(b.len(), 2);
    }

    proptest! {
        /// Whatever the arrival order, entries leave sorted by (priority desc, offset asc), and
        /// `min_offset` is always the smallest offset still held.
        #[test]
        fn leaves_in_rank_order(priorities in proptest::collection::vec(0i32..5, 1..200)) {
            let mut b = Backlog::default();
            let mut held = BTreeSet::new();
            for (offset, p) in priorities.iter().enumerate() {
                b.push(entry(offset as u64, *p));
                held.insert(offset as u64);
            }
            let mut last: Option<(i32, u64)> = None;
            while let Some(e) = b.take_best() {
                prop_assert!(held.remove(&e.offset), "each entry leaves once");
                prop_assert_eq!(b.min_offset(), held.first().copied(), "the lowest offset still held");
                if let Some((p, o)) = last {
                    prop_assert!(e.priority < p || (e.priority == p && e.offset > o));
                }
                last = Some((e.priority, e.offset));
            }
            prop_assert!(held.is_empty());
        }
    }
}
