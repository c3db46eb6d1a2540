//! Pops from a PRIORITY topic. Each of the group's queues keeps a read-ahead backlog of
//! undelivered messages (`GroupQueue::fill_backlog`); a pop first tops up the backlog of every
//! ready queue, then leases the best message across all of them, one at a time, so a pop
//! never hands out a lower priority while a higher one waits in another of the shard's
//! queues. Leases due again (expired, or given back) compete by the same rank, and win ties.

use std::cmp::Reverse;
use std::rc::Rc;

use sluice_transport::model::filter::Filter;

use super::{PopAsk, Popped, ScanGuard};
use crate::broker::handler::{now_ms, Counters, Result, ShardHandler};
use crate::broker::pop::Delivery;
use crate::index::QueueEntry;

/// Order across queues: higher priority first; then a lease due again; then the earlier stored.
type Rank = (i32, bool, Reverse<u64>);

fn rank(entry: &QueueEntry, due_again: bool) -> Rank {
    (entry.priority, due_again, Reverse(entry.store_ms))
}

/// How a pop's top-up went: the first error met, and whether any queue moved on.
pub(super) struct Pass {
    pub failure: Option<crate::broker::error::BrokerError>,
    pub progressed: bool,
}

/// What topping up one queue's backlog did.
#[derive(Default)]
struct Filled {
    /// `next` moved: entries were read into the backlog or consumed.
    advanced: bool,
    filtered: u64,
    gone: u64,
}

impl ShardHandler {
    /// One pass over the group's ready queues of a PRIORITY topic (see the module comment).
    pub(super) async fn pop_prioritized(&self, ask: &PopAsk<'_>, order: Vec<u32>) -> Result<(Vec<Popped>, bool)> {
        let queues: Vec<(u32, Rc<str>)> =
            order.into_iter().filter_map(|index| self.queue_name(ask.topic, index).map(|q| (index, q))).collect();
        let mut failure = None;
        let mut progressed = false;
        for (index, queue) in &queues {
            match self.fill_backlog(ask, *index, queue).await {
                Ok(advanced) => progressed |= advanced,
                Err(e) => {
                    tracing::warn!(error = %e, queue = &**queue, group = ask.group, "reading a queue's index failed during a pop; the others still deliver");
                    failure.get_or_insert(e);
                }
            }
        }
        let granted = self.lease_across(ask, &queues);
        // Redeliveries and the queues' bests, merged: the reply itself is in priority order.
        let order = |out: &mut Vec<Popped>| {
            out.sort_by_key(|p| (Reverse(p.delivery.entry.priority), p.delivery.entry.store_ms));
        };
        self.deliver_granted(ask, &queues, granted, Pass { failure, progressed }, order).await
    }

