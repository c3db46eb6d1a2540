//! Consumption on one shard: a pop takes what the scheduler says is deliverable for a
//! (group, topic) from the topic's local queues, in one batched reply, and long-polls at the
//! (group, topic) level until something is ready; acks, releases and invisible-time changes
//! update the leases and the ready set.
//!
//! A pop serves each ready queue in turn: leases due again first, then FIFO messages whose
//! group was freed, then new messages, read ahead from the queue index and passed through the
//! group's filter before anything is leased. Other pops and acks may run while one waits for
//! I/O, so state is re-checked after every await (the queue's epoch, and a per-queue scanning
//! flag that keeps two pops from scanning one queue at once).

mod fair;
mod priority;

use std::rc::Rc;
use std::time::Duration;

use sluice_transport::messages::*;
use sluice_transport::{Frame, OutFrame};

use crate::broker::error::BrokerError;
use crate::broker::handler::{bounded, now_ms, status_of, Counters, Result, ShardHandler};
use crate::broker::pop::{Delivery, GroupQueue, LeaseError, LeaseTerms};
use crate::index::QueueEntry;
use crate::shard::StoredRecord;

/// Lite queues a pop serves at once (each gives one message, usually one disk read).
const LITE_POP_CONCURRENCY: usize = 16;

/// A lease granted by this pop and its record.
struct Popped {
    queue: Rc<str>,
    index: u32,
    delivery: Delivery,
    record: StoredRecord,
}

/// Why a scan consumed offsets without leasing them.
#[derive(Default)]
struct Skipped {
    filtered: u64,
    damaged: u64,
    /// Retention deleted the record first (a delay message dispatched late in the log's life).
    gone: u64,
}

/// What one pop asks for.
struct PopAsk<'a> {
    group: &'a str,
    topic: &'a str,
    /// A lite consumer's client id (it pops its own lite subscriptions); empty otherwise.
    client: &'a str,
    max_count: usize,
    max_bytes: usize,
    invisible_ms: u64,
    retry_delays_ms: Vec<u32>,
}

impl PopAsk<'_> {
    fn terms(&self, now_ms: u64) -> LeaseTerms<'_> {
        LeaseTerms { now_ms, invisible_ms: self.invisible_ms, retry_delays_ms: &self.retry_delays_ms }
    }
}

/// Leaves a queue's scan to others again when the scanning pop is done (or cancelled).
struct ScanGuard<'a> {
    handler: &'a ShardHandler,
    group: &'a str,
    topic: &'a str,
    index: u32,
}

impl Drop for ScanGuard<'_> {
    fn drop(&mut self) {
        if let Some(gq) = self
            .handler
            .scheduler
            .borrow_mut()
            .group_mut(self.group, self.topic)
            .and_then(|gt| gt.queues.get_mut(&self.index))
        {
            gq.scanning = false;
        }
    }
}

