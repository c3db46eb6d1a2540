//! Lite-topic workloads: which session (lite topic) each message goes to, and which sessions
//! each consumer subscribes to, the same for every target.
//!
//! Message g of the run goes to topic `g % topics`; within the topic, its j-th message
//! (j = g / topics) belongs to generation `j / (sessions × answer)`, and within that to
//! session `j % sessions` at position `(j / sessions) % answer`. So `sessions` sessions stream
//! at once, interleaved, each an answer of `answer` messages in order; then the next
//! generation (new sessions, new lite topics) starts.
//!
//! A consumer of a topic owns the sessions whose index in their generation is its own modulo
//! the topic's consumer count. It subscribes a generation ahead (when it first receives a
//! message of generation n it subscribes to generation n + 1), and drops a session once it has
//! received its whole answer, as a chat client closes a finished stream.

use std::collections::HashMap;

use crate::workload::Workload;

/// Where one message of a lite workload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub topic: usize,
    /// Unique within the topic across generations.
    pub session: u64,
    pub position: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionPlan {
    topics: u64,
    sessions: u64,
    answer: u64,
    total: u64,
}

impl SessionPlan {
    pub fn new(workload: &Workload) -> SessionPlan {
        SessionPlan {
            topics: u64::from(workload.topics.max(1)),
            sessions: u64::from(workload.sessions.max(1)),
            answer: u64::from(workload.answer_messages.max(1)),
            total: workload.total_messages(),
        }
    }

    pub fn slot(&self, sequence: u64) -> Slot {
        let j = sequence / self.topics;
        let generation_size = self.sessions * self.answer;
        let (generation, within) = (j / generation_size, j % generation_size);
        Slot {
            topic: (sequence % self.topics) as usize,
            session: generation * self.sessions + within % self.sessions,
            position: (within / self.sessions) as u32,
        }
    }

    /// A session's lite topic name, shaped like a session id (36 characters).
    pub fn name(session: u64) -> String {
        format!("{:08x}-0000-4000-8000-{:012x}", session >> 48, session & 0xffff_ffff_ffff)
    }

    /// Generations that have at least one message of `topic`.
    fn generations(&self, topic: usize) -> u64 {
        let topic = topic as u64;
        let messages = if self.total > topic { (self.total - topic).div_ceil(self.topics) } else { 0 };
        messages.div_ceil(self.sessions * self.answer)
    }
}

/// Subscription changes a consumer has to make before its next receive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// One consumer's sessions: what it subscribes to, and what it has received of each.
#[derive(Debug)]
pub struct Subscriptions {
    plan: SessionPlan,
    topic: usize,
    consumer: u64,
    consumers: u64,
    /// Generations below this one are subscribed (or done).
    subscribed_until: u64,
    /// Positions received per open session (bit p = position p).
    received: HashMap<u64, u64>,
    pending: Changes,
}

impl Subscriptions {
    /// Consumer `consumer` of `consumers` on `topic`; starts with generations 0 and 1 pending.
    pub fn new(plan: SessionPlan, topic: usize, consumer: u32, consumers: u32) -> Subscriptions {
        let mut subscriptions = Subscriptions {
            plan,
            topic,
            consumer: u64::from(consumer),
            consumers: u64::from(consumers.max(1)),
            subscribed_until: 0,
            received: HashMap::new(),
            pending: Changes::default(),
        };
        subscriptions.subscribe_through(1);
        subscriptions
    }

    fn subscribe_through(&mut self, generation: u64) {
        let last = generation.min(self.plan.generations(self.topic).saturating_sub(1));
        while self.subscribed_until <= last && self.subscribed_until < self.plan.generations(self.topic) {
            let first = self.subscribed_until * self.plan.sessions;
            for index in (self.consumer..self.plan.sessions).step_by(self.consumers as usize) {
                self.received.insert(first + index, 0);
                self.pending.add.push(SessionPlan::name(first + index));
            }
            self.subscribed_until += 1;
        }
    }

