//! What each consumer group gets next, on one shard. For every (group, topic) it keeps the
//! delivery state of the topic's local queues (`GroupQueue`), the *ready set* of queues with
//! something deliverable now, and when each queue's earliest expired lease comes due. Appends,
//! acks, releases and lease changes update these as they happen; a pop serves ready queues in
//! turn and never scans an idle one. Pure state: the I/O of a pop lives in `delivery`.
//!
//! Invariant (checked by `check_consistent` in tests): after `promote_due(now)`, a queue is
//! in the ready set exactly when its `GroupQueue::has_work(end, now)` holds, and every queue
//! whose earliest retry lies in the future is in `retry_due` at that time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;

use sluice_transport::messages::{FilterSpec, GroupPolicy};
use sluice_transport::model::filter::{Filter, FilterError};
use sluice_transport::model::placement::split_topic_queue;

use crate::broker::pop::{GroupQueue, QueueLimits};

/// What `GroupTopic::refresh` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub became_ready: bool,
}

/// A (group, topic) pair's delivery state on this shard.
pub struct GroupTopic {
    pub queues: BTreeMap<u32, GroupQueue>,
    ready: BTreeSet<u32>,
    /// (when, queue) of each queue's earliest expired-lease retry still in the future.
    retry_due: BTreeSet<(u64, u32)>,
    retry_at: HashMap<u32, u64>,
    /// Where the next pop starts in the ready set, so queues are served in turn.
    cursor: u32,
    /// Long polls of this group on this topic wait here.
    pub waiters: Rc<tokio::sync::Notify>,
    pub filter: Rc<Filter>,
    filter_spec: FilterSpec,
    pub policy: GroupPolicy,
}

impl GroupTopic {
    fn new() -> GroupTopic {
        GroupTopic {
            queues: BTreeMap::new(),
            ready: BTreeSet::new(),
            retry_due: BTreeSet::new(),
            retry_at: HashMap::new(),
            cursor: 0,
            waiters: Rc::new(tokio::sync::Notify::new()),
            filter: Rc::new(Filter::All),
            filter_spec: FilterSpec::default(),
            policy: GroupPolicy::default(),
        }
    }

    /// Ready queues, starting after the last one served.
    pub fn ready_in_turn(&self) -> Vec<u32> {
        let after: Vec<u32> = self.ready.range(self.cursor..).copied().collect();
        after.into_iter().chain(self.ready.range(..self.cursor).copied()).collect()
    }

    pub fn served(&mut self, queue: u32) {
        self.cursor = queue.wrapping_add(1);
    }

    /// Earliest time a retry makes a queue ready.
    pub fn next_retry_ms(&self) -> Option<u64> {
        self.retry_due.first().map(|(at, _)| *at)
    }

    pub fn is_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Moves queues whose retry time has come into the ready set.
    pub fn promote_due(&mut self, now_ms: u64) {
        while let Some(&(at, queue)) = self.retry_due.first() {
            if at > now_ms {
                break;
            }
            self.retry_due.remove(&(at, queue));
            self.retry_at.remove(&queue);
            self.ready.insert(queue);
        }
    }

    /// Recomputes one queue's membership in the ready set and its retry time. Every change to
    /// the queue's `GroupQueue` is followed by this. Returns whether it is ready now and whether
    /// it just became ready (long polls are woken on that transition, not on every refresh, so
    /// a poll that finds nothing does not wake itself).
    pub fn refresh(&mut self, queue: u32, end: u64, now_ms: u64, limits: QueueLimits) -> Readiness {
        let Some(gq) = self.queues.get(&queue) else {
            self.ready.remove(&queue);
            return Readiness { ready: false, became_ready: false };
        };
        let ready = gq.has_work(end, now_ms, limits);
        let retry = gq.next_retry_ms().filter(|at| *at > now_ms);
        let became_ready = if ready {
            self.ready.insert(queue)
        } else {
            self.ready.remove(&queue);
            false
        };
        if let Some(old) = self.retry_at.remove(&queue) {
            self.retry_due.remove(&(old, queue));
        }
        if let Some(at) = retry {
            self.retry_at.insert(queue, at);
            self.retry_due.insert((at, queue));
        }
        Readiness { ready, became_ready }
    }