impl ShardHandler {
    pub(super) async fn pop(&self, request: &Frame) -> Result<OutFrame> {
        let pop = request.access::<PopRequest>()?;
        let (group, topic) = (pop.group.as_str(), pop.topic.as_str());
        Self::check_group(group)?;
        let policy = GroupPolicy {
            fifo: pop.policy.fifo,
            retry_delays_ms: pop.policy.retry_delays_ms.iter().map(|d| d.to_native()).collect(),
        };
        if policy.retry_delays_ms.len() > self.limits.retry_delays_max {
            return Err(BrokerError::InvalidRequest(format!("at most {} retry delays", self.limits.retry_delays_max)));
        }
        let filter = FilterSpec { kind: pop.filter.kind, expression: pop.filter.expression.as_str().to_string() };
        let only = match pop.queue.as_str() {
            "" => None,
            queue => {
                self.check_queue(queue)?;
                Some(sluice_transport::model::placement::split_topic_queue(queue).map(|(_, i)| i).ok_or_else(|| {
                    BrokerError::InvalidRequest(format!("{queue:?} is not a topic queue (topic#index)"))
                })?)
            }
        };
        let client = pop.client_id.as_str();
        let first_queue = self.scheduler.borrow().topic_queues(topic).and_then(|q| q.values().next().cloned());
        let Some(first_queue) = first_queue else {
            return Err(BrokerError::QueueNotFound(format!("{topic}#*")));
        };
        let lite = !client.is_empty();
        if lite {
            Self::check_lite_client(client)?;
            if self.queue_type(&first_queue) != sluice_transport::model::message_type::LITE {
                return Err(BrokerError::InvalidRequest(format!(
                    "{topic} is not a LITE topic: only ordinary consumers receive from it"
                )));
            }
        }
        self.ensure_group(group, topic, &filter, &policy, lite).await?;
        if lite {
            self.check_lite_client_room(group, topic, client)?;
        }
        let ask = PopAsk {
            group,
            topic,
            client,
            max_count: bounded(pop.max_count.to_native(), self.limits.pop_records_max) as usize,
            max_bytes: bounded(pop.max_bytes.to_native(), self.limits.read_bytes_max) as usize,
            invisible_ms: pop
                .invisible_ms
                .to_native()
                .clamp(self.limits.invisible_min_ms, self.limits.invisible_max_ms),
            retry_delays_ms: policy.retry_delays_ms,
        };
        let wait_until_ms = now_ms() + pop.long_poll_ms.to_native().min(self.limits.long_poll_max_ms);
        let poll_id = pop.poll_id.to_native();
        let cancel = Rc::new(tokio::sync::Notify::new());
        if poll_id != 0 {
            self.polls.borrow_mut().insert(poll_id, cancel.clone());
        }
        let _unregister = PollGuard { handler: self, poll_id };
        let waiters = {
            let mut scheduler = self.scheduler.borrow_mut();
            let gt = scheduler.group_entry(group, topic);
            if lite {
                gt.lite.client(client, now_ms()).waiters.clone()
            } else {
                gt.waiters.clone()
            }
        };
        let _polling = LitePollGuard::enter(self, group, topic, client, &waiters);
        loop {
            let woken = waiters.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            let cancelled = cancel.notified();
            let mut cancelled = std::pin::pin!(cancelled);
            cancelled.as_mut().enable();
            let (popped, progressed) = self.pop_once(&ask, only).await?;
            let now = now_ms();
            // A lite client removed meanwhile (it terminated, or went silent) is answered now.
            let gone = lite && !self.lite_client_is(group, topic, client, &waiters);
            if !popped.is_empty() || now >= wait_until_ms || self.closing.get() || self.poll_cancelled(poll_id) || gone
            {
                return self.pop_reply(request.request_id(), &ask, popped);
            }
            if progressed {
                // Scanned past messages without leasing any (filtered out, or waiting behind
                // their FIFO group): look again, after letting other tasks run.
                yield_now().await;
                continue;
            }
            Counters::add(&self.counters.long_polls, 1);
            let retry_ms = self.scheduler.borrow().group(group, topic).and_then(|gt| gt.next_retry_ms());
            let wake_ms = retry_ms.map_or(wait_until_ms, |at| at.min(wait_until_ms)).max(now + 1);
            let sleep = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(wake_ms - now)));
            let closing = std::pin::pin!(self.closing_signal.notified());
            let events = futures::future::select(futures::future::select(woken, cancelled), closing);
            futures::future::select(events, sleep).await;
        }
    }

    /// True once `cancel_pop` named this poll (the entry is removed when it is cancelled).
    fn poll_cancelled(&self, poll_id: u64) -> bool {
        poll_id != 0 && !self.polls.borrow().contains_key(&poll_id)
    }

    pub(super) fn cancel_pop(&self, request: &Frame) -> Result<PopCancelResponse> {
        let cancel = request.access::<PopCancelRequest>()?;
        let waiting = self.polls.borrow_mut().remove(&cancel.poll_id.to_native());
        if let Some(notify) = &waiting {
            notify.notify_waiters();
            Counters::add(&self.counters.polls_cancelled, 1);
        }
        Ok(PopCancelResponse { cancelled: waiting.is_some() })
    }

    fn pop_reply(&self, id: u64, ask: &PopAsk<'_>, popped: Vec<Popped>) -> Result<OutFrame> {
        let group = ask.group;
        if let Some(gt) = self.scheduler.borrow_mut().group_mut(group, ask.topic) {
            gt.delivered += popped.len() as u64;
            gt.rate.add(popped.len() as u64, now_ms());
        }

        let receipts: Vec<String> = popped.iter().map(|p| self.key.issue(&p.queue, group, &p.delivery.lease)).collect();
        let reply = PopResponse {
            messages: popped
                .iter()
                .zip(&receipts)
                .map(|(p, receipt)| PoppedMessage {
                    queue: p.queue.to_string(),
                    offset: p.delivery.lease.offset,
                    delivery_attempt: p.delivery.lease.attempt,
                    receipt: receipt.clone(),
                    record: p.record.bytes(),
                })
                .collect(),
        };
        OutFrame::encode(id, &reply, self.limits.max_frame_bytes).map_err(|e| {
            // Leased but never handed out: given back rather than hidden for the invisible time.
            for p in &popped {
                self.give_back(ask, p.index, std::slice::from_ref(&p.delivery));
            }
            Self::unencodable(e)
        })
    }

    /// The group's state on the topic, with every local queue's position loaded (from its
    /// committed offset, or the queue's first message for a new group), and its filter and
    /// policy as this pop states them.
    async fn ensure_group(
        &self,
        group: &str,
        topic: &str,
        filter: &FilterSpec,
        policy: &GroupPolicy,
        lite: bool,
    ) -> Result<()> {
        let (missing, switched): (Vec<(u32, Rc<str>)>, Vec<u32>) = {
            let mut scheduler = self.scheduler.borrow_mut();
            let gt = scheduler.group_entry(group, topic);
            let switched = match gt.set_filter(filter) {
                // A FIFO switch frees or holds message groups: every queue's readiness is
                // recomputed.
                Ok(()) if gt.set_policy(policy) => gt.queues.keys().copied().collect(),
                Ok(()) => Vec::new(),
                Err(e) => {
                    scheduler.forget_if_empty(group, topic);
                    return Err(e.into());
                }
            };
            let known = scheduler.group(group, topic).map(|gt| &gt.queues);
            let missing = match scheduler.topic_queues(topic) {
                // A lite consumer's queues come with its subscriptions.
                Some(_) if lite => Vec::new(),
                Some(queues) => queues
                    .iter()
                    .filter(|(i, _)| known.is_none_or(|k| !k.contains_key(i)))
                    .map(|(i, q)| (*i, q.clone()))
                    .collect(),
                None => Vec::new(),
            };
            (missing, switched)
        };
        for index in switched {
            self.refresh(group, topic, index);
        }
        for (index, queue) in missing {
            let committed = self.load_offset(group, &queue).await?;
            // A new group starts at the oldest retained message: nothing sent before it is skipped.
            let (min, max) = self.shard.queue_info(&queue)?.map_or((0, 0), |q| (q.min_offset, q.max_offset));
            let start = committed.unwrap_or(min).clamp(min, max.max(min));
            let mut gq = GroupQueue::new(start);
            match self.with_queue_terms(&queue, |kind, key| (kind, key.is_some())) {
                (sluice_transport::model::message_type::PRIORITY, _) => gq.set_prioritized(),
                (sluice_transport::model::message_type::NORMAL, true) => gq.set_fair(),
                _ => {}
            }
            let inserted =
                self.scheduler.borrow_mut().insert_group_queue(group, topic, index, gq, self.limits.group_queues_max);
            if !inserted {
                self.scheduler.borrow_mut().forget_if_empty(group, topic);
                return Err(BrokerError::TooManyGroups { max: self.limits.group_queues_max });
            }
            self.refresh(group, topic, index);
        }
        Ok(())
    }

    /// Recomputes a queue's readiness for a group after its state changed; wakes the group's
    /// long polls when it became ready. Returns whether it is ready.
    pub(super) fn refresh(&self, group: &str, topic: &str, index: u32) -> bool {
        let Some(queue) = self.queue_name(topic, index) else { return false };
        let end = match self.shard.queue_info(&queue) {
            Ok(info) => info.map_or(0, |q| q.max_offset),
            Err(err) => {
                tracing::warn!(queue = %queue, error = %err, "queue metadata unreadable; readiness not refreshed");
                return false;
            }
        };
        let limits = self.queue_limits();
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gt) = scheduler.group_mut(group, topic) else { return false };
        let readiness = gt.refresh(index, end, now_ms(), limits);
        if readiness.became_ready {
            gt.waiters.notify_waiters();
        }
        readiness.ready
    }

    /// Wakes the group's (or the lite client's) long polls: work is left that this pop had
    /// no room for.
    fn hand_off(&self, ask: &PopAsk<'_>) {
        if let Some(gt) = self.scheduler.borrow().group(ask.group, ask.topic) {
            if ask.client.is_empty() {
                gt.waiters.notify_waiters();
            } else if let Some(c) = gt.lite.clients.get(ask.client) {
                c.waiters.notify_waiters();
            }
        }
    }

    /// True while the lite client's entry is the one whose `waiters` this poll waits on.
    fn lite_client_is(&self, group: &str, topic: &str, client: &str, waiters: &Rc<tokio::sync::Notify>) -> bool {
        self.scheduler
            .borrow()
            .group(group, topic)
            .and_then(|gt| gt.lite.clients.get(client))
            .is_some_and(|c| Rc::ptr_eq(&c.waiters, waiters))
    }

    pub(super) fn queue_name(&self, topic: &str, index: u32) -> Option<Rc<str>> {
        self.scheduler.borrow().queue_name(topic, index)
    }

    /// One pass over the group's ready queues, without waiting for new messages. Also says
    /// whether it got anywhere without delivering (scanned past filtered or FIFO-waiting
    /// messages), in which case another pass may find more.
    async fn pop_once(&self, ask: &PopAsk<'_>, only: Option<u32>) -> Result<(Vec<Popped>, bool)> {
        let order: Vec<u32> = {
            let mut scheduler = self.scheduler.borrow_mut();
            let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return Ok((Vec::new(), false)) };
            gt.promote_due(now_ms());
            let ready = if ask.client.is_empty() { gt.ready_in_turn() } else { gt.lite.ready_in_turn(ask.client) };
            ready.into_iter().filter(|i| only.is_none_or(|o| o == *i)).collect()
        };
        if self.is_prioritized(ask) {
            return self.pop_prioritized(ask, order).await;
        }
        if self.is_fair(ask) {
            return self.pop_fair(ask, order).await;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut progressed = false;
        let mut failure = None;
        // A lite client's ready queues each give at most one message (a lite topic is one
        // ordered stream), often a record read from disk: several are popped at once so their
        // reads overlap. Topic queues are served one after another, each as far as room allows.
        let lite = !ask.client.is_empty();
        let concurrency = if lite { LITE_POP_CONCURRENCY } else { 1 };
        let mut order = order.into_iter().peekable();
        while order.peek().is_some() {
            let full = out.len() >= ask.max_count || bytes >= ask.max_bytes;
            if full {
                // Work is left that this pop has no room for: another poll may take it.
                self.hand_off(ask);
                break;
            }
            let room = ask.max_count - out.len();
            let bytes_left = ask.max_bytes - bytes;
            let chunk: Vec<(u32, Rc<str>)> = order
                .by_ref()
                .take(concurrency.min(room))
                .filter_map(|index| self.queue_name(ask.topic, index).map(|queue| (index, queue)))
                .collect();
            let (queue_room, queue_bytes) =
                if lite { (1, (bytes_left / chunk.len().max(1)).max(1)) } else { (room, bytes_left) };
            let results = futures::future::join_all(
                chunk.iter().map(|(index, queue)| self.pop_queue(ask, *index, queue, queue_room, queue_bytes)),
            )
            .await;
            for ((index, queue), got) in chunk.iter().zip(results) {
                let index = *index;
                // One queue failing (a read error) costs only its own messages: what the others
                // leased still goes out. The pop fails only when it has nothing else to give.
                let (got, scanned) = match got {
                    Ok(got) => got,
                    Err(e) => {
                        tracing::warn!(error = %e, queue = &**queue, group = ask.group, "a queue failed during a pop; the others still deliver");
                        failure.get_or_insert(e);
                        (Vec::new(), false)
                    }
                };
                progressed |= scanned;
                if !out.is_empty() && (out.len() >= ask.max_count || bytes >= ask.max_bytes) && !got.is_empty() {
                    // Popped at once with others that filled the reply: given back, attempt kept.
                    let deliveries: Vec<Delivery> = got.iter().map(|p| p.delivery).collect();
                    self.give_back(ask, index, &deliveries);
                } else {
                    bytes += got.iter().map(|p| p.record.bytes().len()).sum::<usize>();
                    out.extend(got);
                }
                let still_ready = self.refresh(ask.group, ask.topic, index);
                if let Some(gt) = self.scheduler.borrow_mut().group_mut(ask.group, ask.topic) {
                    if lite {
                        gt.lite.served(ask.client, index);
                    } else {
                        gt.served(index);
                    }
                }
                if still_ready && (out.len() >= ask.max_count || bytes >= ask.max_bytes) {
                    self.hand_off(ask);
                }
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok((out, progressed)),
        }
    }

    /// True for a fair topic (its group queues hold messages per tenant).
    fn is_fair(&self, ask: &PopAsk<'_>) -> bool {
        let scheduler = self.scheduler.borrow();
        let gt = scheduler.group(ask.group, ask.topic);
        gt.and_then(|gt| gt.queues.values().next()).is_some_and(GroupQueue::is_fair)
    }

    /// True for a PRIORITY topic (its group queues keep a backlog).
    fn is_prioritized(&self, ask: &PopAsk<'_>) -> bool {
        let scheduler = self.scheduler.borrow();
        let gt = scheduler.group(ask.group, ask.topic);
        gt.and_then(|gt| gt.queues.values().next()).is_some_and(GroupQueue::is_prioritized)
    }

    /// What one queue gives: leases due again, freed FIFO groups, then new messages.
    async fn pop_queue(
        &self,
        ask: &PopAsk<'_>,
        index: u32,
        queue: &Rc<str>,
        room: usize,
        bytes_room: usize,
    ) -> Result<(Vec<Popped>, bool)> {
        let mut deliveries = self.take_waiting(ask, index, room, bytes_room);
        let taken_bytes: usize = deliveries.iter().map(|d| d.entry.size_bytes as usize).sum();
        let mut out = self.read_deliveries(ask, index, queue, std::mem::take(&mut deliveries), None).await?;
        let room = room - out.len().min(room);
        let mut scanned = false;
        if room > 0 && taken_bytes < bytes_room {
            let (got, advanced) = self.scan(ask, index, queue, room, bytes_room - taken_bytes).await?;
            scanned = advanced;
            out.extend(got);
        }
        Ok((out, scanned))
    }

    /// Leases due again and heads of freed FIFO groups; no I/O.
    fn take_waiting(&self, ask: &PopAsk<'_>, index: u32, room: usize, bytes_room: usize) -> Vec<Delivery> {
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gq) = scheduler.group_mut(ask.group, ask.topic).and_then(|gt| gt.queues.get_mut(&index)) else {
            return Vec::new();
        };
        let now = now_ms();
        let mut out: Vec<Delivery> = Vec::new();
        let mut bytes = 0usize;
        for offset in gq.due(now, room) {
            if bytes >= bytes_room {
                break;
            }
            if let Some(d) = gq.redeliver(offset, ask.terms(now), self.lease_id()) {
                bytes += d.entry.size_bytes as usize;
                Counters::add(&self.counters.redelivered, 1);
                out.push(d);
            }
        }
        for offset in gq.ready_heads(room - out.len()) {
            if bytes >= bytes_room {
                break;
            }
            if let Some(d) = gq.deliver_head(offset, ask.terms(now), self.lease_id()) {
                bytes += d.entry.size_bytes as usize;
                Counters::add(&self.counters.popped, 1);
                out.push(d);
            }
        }
        out
    }

    /// Reads the records of leases granted without reading them (redeliveries, FIFO heads,
    /// backlog messages). A record retention deleted, or one `filter` rules out, is consumed
    /// instead of delivered.
    async fn read_deliveries(
        &self,
        ask: &PopAsk<'_>,
        index: u32,
        queue: &Rc<str>,
        deliveries: Vec<Delivery>,
        filter: Option<&sluice_transport::model::filter::Filter>,
    ) -> Result<Vec<Popped>> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let log_start = self.shard.log_start();
        let (stored, gone): (Vec<Delivery>, Vec<Delivery>) =
            deliveries.into_iter().partition(|d| d.entry.position >= log_start);
        Counters::add(&self.counters.gone_unread, gone.len() as u64);
        for d in gone {
            self.consume_without_delivery(ask.group, ask.topic, index, d.lease.offset);
        }
        let entries: Vec<QueueEntry> = stored.iter().map(|d| d.entry).collect();
        let records = match self.shard.read_each(&entries, usize::MAX).await {
            Ok(records) => records,
            Err(e) => {
                // Leased but never handed out: given back, deliverable at once, attempt kept.
                self.give_back(ask, index, &stored);
                return Err(e.into());
            }
        };
        let mut out = Vec::with_capacity(stored.len());
        for (delivery, record) in stored.into_iter().zip(records) {
            match record {
                Ok(record) if filter.is_some_and(|f| f.needs_record() && !f.matches(&record.view())) => {
                    Counters::add(&self.counters.filtered, 1);
                    self.consume_without_delivery(ask.group, ask.topic, index, delivery.lease.offset);
                }
                Ok(record) => out.push(Popped { queue: queue.clone(), index, delivery, record }),
                Err(e) => {
                    log_damaged(queue, &delivery.entry, &e);
                    Counters::add(&self.counters.damaged_skipped, 1);
                    self.consume_without_delivery(ask.group, ask.topic, index, delivery.lease.offset);
                }
            }
        }
        Ok(out)
    }

    fn give_back(&self, ask: &PopAsk<'_>, index: u32, deliveries: &[Delivery]) {
        let now = now_ms();
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gq) = scheduler.group_mut(ask.group, ask.topic).and_then(|gt| gt.queues.get_mut(&index)) else {
            return;
        };
        for d in deliveries {
            // Fails only if the lease is no longer this delivery's: nothing to give back then.
            let _ = gq.release(d.lease.offset, d.lease.lease_id, now);
        }
    }

    /// Reads the queue index ahead of the group's position, reads the records the filter may
    /// want, then leases what passes (at most `room`).
    async fn scan(
        &self,
        ask: &PopAsk<'_>,
        index: u32,
        queue: &Rc<str>,
        room: usize,
        bytes_room: usize,
    ) -> Result<(Vec<Popped>, bool)> {
        let (next, epoch, filter) = {
            let mut scheduler = self.scheduler.borrow_mut();
            let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return Ok((Vec::new(), false)) };
            let filter = gt.filter.clone();
            let Some(gq) = gt.queues.get_mut(&index) else { return Ok((Vec::new(), false)) };
            if gq.scanning {
                return Ok((Vec::new(), false));
            }
            gq.scanning = true;
            (gq.next(), gq.epoch(), filter)
        };
        let _guard = ScanGuard { handler: self, group: ask.group, topic: ask.topic, index };
        let Some(info) = self.shard.queue_info(queue)? else { return Ok((Vec::new(), false)) };
        if next < info.min_offset {
            self.skip_removed(ask, index, epoch, info.min_offset);
        }
        let start = next.max(info.min_offset);
        let end = info.max_offset.min(start + self.limits.scan_entries_max as u64);
        if start >= end {
            return Ok((Vec::new(), false));
        }
        let entries = self.shard.entries(queue, start, end).await?;
        let log_start = self.shard.log_start();
        // Candidates: stored, and not ruled out by the tag hash. Read at most `room` of them
        // (and about `bytes_room`); entries after the last one read wait for the next pop.
        let mut candidates = Vec::new();
        let mut candidate_bytes = 0usize;
        let mut decided_end = end;
        for e in entries.iter().filter(|e| e.position >= log_start && filter.may_pass(e.tag_hash)) {
            let over_budget = candidate_bytes + e.size_bytes as usize > bytes_room;
            if candidates.len() >= room || (!candidates.is_empty() && over_budget) {
                decided_end = e.offset;
                break;
            }
            candidate_bytes += e.size_bytes as usize;
            candidates.push(*e);
        }
        let records = self.shard.read_each(&candidates, usize::MAX).await?;
        let mut passed: std::collections::HashMap<u64, StoredRecord> = std::collections::HashMap::new();
        let mut damaged = std::collections::HashSet::new();
        for (entry, record) in candidates.iter().zip(records) {
            match record {
                Ok(record) if !filter.needs_record() || filter.matches(&record.view()) => {
                    passed.insert(record.offset, record);
                }
                Ok(_) => {}
                Err(e) => {
                    damaged.insert(entry.offset);
                    log_damaged(queue, entry, &e);
                }
            }
        }
        let decided: Vec<QueueEntry> = entries.into_iter().filter(|e| e.offset < decided_end).collect();
        let now = now_ms();
        let limits = self.queue_limits();
        let leased = self.with_queue(ask, index, epoch, |gq| {
            let floor_before = gq.floor();
            let next_before = gq.next();
            let leased =
                gq.scan(&decided, |e| passed.contains_key(&e.offset), room, ask.terms(now), limits, || self.lease_id());
            let scanned = decided.iter().filter(|e| e.offset >= next_before && e.offset < gq.next());
            let mut skipped = Skipped::default();
            for e in scanned.filter(|e| !passed.contains_key(&e.offset)) {
                if damaged.contains(&e.offset) {
                    skipped.damaged += 1;
                } else if e.position < log_start {
                    skipped.gone += 1;
                } else {
                    skipped.filtered += 1;
                }
            }
            (leased, skipped, gq.floor() != floor_before, gq.next() > next_before)
        });
        let Some((leased, skipped, floor_moved, scanned_any)) = leased else {
            return Ok((Vec::new(), false));
        };
        if floor_moved {
            self.mark_dirty(ask.group, ask.topic, index);
        }
        Counters::add(&self.counters.popped, leased.len() as u64);
        Counters::add(&self.counters.filtered, skipped.filtered);
        Counters::add(&self.counters.damaged_skipped, skipped.damaged);
        Counters::add(&self.counters.gone_unread, skipped.gone);
        let popped = leased
            .into_iter()
            .filter_map(|delivery| {
                let record = passed.remove(&delivery.lease.offset)?;
                Some(Popped { queue: queue.clone(), index, delivery, record })
            })
            .collect();
        Ok((popped, scanned_any))
    }

    /// Retention removed messages below `min_offset` that the group may never have got to:
    /// nothing is left to deliver there.
    fn skip_removed(&self, ask: &PopAsk<'_>, index: u32, epoch: u64, min_offset: u64) {
        let moved = self.with_queue(ask, index, epoch, |gq| {
            let before = gq.floor();
            gq.skip_to(min_offset);
            gq.floor() != before
        });
        if moved == Some(true) {
            self.mark_dirty(ask.group, ask.topic, index);
        }
    }

    /// Runs `f` on the group's queue state if no offset reset happened since `epoch`.
    fn with_queue<T>(
        &self,
        ask: &PopAsk<'_>,
        index: u32,
        epoch: u64,
        f: impl FnOnce(&mut GroupQueue) -> T,
    ) -> Option<T> {
        let mut scheduler = self.scheduler.borrow_mut();
        let gq = scheduler.group_mut(ask.group, ask.topic)?.queues.get_mut(&index)?;
        (gq.epoch() == epoch).then(|| f(gq))
    }

    /// A leased offset whose record is gone: consumed, and the floor may move.
    fn consume_without_delivery(&self, group: &str, topic: &str, index: u32, offset: u64) {
        let moved = self
            .scheduler
            .borrow_mut()
            .group_mut(group, topic)
            .and_then(|gt| gt.queues.get_mut(&index))
            .map(|gq| gq.forget(offset));
        if moved == Some(true) {
            self.mark_dirty(group, topic, index);
        }
    }

    fn mark_dirty(&self, group: &str, topic: &str, index: u32) {
        if let Some(queue) = self.queue_name(topic, index) {
            self.dirty_offsets.borrow_mut().insert((group.into(), queue));
        }
    }

    /// The group's floor on a queue, if it has delivery state there.
    pub(super) fn floor_of(&self, group: &str, queue: &str) -> Option<u64> {
        let scheduler = self.scheduler.borrow();
        let (topic, index) = scheduler.locate(queue)?;
        scheduler.group(group, topic)?.queues.get(&index).map(GroupQueue::floor)
    }

    /// Authenticates a receipt and returns the (topic, index, lease) it names.
    fn open_receipt(
        &self,
        queue: &str,
        group: &str,
        receipt: &str,
    ) -> Result<(String, u32, crate::broker::pop::Lease)> {
        let lease = self.key.open(queue, group, receipt).ok_or_else(|| {
            Counters::add(&self.counters.receipts_refused, 1);
            BrokerError::InvalidReceipt
        })?;
        let located = self.scheduler.borrow().locate(queue).map(|(t, i)| (t.to_string(), i));
        let (topic, index) = match located {
            Some(found) => found,
            // A lite queue whose delivery state is gone (its subscribers left): no live lease.
            None if sluice_transport::model::placement::split_lite_queue(queue).is_some() => {
                return Err(BrokerError::ReceiptExpired)
            }
            None => return Err(BrokerError::InvalidRequest(format!("{queue:?} is not a topic queue"))),
        };
        Ok((topic, index, lease))
    }

    fn lease_error(&self, e: LeaseError) -> BrokerError {
        Counters::add(&self.counters.receipts_refused, 1);
        match e {
            LeaseError::Stale | LeaseError::Expired => BrokerError::ReceiptExpired,
        }
    }

    /// Applies `f` to the live lease a receipt names; no state means it was issued before
    /// this broker started.
    fn on_lease<T>(
        &self,
        queue: &str,
        group: &str,
        receipt: &str,
        f: impl FnOnce(&mut GroupQueue, crate::broker::pop::Lease) -> std::result::Result<T, LeaseError>,
    ) -> Result<T> {
        let (topic, index, lease) = self.open_receipt(queue, group, receipt)?;
        let result = {
            let mut scheduler = self.scheduler.borrow_mut();
            let gq = scheduler
                .group_mut(group, &topic)
                .and_then(|gt| gt.queues.get_mut(&index))
                .ok_or(BrokerError::ReceiptExpired)?;
            f(gq, lease).map_err(|e| self.lease_error(e))
        };
        self.refresh(group, &topic, index);
        result
    }

    pub(super) fn ack(&self, request: &Frame) -> Result<AckResponse> {
        let ack = request.access::<AckRequest>()?;
        let (queue, group) = (ack.queue.as_str(), ack.group.as_str());
        let statuses = self.settle(queue, group, ack.receipts.iter().map(|r| r.as_str()), |gq, lease, now| {
            let floor_moved = gq.ack(lease.offset, lease.lease_id, now)?;
            if floor_moved {
                self.dirty_offsets.borrow_mut().insert((group.into(), queue.into()));
            }
            Counters::add(&self.counters.acked, 1);
            Ok(())
        })?;
        Ok(AckResponse { statuses })
    }

    pub(super) fn release(&self, request: &Frame) -> Result<ReleaseResponse> {
        let release = request.access::<ReleaseRequest>()?;
        let (queue, group) = (release.queue.as_str(), release.group.as_str());
        let statuses = self.settle(queue, group, release.receipts.iter().map(|r| r.as_str()), |gq, lease, now| {
            gq.release(lease.offset, lease.lease_id, now)?;
            Counters::add(&self.counters.released, 1);
            Ok(())
        })?;
        Ok(ReleaseResponse { statuses })
    }

    /// Applies `settle` to the lease of each receipt (an ack or a release); one status per
    /// receipt, in order.
    fn settle<'a>(
        &self,
        queue: &str,
        group: &str,
        receipts: impl ExactSizeIterator<Item = &'a str>,
        settle: impl Fn(&mut GroupQueue, crate::broker::pop::Lease, u64) -> std::result::Result<(), LeaseError>,
    ) -> Result<Vec<u32>> {
        self.check_queue(queue)?;
        Self::check_group(group)?;
        self.check_receipt_count(receipts.len())?;
        let now = now_ms();
        Ok(receipts
            .map(|receipt| status_of(self.on_lease(queue, group, receipt, |gq, l| settle(gq, l, now))))
            .collect())
    }

    fn check_receipt_count(&self, count: usize) -> Result<()> {
        if count > self.limits.pop_records_max as usize {
            return Err(BrokerError::InvalidRequest(format!(
                "at most {} receipts per call",
                self.limits.pop_records_max
            )));
        }
        Ok(())
    }

    pub(super) fn change_invisible(&self, request: &Frame) -> Result<ChangeInvisibleResponse> {
        let change = request.access::<ChangeInvisibleRequest>()?;
        let (queue, group) = (change.queue.as_str(), change.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let invisible_ms =
            change.invisible_ms.to_native().clamp(self.limits.invisible_min_ms, self.limits.invisible_max_ms);
        let new_id = self.lease_id();
        let (topic, _, _) = self.open_receipt(queue, group, change.receipt.as_str())?;
        let delays = self
            .scheduler
            .borrow()
            .group(group, &topic)
            .map(|gt| gt.policy.retry_delays_ms.clone())
            .unwrap_or_default();
        let terms = LeaseTerms { now_ms: now_ms(), invisible_ms, retry_delays_ms: &delays };
        let renewed = self.on_lease(queue, group, change.receipt.as_str(), |gq, lease| {
            if change.renew {
                gq.renew(lease.offset, lease.lease_id, terms)
            } else {
                gq.extend(lease.offset, lease.lease_id, terms, new_id, change.suspend)
            }
        })?;
        Ok(ChangeInvisibleResponse { receipt: self.key.issue(queue, group, &renewed), offset: renewed.offset })
    }

    pub(super) async fn commit_offset(&self, request: &Frame) -> Result<CommitOffsetResponse> {
        let commit = request.access::<CommitOffsetRequest>()?;
        let (queue, group) = (commit.queue.as_str(), commit.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let max = self.shard.queue_info(queue)?.map_or(0, |q| q.max_offset);
        let offset = commit.offset.to_native();
        if offset > max {
            return Err(BrokerError::InvalidRequest(format!("offset {offset} is past the end of {queue} ({max})")));
        }
        let (topic, index) = self.index_for_commit(queue)?;
        self.move_position(group, &topic, index, queue, offset, false).await?;
        Ok(CommitOffsetResponse {})
    }

    /// Restarts the group's delivery on a queue at `offset` (outstanding receipts become
    /// stale) and persists the new position before returning. With `refuse_in_flight`, a live
    /// lease below `offset` refuses the move instead (checked with no await before the move).
    /// Returns whether it moved.
    pub(super) async fn move_position(
        &self,
        group: &str,
        topic: &str,
        index: u32,
        queue: &str,
        offset: u64,
        refuse_in_flight: bool,
    ) -> Result<bool> {
        {
            let mut scheduler = self.scheduler.borrow_mut();
            let current = scheduler.group(group, topic).and_then(|gt| gt.queues.get(&index));
            let now = now_ms();
            if refuse_in_flight && current.is_some_and(|gq| gq.live_leases_below(offset, now).next().is_some()) {
                return Ok(false);
            }
            if current.is_some() {
                // An explicit offset restarts delivery there; outstanding receipts become stale.
                let gt = scheduler.group_mut(group, topic).expect("checked above");
                gt.queues.get_mut(&index).expect("checked above").reset(offset);
            } else if !scheduler.insert_group_queue(
                group,
                topic,
                index,
                GroupQueue::new(offset),
                self.limits.group_queues_max,
            ) {
                return Err(BrokerError::TooManyGroups { max: self.limits.group_queues_max });
            }
        }
        self.refresh(group, topic, index);
        // Written through the same path as acks, so a timed write cannot land after it with
        // an older floor.
        self.dirty_offsets.borrow_mut().insert((group.into(), queue.into()));
        self.persist_offsets().await?;
        Ok(true)
    }

    /// (topic, index) of a topic queue an offset is committed on. A lite topic's position
    /// moves with its subscription's offset option instead (its state lives only while
    /// subscribed).
    pub(super) fn index_for_commit(&self, queue: &str) -> Result<(String, u32)> {
        match sluice_transport::model::placement::split_topic_queue(queue) {
            Some((topic, index)) => Ok((topic.to_string(), index)),
            None => Err(BrokerError::InvalidRequest(format!(
                "{queue:?} is not a topic queue; a lite topic's start is set by its subscription's offset option"
            ))),
        }
    }

    pub(super) async fn query_offset(&self, request: &Frame) -> Result<QueryOffsetResponse> {
        let query = request.access::<QueryOffsetRequest>()?;
        let (queue, group) = (query.queue.as_str(), query.group.as_str());
        self.check_queue(queue)?;
        let info = self.shard.queue_info(queue)?;
        let committed = if group.is_empty() {
            None
        } else {
            Self::check_group(group)?;
            match self.floor_of(group, queue) {
                Some(floor) => Some(floor),
                None => self.load_offset(group, queue).await?,
            }
        };
        Ok(QueryOffsetResponse {
            committed,
            min_offset: info.map_or(0, |i| i.min_offset),
            max_offset: info.map_or(0, |i| i.max_offset),
        })
    }
}

/// Lets every other ready task on this executor run once before continuing.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Counts a lite client's pop as under way, so the idle sweep leaves a waiting client alone;
/// marks it seen again when the pop ends. Tied to the client entry it counted in (by its
/// waiters): a client removed and made again meanwhile is a new entry, left alone.
struct LitePollGuard<'a> {
    handler: &'a ShardHandler,
    group: &'a str,
    topic: &'a str,
    client: &'a str,
    waiters: Rc<tokio::sync::Notify>,
}

