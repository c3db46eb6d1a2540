//! A queue checker in the manner of Jepsen's: it records every send with its outcome and every
//! delivery, then reports what the history breaks.
//! - lost: sends the proxy acknowledged that no consumer ever received;
//! - unexpected: deliveries of messages never sent, or whose send definitely failed;
//! - duplicated: deliveries of a message after a consumer's ack of it was confirmed, with no
//!   broker restart in between. At least once allows redelivery until an ack succeeds; and the
//!   broker keeps, per group and queue, the offset below which everything is acked (written
//!   every second and at shutdown), so after a restart the messages acked above it come again
//!   (README, "Leases"). Those are counted apart, as redelivered after a restart;
//! - corrupt: deliveries whose body is not the body sent;
//! - out of order: in an ordered stream (a message group of a FIFO topic, a lite topic), a
//!   message delivered while an earlier acknowledged message of its stream had not been yet;
//! - early: deliveries of a delay message before its delivery time (less a tolerance for the
//!   clocks of client and broker, which share a host here);
//! - delivered though rolled back: deliveries of a transactional message its producer rolled
//!   back (or never committed: a half message whose send went unanswered is rolled back when the
//!   broker checks it).
//!
//! Unknown outcomes (an error or a time-out: the message may or may not have been stored) may go
//! either way; acknowledged ones may not. A transactional message counts as acknowledged once a
//! commit of it was confirmed (by the producer's EndTransaction or its answer to a check).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// How much earlier than its delivery time a delay message may arrive before it counts as
/// early: the broker's clock and the consumer's may disagree by a little (NTP slewing since the
/// broker started; millisecond timestamps).
pub const EARLY_TOLERANCE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The proxy answered OK: the message is stored.
    Acked,
    /// The proxy refused it before storing anything.
    Failed,
    /// An error or a time-out: it may or may not be stored.
    Unknown,
    /// A transaction its producer rolled back: it must never be delivered.
    RolledBack,
}

struct Sent {
    /// Which stream of the workload sent it (a topic's kind), for the per-kind counts.
    kind: &'static str,
    /// (ordered stream, position in its send order) for sends to a FIFO group or a lite topic.
    group_seq: Option<(String, u64)>,
    body: Vec<u8>,
    outcome: SendOutcome,
    /// A delay message's delivery time.
    not_before: Option<SystemTime>,
}

pub struct History {
    sends: HashMap<String, Sent>,
    /// Message ids in delivery order.
    deliveries: Vec<String>,
    /// The same ids as a set, kept as they come: `drained` is asked often, over large histories.
    delivered: HashSet<String>,
    corrupt: usize,
    /// When each confirmed ack was requested: the broker may have applied it from then on.
    confirmed_acks: HashMap<String, Instant>,
    /// When the broker was restarted (after a crash or a stop).
    restarts: Vec<Instant>,
    after_restart: usize,
    duplicated: usize,
    unexpected: usize,
    /// Per FIFO group: the positions of its acknowledged sends, and those delivered so far.
    acked_seqs: HashMap<String, BTreeSet<u64>>,
    delivered_seqs: HashMap<String, HashSet<u64>>,
    out_of_order: usize,
    longest_stall: Duration,
    /// SendMessage calls the proxy acked (half messages of transactions included).
    sends_acked: usize,
    /// The broker's checks of open transactions that the producer answered.
    checks_answered: usize,
    early: usize,
}

/// Running counts of a history (`History::progress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub deliveries: usize,
    pub acks_confirmed: usize,
    /// SendMessage calls the proxy acked, half messages of transactions included: each stored
    /// a message in the log.
    pub sends_acked: usize,
    /// Sends the proxy refused before storing anything.
    pub sends_failed: usize,
}

