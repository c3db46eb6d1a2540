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
use sluice_transport::model::placement::{split_lite_queue, split_topic_queue};

use sluice_transport::model::fairness::Weights;

use crate::broker::fair::FairClock;
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
    /// Lite consumers of the group on this topic: what each subscribed to, and its own
    /// ready set and long polls (lite queues are never in `ready`).
    pub lite: LiteClients,
    /// A fair topic: whose message goes next, and the tenants' weights as the topic's
    /// attributes last said (`weights_source`).
    pub fair: FairClock,
    pub weights: Rc<Weights>,
    pub weights_source: (String, String),
    /// Messages handed out to the group from this topic on this shard, redeliveries included.
    pub delivered: u64,
    pub rate: DeliveryRate,
}

/// Seconds the delivery rate is averaged over.
const RATE_WINDOW_S: usize = 5;

/// Deliveries per second, averaged over the last `RATE_WINDOW_S` whole seconds.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    /// Deliveries in each second, by `second % RATE_WINDOW_S`.
    counts: [u64; RATE_WINDOW_S],
    /// The second `counts` were last written in.
    second: u64,
}

impl DeliveryRate {
    fn advance(&mut self, second: u64) {
        if second <= self.second {
            return;
        }
        let stale = (second - self.second).min(RATE_WINDOW_S as u64);
        for s in 1..=stale {
            self.counts[((self.second + s) % RATE_WINDOW_S as u64) as usize] = 0;
        }
        self.second = second;
    }

    pub fn add(&mut self, n: u64, now_ms: u64) {
        self.advance(now_ms / 1000);
        self.counts[(self.second % RATE_WINDOW_S as u64) as usize] += n;
    }

    /// Mean deliveries per second over the last whole seconds (the current one excluded).
    pub fn per_s(&self, now_ms: u64) -> f64 {
        let mut copy = self.clone();
        copy.advance(now_ms / 1000);
        let current = (copy.second % RATE_WINDOW_S as u64) as usize;
        let whole: u64 = copy.counts.iter().enumerate().filter(|(i, _)| *i != current).map(|(_, n)| n).sum();
        whole as f64 / (RATE_WINDOW_S - 1) as f64
    }
}

/// Lite queue indexes start here, so they never meet a topic queue's index.
pub const LITE_INDEX_BASE: u32 = 1 << 31;

pub fn is_lite(index: u32) -> bool {
    index >= LITE_INDEX_BASE
}

/// One lite consumer (a client id) of a group on one topic.
pub struct LiteClient {
    pub subscribed: HashSet<u32>,
    /// Subscribed lite queues with something deliverable now.
    ready: BTreeSet<u32>,
    cursor: u32,
    pub waiters: Rc<tokio::sync::Notify>,
    /// Last pop or subscription change, to forget clients that went away silently.
    pub seen_ms: u64,
    /// Pops of this client under way (a client waiting in a long poll is not idle).
    pub polls: u32,
}

/// The lite consumers of one (group, topic) and, per lite queue, who subscribed to it. On an
/// append or any other readiness change of a lite queue, exactly its subscribers' ready sets
/// change and exactly their polls wake: an idle subscription costs nothing.
#[derive(Default)]
pub struct LiteClients {
    pub clients: HashMap<Rc<str>, LiteClient>,
    subscribers: HashMap<u32, Vec<Rc<str>>>,
}

impl LiteClients {
    /// The client, created on first use.
    pub fn client(&mut self, client: &str, now_ms: u64) -> &mut LiteClient {
        let c = self.clients.entry(client.into()).or_insert_with(|| LiteClient {
            subscribed: HashSet::new(),
            ready: BTreeSet::new(),
            cursor: LITE_INDEX_BASE,
            waiters: Rc::new(tokio::sync::Notify::new()),
            seen_ms: now_ms,
            polls: 0,
        });
        c.seen_ms = c.seen_ms.max(now_ms);
        c
    }