impl<'a> LitePollGuard<'a> {
    fn enter(
        handler: &'a ShardHandler,
        group: &'a str,
        topic: &'a str,
        client: &'a str,
        waiters: &Rc<tokio::sync::Notify>,
    ) -> Option<Self> {
        if client.is_empty() {
            return None;
        }
        handler.scheduler.borrow_mut().group_entry(group, topic).lite.client(client, now_ms()).polls += 1;
        Some(LitePollGuard { handler, group, topic, client, waiters: waiters.clone() })
    }
}

impl Drop for LitePollGuard<'_> {
    fn drop(&mut self) {
        let mut scheduler = self.handler.scheduler.borrow_mut();
        let entry = scheduler.group_mut(self.group, self.topic).and_then(|gt| gt.lite.clients.get_mut(self.client));
        if let Some(c) = entry.filter(|c| Rc::ptr_eq(&c.waiters, &self.waiters)) {
            c.polls = c.polls.saturating_sub(1);
            c.seen_ms = c.seen_ms.max(now_ms());
        }
    }
}

/// Forgets a cancellable poll when its pop ends.
struct PollGuard<'a> {
    handler: &'a ShardHandler,
    poll_id: u64,
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        if self.poll_id != 0 {
            self.handler.polls.borrow_mut().remove(&self.poll_id);
        }
    }
}

/// A record that fails verification is never delivered: it is consumed (counted as
/// `damaged_records_skipped`) and logged with its position, so it cannot stop its queue.
fn log_damaged(queue: &str, entry: &QueueEntry, error: &crate::error::EngineError) {
    tracing::error!(queue, offset = entry.offset, position = entry.position, %error, "a damaged record is skipped, never delivered");
}