/// What a history shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sent: usize,
    pub acked: usize,
    pub unknown: usize,
    /// Distinct messages delivered.
    pub delivered: usize,
    pub lost: usize,
    pub unexpected: usize,
    pub duplicated: usize,
    /// Deliveries after a confirmed ack that a broker restart explains (not a violation).
    pub redelivered_after_restart: usize,
    pub corrupt: usize,
    pub out_of_order: usize,
    /// Deliveries of delay messages before their time.
    pub early: usize,
    /// Transactional messages rolled back, and how many of them were delivered all the same.
    pub rolled_back: usize,
    pub delivered_rolled_back: usize,
    /// The longest time any client call waited for its answer.
    pub longest_stall: Duration,
    /// Per kind of send: how many were acked, and how many of those were delivered.
    pub by_kind: BTreeMap<&'static str, KindCounts>,
    /// Checks of open transactions the producer answered (its own EndTransaction had failed,
    /// or its send had gone unanswered).
    pub checks_answered: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    pub acked: usize,
    pub delivered: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.unexpected == 0
            && self.duplicated == 0
            && self.corrupt == 0
            && self.out_of_order == 0
            && self.early == 0
            && self.delivered_rolled_back == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} acked {} unknown {} delivered {} lost {} unexpected {} duplicated {} (after-restart {}) corrupt {} \
             out-of-order {} early {} rolled-back {} delivered-though-rolled-back {} longest-stall {}ms {}",
            self.sent,
            self.acked,
            self.unknown,
            self.delivered,
            self.lost,
            self.unexpected,
            self.duplicated,
            self.redelivered_after_restart,
            self.corrupt,
            self.out_of_order,
            self.early,
            self.rolled_back,
            self.delivered_rolled_back,
            self.longest_stall.as_millis(),
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

impl History {
    pub fn new() -> History {
        History {
            sends: HashMap::new(),
            deliveries: Vec::new(),
            delivered: HashSet::new(),
            corrupt: 0,
            confirmed_acks: HashMap::new(),
            restarts: Vec::new(),
            after_restart: 0,
            duplicated: 0,
            unexpected: 0,
            acked_seqs: HashMap::new(),
            delivered_seqs: HashMap::new(),
            out_of_order: 0,
            longest_stall: Duration::ZERO,
            sends_acked: 0,
            checks_answered: 0,
            early: 0,
        }
    }

    /// A send about to be made (its outcome is unknown until `send_finished`). Recorded before
    /// the call, because a consumer may receive the message before the producer hears its reply.
    /// `group_seq` is (stream, position in its send order) for a FIFO group or a lite topic,
    /// whose producer sends each stream's messages one at a time.
    /// `kind` names the stream it belongs to (the report counts each kind apart).
    pub fn send_started(&mut self, kind: &'static str, id: &str, group_seq: Option<(String, u64)>, body: &[u8]) {
        let sent = Sent { kind, group_seq, body: body.to_vec(), outcome: SendOutcome::Unknown, not_before: None };
        let previous = self.sends.insert(id.to_string(), sent);
        assert!(previous.is_none(), "message id {id} sent twice: the history needs unique ids");
    }

    /// What the send of `id` came to.
    pub fn send_finished(&mut self, id: &str, outcome: SendOutcome) {
        if outcome == SendOutcome::Acked {
            self.sends_acked += 1;
        }
        self.set_outcome(id, outcome);
    }

    /// The half message of transaction `id` is stored (its SendMessage was acked); whether it
    /// is ever delivered depends on how the transaction ends.
    pub fn half_stored(&mut self, id: &str) {
        assert!(self.sends.contains_key(id), "half_stored after send_started");
        self.sends_acked += 1;
    }

    /// The producer rolled transaction `id` back (decided to: it never commits it), or the
    /// proxy confirmed its commit.
    pub fn transaction_ended(&mut self, id: &str, committed: bool) {
        let outcome = if committed { SendOutcome::Acked } else { SendOutcome::RolledBack };
        self.set_outcome(id, outcome);
    }

