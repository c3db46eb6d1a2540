//! Messages stored but held out of their queues: delay messages until their time, and the half
//! messages of open transactions until they are committed, rolled back, or given up on.
//!
//! Both live in the shard's index (timer and half tables) and are rebuilt from the log after a
//! crash, so they survive restarts. The timer loop moves due delay messages into their queues;
//! EndTransaction moves or drops a half message; a recall drops a delay message. One lock
//! orders these, so a message is never both delivered and recalled (or committed and dropped).
//!
//! Transaction checks: every half message is due for a check `transaction_check_first_ms`
//! after it was stored, then at doubling intervals up to `transaction_check_interval_max_ms`.
//! A proxy asks for due checks of the topics its producers publish to and forwards each to one
//! producer; the producer answers with EndTransaction. A half message still open when that
//! schedule's `transaction_checks_max` checks have passed (counted from its store time, so
//! whether or not a producer was there to ask, and across restarts) is discarded and counted.
//! Check times are soft state: after a restart the first check comes again, which only asks a
//! producer once more.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use sluice_transport::messages::*;
use sluice_transport::model::placement::split_topic_queue;
use sluice_transport::{Frame, OutFrame};

use crate::broker::error::BrokerError;
use crate::broker::handler::{now_ms, Counters, Result, ShardHandler};
use crate::broker::BrokerLimits;
use crate::index::{HeldKind, HeldMessage, RecordLocation};
use crate::shard::Shard;

/// Half messages read per step at start-up.
const HALF_LOAD_CHUNK: usize = 4096;
/// Longest sleep of the timer loop when no timer is pending (a new one wakes it).
const TIMER_IDLE_MS: u64 = 60_000;
/// Pause after a failed timer step before the next try.
const TIMER_RETRY_MS: u64 = 200;
/// Scans of the timer table start this far before the last dispatched due time, in case the
/// wall clock stepped back.
const TIMER_SCAN_SLACK_MS: u64 = 60_000;

/// Half messages given up per step of the timer loop.
const HALF_EXPIRY_BATCH: usize = 1_024;

/// Wakes the timer loop early (a delay message was stored, or shutdown began).
#[derive(Default)]
pub struct TimerWake {
    notify: tokio::sync::Notify,
    /// Due time of the last dispatched timer: scans start near it, past the deleted ones.
    floor_ms: std::cell::Cell<u64>,
}

