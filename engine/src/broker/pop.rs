//! Pop consumption state of one (consumer group, queue): which offsets are leased to a
//! consumer (invisible until a deadline), which are acked, and which were never delivered.
//!
//! Invariant: every offset in `[floor, next)` is either leased (in `leases`) or acked; every
//! offset below `floor` is acked; no offset at or above `next` was delivered. So `floor` is the
//! smallest leased offset (or `next`) and is what gets persisted as the group's offset: after a
//! restart everything from it on is delivered again (at least once, never lost).
//!
//! Pure logic with the clock passed in, so it is tested without a broker.

use std::collections::{BTreeMap, BTreeSet};

/// One delivery of one message, alive until acked or until `deadline_ms` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub offset: u64,
    /// 1 on first delivery, +1 on every redelivery.
    pub attempt: u32,
    pub deadline_ms: u64,
    /// Unique per delivery, so a receipt of an earlier delivery of the same offset is stale.
    pub lease_id: u64,
}

/// Why a receipt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseError {
    /// Acked already, or redelivered since (the receipt is from an earlier delivery).
    Stale,
    /// The invisible time ran out; the message is visible again.
    Expired,
}

#[derive(Debug, Clone)]
pub struct GroupQueue {
    floor: u64,
    next: u64,
    leases: BTreeMap<u64, Lease>,
    /// (deadline, offset) of every lease, to find expired ones without a scan.
    by_deadline: BTreeSet<(u64, u64)>,
    /// Bumped by `reset`, so a pop that read before a reset does not deliver after it.
    epoch: u64,
}

impl GroupQueue {
    /// Starts delivering at `start` (the committed offset, or the queue's first offset).
    pub fn new(start: u64) -> GroupQueue {
        GroupQueue { floor: start, next: start, leases: BTreeMap::new(), by_deadline: BTreeSet::new(), epoch: 0 }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Every offset below this is acked; the offset to persist.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The next offset never delivered.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn leased(&self) -> usize {
        self.leases.len()
    }

    /// Earliest lease deadline, for a long poll to wake at.
    pub fn earliest_deadline_ms(&self) -> Option<u64> {
        self.by_deadline.first().map(|(deadline, _)| *deadline)
    }

    /// Leases whose deadline has passed, oldest deadline first, at most `max`: to deliver again.
    pub fn expired(&self, now_ms: u64, max: usize) -> Vec<Lease> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .take(max)
            .map(|(_, offset)| self.leases[offset])
            .collect()
    }

    /// Leases `offset` again (a redelivery of an expired lease) with attempt + 1.
    pub fn redeliver(&mut self, offset: u64, deadline_ms: u64, lease_id: u64) -> Option<Lease> {
        let old = self.leases.get(&offset).copied()?;
        self.by_deadline.remove(&(old.deadline_ms, offset));
        let lease = Lease { offset, attempt: old.attempt.saturating_add(1), deadline_ms, lease_id };
        self.leases.insert(offset, lease);
        self.by_deadline.insert((deadline_ms, offset));
        Some(lease)
    }

    /// Leases `offset` for the first time. Offsets must come in increasing order, at or
    /// after `next`; skipped offsets (removed by retention) count as acked.
    pub fn deliver(&mut self, offset: u64, deadline_ms: u64, lease_id: u64) -> Lease {
        assert!(offset >= self.next, "offset {offset} delivered before, next is {}", self.next);
        if self.leases.is_empty() {
            self.floor = offset;
        }
        self.next = offset + 1;
        let lease = Lease { offset, attempt: 1, deadline_ms, lease_id };
        self.leases.insert(offset, lease);
        self.by_deadline.insert((deadline_ms, offset));
        lease
    }

    /// Skips to `offset` when nothing below it can be read any more (retention removed it).
    pub fn skip_to(&mut self, offset: u64) {
        if offset > self.next {
            self.next = offset;
        }
        let gone: Vec<u64> = self.leases.range(..offset).map(|(o, _)| *o).collect();
        for o in gone {
            self.remove(o);
        }
        self.recompute_floor();
    }

    /// Checks that `lease_id` is the live delivery of `offset`.
    pub fn check(&self, offset: u64, lease_id: u64, now_ms: u64) -> Result<Lease, LeaseError> {
        match self.leases.get(&offset) {
            Some(lease) if lease.lease_id == lease_id && lease.deadline_ms > now_ms => Ok(*lease),
            Some(lease) if lease.lease_id == lease_id => Err(LeaseError::Expired),
            _ => Err(LeaseError::Stale),
        }
    }

    /// Acks a delivery. Returns true when the floor moved (the offset to persist changed).
    pub fn ack(&mut self, offset: u64, lease_id: u64, now_ms: u64) -> Result<bool, LeaseError> {
        self.check(offset, lease_id, now_ms)?;
        let floor_before = self.floor;
        self.remove(offset);
        self.recompute_floor();
        Ok(self.floor != floor_before)
    }

    /// Moves a live delivery's deadline and keeps its lease id (an auto-renew: receipts
    /// already handed out stay valid).
    pub fn renew(&mut self, offset: u64, lease_id: u64, now_ms: u64, deadline_ms: u64) -> Result<Lease, LeaseError> {
        let old = self.check(offset, lease_id, now_ms)?;
        self.by_deadline.remove(&(old.deadline_ms, offset));
        let lease = Lease { deadline_ms, ..old };
        self.leases.insert(offset, lease);
        self.by_deadline.insert((deadline_ms, offset));
        Ok(lease)
    }