    /// True when the client newly subscribed to the queue.
    pub fn subscribe(&mut self, client: &str, index: u32, now_ms: u64) -> bool {
        let added = self.client(client, now_ms).subscribed.insert(index);
        if added {
            let key = self.clients.get_key_value(client).map(|(k, _)| k.clone()).expect("created above");
            self.subscribers.entry(index).or_default().push(key);
        }
        added
    }

    /// True when the client was subscribed to the queue.
    pub fn unsubscribe(&mut self, client: &str, index: u32) -> bool {
        let Some(c) = self.clients.get_mut(client) else { return false };
        if !c.subscribed.remove(&index) {
            return false;
        }
        c.ready.remove(&index);
        if let Some(subs) = self.subscribers.get_mut(&index) {
            subs.retain(|s| &**s != client);
            if subs.is_empty() {
                self.subscribers.remove(&index);
            }
        }
        true
    }

    /// Forgets a client and returns the queues it was subscribed to.
    pub fn remove_client(&mut self, client: &str) -> Vec<u32> {
        let indexes: Vec<u32> =
            self.clients.get(client).map(|c| c.subscribed.iter().copied().collect()).unwrap_or_default();
        for index in &indexes {
            self.unsubscribe(client, *index);
        }
        if let Some(c) = self.clients.remove(client) {
            // Its polls wake, find the entry gone, and answer now rather than at their deadline.
            c.waiters.notify_waiters();
        }
        indexes
    }

    pub fn has_subscribers(&self, index: u32) -> bool {
        self.subscribers.contains_key(&index)
    }

    /// Puts the queue in (or takes it out of) each subscriber's ready set; wakes those it
    /// newly became ready for. True if it became ready for any.
    fn set_ready(&mut self, index: u32, ready: bool) -> bool {
        let Some(subs) = self.subscribers.get(&index) else { return false };
        let mut became = false;
        for sub in subs {
            let Some(c) = self.clients.get_mut(sub) else { continue };
            if !ready {
                c.ready.remove(&index);
            } else if c.ready.insert(index) {
                became = true;
                c.waiters.notify_waiters();
            }
        }
        became
    }

    /// Wakes the polls of every subscriber the queue is ready for (new messages).
    fn wake(&self, index: u32) {
        for sub in self.subscribers.get(&index).into_iter().flatten() {
            if let Some(c) = self.clients.get(sub).filter(|c| c.ready.contains(&index)) {
                c.waiters.notify_waiters();
            }
        }
    }

    /// The client's ready queues, starting after the last one served.
    pub fn ready_in_turn(&self, client: &str) -> Vec<u32> {
        let Some(c) = self.clients.get(client) else { return Vec::new() };
        let after = c.ready.range(c.cursor..).copied();
        after.chain(c.ready.range(..c.cursor).copied()).collect()
    }

    pub fn served(&mut self, client: &str, index: u32) {
        if let Some(c) = self.clients.get_mut(client) {
            c.cursor = index.wrapping_add(1).max(LITE_INDEX_BASE);
        }
    }