impl TimerWake {
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

#[derive(Debug, Clone)]
struct HalfState {
    queue: Rc<str>,
    checks: u32,
    next_check_ms: u64,
    /// Store time plus the whole check schedule: still open then, it is discarded.
    give_up_ms: u64,
}

/// The time from a half message's store to the end of its check schedule: the first check,
/// then one backed-off interval after each of the `transaction_checks_max` checks.
fn check_schedule_ms(limits: &BrokerLimits) -> u64 {
    (0..limits.transaction_checks_max).fold(limits.transaction_check_first_ms, |total, checks| {
        total.saturating_add(check_interval_ms(checks, limits))
    })
}

/// The wait after a half message's check number `checks` (0-based) before the next.
fn check_interval_ms(checks: u32, limits: &BrokerLimits) -> u64 {
    limits
        .transaction_check_first_ms
        .saturating_mul(1u64 << checks.min(20))
        .min(limits.transaction_check_interval_max_ms)
}

/// A half message due for a check: its position, queue, and the checks made before.
type DueCheck = (u64, Rc<str>, u32);

/// When each open transaction's half message is next checked.
#[derive(Debug, Default)]
pub struct HalfChecks {
    by_position: HashMap<u64, HalfState>,
    due: BTreeSet<(u64, u64)>,
    /// (give_up, position) of every half message, so expired ones are found without a scan.
    by_give_up: BTreeSet<(u64, u64)>,
}

impl HalfChecks {
    /// The open transactions of a shard, each first checked `first` after it was stored.
    pub async fn load(shard: &Shard, limits: &BrokerLimits) -> Result<HalfChecks> {
        let mut checks = HalfChecks::default();
        let mut from = Vec::new();
        loop {
            let chunk = shard.held_scan(HeldKind::Half, from.clone(), HALF_LOAD_CHUNK).await?;
            let done = chunk.len() < HALF_LOAD_CHUNK;
            for held in &chunk {
                let queue = held.queues.first().cloned().unwrap_or_default();
                checks.add(held.entry.position, &queue, held.entry.store_ms, limits);
            }
            match chunk.last() {
                Some(last) if !done => from = crate::index::held_key(HeldKind::Half, 0, last.entry.position + 1),
                _ => return Ok(checks),
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_position.len()
    }

    pub fn add(&mut self, position: u64, queue: &str, stored_ms: u64, limits: &BrokerLimits) {
        let next_check_ms = stored_ms + limits.transaction_check_first_ms;
        let give_up_ms = stored_ms.saturating_add(check_schedule_ms(limits));
        self.remove(position);
        self.by_position.insert(position, HalfState { queue: queue.into(), checks: 0, next_check_ms, give_up_ms });
        self.due.insert((next_check_ms, position));
        self.by_give_up.insert((give_up_ms, position));
    }

    pub fn remove(&mut self, position: u64) {
        if let Some(state) = self.by_position.remove(&position) {
            self.due.remove(&(state.next_check_ms, position));
            self.by_give_up.remove(&(state.give_up_ms, position));
        }
    }

    /// Half messages of `topics` due for a check, at most `max`, each with the checks made
    /// before; their next check is scheduled now (so one asker gets each). Those past their
    /// give-up time (of any topic) come back in the second list, to be discarded.
    fn take_due(
        &mut self,
        now_ms: u64,
        topics: &[&str],
        max: usize,
        limits: &BrokerLimits,
    ) -> (Vec<DueCheck>, Vec<u64>) {
        let mut checks = Vec::new();
        let mut expired = Vec::new();
        let due: Vec<(u64, u64)> = self.due.iter().take_while(|(at, _)| *at <= now_ms).copied().collect();
        for (at, position) in due {
            if checks.len() >= max {
                break;
            }
            let state = self.by_position.get_mut(&position).expect("due entries are tracked");
            if now_ms >= state.give_up_ms {
                expired.push(position);
                continue;
            }
            let topic = split_topic_queue(&state.queue).map_or("", |(t, _)| t);
            if !topics.contains(&topic) {
                continue;
            }
            let interval = check_interval_ms(state.checks, limits);
            self.due.remove(&(at, position));
            checks.push((position, state.queue.clone(), state.checks));
            state.checks += 1;
            state.next_check_ms = now_ms + interval;
            self.due.insert((state.next_check_ms, position));
        }
        (checks, expired)
    }

    /// Half messages past their give-up time, at most `max`: asked for or not, they go.
    fn take_expired(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.by_give_up.iter().take_while(|(at, _)| *at <= now_ms).take(max).map(|(_, p)| *p).collect()
    }

    /// The earliest give-up time of any half message.
    fn next_give_up_ms(&self) -> Option<u64> {
        self.by_give_up.first().map(|(at, _)| *at)
    }

    /// Earliest next check among `topics`.
    fn next_due_ms(&self, topics: &[&str]) -> Option<u64> {
        self.due
            .iter()
            .find(|(_, p)| {
                self.by_position
                    .get(p)
                    .is_some_and(|s| split_topic_queue(&s.queue).is_some_and(|(t, _)| topics.contains(&t)))
            })
            .map(|(at, _)| *at)
    }
}

impl ShardHandler {
    /// Moves due delay messages into their queues until shutdown.
    pub async fn run_timers(&self) {
        while !self.closing.get() {
            let give_up_wait_ms = match self.give_up_expired_halves().await {
                Ok(wait_ms) => wait_ms,
                Err(e) => {
                    tracing::warn!(shard = self.shard_id, error = %e, "discarding unresolved half messages failed; will retry");
                    TIMER_RETRY_MS
                }
            };
            let wait_ms = match self.dispatch_due_timers().await {
                Ok(wait_ms) => wait_ms,
                Err(e) => {
                    tracing::warn!(shard = self.shard_id, error = %e, "dispatching delay messages failed; will retry");
                    TIMER_RETRY_MS
                }
            };
            let wait_ms = wait_ms.min(give_up_wait_ms);
            if wait_ms == 0 {
                continue;
            }
            let woken = std::pin::pin!(self.timers.notify.notified());
            let sleep = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(wait_ms)));
            futures::future::select(woken, sleep).await;
        }
    }