    /// Replaces the filter when the group subscribes with another expression.
    pub fn set_filter(&mut self, spec: &FilterSpec) -> Result<(), FilterError> {
        if *spec != self.filter_spec {
            self.filter = Rc::new(Filter::parse(spec.kind, &spec.expression)?);
            self.filter_spec = spec.clone();
        }
        Ok(())
    }

    /// Takes the policy a pop states; true when FIFO was switched (readiness may change).
    pub fn set_policy(&mut self, policy: &GroupPolicy) -> bool {
        if self.policy == *policy {
            return false;
        }
        let switched = self.policy.fifo != policy.fifo;
        for gq in self.queues.values_mut() {
            gq.set_fifo(policy.fifo);
        }
        self.policy = policy.clone();
        switched
    }

    /// Leases held across the topic's queues.
    pub fn leased(&self) -> usize {
        self.queues.values().map(GroupQueue::leased).sum()
    }

    #[cfg(test)]
    fn check_consistent(&self, now_ms: u64, end_of: impl Fn(u32) -> u64, limits: QueueLimits) -> Result<(), String> {
        for (queue, gq) in &self.queues {
            let want = gq.has_work(end_of(*queue), now_ms, limits);
            if self.ready.contains(queue) != want {
                return Err(format!("queue {queue}: ready {} but has_work {want}", self.ready.contains(queue)));
            }
            if let Some(at) = gq.next_retry_ms().filter(|at| *at > now_ms) {
                if !self.retry_due.contains(&(at, *queue)) {
                    return Err(format!("queue {queue}: retry at {at} missing from retry_due"));
                }
            }
        }
        Ok(())
    }
}

/// Key of a (consumer group, topic) pair.
pub type GroupKey = (Rc<str>, Rc<str>);

/// Every group's delivery state on one shard.
#[derive(Default)]
pub struct Scheduler {
    /// The local queues of each topic: topic → (index → queue name).
    topics: HashMap<Rc<str>, BTreeMap<u32, Rc<str>>>,
    groups: HashMap<GroupKey, GroupTopic>,
    /// Which groups consume each topic here, to wake them on appends.
    consumers: HashMap<Rc<str>, HashSet<Rc<str>>>,
    /// `GroupQueue`s held in all, bounded by the broker's `group_queues_max`.
    group_queues: usize,
}

impl Scheduler {
    /// Records a topic queue (`topic#index`) served by this shard. Other names are ignored.
    pub fn add_queue(&mut self, queue: &str) {
        if let Some((topic, index)) = split_topic_queue(queue) {
            self.topics.entry(topic.into()).or_default().insert(index, queue.into());
        }
    }

    /// Forgets a queue and every group's state on it.
    pub fn remove_queue(&mut self, queue: &str) {
        let Some((topic, index)) = split_topic_queue(queue) else { return };
        if let Some(queues) = self.topics.get_mut(topic) {
            queues.remove(&index);
            if queues.is_empty() {
                self.topics.remove(topic);
            }
        }
        for group in self.consumers.get(topic).cloned().unwrap_or_default() {
            if let Some(gt) = self.groups.get_mut(&(group, topic.into())) {
                if gt.queues.remove(&index).is_some() {
                    self.group_queues -= 1;
                }
                gt.ready.remove(&index);
                if let Some(at) = gt.retry_at.remove(&index) {
                    gt.retry_due.remove(&(at, index));
                }
                gt.waiters.notify_waiters();
            }
        }
    }

    /// The topic's local queues, by index.
    pub fn topic_queues(&self, topic: &str) -> Option<&BTreeMap<u32, Rc<str>>> {
        self.topics.get(topic)
    }

    pub fn group(&self, group: &str, topic: &str) -> Option<&GroupTopic> {
        self.groups.get(&(group.into(), topic.into()))
    }

    pub fn group_mut(&mut self, group: &str, topic: &str) -> Option<&mut GroupTopic> {
        self.groups.get_mut(&(group.into(), topic.into()))
    }