    /// Moves a live delivery's deadline; the new lease id makes the old receipt stale.
    pub fn extend(
        &mut self,
        offset: u64,
        lease_id: u64,
        now_ms: u64,
        deadline_ms: u64,
        new_lease_id: u64,
    ) -> Result<Lease, LeaseError> {
        let old = self.check(offset, lease_id, now_ms)?;
        self.by_deadline.remove(&(old.deadline_ms, offset));
        let lease = Lease { deadline_ms, lease_id: new_lease_id, ..old };
        self.leases.insert(offset, lease);
        self.by_deadline.insert((deadline_ms, offset));
        Ok(lease)
    }

    /// Forgets all leases and restarts delivery at `offset` (an explicit offset reset).
    pub fn reset(&mut self, offset: u64) {
        let epoch = self.epoch + 1;
        *self = GroupQueue::new(offset);
        self.epoch = epoch;
    }

    fn remove(&mut self, offset: u64) {
        if let Some(lease) = self.leases.remove(&offset) {
            self.by_deadline.remove(&(lease.deadline_ms, offset));
        }
    }

    fn recompute_floor(&mut self) {
        self.floor = self.leases.keys().next().copied().unwrap_or(self.next);
        debug_assert!(self.floor <= self.next);
        debug_assert_eq!(self.leases.len(), self.by_deadline.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ack_in_order_moves_the_floor() {
        let mut q = GroupQueue::new(10);
        let a = q.deliver(10, 100, 1);
        let b = q.deliver(11, 100, 2);
        assert_eq!(q.floor(), 10);
        assert_eq!(q.ack(b.offset, b.lease_id, 50), Ok(false), "acking 11 first leaves 10 leased");
        assert_eq!(q.floor(), 10);
        assert_eq!(q.ack(a.offset, a.lease_id, 50), Ok(true));
        assert_eq!(q.floor(), 12);
    }

    #[test]
    fn expired_lease_is_redelivered_with_attempt_two_and_old_receipt_is_refused() {
        let mut q = GroupQueue::new(0);
        let first = q.deliver(0, 100, 1);
        assert!(q.expired(99, 10).is_empty());
        assert_eq!(q.expired(100, 10), vec![first]);
        assert_eq!(q.ack(0, 1, 100), Err(LeaseError::Expired));
        let second = q.redeliver(0, 300, 2).unwrap();
        assert_eq!(second.attempt, 2);
        assert_eq!(q.ack(0, 1, 150), Err(LeaseError::Stale), "receipt of the first delivery");
        assert_eq!(q.ack(0, 2, 150), Ok(true));
        assert_eq!(q.ack(0, 2, 150), Err(LeaseError::Stale), "acked twice");
    }

    #[test]
    fn extend_moves_the_deadline_and_renews_the_receipt() {
        let mut q = GroupQueue::new(0);
        q.deliver(0, 100, 1);
        let extended = q.extend(0, 1, 50, 500, 7).unwrap();
        assert_eq!(extended.deadline_ms, 500);
        assert!(q.expired(200, 10).is_empty(), "not visible at the old deadline");
        assert_eq!(q.check(0, 1, 60), Err(LeaseError::Stale));
        assert_eq!(q.ack(0, 7, 400), Ok(true));
    }

    #[test]
    fn renew_keeps_the_receipt_valid() {
        let mut q = GroupQueue::new(0);
        q.deliver(0, 100, 1);
        let renewed = q.renew(0, 1, 50, 500).unwrap();
        assert_eq!((renewed.lease_id, renewed.deadline_ms), (1, 500));
        assert!(q.expired(200, 10).is_empty());
        assert_eq!(q.ack(0, 1, 400), Ok(true), "the first receipt still acks");
    }

    #[test]
    fn reset_bumps_the_epoch() {
        let mut q = GroupQueue::new(0);
        q.deliver(0, 100, 1);
        q.reset(5);
        assert_eq!((q.epoch(), q.floor(), q.next(), q.leased()), (1, 5, 5, 0));
    }

    #[test]
    fn retention_skip_drops_leases_below() {
        let mut q = GroupQueue::new(0);
        q.deliver(0, 100, 1);
        q.deliver(1, 100, 2);
        q.skip_to(5);
        assert_eq!(q.leased(), 0);
        assert_eq!((q.floor(), q.next()), (5, 5));
    }

    proptest! {
        /// Random deliver/ack/expire/extend sequences keep the invariant: floor is the lowest
        /// leased offset (or next), and every offset is acked at most once.
        #[test]
        fn floor_is_lowest_unacked(ops in proptest::collection::vec((0u8..4, 0u64..32, 1u64..50), 1..200)) {
            let mut q = GroupQueue::new(0);
            let mut now = 0u64;
            let mut next_id = 1u64;
            let mut acked = std::collections::BTreeSet::new();
            for (op, pick, step) in ops {
                now += step;
                match op {
                    0 => { q.deliver(q.next(), now + 40, next_id); next_id += 1; }
                    1 => {
                        if let Some(l) = q.leases.values().nth(pick as usize % q.leased().max(1)).copied() {
                            if q.ack(l.offset, l.lease_id, now).is_ok() {
                                prop_assert!(acked.insert(l.offset), "offset acked twice");
                            }
                        }
                    }
                    2 => {
                        for l in q.expired(now, 4) {
                            q.redeliver(l.offset, now + 40, next_id).unwrap();
                            next_id += 1;
                        }
                    }
                    _ => {
                        if let Some(l) = q.leases.values().next().copied() {
                            let _ = q.extend(l.offset, l.lease_id, now, now + 80, next_id);
                            next_id += 1;
                        }
                    }
                }
                let lowest = q.leases.keys().next().copied().unwrap_or(q.next());
                prop_assert_eq!(q.floor(), lowest);
                for o in 0..q.floor() {
                    prop_assert!(acked.contains(&o), "offset {} below floor but not acked", o);
                }
            }
        }
    }
}