    /// Discards a batch of half messages past their give-up time, so they go even when no
    /// producer of their topic is connected to ask. Returns how long until the next give-up
    /// (0: more are due now).
    async fn give_up_expired_halves(&self) -> Result<u64> {
        let expired = self.halves.borrow().take_expired(now_ms(), HALF_EXPIRY_BATCH);
        self.discard_expired(expired).await?;
        let next = self.halves.borrow().next_give_up_ms();
        Ok(next.map_or(TIMER_IDLE_MS, |at| at.saturating_sub(now_ms())))
    }

    /// Dispatches one batch of due timers; returns how long to wait before the next step
    /// (0: more may be due now).
    async fn dispatch_due_timers(&self) -> Result<u64> {
        let batch = self.limits.timer_dispatch_batch;
        let from = self.timers.floor_ms.get().saturating_sub(TIMER_SCAN_SLACK_MS);
        let first =
            self.shard.held_scan(HeldKind::Timer, crate::index::held_key(HeldKind::Timer, from, 0), batch).await?;
        let now = now_ms();
        let due: Vec<HeldMessage> = first.iter().filter(|h| h.due_ms <= now).cloned().collect();
        if due.is_empty() {
            return Ok(first.first().map_or(TIMER_IDLE_MS, |h| h.due_ms - now).max(1));
        }
        let _one_at_a_time = self.held_lock().await?;
        // A recall may have dropped some while the lock was awaited: dispatch what is still held.
        let mut still = Vec::with_capacity(due.len());
        for held in due {
            if self.shard.held(HeldKind::Timer, held.due_ms, held.entry.position).await?.is_some() {
                still.push(held);
            }
        }
        let floor = still.iter().map(|h| h.due_ms).max().unwrap_or(0);
        let dispatched = self.dispatch_into_queues(still).await?;
        Counters::add(&self.counters.timers_dispatched, dispatched.len() as u64);
        self.timers.floor_ms.set(self.timers.floor_ms.get().max(floor));
        Ok(0)
    }