    /// The group's state on the topic, created empty on first use.
    pub fn group_entry(&mut self, group: &str, topic: &str) -> &mut GroupTopic {
        let key: GroupKey = (group.into(), topic.into());
        self.consumers.entry(key.1.clone()).or_default().insert(key.0.clone());
        self.groups.entry(key).or_insert_with(GroupTopic::new)
    }

    /// Forgets a group's state on a topic that holds no queue state (a group refused for want
    /// of room), so refused groups leave nothing behind.
    pub fn forget_if_empty(&mut self, group: &str, topic: &str) {
        let key: GroupKey = (group.into(), topic.into());
        if self.groups.get(&key).is_some_and(|gt| gt.queues.is_empty()) {
            self.groups.remove(&key);
            if let Some(groups) = self.consumers.get_mut(&key.1) {
                groups.remove(&key.0);
                if groups.is_empty() {
                    self.consumers.remove(&key.1);
                }
            }
        }
    }

    /// Adds a queue's delivery state for a group; false when the shard holds its maximum.
    pub fn insert_group_queue(&mut self, group: &str, topic: &str, index: u32, gq: GroupQueue, max: usize) -> bool {
        let group_queues = self.group_queues;
        let gt = self.group_entry(group, topic);
        if gt.queues.contains_key(&index) {
            return true;
        }
        if group_queues >= max {
            return false;
        }
        let fifo = gt.policy.fifo;
        let mut gq = gq;
        gq.set_fifo(fifo);
        self.group_entry(group, topic).queues.insert(index, gq);
        self.group_queues += 1;
        true
    }

    /// A queue got new messages: mark it ready for every group consuming its topic and wake
    /// their long polls. `end` is the queue's readable end.
    pub fn on_append(&mut self, queue: &str, end: u64, now_ms: u64, limits: QueueLimits) {
        let Some((topic, index)) = split_topic_queue(queue) else { return };
        let Some(groups) = self.consumers.get(topic) else { return };
        for group in groups {
            if let Some(gt) = self.groups.get_mut(&(group.clone(), topic.into())) {
                // New messages: wake the polls even if the queue was ready already.
                if gt.refresh(index, end, now_ms, limits).ready {
                    gt.waiters.notify_waiters();
                }
            }
        }
    }

