//! Delivery state of one (consumer group, queue): which offsets are leased to a consumer
//! (invisible until a deadline), which wait behind an earlier message of their FIFO message
//! group, and how far the queue has been scanned.
//!
//! Invariants:
//! - every offset in `[floor, next)` is leased, waiting (FIFO), or consumed (acked, or filtered
//!   out); every offset below `floor` is consumed; no offset at or after `next` was looked at.
//!   So `floor` is what gets persisted: after a restart everything from it on is delivered
//!   again (at least once, never lost);
//! - in FIFO mode a message group has at most one message leased at a time, and a group's
//!   messages are delivered in offset order;
//! - an expired lease comes back after the group's retry delay for the attempt it used, unless
//!   the consumer chose the delay itself (a nack) or gave it back (a release).
//!
//! Pure logic with the clock passed in, so it is tested without a broker.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::broker::backlog::Backlog;
use crate::broker::fair::{FairBacklog, Scanned};
use crate::index::QueueEntry;

/// The FIFO key of every entry of an ordered queue (any non-zero value: 0 means "no group").
const ORDERED_QUEUE_KEY: u64 = 1;

/// One delivery of one message, alive until acked or until `deadline_ms` passes. A receipt
/// names exactly these fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub offset: u64,
    /// 1 on first delivery, +1 on every redelivery.
    pub attempt: u32,
    pub deadline_ms: u64,
    /// Unique per delivery, so a receipt of an earlier delivery of the same offset is stale.
    pub lease_id: u64,
}

/// A lease just granted and where its record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub lease: Lease,
    pub entry: QueueEntry,
}

/// Why a receipt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseError {
    /// Acked already, or redelivered since (the receipt is from an earlier delivery).
    Stale,
    /// The invisible time ran out; the message is visible again.
    Expired,
}

/// What one delivery may take: how long it stays invisible and the retry delays.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms<'a> {
    pub now_ms: u64,
    pub invisible_ms: u64,
    /// Delay before an expired delivery of attempt n comes back: `retry_delays_ms[n - 1]`,
    /// the last one repeating; empty means at once.
    pub retry_delays_ms: &'a [u32],
}

impl LeaseTerms<'_> {
    fn retry_delay_ms(&self, attempt: u32) -> u64 {
        match self.retry_delays_ms.len() {
            0 => 0,
            n => u64::from(self.retry_delays_ms[(attempt.max(1) as usize - 1).min(n - 1)]),
        }
    }
}

/// Bounds on what one (group, queue) holds.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub leases_max: usize,
    /// FIFO messages waiting behind an earlier message of their group; when full, scanning
    /// stops until one is delivered.
    pub waiting_max: usize,
    /// A prioritized or fair queue's read-ahead backlog; when full, scanning stops until one
    /// is delivered. Priority decides among this many undelivered messages.
    pub backlog_max: usize,
}

#[derive(Debug, Clone, Copy)]
struct Leased {
    lease: Lease,
    entry: QueueEntry,
    /// When an expired lease may be delivered again.
    retry_at_ms: u64,
    /// Given back unconsumed: the next delivery keeps the attempt.
    released: bool,
}

#[derive(Debug, Clone)]
pub struct GroupQueue {
    next: u64,
    leases: BTreeMap<u64, Leased>,
    /// (retry_at, offset) of every lease, to find the ones due again without a scan.
    by_retry: BTreeSet<(u64, u64)>,
    /// FIFO: message group → the offset it has leased.
    blocked: HashMap<u64, u64>,
    /// FIFO: per message group, scanned messages waiting behind its leased one, in order.
    waiting: HashMap<u64, VecDeque<QueueEntry>>,
    waiting_offsets: BTreeSet<u64>,
    /// FIFO: (offset, group) of each group's first waiting message once its group is free.
    ready_heads: BTreeSet<(u64, u64)>,
    fifo: bool,
    /// The whole queue is one FIFO message group (a lite topic): one message leased at a
    /// time, in offset order, whatever the group's policy says.
    ordered: bool,
    /// FIFO was switched on while a message group held several leases: how many of those
    /// leases `blocked` does not record. While non-zero, settling a group's recorded lease
    /// looks for another of its leases before the group moves on.
    unrecorded_leases: usize,
    /// A PRIORITY queue: scanned messages wait in `backlog` and are leased best first.
    prioritized: bool,
    backlog: Backlog,
    /// A queue of a fair topic: scanned messages wait in `fair_backlog`, per tenant, and the
    /// group's `FairClock` picks whose goes next.
    fair: bool,
    fair_backlog: FairBacklog,
    /// Bumped by `reset`, so a pop that read before a reset does not deliver after it.
    epoch: u64,
    /// A pop is reading entries to scan; others leave the scan to it.
    pub scanning: bool,
}

impl GroupQueue {
    /// Starts delivering at `start` (the committed offset, or the queue's first offset).
    pub fn new(start: u64) -> GroupQueue {
        GroupQueue {
            next: start,
            leases: BTreeMap::new(),
            by_retry: BTreeSet::new(),
            blocked: HashMap::new(),
            waiting: HashMap::new(),
            waiting_offsets: BTreeSet::new(),
            ready_heads: BTreeSet::new(),
            fifo: false,
            ordered: false,
            prioritized: false,
            backlog: Backlog::default(),
            fair: false,
            fair_backlog: FairBacklog::default(),
            unrecorded_leases: 0,
            epoch: 0,
            scanning: false,
        }
    }

    /// Makes the whole queue one ordered stream (see `ordered`). Set before the first scan.
    pub fn set_ordered(&mut self) {
        self.set_fifo(true);
        self.ordered = true;
    }

    /// Makes scanned messages wait in the backlog and go highest priority first. Set before
    /// the first scan.
    pub fn set_prioritized(&mut self) {
        self.prioritized = true;
    }

    pub fn is_prioritized(&self) -> bool {
        self.prioritized
    }

    /// Makes scanned messages wait per tenant for the group's fair clock. Set before the
    /// first scan.
    pub fn set_fair(&mut self) {
        self.fair = true;
    }

    pub fn is_fair(&self) -> bool {
        self.fair
    }