    /// Serialises changes to held messages (timer dispatch, recall, transaction end).
    async fn held_lock(&self) -> Result<glommio::sync::Permit<'_>> {
        self.held_lock.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)
    }

    /// Moves held messages into their queues; drops those whose record retention deleted or
    /// whose queue no longer exists. Returns the offsets of those dispatched (in order).
    async fn dispatch_into_queues(&self, held: Vec<HeldMessage>) -> Result<Vec<crate::shard::AppendAck>> {
        let log_start = self.shard.log_start();
        let (live, lost): (Vec<HeldMessage>, Vec<HeldMessage>) = held
            .into_iter()
            .partition(|h| h.entry.position >= log_start && h.queues.iter().all(|q| self.check_queue(q).is_ok()));
        for held in &lost {
            tracing::warn!(position = held.entry.position, queues = ?held.queues, "held message lost: its record or queue is gone");
            self.shard.discard_held(held).await?;
            Counters::add(&self.counters.held_lost, 1);
        }
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let acks = self.shard.dispatch_held(&live).await?;
        for queue in live.iter().flat_map(|h| h.queues.iter()).collect::<std::collections::HashSet<_>>() {
            self.queue_grew(queue);
        }
        Ok(acks)
    }

    pub(super) async fn recall(&self, request: &Frame) -> Result<RecallResponse> {
        let recall = request.access::<RecallRequest>()?;
        let queue = recall.queue.as_str();
        self.check_queue(queue)?;
        let (position, due_ms) = (recall.position.to_native(), recall.due_ms.to_native());
        let _one_at_a_time = self.held_lock().await?;
        let held = self.shard.held(HeldKind::Timer, due_ms, position).await?;
        let held = held
            .filter(|h| h.message_id == recall.message_id.as_str() && h.queues.iter().any(|q| q == queue))
            .ok_or_else(|| BrokerError::HeldNotFound { what: "delay message", queue: queue.into(), position })?;
        self.shard.discard_held(&held).await?;
        Counters::add(&self.counters.timers_recalled, 1);
        Ok(RecallResponse { message_id: held.message_id })
    }

    pub(super) async fn end_transaction(&self, request: &Frame) -> Result<EndTransactionResponse> {
        let end = request.access::<EndTransactionRequest>()?;
        let queue = end.queue.as_str();
        self.check_queue(queue)?;
        let position = end.position.to_native();
        let _one_at_a_time = self.held_lock().await?;
        let held = self.shard.held(HeldKind::Half, 0, position).await?;
        let held = held
            .filter(|h| h.message_id == end.message_id.as_str() && h.queues.first().is_some_and(|q| q == queue))
            .ok_or_else(|| BrokerError::HeldNotFound { what: "half message", queue: queue.into(), position })?;
        self.halves.borrow_mut().remove(position);
        if !end.commit {
            self.shard.discard_held(&held).await?;
            Counters::add(&self.counters.transactions_rolled_back, 1);
            return Ok(EndTransactionResponse { offset: None });
        }
        let dispatched = self.dispatch_into_queues(vec![held]).await?;
        Counters::add(&self.counters.transactions_committed, 1);
        Ok(EndTransactionResponse { offset: dispatched.first().and_then(|a| a.offsets.first().copied()) })
    }

    /// Hands out half messages due for a check, waiting up to the request's long poll for one.
    pub(super) async fn transaction_checks(&self, request: &Frame) -> Result<OutFrame> {
        let ask = request.access::<TransactionCheckRequest>()?;
        let topics: Vec<&str> =
            ask.topics.iter().map(|t| t.as_str()).take(self.limits.list_queues_max as usize).collect();
        let max = ask.max_count.to_native().clamp(1, self.limits.pop_records_max) as usize;
        let wait_until_ms = now_ms() + ask.long_poll_ms.to_native().min(self.limits.long_poll_max_ms);
        loop {
            let (checks, expired) = self.halves.borrow_mut().take_due(now_ms(), &topics, max, &self.limits);
            self.discard_expired(expired).await?;
            let mut out = Vec::with_capacity(checks.len());
            for (position, queue, checks) in checks {
                if let Some(found) = self.half_record(position).await? {
                    out.push((queue, position, checks, found));
                }
            }
            let now = now_ms();
            if !out.is_empty() || now >= wait_until_ms || self.closing.get() {
                Counters::add(&self.counters.transaction_checks, out.len() as u64);
                let reply = TransactionCheckResponse {
                    messages: out
                        .iter()
                        .map(|(queue, position, checks, record)| HalfMessage {
                            queue: queue.to_string(),
                            position: *position,
                            checks: *checks,
                            record: record.bytes(),
                        })
                        .collect(),
                };
                return OutFrame::encode(request.request_id(), &reply, self.limits.max_frame_bytes)
                    .map_err(Self::unencodable);
            }
            let next = self.halves.borrow().next_due_ms(&topics).unwrap_or(wait_until_ms);
            let wake_ms = next.min(wait_until_ms).max(now + 1);
            let sleep = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(wake_ms - now)));
            let closing = std::pin::pin!(self.closing_signal.notified());
            futures::future::select(sleep, closing).await;
        }
    }

    /// The half message's record, or `None` (and it is dropped) when it is gone.
    async fn half_record(&self, position: u64) -> Result<Option<crate::shard::StoredRecord>> {
        let Some(held) = self.shard.held(HeldKind::Half, 0, position).await? else {
            self.halves.borrow_mut().remove(position);
            return Ok(None);
        };
        let location = RecordLocation { position, size_bytes: held.entry.size_bytes };
        match self.shard.read_location(location).await? {
            Some(record) => Ok(Some(record)),
            None => {
                let _one_at_a_time = self.held_lock().await?;
                self.shard.discard_held(&held).await?;
                self.halves.borrow_mut().remove(position);
                Counters::add(&self.counters.held_lost, 1);
                Ok(None)
            }
        }
    }

    /// Half messages checked the maximum number of times without an answer are dropped.
    async fn discard_expired(&self, positions: Vec<u64>) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.held_lock().await?;
        for position in positions {
            if let Some(held) = self.shard.held(HeldKind::Half, 0, position).await? {
                self.shard.discard_held(&held).await?;
                tracing::warn!(
                    position,
                    queues = ?held.queues,
                    message_id = held.message_id,
                    "transaction never resolved within its check schedule; its half message is discarded"
                );
                Counters::add(&self.counters.transactions_discarded, 1);
            }
            self.halves.borrow_mut().remove(position);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BrokerLimits {
        BrokerLimits {
            transaction_check_first_ms: 100,
            transaction_check_interval_max_ms: 350,
            transaction_checks_max: 4,
            ..BrokerLimits::default()
        }
    }

    #[test]
    fn checks_back_off_and_stop_at_the_limit() {
        let limits = limits();
        let mut halves = HalfChecks::default();
        halves.add(10, "t#0", 0, &limits);
        halves.add(20, "other#0", 0, &limits);
        let mut times = Vec::new();
        let mut now = 0;
        loop {
            now += 10;
            let (checks, expired) = halves.take_due(now, &["t"], 10, &limits);
            assert!(checks.iter().all(|(p, _, _)| *p == 10), "only the asked topics");
            if !checks.is_empty() {
                times.push(now);
            }
            if !expired.is_empty() {
                let mut expired = expired;
                expired.sort();
                assert_eq!(expired, vec![10, 20], "the unasked topic's too");
                break;
            }
            assert!(now < 10_000);
        }
        // First at 100, then intervals of 100, 200, then 400 capped at 350.
        assert_eq!(times, vec![100, 200, 400, 750]);
        assert_eq!(now, 1100, "given up one interval after the last check");
        assert_eq!(halves.next_due_ms(&["other"]), Some(100));
    }

    #[test]
    fn a_half_message_nobody_asks_about_is_given_up_at_the_end_of_its_schedule() {
        let limits = limits();
        let mut halves = HalfChecks::default();
        halves.add(10, "t#0", 50, &limits);
        halves.add(20, "t#0", 500, &limits);
        assert!(halves.take_expired(1149, 10).is_empty());
        assert_eq!(halves.take_expired(1150, 10), vec![10], "store time 50 + 1100");
        // A restart reloads it with no checks made, but its give-up time stays put.
        halves.add(10, "t#0", 50, &limits);
        let (checks, expired) = halves.take_due(1150, &["t"], 10, &limits);
        assert_eq!(checks.iter().map(|(p, _, _)| *p).collect::<Vec<_>>(), vec![20], "only the younger one is checked");
        assert_eq!(expired, vec![10]);
    }

    #[test]
    fn a_check_is_handed_to_one_asker() {
        let limits = limits();
        let mut halves = HalfChecks::default();
        halves.add(10, "t#0", 0, &limits);
        assert_eq!(halves.take_due(100, &["t"], 10, &limits).0.len(), 1);
        assert!(halves.take_due(100, &["t"], 10, &limits).0.is_empty(), "rescheduled when handed out");
        halves.remove(10);
        assert_eq!(halves.len(), 0);
    }
}