    /// `id` is a delay message due at `at`: no delivery may come before.
    pub fn not_before(&mut self, id: &str, at: SystemTime) {
        self.sends.get_mut(id).expect("not_before after send_started").not_before = Some(at);
    }

    /// The producer answered the broker's check of an open transaction.
    pub fn check_answered(&mut self) {
        self.checks_answered += 1;
    }

    fn set_outcome(&mut self, id: &str, outcome: SendOutcome) {
        let sent = self.sends.get_mut(id).expect("an outcome after send_started");
        sent.outcome = outcome;
        if let (Some((group, seq)), SendOutcome::Acked) = (&sent.group_seq, outcome) {
            self.acked_seqs.entry(group.clone()).or_default().insert(*seq);
        }
    }

    /// A send and its outcome at once.
    pub fn send(
        &mut self,
        kind: &'static str,
        id: &str,
        group_seq: Option<(String, u64)>,
        body: &[u8],
        outcome: SendOutcome,
    ) {
        self.send_started(kind, id, group_seq, body);
        self.send_finished(id, outcome);
    }

    /// A message a consumer received.
    pub fn deliver(&mut self, id: &str, body: &[u8]) {
        self.deliveries.push(id.to_string());
        self.delivered.insert(id.to_string());
        if let Some(acked_at) = self.confirmed_acks.get(id) {
            if self.restarts.iter().any(|r| r >= acked_at) {
                self.after_restart += 1;
            } else {
                self.duplicated += 1;
            }
        }
        let Some(sent) = self.sends.get(id) else {
            self.unexpected += 1;
            return;
        };
        if sent.body != body {
            self.corrupt += 1;
        }
        if sent.not_before.is_some_and(|due| SystemTime::now() + EARLY_TOLERANCE < due) {
            self.early += 1;
        }
        if let Some((group, seq)) = &sent.group_seq {
            let delivered = self.delivered_seqs.entry(group.clone()).or_default();
            let earlier_missing = self
                .acked_seqs
                .get(group)
                .is_some_and(|acked| acked.range(..*seq).any(|earlier| !delivered.contains(earlier)));
            delivered.insert(*seq);
            if earlier_missing {
                self.out_of_order += 1;
            }
        }
    }

    /// A consumer's ack of `id`, requested at `requested_at`, that the proxy confirmed. A
    /// restart after the request may have undone it, even one before the reply came.
    pub fn ack_confirmed(&mut self, id: &str, requested_at: Instant) {
        self.confirmed_acks.insert(id.to_string(), requested_at);
    }

    /// The broker went down just now (a crash or a stop) to be started again.
    pub fn broker_restarted(&mut self) {
        self.restarts.push(Instant::now());
    }

    /// How long one client call waited for its answer.
    pub fn waited(&mut self, took: Duration) {
        self.longest_stall = self.longest_stall.max(took);
    }

    /// Counts so far, to compare a case's progress between two moments.
    pub fn progress(&self) -> Progress {
        Progress {
            deliveries: self.deliveries.len(),
            acks_confirmed: self.confirmed_acks.len(),
            sends_acked: self.sends_acked,
            sends_failed: self.sends.values().filter(|s| s.outcome == SendOutcome::Failed).count(),
        }
    }

    pub fn acked_ids(&self) -> HashSet<String> {
        self.sends.iter().filter(|(_, s)| s.outcome == SendOutcome::Acked).map(|(id, _)| id.clone()).collect()
    }

    /// Acked sends no consumer's ack of has been confirmed yet.
    pub fn unacked(&self) -> usize {
        self.sends
            .iter()
            .filter(|(id, s)| s.outcome == SendOutcome::Acked && !self.confirmed_acks.contains_key(*id))
            .count()
    }

    /// Whether every acked send has been delivered.
    pub fn drained(&self) -> bool {
        self.sends.iter().all(|(id, s)| s.outcome != SendOutcome::Acked || self.delivered.contains(id))
    }

    pub fn delivered_ids(&self) -> HashSet<String> {
        self.delivered.clone()
    }