    /// The FIFO message group of an entry: the whole queue when it is ordered, none on a
    /// prioritized queue (priority decides its order, whatever the group's FIFO policy).
    fn fifo_key(&self, entry: &QueueEntry) -> u64 {
        if self.prioritized || self.fair {
            0
        } else if self.ordered {
            ORDERED_QUEUE_KEY
        } else {
            entry.group_hash
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Every offset below this is consumed; the offset to persist.
    pub fn floor(&self) -> u64 {
        let lease = self.leases.keys().next().copied().unwrap_or(u64::MAX);
        let waiting = self.waiting_offsets.first().copied().unwrap_or(u64::MAX);
        let backlog = self.backlog.min_offset().unwrap_or(u64::MAX);
        let fair = self.fair_backlog.min_offset().unwrap_or(u64::MAX);
        lease.min(waiting).min(backlog).min(fair).min(self.next)
    }

    /// The next offset never scanned.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn leased(&self) -> usize {
        self.leases.len()
    }

    /// True while some delivery is out with a consumer (leased, deadline not yet passed).
    pub fn has_live_lease(&self, now_ms: u64) -> bool {
        self.leases.values().any(|l| l.lease.deadline_ms > now_ms)
    }

    /// Deliveries out with a consumer now (leased, deadline not yet passed).
    pub fn live_leases(&self, now_ms: u64) -> usize {
        self.leases.values().filter(|l| l.lease.deadline_ms > now_ms).count()
    }

    pub fn waiting(&self) -> usize {
        self.waiting_offsets.len()
    }

    /// Scanned messages of a prioritized queue not yet leased.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// The read-ahead (priority or fair) cannot take more until something is leased.
    pub fn read_ahead_full(&self, limits: QueueLimits) -> bool {
        self.backlog.len() >= limits.backlog_max
            || self.fair_backlog.len() >= limits.backlog_max
            || self.fair_backlog.behind_count() >= limits.backlog_max
    }

    /// A fair queue's held messages, per tenant.
    pub fn fair_backlog(&self) -> &FairBacklog {
        &self.fair_backlog
    }

    /// The message a prioritized queue gives next.
    pub fn best_in_backlog(&self) -> Option<&QueueEntry> {
        self.backlog.best()
    }

    /// Switches FIFO on or off (the group's policy, sent with each pop). Off frees every
    /// waiting group's head at once, and each delivered head frees the next: waiting messages
    /// drain in order. On records each group's leases, so no group gets another message until
    /// all it had leased before the switch are settled.
    pub fn set_fifo(&mut self, fifo: bool) {
        if self.ordered || self.prioritized || self.fair {
            return;
        }
        if self.fifo && !fifo {
            let heads: Vec<(u64, u64)> =
                self.waiting.iter().filter_map(|(g, q)| q.front().map(|e| (e.offset, *g))).collect();
            self.ready_heads.extend(heads);
            self.blocked.clear();
            self.unrecorded_leases = 0;
        } else if !self.fifo && fifo {
            self.blocked.clear();
            self.unrecorded_leases = 0;
            for (&offset, leased) in &self.leases {
                let group = leased.entry.group_hash;
                if group == 0 {
                    continue;
                }
                if *self.blocked.entry(group).or_insert(offset) != offset {
                    self.unrecorded_leases += 1;
                }
            }
            let blocked = &self.blocked;
            self.ready_heads.retain(|(_, group)| !blocked.contains_key(group));
        }
        self.fifo = fifo;
    }

    /// True when a pop now would find something: a lease due again, a freed FIFO group, or
    /// unscanned messages below `end` (the queue's end) that there is room to take.
    pub fn has_work(&self, end: u64, now_ms: u64, limits: QueueLimits) -> bool {
        !self.ready_heads.is_empty()
            || self.next_retry_ms().is_some_and(|at| at <= now_ms)
            || (!self.backlog.is_empty() && self.leases.len() < limits.leases_max)
            || (!self.fair_backlog.is_empty() && self.leases.len() < limits.leases_max)
            || self.fair_backlog.can_catch_up(limits.backlog_max)
            || (self.next < end && !self.stalled(limits))
    }

    /// Scanning cannot go on until something is acked. An ordered queue does not read ahead
    /// while its one message is out: nothing after it could go before it is settled.
    fn stalled(&self, limits: QueueLimits) -> bool {
        self.leases.len() >= limits.leases_max
            || self.waiting_offsets.len() >= limits.waiting_max
            || self.backlog.len() >= limits.backlog_max
            || self.fair_backlog.len() >= limits.backlog_max
            || self.fair_backlog.behind_count() >= limits.backlog_max
            || (self.ordered && !self.blocked.is_empty())
    }

    /// When the earliest expired lease may be delivered again.
    pub fn next_retry_ms(&self) -> Option<u64> {
        self.by_retry.first().map(|(at, _)| *at)
    }

    /// Offsets of leases due to be delivered again, earliest first, at most `max`.
    pub fn due(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.by_retry.iter().take_while(|(at, _)| *at <= now_ms).take(max).map(|(_, offset)| *offset).collect()
    }

    /// Delivers an expired (or released) lease again. `None` if it is no longer due.
    pub fn redeliver(&mut self, offset: u64, terms: LeaseTerms<'_>, lease_id: u64) -> Option<Delivery> {
        let old = self.leases.get(&offset).copied().filter(|l| l.retry_at_ms <= terms.now_ms)?;
        let attempt = if old.released { old.lease.attempt } else { old.lease.attempt.saturating_add(1) };
        Some(self.lease_again(old, attempt, terms, lease_id))
    }

    fn lease_again(&mut self, old: Leased, attempt: u32, terms: LeaseTerms<'_>, lease_id: u64) -> Delivery {
        let offset = old.lease.offset;
        self.by_retry.remove(&(old.retry_at_ms, offset));
        let deadline_ms = terms.now_ms + terms.invisible_ms;
        let lease = Lease { offset, attempt, deadline_ms, lease_id };
        let retry_at_ms = deadline_ms + terms.retry_delay_ms(attempt);
        self.leases.insert(offset, Leased { lease, entry: old.entry, retry_at_ms, released: false });
        self.by_retry.insert((retry_at_ms, offset));
        Delivery { lease, entry: old.entry }
    }

    /// Offsets of FIFO messages whose group is free, oldest first, at most `max`.
    pub fn ready_heads(&self, max: usize) -> Vec<u64> {
        self.ready_heads.iter().take(max).map(|(offset, _)| *offset).collect()
    }

    /// Delivers the first waiting message of a freed group.
    pub fn deliver_head(&mut self, offset: u64, terms: LeaseTerms<'_>, lease_id: u64) -> Option<Delivery> {
        let group = self.ready_heads.iter().find(|(o, _)| *o == offset).map(|(_, g)| *g)?;
        self.ready_heads.remove(&(offset, group));
        let queue = self.waiting.get_mut(&group).expect("a ready head has a waiting queue");
        let entry = queue.pop_front().expect("a ready head is waiting");
        assert_eq!(entry.offset, offset, "a group's head is its oldest waiting message");
        if queue.is_empty() {
            self.waiting.remove(&group);
        }
        self.waiting_offsets.remove(&offset);
        if !self.fifo {
            // FIFO was switched off: the group's next waiting message may go too.
            if let Some(next) = self.waiting.get(&group).and_then(VecDeque::front) {
                self.ready_heads.insert((next.offset, group));
            }
        }
        Some(self.lease_new(entry, terms, lease_id))
    }

    fn lease_new(&mut self, entry: QueueEntry, terms: LeaseTerms<'_>, lease_id: u64) -> Delivery {
        let offset = entry.offset;
        let deadline_ms = terms.now_ms + terms.invisible_ms;
        let lease = Lease { offset, attempt: 1, deadline_ms, lease_id };
        let retry_at_ms = deadline_ms + terms.retry_delay_ms(1);
        let previous = self.leases.insert(offset, Leased { lease, entry, retry_at_ms, released: false });
        assert!(previous.is_none(), "offset {offset} leased twice");
        self.by_retry.insert((retry_at_ms, offset));
        let key = self.fifo_key(&entry);
        if self.fifo && key != 0 {
            let was = self.blocked.insert(key, offset);
            assert!(was.is_none(), "a FIFO group never has two messages leased at once");
        }
        Delivery { lease, entry }
    }

    /// Takes scanned entries in offset order (from `next` on; gaps are offsets retention
    /// removed) and leases up to `room` of them. An entry `deliver` refuses (filtered out) is
    /// consumed without ever being leased. A FIFO entry whose group is busy waits. Stops,
    /// without consuming, at the first entry there is no room for.
    pub fn scan(
        &mut self,
        entries: &[QueueEntry],
        deliver: impl Fn(&QueueEntry) -> bool,
        room: usize,
        terms: LeaseTerms<'_>,
        limits: QueueLimits,
        mut lease_id: impl FnMut() -> u64,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let start = self.next;
        for entry in entries.iter().filter(|e| e.offset >= start) {
            // An ordered queue takes one message and scans no further while it is out.
            let ordered_busy = self.ordered && !self.blocked.is_empty();
            if out.len() >= room || ordered_busy {
                break;
            }
            if !deliver(entry) {
                self.next = entry.offset + 1;
                continue;
            }
            let group = self.fifo_key(entry);
            if self.fifo && group != 0 && (self.blocked.contains_key(&group) || self.waiting.contains_key(&group)) {
                if self.waiting_offsets.len() >= limits.waiting_max {
                    break;
                }
                self.waiting.entry(group).or_default().push_back(*entry);
                self.waiting_offsets.insert(entry.offset);
                self.next = entry.offset + 1;
                continue;
            }
            if self.leases.len() >= limits.leases_max {
                break;
            }
            self.next = entry.offset + 1;
            out.push(self.lease_new(*entry, terms, lease_id()));
        }
        out
    }

    /// Prioritized queues: takes scanned entries in offset order into the backlog, up to
    /// `limits.backlog_max`. An entry `keep` refuses (filtered out, or gone) is consumed
    /// without ever being leased. Returns whether `next` moved.
    pub fn fill_backlog(
        &mut self,
        entries: &[QueueEntry],
        keep: impl Fn(&QueueEntry) -> bool,
        limits: QueueLimits,
    ) -> bool {
        assert!(self.prioritized, "only a prioritized queue has a backlog");
        let start = self.next;
        for entry in entries.iter().filter(|e| e.offset >= start) {
            if self.backlog.len() >= limits.backlog_max {
                break;
            }
            if keep(entry) {
                self.backlog.push(*entry);
            }
            self.next = entry.offset + 1;
        }
        self.next != start
    }

    /// Fair queues: takes scanned entries in offset order, each into its tenant's share of
    /// the backlog or passed over when that share is full (`FairBacklog::scan`), until the
    /// backlog is full. Returns whether `next` moved.
    pub fn fill_fair(
        &mut self,
        entries: &[QueueEntry],
        keep: impl Fn(&QueueEntry) -> bool,
        limits: QueueLimits,
    ) -> bool {
        assert!(self.fair, "only a fair queue holds messages per tenant");
        let start = self.next;
        for entry in entries.iter().filter(|e| e.offset >= start) {
            if keep(entry) && self.fair_backlog.scan(entry, limits.backlog_max) == Scanned::Full {
                break;
            }
            self.next = entry.offset + 1;
        }
        self.next != start
    }

    /// Fair queues: a tenant that fell behind takes its messages from `entries` (read from
    /// its resume offset up to `read_end`). Returns whether anything changed.
    pub fn catch_up_fair(
        &mut self,
        tenant: u64,
        entries: &[QueueEntry],
        read_end: u64,
        keep: impl Fn(&QueueEntry) -> bool,
        limits: QueueLimits,
    ) -> bool {
        self.fair_backlog.catch_up(tenant, entries, read_end, self.next, keep, limits.backlog_max)
    }

    /// Leases the tenant's oldest held message, if a lease is free.
    pub fn lease_fair(
        &mut self,
        tenant: u64,
        terms: LeaseTerms<'_>,
        limits: QueueLimits,
        lease_id: u64,
    ) -> Option<Delivery> {
        if self.leases.len() >= limits.leases_max {
            return None;
        }
        let entry = self.fair_backlog.take(tenant)?;
        Some(self.lease_new(entry, terms, lease_id))
    }

    /// Leases the backlog's best message, if a lease is free.
    pub fn lease_best(&mut self, terms: LeaseTerms<'_>, limits: QueueLimits, lease_id: u64) -> Option<Delivery> {
        if self.leases.len() >= limits.leases_max {
            return None;
        }
        let entry = self.backlog.take_best()?;
        Some(self.lease_new(entry, terms, lease_id))
    }

    /// Moves `next` forward over offsets that can no longer be read (retention removed them)
    /// and forgets leases and waiting messages below it.
    pub fn skip_to(&mut self, offset: u64) {
        if offset > self.next {
            self.next = offset;
        }
        let gone: Vec<u64> = self.leases.range(..offset).map(|(o, _)| *o).collect();
        for o in gone {
            self.remove(o);
        }
        let waiting: Vec<u64> = self.waiting_offsets.range(..offset).copied().collect();
        for o in waiting {
            self.forget_waiting(o);
        }
        self.backlog.forget_below(offset);
        self.fair_backlog.forget_below(offset, self.next);
    }

    fn forget_waiting(&mut self, offset: u64) {
        self.waiting_offsets.remove(&offset);
        let Some(group) = self.waiting.iter().find(|(_, q)| q.iter().any(|e| e.offset == offset)).map(|(g, _)| *g)
        else {
            return;
        };
        let queue = self.waiting.get_mut(&group).expect("found above");
        let was_head = queue.front().is_some_and(|e| e.offset == offset);
        queue.retain(|e| e.offset != offset);
        if was_head {
            self.ready_heads.remove(&(offset, group));
            self.free_group(group);
        }
        if self.waiting.get(&group).is_some_and(VecDeque::is_empty) {
            self.waiting.remove(&group);
        }
    }

    /// Checks that `lease_id` is the live delivery of `offset`.
    pub fn check(&self, offset: u64, lease_id: u64, now_ms: u64) -> Result<Lease, LeaseError> {
        match self.leases.get(&offset) {
            Some(l) if l.lease.lease_id == lease_id && l.lease.deadline_ms > now_ms => Ok(l.lease),
            Some(l) if l.lease.lease_id == lease_id => Err(LeaseError::Expired),
            _ => Err(LeaseError::Stale),
        }
    }

    /// Acks a delivery. Returns true when the floor moved (the offset to persist changed).
    pub fn ack(&mut self, offset: u64, lease_id: u64, now_ms: u64) -> Result<bool, LeaseError> {
        self.check(offset, lease_id, now_ms)?;
        let floor_before = self.floor();
        self.remove(offset);
        Ok(self.floor() != floor_before)
    }

    /// Consumes a leased offset without a receipt (its record is gone, or the broker filtered
    /// it out after reading it). Returns true when the floor moved.
    pub fn forget(&mut self, offset: u64) -> bool {
        let floor_before = self.floor();
        self.remove(offset);
        self.floor() != floor_before
    }

    /// Moves a live delivery's deadline and keeps its lease id (an auto-renew: receipts
    /// already handed out stay valid).
    pub fn renew(&mut self, offset: u64, lease_id: u64, terms: LeaseTerms<'_>) -> Result<Lease, LeaseError> {
        let old = self.check(offset, lease_id, terms.now_ms)?;
        let deadline_ms = terms.now_ms + terms.invisible_ms;
        let retry_at_ms = deadline_ms + terms.retry_delay_ms(old.attempt);
        Ok(self.replace(offset, Lease { deadline_ms, ..old }, retry_at_ms, false))
    }

    /// A consumer's own new deadline (a nack with its chosen delay, or more time): the new
    /// lease id makes the old receipt stale, and at the deadline the message comes back at
    /// once, since the consumer already chose when. A suspended message (`keep_attempt`)
    /// comes back with the same attempt: the consumer put it off, it did not fail it.
    pub fn extend(
        &mut self,
        offset: u64,
        lease_id: u64,
        terms: LeaseTerms<'_>,
        new_lease_id: u64,
        keep_attempt: bool,
    ) -> Result<Lease, LeaseError> {
        let old = self.check(offset, lease_id, terms.now_ms)?;
        let deadline_ms = terms.now_ms + terms.invisible_ms;
        let lease = Lease { deadline_ms, lease_id: new_lease_id, ..old };
        Ok(self.replace(offset, lease, deadline_ms, keep_attempt))
    }

    /// Gives a delivery back unconsumed: deliverable at once, and the attempt is not counted.
    pub fn release(&mut self, offset: u64, lease_id: u64, now_ms: u64) -> Result<(), LeaseError> {
        let old = self.check(offset, lease_id, now_ms)?;
        self.replace(offset, Lease { deadline_ms: now_ms, ..old }, now_ms, true);
        Ok(())
    }

    fn replace(&mut self, offset: u64, lease: Lease, retry_at_ms: u64, released: bool) -> Lease {
        let old = self.leases.get(&offset).copied().expect("checked by the caller");
        self.by_retry.remove(&(old.retry_at_ms, offset));
        self.leases.insert(offset, Leased { lease, entry: old.entry, retry_at_ms, released });
        self.by_retry.insert((retry_at_ms, offset));
        lease
    }

    /// Live leases, in offset order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> + '_ {
        self.leases.values().map(|l| &l.lease)
    }