    /// Every (group, queue name) with delivery state, with its floor.
    pub fn floors(&self) -> impl Iterator<Item = (Rc<str>, Rc<str>, u64)> + '_ {
        self.groups.iter().flat_map(move |((group, topic), gt)| {
            let names = self.topics.get(topic);
            gt.queues.iter().filter_map(move |(index, gq)| {
                names.and_then(|n| n.get(index)).map(|name| (group.clone(), name.clone(), gq.floor()))
            })
        })
    }

    pub fn group_queue_count(&self) -> usize {
        self.group_queues
    }

    pub fn leases(&self) -> usize {
        self.groups.values().map(GroupTopic::leased).sum()
    }

    /// Wakes every long poll (shutdown).
    pub fn wake_all(&self) {
        for gt in self.groups.values() {
            gt.waiters.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::pop::LeaseTerms;
    use crate::index::QueueEntry;
    use proptest::prelude::*;

    const LIMITS: QueueLimits = QueueLimits { leases_max: 6, waiting_max: 4 };

    fn entry(offset: u64, group_hash: u64) -> QueueEntry {
        QueueEntry { offset, position: offset, size_bytes: 1, group_hash, ..Default::default() }
    }

    #[test]
    fn appends_wake_only_the_groups_of_their_topic() {
        let mut s = Scheduler::default();
        s.add_queue("a#0");
        s.add_queue("b#0");
        assert!(s.insert_group_queue("g", "a", 0, GroupQueue::new(0), 10));
        assert!(s.insert_group_queue("g", "b", 0, GroupQueue::new(0), 10));
        s.on_append("a#0", 1, 0, LIMITS);
        assert!(s.group("g", "a").unwrap().is_ready());
        assert!(!s.group("g", "b").unwrap().is_ready(), "an idle queue is not ready");
        assert!(!s.insert_group_queue("h", "a", 0, GroupQueue::new(0), 2), "the shard's maximum holds");
        s.forget_if_empty("h", "a");
        assert!(s.group("h", "a").is_none(), "a refused group leaves nothing behind");
        s.forget_if_empty("g", "a");
        assert!(s.group("g", "a").is_some(), "a group with queue state stays");
        s.on_append("a#0", 2, 0, LIMITS);
        assert!(s.group("g", "a").unwrap().is_ready(), "and is still woken by appends");
    }

    #[test]
    fn ready_queues_are_served_in_turn() {
        let mut gt = GroupTopic::new();
        for q in 0..3 {
            gt.queues.insert(q, GroupQueue::new(0));
            gt.refresh(q, 5, 0, LIMITS);
        }
        assert_eq!(gt.ready_in_turn(), vec![0, 1, 2]);
        gt.served(0);
        assert_eq!(gt.ready_in_turn(), vec![1, 2, 0]);
        gt.served(2);
        assert_eq!(gt.ready_in_turn(), vec![0, 1, 2]);
    }

    proptest! {
        /// Random appends, pops, acks, releases and clock steps keep the ready set and the
        /// retry times consistent with each queue's delivery state, and pops find exactly
        /// what the ready set says.
        #[test]
        fn ready_sets_stay_consistent(ops in proptest::collection::vec((0u8..5, 0u32..4, 1u64..40), 1..300), fifo in any::<bool>()) {
            let mut gt = GroupTopic::new();
            gt.set_policy(&GroupPolicy { fifo, retry_delays_ms: vec![5, 10] });
            let mut ends = [0u64; 4];
            for q in 0..4u32 {
                let mut gq = GroupQueue::new(0);
                gq.set_fifo(fifo);
                gt.queues.insert(q, gq);
                gt.refresh(q, 0, 0, LIMITS);
            }
            let mut now = 0u64;
            let mut next_id = 0u64;
            for (op, q, step) in ops {
                now += step;
                let terms = LeaseTerms { now_ms: now, invisible_ms: 30, retry_delays_ms: &[5, 10] };
                match op {
                    0 => {
                        ends[q as usize] += 1 + u64::from(q);
                        gt.refresh(q, ends[q as usize], now, LIMITS);
                    }
                    1 => {
                        gt.promote_due(now);
                        for queue in gt.ready_in_turn() {
                            let end = ends[queue as usize];
                            let gq = gt.queues.get_mut(&queue).unwrap();
                            let mut got = 0;
                            for offset in gq.due(now, 2) {
                                next_id += 1;
                                got += usize::from(gq.redeliver(offset, terms, next_id).is_some());
                            }
                            for offset in gq.ready_heads(2) {
                                next_id += 1;
                                got += usize::from(gq.deliver_head(offset, terms, next_id).is_some());
                            }
                            let entries: Vec<QueueEntry> = (gq.next()..end).map(|o| entry(o, o % 2 + 1)).collect();
                            got += gq.scan(&entries, |_| true, 3, terms, LIMITS, || { next_id += 1; next_id }).len();
                            prop_assert!(got > 0 || !gq.has_work(end, now, LIMITS), "a ready queue that is not stalled gives something");
                            gt.refresh(queue, end, now, LIMITS);
                            gt.served(queue);
                        }
                    }
                    2 | 3 => {
                        let gq = gt.queues.get_mut(&q).unwrap();
                        let live = gq.leases().copied().find(|l| l.deadline_ms > now);
                        if let Some(lease) = live {
                            if op == 2 {
                                gq.ack(lease.offset, lease.lease_id, now).unwrap();
                            } else {
                                gq.release(lease.offset, lease.lease_id, now).unwrap();
                            }
                        }
                        gt.refresh(q, ends[q as usize], now, LIMITS);
                    }
                    _ => {}
                }
                gt.promote_due(now);
                prop_assert_eq!(gt.check_consistent(now, |q| ends[q as usize], LIMITS), Ok(()));
            }
        }
    }
}