    /// The end of a priority or fair pop: reads the granted leases' records (one read per
    /// queue, at once), lets `order` sort the reply, refreshes each queue's readiness, and
    /// hands a full pop's leftover work to the next waiter.
    pub(super) async fn deliver_granted(
        &self,
        ask: &PopAsk<'_>,
        queues: &[(u32, Rc<str>)],
        granted: Vec<(u32, Delivery)>,
        pass: Pass,
        order: impl FnOnce(&mut Vec<Popped>),
    ) -> Result<(Vec<Popped>, bool)> {
        let Pass { mut failure, mut progressed } = pass;
        let granted_count = granted.len();
        let filter = self.scheduler.borrow().group(ask.group, ask.topic).map(|gt| gt.filter.clone());
        let reads = queues.iter().filter_map(|(index, queue)| {
            let mine: Vec<Delivery> = granted.iter().filter(|(i, _)| i == index).map(|(_, d)| *d).collect();
            (!mine.is_empty()).then(|| self.read_deliveries(ask, *index, queue, mine, filter.as_deref()))
        });
        let mut out = Vec::new();
        for read in futures::future::join_all(reads).await {
            match read {
                Ok(popped) => out.extend(popped),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // Leases the filter (or retention) consumed instead of delivering: moving on, so another
        // pass may find more in the backlog.
        progressed |= out.len() < granted_count;
        order(&mut out);
        let full = out.len() >= ask.max_count;
        let mut still_ready = false;
        for (index, _) in queues {
            still_ready |= self.refresh(ask.group, ask.topic, *index);
            if let Some(gt) = self.scheduler.borrow_mut().group_mut(ask.group, ask.topic) {
                gt.served(*index);
            }
        }
        if full && still_ready {
            self.hand_off(ask);
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok((out, progressed)),
        }
    }

    /// Reads the queue index after the group's position into the queue's backlog until the
    /// backlog is full or the queue's end is reached. Entries the tag filter rules out, and
    /// entries retention removed, are consumed here.
    pub(super) async fn fill_backlog(&self, ask: &PopAsk<'_>, index: u32, queue: &Rc<str>) -> Result<bool> {
        let limits = self.queue_limits();
        let (epoch, filter) = {
            let mut scheduler = self.scheduler.borrow_mut();
            let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return Ok(false) };
            let filter = gt.filter.clone();
            let Some(gq) = gt.queues.get_mut(&index) else { return Ok(false) };
            if gq.scanning || gq.read_ahead_full(limits) {
                return Ok(false);
            }
            gq.scanning = true;
            (gq.epoch(), filter)
        };
        let _guard = ScanGuard { handler: self, group: ask.group, topic: ask.topic, index };
        let mut advanced = false;
        loop {
            let Some(info) = self.shard.queue_info(queue)? else { return Ok(advanced) };
            self.skip_removed(ask, index, epoch, info.min_offset);
            let Some((next, room)) = self.with_queue(ask, index, epoch, |gq| {
                // A fair queue passes over full tenants' messages: it reads on while it has room.
                let room = if gq.is_fair() { self.limits.scan_entries_max } else { limits.backlog_max - gq.backlog() };
                (gq.next(), room)
            }) else {
                return Ok(advanced);
            };
            let end = info.max_offset.min(next + room.min(self.limits.scan_entries_max) as u64);
            if room == 0 || next >= end {
                return Ok(advanced);
            }
            let entries = self.shard.entries(queue, next, end).await?;
            let filled = self.take_into_backlog(ask, index, epoch, &entries, &filter);
            let Some(filled) = filled else { return Ok(advanced) };
            Counters::add(&self.counters.filtered, filled.filtered);
            Counters::add(&self.counters.gone_unread, filled.gone);
            if !filled.advanced {
                return Ok(advanced);
            }
            advanced = true;
        }
    }

    fn take_into_backlog(
        &self,
        ask: &PopAsk<'_>,
        index: u32,
        epoch: u64,
        entries: &[QueueEntry],
        filter: &Filter,
    ) -> Option<Filled> {
        let log_start = self.shard.log_start();
        let limits = self.queue_limits();
        let filled = self.with_queue(ask, index, epoch, |gq| {
            let (floor_before, next_before) = (gq.floor(), gq.next());
            let keep = |e: &QueueEntry| e.position >= log_start && filter.may_pass(e.tag_hash);
            let advanced =
                if gq.is_fair() { gq.fill_fair(entries, keep, limits) } else { gq.fill_backlog(entries, keep, limits) };
            let mut filled = Filled { advanced, ..Filled::default() };
            for e in entries.iter().filter(|e| e.offset >= next_before && e.offset < gq.next() && !keep(e)) {
                if e.position < log_start {
                    filled.gone += 1;
                } else {
                    filled.filtered += 1;
                }
            }
            (filled, gq.floor() != floor_before)
        })?;
        let (filled, floor_moved) = filled;
        if floor_moved {
            self.mark_dirty(ask.group, ask.topic, index);
        }
        Some(filled)
    }

    /// Leases the best message across the queues, one at a time, until the pop is full: a
    /// lease due again or a backlog message, whichever ranks higher (a lease due again wins a
    /// tie: it has waited longer). No I/O.
    fn lease_across(&self, ask: &PopAsk<'_>, queues: &[(u32, Rc<str>)]) -> Vec<(u32, Delivery)> {
        let now = now_ms();
        let limits = self.queue_limits();
        let mut out: Vec<(u32, Delivery)> = Vec::new();
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return out };
        let mut due: Vec<(Rank, u32, u64)> = queues
            .iter()
            .filter_map(|(index, _)| gt.queues.get(index).map(|gq| (*index, gq)))
            .flat_map(|(index, gq)| {
                gq.due(now, limits.leases_max)
                    .into_iter()
                    .filter_map(move |offset| gq.leased_entry(offset).map(|e| (rank(&e, true), index, offset)))
            })
            .collect();
        due.sort_by_key(|d| std::cmp::Reverse(d.0));
        let mut due = due.into_iter().peekable();
        let (mut bytes, mut fresh, mut again) = (0usize, 0u64, 0u64);
        while out.len() < ask.max_count && bytes < ask.max_bytes {
            let best = queues
                .iter()
                .filter_map(|(index, _)| {
                    let gq = gt.queues.get(index).filter(|gq| gq.leased() < limits.leases_max)?;
                    gq.best_in_backlog().map(|e| (rank(e, false), *index))
                })
                .max();
            let delivery = match (due.peek(), best) {
                (Some((due_rank, _, _)), best) if best.is_none_or(|(b, _)| *due_rank > b) => {
                    let (_, index, offset) = due.next().expect("peeked");
                    let gq = gt.queues.get_mut(&index).expect("found above");
                    gq.redeliver(offset, ask.terms(now), self.lease_id()).map(|d| {
                        again += 1;
                        (index, d)
                    })
                }
                (_, Some((_, index))) => {
                    let gq = gt.queues.get_mut(&index).expect("found above");
                    gq.lease_best(ask.terms(now), limits, self.lease_id()).map(|d| {
                        fresh += 1;
                        (index, d)
                    })
                }
                (None, None) => break,
                (Some(_), None) => unreachable!("matched by the first arm"),
            };
            if let Some((index, d)) = delivery {
                bytes += d.entry.size_bytes as usize;
                out.push((index, d));
            }
        }
        Counters::add(&self.counters.popped, fresh);
        Counters::add(&self.counters.redelivered, again);
        out
    }
}