    /// Live leases below `offset` (deadline not yet passed at `now_ms`): the deliveries a move
    /// of the group's position to `offset` would skip.
    pub fn live_leases_below(&self, offset: u64, now_ms: u64) -> impl Iterator<Item = &Lease> + '_ {
        self.leases.range(..offset).map(|(_, l)| &l.lease).filter(move |l| l.deadline_ms > now_ms)
    }

    /// True when the lease was given back unconsumed (it never reached a consumer).
    pub fn was_released(&self, offset: u64) -> bool {
        self.leases.get(&offset).is_some_and(|l| l.released)
    }

    /// The stored location of a leased offset.
    pub fn leased_entry(&self, offset: u64) -> Option<QueueEntry> {
        self.leases.get(&offset).map(|l| l.entry)
    }

    /// Where this group stands with the message at `offset` (of tenant `key_hash` on a fair
    /// queue): a `delivery_state` and, when leased, its delivery attempt.
    pub fn state_of(&self, offset: u64, key_hash: u64, now_ms: u64) -> (u8, u32) {
        use sluice_transport::messages::delivery_state::{ACKED, IN_FLIGHT, PENDING};
        if let Some(leased) = self.leases.get(&offset) {
            let state = if leased.lease.deadline_ms > now_ms { IN_FLIGHT } else { PENDING };
            return (state, leased.lease.attempt);
        }
        let held = self.waiting_offsets.contains(&offset)
            || self.backlog.contains(offset)
            || self.fair_backlog.holds(offset, key_hash);
        if offset >= self.next || held {
            (PENDING, 0)
        } else {
            // Scanned, not leased and not held: acked, or passed over by the group's filter.
            (ACKED, 0)
        }
    }

    /// Forgets every lease and restarts delivery at `offset` (an explicit offset reset).
    pub fn reset(&mut self, offset: u64) {
        let (epoch, fifo, ordered, prioritized, fair) =
            (self.epoch + 1, self.fifo, self.ordered, self.prioritized, self.fair);
        *self = GroupQueue::new(offset);
        self.epoch = epoch;
        self.fifo = fifo;
        self.ordered = ordered;
        self.prioritized = prioritized;
        self.fair = fair;
    }

    fn remove(&mut self, offset: u64) {
        if let Some(leased) = self.leases.remove(&offset) {
            self.by_retry.remove(&(leased.retry_at_ms, offset));
            let group = self.fifo_key(&leased.entry);
            if self.blocked.get(&group) == Some(&offset) {
                self.blocked.remove(&group);
                self.block_on_unrecorded(group);
                self.free_group(group);
            } else if self.fifo && group != 0 && self.unrecorded_leases > 0 {
                self.unrecorded_leases -= 1;
            }
        }
        debug_assert_eq!(self.leases.len(), self.by_retry.len());
    }

    /// After FIFO was switched on: records another lease the group still holds, if any.
    fn block_on_unrecorded(&mut self, group: u64) {
        if self.unrecorded_leases == 0 {
            return;
        }
        let other = self.leases.iter().find(|(_, l)| l.entry.group_hash == group).map(|(o, _)| *o);
        if let Some(other) = other {
            self.blocked.insert(group, other);
            self.unrecorded_leases -= 1;
        }
    }

    /// A group's leased message is gone: its first waiting message may go out.
    fn free_group(&mut self, group: u64) {
        if self.blocked.contains_key(&group) {
            return;
        }
        if let Some(head) = self.waiting.get(&group).and_then(VecDeque::front) {
            self.ready_heads.insert((head.offset, group));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: QueueLimits = QueueLimits { leases_max: 1000, waiting_max: 1000, backlog_max: 1000 };

    fn terms(now_ms: u64) -> LeaseTerms<'static> {
        LeaseTerms { now_ms, invisible_ms: 100, retry_delays_ms: &[] }
    }

    fn entry(offset: u64, group_hash: u64) -> QueueEntry {
        QueueEntry { offset, position: offset * 64, size_bytes: 64, group_hash, ..Default::default() }
    }

    fn ids() -> impl FnMut() -> u64 {
        let mut next = 0;
        move || {
            next += 1;
            next
        }
    }

    fn scan_all(q: &mut GroupQueue, entries: &[QueueEntry], now: u64) -> Vec<Delivery> {
        q.scan(entries, |_| true, usize::MAX, terms(now), LIMITS, ids())
    }

    #[test]
    fn state_of_tells_pending_in_flight_and_acked_apart() {
        use sluice_transport::messages::delivery_state::{ACKED, IN_FLIGHT, PENDING};
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        // Message group 1 holds 0 and 2 (2 waits behind 0); 1 and 3 are their own groups.
        let entries = [entry(0, 1), entry(1, 2), entry(2, 1), entry(3, 3)];
        let leased: Vec<u64> = scan_all(&mut q, &entries, 0).iter().map(|d| d.lease.offset).collect();
        assert_eq!(leased, vec![0, 1, 3]);
        let lease_of = |q: &GroupQueue, offset: u64| q.leases().find(|l| l.offset == offset).unwrap().lease_id;
        assert!(!q.ack(1, lease_of(&q, 1), 0).unwrap(), "the floor stays at 0, still leased");
        assert_eq!(q.state_of(0, 0, 50), (IN_FLIGHT, 1));
        assert_eq!(q.state_of(1, 0, 50), (ACKED, 0));
        assert_eq!(q.state_of(2, 0, 50), (PENDING, 0), "waiting behind its group's head");
        assert_eq!(q.state_of(4, 0, 50), (PENDING, 0), "not scanned yet");
        assert_eq!(q.state_of(3, 0, 500).0, PENDING, "a lease past its deadline is due again");
    }

    #[test]
    fn a_prioritized_queue_leases_its_backlog_best_first_and_its_floor_waits_for_the_backlog() {
        let limits = QueueLimits { leases_max: 3, waiting_max: 1000, backlog_max: 4 };
        let mut q = GroupQueue::new(10);
        q.set_prioritized();
        let with = |offset: u64, priority: i32, tag_hash: u32| QueueEntry { priority, tag_hash, ..entry(offset, 0) };
        let entries = [with(10, 1, 0), with(11, 5, 0), with(12, 1, 7), with(13, 5, 0), with(14, 9, 0), with(15, 9, 0)];
        // 12 is filtered out (consumed); the backlog holds 4, so 15 is not read yet.
        assert!(q.fill_backlog(&entries, |e| e.tag_hash == 0, limits));
        assert_eq!((q.backlog(), q.next()), (4, 15));
        assert!(!q.has_work(16, 0, QueueLimits { leases_max: 0, ..limits }), "no lease free: nothing to do");
        assert!(q.has_work(16, 0, limits));
        let mut ids = ids();
        let order: Vec<u64> =
            std::iter::from_fn(|| q.lease_best(terms(0), limits, ids())).map(|d| d.lease.offset).collect();
        assert_eq!(order, [14, 11, 13], "priority 9, then 5 in offset order; the fourth waits for a free lease");
        assert_eq!(q.floor(), 10, "10 is still in the backlog");
        q.ack(14, 1, 1).unwrap();
        assert_eq!(q.lease_best(terms(1), limits, ids()).map(|d| d.lease.offset), Some(10));
        assert!(q.fill_backlog(&entries, |_| true, limits), "room again: 15 is read");
        q.skip_to(16);
        assert_eq!((q.backlog(), q.leased(), q.floor()), (0, 0, 16), "retention took everything");
        q.reset(3);
        assert!(q.is_prioritized(), "a reset keeps the queue's kind");
    }

    #[test]
    fn a_fair_queue_passes_over_a_full_tenant_and_its_floor_waits_for_it() {
        let (heavy, light) = (1, 2);
        let tenant = |o: u64| if o == 299 { light } else { heavy };
        let entries: Vec<QueueEntry> = (0..300).map(|o| QueueEntry { key_hash: tenant(o), ..entry(o, 0) }).collect();
        let mut q = GroupQueue::new(0);
        q.set_fair();
        q.set_fifo(true);
        assert!(q.fill_fair(&entries, |_| true, LIMITS));
        assert_eq!(q.next(), 300, "the scan went past the heavy tenant's full share");
        let first = q.lease_fair(light, terms(0), LIMITS, 1).expect("the light tenant's message is held");
        assert_eq!(first.entry.offset, 299);
        assert_eq!(q.floor(), 0, "the heavy tenant's messages still count");
        let mut ids = ids();
        let leased: Vec<u64> =
            std::iter::from_fn(|| q.lease_fair(heavy, terms(0), LIMITS, ids()).map(|d| d.lease.offset)).collect();
        assert_eq!(leased, (0..128).collect::<Vec<u64>>(), "its share, in order; FIFO does not apply");
        assert!(q.has_work(300, 0, LIMITS), "the heavy tenant can catch up");
        assert!(q.catch_up_fair(heavy, &entries[128..], 300, |_| true, LIMITS));
        assert_eq!(q.lease_fair(heavy, terms(0), LIMITS, ids()).map(|d| d.lease.offset), Some(128));
        for offset in 0..=128 {
            q.forget(offset);
        }
        assert_eq!(q.floor(), 129);
        q.reset(0);
        assert!(q.is_fair() && q.fair_backlog().is_empty(), "a reset keeps the queue fair and forgets what it held");
    }

    #[test]
    fn a_fifo_group_on_a_prioritized_queue_follows_priority_not_message_groups() {
        let mut q = GroupQueue::new(0);
        q.set_prioritized();
        q.set_fifo(true);
        // Same message group (a producer may set one on a priority message): both go out.
        let entries = [QueueEntry { priority: 1, ..entry(0, 7) }, QueueEntry { priority: 2, ..entry(1, 7) }];
        q.fill_backlog(&entries, |_| true, LIMITS);
        let mut ids = ids();
        let first = q.lease_best(terms(0), LIMITS, ids()).expect("first");
        let second = q.lease_best(terms(0), LIMITS, ids()).expect("second: no FIFO block on a priority queue");
        assert_eq!((first.lease.offset, second.lease.offset), (1, 0));
        q.ack(1, first.lease.lease_id, 1).unwrap();
        q.ack(0, second.lease.lease_id, 1).unwrap();
        assert_eq!(q.floor(), 2);
    }

    #[test]
    fn an_ordered_queue_leases_one_message_at_a_time_in_offset_order() {
        let mut q = GroupQueue::new(0);
        q.set_ordered();
        q.set_fifo(false);
        let got = scan_all(&mut q, &[entry(0, 0), entry(1, 0), entry(2, 5)], 0);
        assert_eq!(got.iter().map(|d| d.lease.offset).collect::<Vec<_>>(), vec![0], "message groups do not matter");
        assert_eq!(q.waiting(), 0, "nothing is read ahead while 0 is out");
        assert_eq!(q.next(), 1);
        assert!(!q.has_work(3, 1, LIMITS), "not ready while its one message is out");
        q.ack(0, got[0].lease.lease_id, 1).unwrap();
        assert!(q.has_work(3, 1, LIMITS));
        let next = scan_all(&mut q, &[entry(1, 0), entry(2, 5)], 2);
        assert_eq!(next.iter().map(|d| d.lease.offset).collect::<Vec<_>>(), vec![1]);
        assert!(!q.has_work(3, 2, LIMITS), "2 waits for 1");
        q.reset(0);
        let again = scan_all(&mut q, &[entry(0, 0), entry(1, 0)], 3);
        assert_eq!(again.len(), 1, "an offset reset keeps the queue ordered");
    }

    #[test]
    fn ack_in_order_moves_the_floor() {
        let mut q = GroupQueue::new(10);
        let got = scan_all(&mut q, &[entry(10, 0), entry(11, 0)], 0);
        assert_eq!(q.floor(), 10);
        assert_eq!(q.ack(11, got[1].lease.lease_id, 50), Ok(false), "acking 11 first leaves 10 leased");
        assert_eq!(q.ack(10, got[0].lease.lease_id, 50), Ok(true));
        assert_eq!(q.floor(), 12);
    }

    #[test]
    fn filtered_entries_are_consumed_without_a_lease() {
        let mut q = GroupQueue::new(0);
        let got = q.scan(&[entry(0, 0), entry(1, 0), entry(2, 0)], |e| e.offset != 1, 10, terms(0), LIMITS, ids());
        assert_eq!(got.iter().map(|d| d.lease.offset).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(q.leased(), 2);
        q.ack(0, got[0].lease.lease_id, 1).unwrap();
        q.ack(2, got[1].lease.lease_id, 1).unwrap();
        assert_eq!(q.floor(), 3, "the filtered offset counts as consumed");
    }

    #[test]
    fn expired_lease_comes_back_after_the_retry_delay_with_attempt_two() {
        let mut q = GroupQueue::new(0);
        let delays = [1000, 5000];
        let t = |now| LeaseTerms { now_ms: now, invisible_ms: 100, retry_delays_ms: &delays };
        let first = q.scan(&[entry(0, 0)], |_| true, 1, t(0), LIMITS, ids())[0].lease;
        assert_eq!(q.ack(0, first.lease_id, 100), Err(LeaseError::Expired));
        assert!(q.due(1099, 10).is_empty(), "waits the first retry delay after the deadline");
        assert_eq!(q.due(1100, 10), vec![0]);
        let second = q.redeliver(0, t(1100), 2).unwrap().lease;
        assert_eq!(second.attempt, 2);
        assert_eq!(q.next_retry_ms(), Some(1200 + 5000), "the second attempt waits the second delay");
        assert_eq!(q.ack(0, first.lease_id, 1150), Err(LeaseError::Stale), "receipt of the first delivery");
        assert_eq!(q.ack(0, 2, 1150), Ok(true));
        assert_eq!(q.ack(0, 2, 1150), Err(LeaseError::Stale), "acked twice");
    }

    #[test]
    fn a_nack_comes_back_at_the_consumers_deadline_without_extra_delay() {
        let mut q = GroupQueue::new(0);
        let delays = [60_000];
        let t = |now| LeaseTerms { now_ms: now, invisible_ms: 500, retry_delays_ms: &delays };
        let first = q.scan(&[entry(0, 0)], |_| true, 1, t(0), LIMITS, ids())[0].lease;
        let nacked = q.extend(0, first.lease_id, t(10), 9, false).unwrap();
        assert_eq!(nacked.deadline_ms, 510);
        assert_eq!(q.due(510, 10), vec![0]);
    }

    #[test]
    fn a_suspended_delivery_comes_back_with_the_same_attempt_and_a_nack_counts_one() {
        let t = |now| LeaseTerms { now_ms: now, invisible_ms: 500, retry_delays_ms: &[] };
        for (suspend, attempt) in [(true, 1), (false, 2)] {
            let mut q = GroupQueue::new(0);
            let first = q.scan(&[entry(0, 0)], |_| true, 1, t(0), LIMITS, ids())[0].lease;
            q.extend(0, first.lease_id, t(10), 9, suspend).unwrap();
            assert_eq!(q.due(509, 10), Vec::<u64>::new(), "hidden until the consumer's deadline");
            let again = q.redeliver(0, t(510), 10).expect("due at 510");
            assert_eq!(again.lease.attempt, attempt, "suspend = {suspend}");
        }
    }

    #[test]
    fn renew_keeps_the_receipt_valid() {
        let mut q = GroupQueue::new(0);
        let first = scan_all(&mut q, &[entry(0, 0)], 0)[0].lease;
        let renewed = q.renew(0, first.lease_id, LeaseTerms { now_ms: 50, invisible_ms: 450, retry_delays_ms: &[] });
        assert_eq!(renewed.unwrap().deadline_ms, 500);
        assert!(q.due(200, 10).is_empty());
        assert_eq!(q.ack(0, first.lease_id, 400), Ok(true), "the first receipt still acks");
    }

    #[test]
    fn a_released_delivery_comes_back_at_once_with_the_same_attempt() {
        let mut q = GroupQueue::new(0);
        let first = scan_all(&mut q, &[entry(0, 0)], 0)[0].lease;
        q.release(0, first.lease_id, 10).unwrap();
        assert_eq!(q.due(10, 10), vec![0]);
        assert_eq!(q.redeliver(0, terms(10), 5).unwrap().lease.attempt, 1);
    }

    #[test]
    fn fifo_holds_a_group_until_its_message_is_acked_and_groups_are_independent() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        let entries = [entry(0, 7), entry(1, 7), entry(2, 8), entry(3, 7), entry(4, 8)];
        let got = scan_all(&mut q, &entries, 0);
        assert_eq!(got.iter().map(|d| d.lease.offset).collect::<Vec<_>>(), vec![0, 2], "one per group");
        assert_eq!(q.waiting(), 3);
        assert_eq!(q.floor(), 0);
        // Group 8 moves on while group 7 is still busy.
        q.ack(2, got[1].lease.lease_id, 1).unwrap();
        assert_eq!(q.ready_heads(10), vec![4]);
        let four = q.deliver_head(4, terms(1), 10).unwrap();
        assert!(q.ready_heads(10).is_empty());
        // Group 7 in order: 1 only after 0, then 3.
        q.ack(0, got[0].lease.lease_id, 2).unwrap();
        assert_eq!(q.ready_heads(10), vec![1]);
        let one = q.deliver_head(1, terms(2), 11).unwrap();
        assert!(q.ready_heads(10).is_empty(), "3 waits for 1");
        q.ack(1, one.lease.lease_id, 3).unwrap();
        let three = q.deliver_head(3, terms(3), 12).unwrap();
        q.ack(3, three.lease.lease_id, 4).unwrap();
        q.ack(4, four.lease.lease_id, 4).unwrap();
        assert_eq!((q.floor(), q.leased(), q.waiting()), (5, 0, 0));
    }

    #[test]
    fn an_expired_fifo_message_is_redelivered_before_its_group_moves_on() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        let got = scan_all(&mut q, &[entry(0, 7), entry(1, 7)], 0);
        assert_eq!(got.len(), 1);
        assert!(q.ready_heads(10).is_empty());
        let again = q.redeliver(0, terms(100), 9).unwrap();
        assert_eq!(again.lease.attempt, 2);
        assert!(q.ready_heads(10).is_empty(), "1 still waits");
    }

    #[test]
    fn scanning_stops_when_the_waiting_room_is_full() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        let limits = QueueLimits { leases_max: 100, waiting_max: 2, backlog_max: 100 };
        let entries: Vec<QueueEntry> = (0..6).map(|o| entry(o, 7)).collect();
        let got = q.scan(&entries, |_| true, 100, terms(0), limits, ids());
        assert_eq!(got.len(), 1);
        assert_eq!((q.waiting(), q.next()), (2, 3), "stopped at the first message with no room");
        assert!(!q.has_work(6, 0, limits), "stalled until an ack");
        q.ack(0, got[0].lease.lease_id, 1).unwrap();
        assert!(q.has_work(6, 1, limits));
    }

    #[test]
    fn switching_fifo_off_drains_every_waiting_message_in_order() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        let got = scan_all(&mut q, &(0..4).map(|o| entry(o, 7)).collect::<Vec<_>>(), 0);
        assert_eq!((got.len(), q.waiting()), (1, 3));
        q.set_fifo(false);
        let mut delivered = Vec::new();
        let mut id = 100;
        while let Some(&head) = q.ready_heads(1).first() {
            id += 1;
            delivered.push(q.deliver_head(head, terms(1), id).unwrap().lease);
        }
        assert_eq!(delivered.iter().map(|l| l.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
        q.ack(0, got[0].lease.lease_id, 2).unwrap();
        for l in delivered {
            q.ack(l.offset, l.lease_id, 2).unwrap();
        }
        assert_eq!((q.floor(), q.leased(), q.waiting()), (4, 0, 0));
    }

    #[test]
    fn switching_fifo_on_holds_a_group_until_all_its_earlier_leases_settle() {
        let mut q = GroupQueue::new(0);
        let got = scan_all(&mut q, &[entry(0, 7), entry(1, 7)], 0);
        q.set_fifo(true);
        let more = scan_all(&mut q, &[entry(2, 7)], 1);
        assert!(more.is_empty(), "group 7 still has 0 and 1 leased");
        q.ack(0, got[0].lease.lease_id, 2).unwrap();
        assert!(q.ready_heads(10).is_empty(), "1 is still leased");
        q.ack(1, got[1].lease.lease_id, 2).unwrap();
        assert_eq!(q.ready_heads(10), vec![2]);
    }

    #[test]
    fn reset_bumps_the_epoch_and_keeps_the_mode() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        scan_all(&mut q, &[entry(0, 1)], 0);
        q.reset(5);
        assert_eq!((q.epoch(), q.floor(), q.next(), q.leased()), (1, 5, 5, 0));
        assert!(q.fifo);
    }

    #[test]
    fn retention_skip_drops_leases_and_waiting_messages_below() {
        let mut q = GroupQueue::new(0);
        q.set_fifo(true);
        scan_all(&mut q, &[entry(0, 1), entry(1, 1), entry(2, 2)], 0);
        q.skip_to(5);
        assert_eq!((q.leased(), q.waiting()), (0, 0));
        assert_eq!((q.floor(), q.next()), (5, 5));
    }

    proptest! {
        /// Random scans, acks, expiries, renewals, releases and FIFO switches keep the
        /// invariants: the floor is the lowest unconsumed offset, every offset is consumed at
        /// most once, no waiting message is stranded, a FIFO group never has two leases (but
        /// for those it held when FIFO was switched on), and without switches each group's
        /// messages are first delivered in order.
        #[test]
        fn invariants_hold(
            ops in proptest::collection::vec((0u8..7, 0u64..32, 1u64..50), 1..300),
            fifo in any::<bool>(),
            switches in any::<bool>(),
        ) {
            let mut q = GroupQueue::new(0);
            q.set_fifo(fifo);
            let mut fifo = fifo;
            let mut held_at_switch = std::collections::BTreeSet::new();
            let limits = QueueLimits { leases_max: 8, waiting_max: 6, backlog_max: 6 };
            let mut now = 0u64;
            let mut next_id = 1u64;
            let mut consumed = std::collections::BTreeSet::new();
            let mut first_delivered: Vec<u64> = Vec::new();
            let mut end = 0u64;
            let group_of = |o: u64| o % 3 + 1;
            for (op, pick, step) in ops {
                now += step;
                let t = LeaseTerms { now_ms: now, invisible_ms: 40, retry_delays_ms: &[10, 20] };
                match op {
                    0 => {
                        end += pick % 4;
                        let entries: Vec<QueueEntry> = (q.next()..end).map(|o| entry(o, group_of(o))).collect();
                        let got = q.scan(&entries, |e| e.offset % 7 != 3, 1 + pick as usize % 5, t, limits, || { next_id += 1; next_id });
                        first_delivered.extend(got.iter().map(|d| d.lease.offset));
                        for skipped in (0..q.next()).filter(|o| o % 7 == 3) {
                            consumed.insert(skipped);
                        }
                    }
                    1 => {
                        if let Some(l) = q.leases.values().nth(pick as usize % q.leased().max(1)).map(|l| l.lease) {
                            if q.ack(l.offset, l.lease_id, now).is_ok() {
                                prop_assert!(consumed.insert(l.offset), "offset acked twice");
                            }
                        }
                    }
                    2 => {
                        for offset in q.due(now, 4) {
                            next_id += 1;
                            q.redeliver(offset, t, next_id).unwrap();
                        }
                    }
                    3 => {
                        for offset in q.ready_heads(2) {
                            next_id += 1;
                            first_delivered.push(q.deliver_head(offset, t, next_id).unwrap().lease.offset);
                        }
                    }
                    4 => {
                        if let Some(l) = q.leases.values().next().map(|l| l.lease) {
                            let _ = q.release(l.offset, l.lease_id, now);
                        }
                    }
                    5 => {
                        if let Some(l) = q.leases.values().next().map(|l| l.lease) {
                            next_id += 1;
                            let _ = q.extend(l.offset, l.lease_id, t, next_id, false);
                        }
                    }
                    _ => {
                        if switches {
                            fifo = !fifo;
                            q.set_fifo(fifo);
                            held_at_switch = q.leases.keys().copied().collect();
                        }
                    }
                }
                for (group, waiting) in &q.waiting {
                    let head = waiting.front().map(|e| e.offset);
                    prop_assert!(head.is_some(), "group {} waits with nothing", group);
                    let freed = head.is_some_and(|h| q.ready_heads.contains(&(h, *group)));
                    prop_assert!(freed || (fifo && q.blocked.contains_key(group)), "group {} stranded", group);
                }
                let lowest = q.leases.keys().chain(q.waiting_offsets.iter()).min().copied().unwrap_or(q.next());
                prop_assert_eq!(q.floor(), lowest);
                for o in 0..q.floor() {
                    prop_assert!(consumed.contains(&o), "offset {} below the floor but not consumed", o);
                }
                prop_assert_eq!(q.leases.len(), q.by_retry.len());
                if fifo {
                    for g in 1..=3 {
                        let held: Vec<u64> = q.leases.keys().copied().filter(|o| group_of(*o) == g).collect();
                        prop_assert!(
                            held.len() <= 1 || held.iter().all(|o| held_at_switch.contains(o)),
                            "two leases in FIFO group {}: {:?}", g, held
                        );
                    }
                }
                if fifo && !switches {
                    for g in 1..=3 {
                        let order: Vec<u64> = first_delivered.iter().copied().filter(|o| group_of(*o) == g).collect();
                        prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "group {} out of order: {:?}", g, order);
                    }
                }
            }
        }
    }
}