    /// Clients not seen since `before_ms`, at most `max`.
    pub fn idle_clients(&self, before_ms: u64, max: usize) -> Vec<Rc<str>> {
        self.clients
            .iter()
            .filter(|(_, c)| c.polls == 0 && c.seen_ms < before_ms)
            .take(max)
            .map(|(k, _)| k.clone())
            .collect()
    }
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
            lite: LiteClients::default(),
            fair: FairClock::default(),
            weights: Rc::new(Weights::default()),
            weights_source: (String::new(), String::new()),
            delivered: 0,
            rate: DeliveryRate::default(),
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
            if is_lite(queue) {
                self.lite.set_ready(queue, true);
            } else {
                self.ready.insert(queue);
            }
        }
    }

    /// Recomputes one queue's membership in the ready set and its retry time. Every change to
    /// the queue's `GroupQueue` is followed by this. Returns whether it is ready now and whether
    /// it just became ready (long polls are woken on that transition, not on every refresh, so
    /// a poll that finds nothing does not wake itself).
    pub fn refresh(&mut self, queue: u32, end: u64, now_ms: u64, limits: QueueLimits) -> Readiness {
        let Some(gq) = self.queues.get(&queue) else {
            self.ready.remove(&queue);
            self.lite.set_ready(queue, false);
            return Readiness { ready: false, became_ready: false };
        };
        let ready = gq.has_work(end, now_ms, limits);
        let retry = gq.next_retry_ms().filter(|at| *at > now_ms);
        let became_ready = if is_lite(queue) {
            self.lite.set_ready(queue, ready)
        } else if ready {
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
            // Lite queues are ordered whatever the policy (`set_fifo` leaves them so).
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
            if is_lite(*queue) {
                for (name, c) in &self.lite.clients {
                    let subscribed = c.subscribed.contains(queue);
                    if c.ready.contains(queue) != (want && subscribed) {
                        return Err(format!("lite queue {queue}: client {name} ready set disagrees"));
                    }
                }
                continue;
            }
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

/// One (group, topic)'s delivery figures on a shard: see `Scheduler::group_stats`.
pub struct GroupStatRow {
    pub group: Rc<str>,
    pub topic: Rc<str>,
    pub ready: u64,
    pub inflight: u64,
    pub delivered: u64,
    pub rate_per_s: f64,
}

/// One (group, topic)'s ready and in-flight counts on a shard, with the queues that lag.
#[derive(Default)]
pub struct LagRow {
    pub group: Rc<str>,
    pub topic: Rc<str>,
    pub ready: u64,
    pub inflight: u64,
    pub queues: Vec<LagQueue>,
    /// More queues lag than `queues` holds: their oldest messages were not looked at.
    pub queues_left_out: bool,
}

/// A queue with messages the group has not acked: the oldest such offset, and the oldest
/// one waiting for delivery (none when everything unacked is in flight).
pub struct LagQueue {
    pub queue: Rc<str>,
    pub oldest_unacked: u64,
    pub oldest_ready: Option<u64>,
}

/// What a group holds on one queue, counted once for stats and metrics.
struct QueueFigures {
    /// Stored after the scan position.
    unscanned: u64,
    /// Ready but behind the scan position: leases expired or given back, FIFO messages
    /// waiting behind their group's head, priority and fair read-ahead.
    held: u64,
    inflight: u64,
}

impl QueueFigures {
    fn of(gq: &GroupQueue, end: u64, now_ms: u64) -> QueueFigures {
        let live = gq.live_leases(now_ms);
        QueueFigures {
            unscanned: end.saturating_sub(gq.next()),
            held: (gq.leased() - live) as u64
                + gq.waiting() as u64
                + gq.backlog() as u64
                + gq.fair_backlog().len() as u64
                + gq.fair_backlog().passed_over(),
            inflight: live as u64,
        }
    }
}

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
    /// Lite queues some group has delivery state for, by topic: name ↔ index.
    lite: HashMap<Rc<str>, LiteNames>,
    next_lite_index: u32,
}

#[derive(Default)]
struct LiteNames {
    index_of: HashMap<Rc<str>, u32>,
    name_of: HashMap<u32, Rc<str>>,
}

impl Scheduler {
    /// Forgets a lite queue: every group's state on it and every subscription to it.
    fn remove_lite_queue(&mut self, queue: &str) {
        let Some((topic, index)) = self.locate(queue) else { return };
        let topic: Rc<str> = topic.into();
        for group in self.consumers.get(&topic).cloned().unwrap_or_default() {
            if let Some(gt) = self.groups.get_mut(&(group.clone(), topic.clone())) {
                let subscribers: Vec<Rc<str>> = gt.lite.subscribers.get(&index).cloned().unwrap_or_default();
                for client in subscribers {
                    gt.lite.unsubscribe(&client, index);
                }
            }
            self.remove_group_queue(&group, &topic, index);
        }
        self.forget_lite_index(&topic, index);
    }

    /// Records a topic queue (`topic#index`) served by this shard. Other names are ignored.
    pub fn add_queue(&mut self, queue: &str) {
        if let Some((topic, index)) = split_topic_queue(queue) {
            self.topics.entry(topic.into()).or_default().insert(index, queue.into());
        }
    }

    /// Forgets a queue and every group's state on it.
    pub fn remove_queue(&mut self, queue: &str) {
        if split_lite_queue(queue).is_some() {
            self.remove_lite_queue(queue);
            return;
        }
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

    /// The name of a topic queue or lite queue by its index.
    pub fn queue_name(&self, topic: &str, index: u32) -> Option<Rc<str>> {
        if is_lite(index) {
            self.lite.get(topic)?.name_of.get(&index).cloned()
        } else {
            self.topics.get(topic)?.get(&index).cloned()
        }
    }

    /// (topic, index) of a topic queue or of a lite queue that has an index.
    pub fn locate<'q>(&self, queue: &'q str) -> Option<(&'q str, u32)> {
        if let Some((topic, index)) = split_topic_queue(queue) {
            return Some((topic, index));
        }
        let (topic, _, _) = split_lite_queue(queue)?;
        Some((topic, *self.lite.get(topic)?.index_of.get(queue)?))
    }

    /// The index of a lite queue, assigned on first use; `None` once indexes ran out.
    pub fn lite_index(&mut self, topic: &str, queue: &str) -> Option<u32> {
        if let Some(index) = self.lite.get(topic).and_then(|l| l.index_of.get(queue)) {
            return Some(*index);
        }
        let index = self.next_lite_index.max(LITE_INDEX_BASE);
        if index == u32::MAX {
            return None;
        }
        self.next_lite_index = index + 1;
        let names = self.lite.entry(topic.into()).or_default();
        let name: Rc<str> = queue.into();
        names.index_of.insert(name.clone(), index);
        names.name_of.insert(index, name);
        Some(index)
    }

    /// Forgets a lite queue's index once no group holds state for it.
    pub fn forget_lite_index(&mut self, topic: &str, index: u32) {
        let held = self.consumers.get(topic).is_some_and(|groups| {
            groups
                .iter()
                .any(|g| self.groups.get(&(g.clone(), topic.into())).is_some_and(|gt| gt.queues.contains_key(&index)))
        });
        if held {
            return;
        }
        if let Some(names) = self.lite.get_mut(topic) {
            if let Some(name) = names.name_of.remove(&index) {
                names.index_of.remove(&name);
            }
            if names.name_of.is_empty() {
                self.lite.remove(topic);
            }
        }
    }

    /// Drops a group's state on a lite queue (no leases left, nobody subscribed).
    pub fn remove_group_queue(&mut self, group: &str, topic: &str, index: u32) {
        if let Some(gt) = self.groups.get_mut(&(group.into(), topic.into())) {
            if gt.queues.remove(&index).is_some() {
                self.group_queues -= 1;
            }
            gt.ready.remove(&index);
            gt.lite.set_ready(index, false);
            if let Some(at) = gt.retry_at.remove(&index) {
                gt.retry_due.remove(&(at, index));
            }
        }
        self.forget_lite_index(topic, index);
    }

    /// True when some group has a subscriber or a live lease on the lite queue.
    pub fn lite_in_use(&self, queue: &str, now_ms: u64) -> bool {
        let Some((topic, index)) = self.locate(queue) else { return false };
        let Some(groups) = self.consumers.get(topic) else { return false };
        groups.iter().any(|g| {
            self.groups.get(&(g.clone(), topic.into())).is_some_and(|gt| {
                gt.lite.has_subscribers(index) || gt.queues.get(&index).is_some_and(|gq| gq.has_live_lease(now_ms))
            })
        })
    }

    /// Topics on which the client is a lite consumer of the group.
    pub fn lite_topics_of(&self, group: &str, client: &str) -> Vec<Rc<str>> {
        self.groups
            .iter()
            .filter(|((g, _), gt)| &**g == group && gt.lite.clients.contains_key(client))
            .map(|((_, t), _)| t.clone())
            .collect()
    }

    pub fn lite_client_count(&self) -> usize {
        self.groups.values().map(|gt| gt.lite.clients.len()).sum()
    }

    /// Every (group, topic) key with lite clients, for the idle-client sweep.
    pub fn lite_group_keys(&self) -> Vec<GroupKey> {
        self.groups.iter().filter(|(_, gt)| !gt.lite.clients.is_empty()).map(|(k, _)| k.clone()).collect()
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
        if is_lite(index) {
            // A lite topic is one ordered stream.
            gq.set_ordered();
        } else {
            gq.set_fifo(fifo);
        }
        self.group_entry(group, topic).queues.insert(index, gq);
        self.group_queues += 1;
        true
    }

    /// A queue got new messages: mark it ready for every group consuming its topic and wake
    /// their long polls. `end` is the queue's readable end.
    /// Returns how many groups (or lite consumers' groups) it woke.
    pub fn on_append(&mut self, queue: &str, end: u64, now_ms: u64, limits: QueueLimits) -> u64 {
        // A lite queue no group has state for has no index, and nobody to wake.
        let Some((topic, index)) = self.locate(queue) else { return 0 };
        let Some(groups) = self.consumers.get(topic) else { return 0 };
        let mut woken = 0;
        for group in groups {
            if let Some(gt) = self.groups.get_mut(&(group.clone(), topic.into())) {
                if !gt.queues.contains_key(&index) {
                    continue;
                }
                // New messages: wake the polls even if the queue was ready already.
                if gt.refresh(index, end, now_ms, limits).ready {
                    woken += 1;
                    if is_lite(index) {
                        gt.lite.wake(index);
                    } else {
                        gt.waiters.notify_waiters();
                    }
                }
            }
        }
        woken
    }

    /// Every (group, queue name) with delivery state, with its floor.
    pub fn floors(&self) -> impl Iterator<Item = (Rc<str>, Rc<str>, u64)> + '_ {
        self.groups.iter().flat_map(move |((group, topic), gt)| {
            gt.queues.iter().filter_map(move |(index, gq)| {
                self.queue_name(topic, *index).map(|name| (group.clone(), name, gq.floor()))
            })
        })
    }

    pub fn group_queue_count(&self) -> usize {
        self.group_queues
    }

    pub fn leases(&self) -> usize {
        self.groups.values().map(GroupTopic::leased).sum()
    }

    /// Delivery figures of up to `max` (group, topic) pairs, and
    /// whether there were more. Ready counts what is stored after the group's position on
    /// this shard and not out with a consumer: unscanned (`end_of` each queue), due again,
    /// waiting behind a FIFO group, or held in a priority or fair read-ahead.
    pub fn group_stats(&self, end_of: impl Fn(&str) -> u64, now_ms: u64, max: usize) -> (Vec<GroupStatRow>, bool) {
        let mut rows = Vec::new();
        for ((group, topic), gt) in self.groups.iter().take(max) {
            let (mut ready, mut inflight) = (0u64, 0u64);
            for (index, gq) in &gt.queues {
                let end = self.queue_name(topic, *index).map_or(gq.next(), |q| end_of(&q));
                let figures = QueueFigures::of(gq, end, now_ms);
                ready += figures.unscanned + figures.held;
                inflight += figures.inflight;
            }
            rows.push(GroupStatRow {
                group: group.clone(),
                topic: topic.clone(),
                ready,
                inflight,
                delivered: gt.delivered,
                rate_per_s: gt.rate.per_s(now_ms),
            });
        }
        (rows, self.groups.len() > max)
    }

    /// Per (group, topic), up to `max` pairs: the figures of `group_stats`, and the queues
    /// whose messages are not all acked, with the offsets whose store times give the
    /// consumer latencies (at most `queues_max` such queues per pair).
    pub fn lag_rows(&self, end_of: impl Fn(&str) -> u64, now_ms: u64, max: usize, queues_max: usize) -> Vec<LagRow> {
        let mut rows = Vec::new();
        for ((group, topic), gt) in self.groups.iter().take(max) {
            let mut row = LagRow { group: group.clone(), topic: topic.clone(), ..LagRow::default() };
            for (index, gq) in &gt.queues {
                let queue = self.queue_name(topic, *index);
                let end = queue.as_deref().map_or(gq.next(), &end_of);
                let figures = QueueFigures::of(gq, end, now_ms);
                row.ready += figures.unscanned + figures.held;
                row.inflight += figures.inflight;
                let Some(queue) = queue else { continue };
                if gq.floor() < end && row.queues.len() == queues_max {
                    row.queues_left_out = true;
                } else if gq.floor() < end {
                    // Messages held back (due again, behind a FIFO head, read ahead) are older
                    // than the scan position; the floor is an upper bound on their age.
                    let oldest_ready =
                        if figures.held > 0 { Some(gq.floor()) } else { (figures.unscanned > 0).then(|| gq.next()) };
                    row.queues.push(LagQueue { queue, oldest_unacked: gq.floor(), oldest_ready });
                }
            }
            rows.push(row);
        }
        rows
    }

    /// Wakes every long poll (shutdown).
    pub fn wake_all(&self) {
        for gt in self.groups.values() {
            gt.waiters.notify_waiters();
            for c in gt.lite.clients.values() {
                c.waiters.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::pop::LeaseTerms;
    use crate::index::QueueEntry;
    use proptest::prelude::*;

    const LIMITS: QueueLimits = QueueLimits { leases_max: 6, waiting_max: 4, backlog_max: 4 };

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
    fn a_lite_append_readies_and_wakes_only_its_subscribers() {
        let mut s = Scheduler::default();
        s.add_queue("chat#0");
        let (one, two) = ("chat#0/session-1", "chat#0/session-2");
        let i1 = s.lite_index("chat", one).unwrap();
        let i2 = s.lite_index("chat", two).unwrap();
        assert!(is_lite(i1) && is_lite(i2) && i1 != i2);
        assert_eq!(s.lite_index("chat", one), Some(i1), "an index is stable while in use");
        s.on_append(one, 1, 0, LIMITS);
        assert!(s.group("g", "chat").is_none(), "an append nobody consumes creates nothing");
        for index in [i1, i2] {
            assert!(s.insert_group_queue("g", "chat", index, GroupQueue::new(0), 10));
        }
        let gt = s.group_mut("g", "chat").unwrap();
        gt.lite.subscribe("a", i1, 0);
        gt.lite.subscribe("b", i2, 0);
        let wake_a = gt.lite.client("a", 0).waiters.clone();
        let woken = wake_a.notified();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        s.on_append(one, 1, 0, LIMITS);
        let gt = s.group("g", "chat").unwrap();
        assert_eq!(gt.lite.ready_in_turn("a"), vec![i1]);
        assert!(gt.lite.ready_in_turn("b").is_empty(), "b did not subscribe to session-1");
        assert!(!gt.is_ready(), "lite queues stay out of the group-wide ready set");
        assert!(futures::FutureExt::now_or_never(woken).is_some(), "a's poll was woken");
        assert!(gt.check_consistent(0, |i| if i == i1 { 1 } else { 0 }, LIMITS).is_ok());
        let gt = s.group_mut("g", "chat").unwrap();
        assert_eq!(gt.lite.remove_client("a"), vec![i1]);
        assert!(!gt.lite.has_subscribers(i1));
        s.remove_group_queue("g", "chat", i1);
        assert_eq!(s.locate(one), None, "an unused lite queue's index is forgotten");
        assert_eq!(s.locate(two), Some(("chat", i2)));
        assert_eq!(s.queue_name("chat", i2).as_deref(), Some(two));
        assert_eq!(s.floors().count(), 1);
    }

    #[test]
    fn the_delivery_rate_is_the_mean_of_the_last_whole_seconds() {
        let mut r = DeliveryRate::default();
        r.add(40, 10_000);
        r.add(40, 10_999);
        r.add(100, 11_500);
        // At 12.3 s the whole seconds in the window are 8..=11 (of which 10 and 11 have counts).
        assert_eq!(r.per_s(12_300), (80.0 + 100.0) / 4.0);
        assert_eq!(r.per_s(11_700), 80.0 / 4.0, "the current second is not counted yet");
        assert_eq!(r.per_s(30_000), 0.0, "nothing delivered lately");
        r.add(8, 30_000);
        assert_eq!(r.per_s(31_000), 2.0, "old seconds were cleared");
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