    /// Records a delivery of message `sequence`.
    pub fn delivered(&mut self, sequence: u64) {
        let slot = self.plan.slot(sequence);
        if slot.topic != self.topic {
            return;
        }
        self.subscribe_through(slot.session / self.plan.sessions + 1);
        let complete = (1u128 << self.plan.answer) - 1;
        if let Some(bits) = self.received.get_mut(&slot.session) {
            *bits |= 1 << slot.position;
            if u128::from(*bits) == complete {
                self.received.remove(&slot.session);
                self.pending.remove.push(SessionPlan::name(slot.session));
            }
        }
    }

    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.pending)
    }

    /// Hands back changes that could not be applied, to be tried again before newer ones.
    pub fn restore(&mut self, mut changes: Changes) {
        changes.add.append(&mut self.pending.add);
        changes.remove.append(&mut self.pending.remove);
        self.pending = changes;
    }

    /// Every session name this consumer subscribed to and has not dropped.
    pub fn open_sessions(&self) -> usize {
        self.received.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::TopicKind;

    fn workload(topics: u32, consumers: u32, sessions: u32, answer: u32, rate: u64) -> Workload {
        let base = crate::workload::Suite::parse("name = \"x\"\n[[workload]]\nname = \"w\"\n", "x").unwrap();
        Workload {
            topic_kind: TopicKind::Lite,
            topics,
            consumers,
            sessions,
            answer_messages: answer,
            rate_per_sec: rate,
            duration_secs: 1,
            warmup_secs: 0,
            ..base.workloads[0].clone()
        }
    }

    #[test]
    fn each_session_gets_its_answer_in_order_then_a_new_generation_starts() {
        let plan = SessionPlan::new(&workload(1, 1, 3, 2, 100));
        let slots: Vec<(u64, u32)> = (0..8).map(|g| plan.slot(g)).map(|s| (s.session, s.position)).collect();
        assert_eq!(slots, [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (3, 0), (4, 0)]);
        let two = SessionPlan::new(&workload(2, 2, 3, 2, 100));
        assert_eq!(two.slot(5), Slot { topic: 1, session: 2, position: 0 });
        assert_eq!(SessionPlan::name(7).len(), 36);
        assert_ne!(SessionPlan::name(7), SessionPlan::name(8));
    }

    #[test]
    fn a_consumer_subscribes_ahead_and_drops_finished_sessions() {
        // 100 messages, 4 sessions of 5: five generations; consumer 1 of 2 owns indexes 1 and 3.
        let plan = SessionPlan::new(&workload(1, 2, 4, 5, 100));
        let mut subs = Subscriptions::new(plan, 0, 1, 2);
        let names = |ids: &[u64]| ids.iter().map(|&i| SessionPlan::name(i)).collect::<Vec<_>>();
        assert_eq!(subs.take_changes(), Changes { add: names(&[1, 3, 5, 7]), remove: vec![] });
        // Session 1 is at sequences 1, 5, 9, 13, 17; a duplicate counts once.
        for g in [1, 5, 9, 5, 13] {
            subs.delivered(g);
        }
        assert!(subs.take_changes().is_empty());
        subs.delivered(17);
        assert_eq!(subs.take_changes(), Changes { add: vec![], remove: names(&[1]) });
        // The first message of generation 1 (sequence 21: session 5) subscribes generation 2.
        subs.delivered(21);
        assert_eq!(subs.take_changes(), Changes { add: names(&[9, 11]), remove: vec![] });
        // Nothing is subscribed past the last generation that has messages.
        subs.delivered(81);
        assert_eq!(subs.take_changes().add, names(&[13, 15, 17, 19]));
        assert_eq!(subs.open_sessions(), 9);
        // Changes that failed to apply come back, ahead of newer ones.
        let failed = Changes { add: names(&[3]), remove: vec![] };
        subs.delivered(3);
        subs.restore(failed);
        let again = subs.take_changes();
        assert_eq!(again.add, names(&[3]));
        assert!(again.remove.is_empty());
    }
}