    fn counts_by_kind(&self) -> BTreeMap<&'static str, KindCounts> {
        let mut by_kind: BTreeMap<&'static str, KindCounts> = BTreeMap::new();
        for (id, sent) in &self.sends {
            let counts = by_kind.entry(sent.kind).or_default();
            if sent.outcome == SendOutcome::Acked {
                counts.acked += 1;
                counts.delivered += usize::from(self.delivered.contains(id));
            }
        }
        by_kind
    }

    pub fn report(&self) -> Report {
        let delivered = self.delivered_ids();
        let acked = self.acked_ids();
        Report {
            sent: self.sends.len(),
            acked: acked.len(),
            unknown: self.sends.values().filter(|s| s.outcome == SendOutcome::Unknown).count(),
            delivered: delivered.len(),
            lost: acked.difference(&delivered).count(),
            // A send that definitely failed may have been delivered before its reply came.
            unexpected: self.unexpected
                + self
                    .deliveries
                    .iter()
                    .filter(|id| self.sends.get(*id).is_some_and(|s| s.outcome == SendOutcome::Failed))
                    .count(),
            duplicated: self.duplicated,
            redelivered_after_restart: self.after_restart,
            corrupt: self.corrupt,
            out_of_order: self.out_of_order,
            early: self.early,
            rolled_back: self.sends.values().filter(|s| s.outcome == SendOutcome::RolledBack).count(),
            delivered_rolled_back: delivered
                .iter()
                .filter(|id| self.sends.get(*id).is_some_and(|s| s.outcome == SendOutcome::RolledBack))
                .count(),
            longest_stall: self.longest_stall,
            by_kind: self.counts_by_kind(),
            checks_answered: self.checks_answered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(group: &str, seq: u64) -> Option<(String, u64)> {
        Some((group.to_string(), seq))
    }

    #[test]
    fn a_clean_history_passes_and_unknown_sends_may_go_either_way() {
        let mut h = History::new();
        h.send("t", "a", None, b"A", SendOutcome::Acked);
        h.send("t", "b", None, b"B", SendOutcome::Unknown);
        h.send("t", "c", None, b"C", SendOutcome::Unknown);
        h.deliver("a", b"A");
        h.deliver("a", b"A"); // redelivered before any ack: at least once
        h.ack_confirmed("a", Instant::now());
        h.deliver("b", b"B");
        let r = h.report();
        assert!(r.passed(), "{r}");
        assert_eq!((r.sent, r.acked, r.unknown, r.delivered), (3, 1, 2, 2));
        assert_eq!(r.by_kind["t"], KindCounts { acked: 1, delivered: 1 });
    }

    #[test]
    fn each_kind_of_violation_is_counted() {
        let mut h = History::new();
        h.send("t", "lost", None, b"L", SendOutcome::Acked);
        h.send("t", "failed", None, b"F", SendOutcome::Failed);
        h.send("t", "torn", None, b"T", SendOutcome::Acked);
        h.send("t", "twice", None, b"W", SendOutcome::Acked);
        h.deliver("failed", b"F");
        h.deliver("ghost", b"?");
        h.deliver("torn", b"t");
        h.deliver("twice", b"W");
        h.ack_confirmed("twice", Instant::now());
        h.deliver("twice", b"W");
        let progress = Progress { deliveries: 5, acks_confirmed: 1, sends_acked: 3, sends_failed: 1 };
        assert_eq!(h.progress(), progress);
        let r = h.report();
        assert_eq!(r.lost, 1, "{r}");
        assert_eq!(r.unexpected, 2, "{r}");
        assert_eq!(r.corrupt, 1, "{r}");
        assert_eq!(r.duplicated, 1, "{r}");
        assert!(!r.passed());
        assert!(r.to_string().ends_with("FAIL"));
    }

    #[test]
    fn a_redelivery_after_a_confirmed_ack_is_explained_only_by_a_restart_after_it() {
        let mut h = History::new();
        h.send("t", "a", None, b"A", SendOutcome::Acked);
        h.send("t", "b", None, b"B", SendOutcome::Acked);
        h.deliver("a", b"A");
        h.ack_confirmed("a", Instant::now());
        h.broker_restarted();
        h.deliver("a", b"A"); // the restart may have undone the ack
        assert_eq!((h.report().duplicated, h.report().redelivered_after_restart), (0, 1));
        h.deliver("b", b"B");
        h.ack_confirmed("b", Instant::now());
        h.deliver("b", b"B"); // no restart after this ack
        assert_eq!((h.report().duplicated, h.report().redelivered_after_restart), (1, 1));
    }

    #[test]
    fn fifo_order_is_checked_per_group_and_skips_only_unknown_sends() {
        let mut h = History::new();
        h.send("t", "g1-0", fifo("g1", 0), b"0", SendOutcome::Acked);
        h.send("t", "g1-1", fifo("g1", 1), b"1", SendOutcome::Unknown);
        h.send("t", "g1-2", fifo("g1", 2), b"2", SendOutcome::Acked);
        h.send("t", "g2-0", fifo("g2", 0), b"0", SendOutcome::Acked);
        h.send("t", "g2-1", fifo("g2", 1), b"1", SendOutcome::Acked);
        // g1: 1 was never stored, and 2 after 0 is in order. g2: 1 before 0 is not.
        h.deliver("g1-0", b"0");
        h.deliver("g1-2", b"2");
        h.deliver("g2-1", b"1");
        h.deliver("g2-0", b"0");
        let r = h.report();
        assert_eq!(r.out_of_order, 1, "{r}");
        assert_eq!(r.lost, 0, "{r}");
    }

    #[test]
    fn a_delay_message_delivered_before_its_time_is_early() {
        let mut h = History::new();
        let now = SystemTime::now();
        h.send("delay", "due", None, b"D", SendOutcome::Acked);
        h.not_before("due", now);
        h.send("delay", "later", None, b"L", SendOutcome::Acked);
        h.not_before("later", now + Duration::from_secs(60));
        h.deliver("due", b"D");
        assert_eq!(h.report().early, 0);
        h.deliver("later", b"L");
        let r = h.report();
        assert_eq!(r.early, 1, "{r}");
        assert!(!r.passed() && r.to_string().contains(" early 1 "), "{r}");
    }

    #[test]
    fn transactions_count_as_acked_once_committed_and_must_not_be_delivered_once_rolled_back() {
        let mut h = History::new();
        for id in ["commit", "rollback", "half-unanswered", "commit-lost"] {
            h.send_started("tx", id, None, id.as_bytes());
        }
        h.half_stored("commit");
        h.half_stored("rollback");
        h.half_stored("commit-lost");
        // A stored half counts as a stored send, not yet as a message that must arrive.
        assert_eq!(h.progress().sends_acked, 3);
        assert_eq!(h.report().acked, 0);
        h.transaction_ended("commit", true);
        h.transaction_ended("rollback", false);
        h.transaction_ended("half-unanswered", false);
        h.transaction_ended("commit-lost", true);
        h.deliver("commit", b"commit");
        let r = h.report();
        assert_eq!((r.acked, r.rolled_back, r.lost, r.delivered_rolled_back), (2, 2, 1, 0), "{r}");
        h.deliver("rollback", b"rollback");
        h.deliver("commit-lost", b"commit-lost");
        let r = h.report();
        assert_eq!((r.lost, r.delivered_rolled_back, r.unexpected), (0, 1, 0), "{r}");
        assert!(!r.passed() && r.to_string().contains("delivered-though-rolled-back 1"), "{r}");
        assert_eq!(r.by_kind["tx"], KindCounts { acked: 2, delivered: 2 });
        assert_eq!(h.progress().sends_acked, 3, "commits store no new message");
    }
}
