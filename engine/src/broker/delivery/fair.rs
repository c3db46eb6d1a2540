//! Pops from a fair topic. Each of the group's queues holds scanned messages per tenant
//! (`FairBacklog`); a pop first tops up every ready queue (the forward scan, then tenants
//! catching up from where they fell behind), then leases one message at a time from the
//! tenant the group's `FairClock` picks, so deliveries follow the tenants' weights across all
//! the shard's queues of the topic. A lease due again is its tenant's next message, ahead of
//! the tenant's held ones, and is charged again unless it was given back unconsumed (it never
//! reached a consumer, and was charged when first leased).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use sluice_transport::model::fairness::{self, Weights};

use super::priority::Pass;
use super::{PopAsk, Popped, ScanGuard};
use crate::broker::handler::{now_ms, Counters, Result, ShardHandler};
use crate::broker::pop::Delivery;
use crate::index::QueueEntry;

/// Index reads one tenant's catch-up may make in one pop.
const CATCH_UP_READS_MAX: usize = 4;

/// A tenant's oldest held message across the queues: (store time, queue index).
type Head = (u64, u32);

impl ShardHandler {
    /// One pass over the group's ready queues of a fair topic (see the module comment).
    pub(super) async fn pop_fair(&self, ask: &PopAsk<'_>, order: Vec<u32>) -> Result<(Vec<Popped>, bool)> {
        self.refresh_weights(ask);
        let queues: Vec<(u32, Rc<str>)> =
            order.into_iter().filter_map(|index| self.queue_name(ask.topic, index).map(|q| (index, q))).collect();
        let mut failure = None;
        let mut progressed = false;
        for (index, queue) in &queues {
            let filled = match self.fill_backlog(ask, *index, queue).await {
                Ok(advanced) => self.catch_up(ask, *index, queue).await.map(|caught| advanced | caught),
                Err(e) => Err(e),
            };
            match filled {
                Ok(advanced) => progressed |= advanced,
                Err(e) => {
                    tracing::warn!(error = %e, queue = &**queue, group = ask.group, "reading a queue's index failed during a pop; the others still deliver");
                    failure.get_or_insert(e);
                }
            }
        }
        let granted = self.lease_fairly(ask, &queues);
        // The reply keeps the order the clock chose.
        let turn: HashMap<(u32, u64), usize> =
            granted.iter().enumerate().map(|(i, (index, d))| ((*index, d.lease.offset), i)).collect();
        let order = |out: &mut Vec<Popped>| {
            out.sort_by_key(|p| turn.get(&(p.index, p.delivery.lease.offset)).copied().unwrap_or(usize::MAX));
        };
        self.deliver_granted(ask, &queues, granted, Pass { failure, progressed }, order).await
    }

    /// Takes the topic's weights from its queue attributes when they changed (an operator
    /// may change them at run time).
    fn refresh_weights(&self, ask: &PopAsk<'_>) {
        let first = self.scheduler.borrow().topic_queues(ask.topic).and_then(|q| q.values().next().cloned());
        let Some(first) = first else { return };
        let source = {
            let configs = self.configs.borrow();
            let attribute = |name: &str| {
                configs
                    .get(&first)
                    .and_then(|c| c.attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                    .unwrap_or_default()
            };
            (attribute(fairness::WEIGHTS_ATTRIBUTE), attribute(fairness::DEFAULT_WEIGHT_ATTRIBUTE))
        };
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return };
        if gt.weights_source == source {
            return;
        }
        let default_weight = (!source.1.is_empty()).then_some(source.1.as_str());
        gt.weights = Rc::new(Weights::parse(&source.0, default_weight).unwrap_or_else(|e| {
            tracing::warn!(topic = ask.topic, error = %e, "unreadable fairness weights; every tenant weighs 1");
            Weights::default()
        }));
        gt.weights_source = source;
    }

    /// Lets every tenant of the queue that fell behind and has room again take its messages,
    /// reading the queue index from where it fell behind. Returns whether anything changed.
    async fn catch_up(&self, ask: &PopAsk<'_>, index: u32, queue: &Rc<str>) -> Result<bool> {
        let limits = self.queue_limits();
        let (epoch, filter, tenants) = {
            let mut scheduler = self.scheduler.borrow_mut();
            let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return Ok(false) };
            let filter = gt.filter.clone();
            let Some(gq) = gt.queues.get_mut(&index) else { return Ok(false) };
            let tenants = gq.fair_backlog().catch_ups(limits.backlog_max);
            if gq.scanning || tenants.is_empty() {
                return Ok(false);
            }
            gq.scanning = true;
            (gq.epoch(), filter, tenants)
        };
        let _guard = ScanGuard { handler: self, group: ask.group, topic: ask.topic, index };
        let log_start = self.shard.log_start();
        let keep = |e: &QueueEntry| e.position >= log_start && filter.may_pass(e.tag_hash);
        let mut changed = false;
        for (tenant, mut from) in tenants {
            for _ in 0..CATCH_UP_READS_MAX {
                let Some(next) = self.with_queue(ask, index, epoch, |gq| gq.next()) else { return Ok(changed) };
                let read_end = next.min(from + self.limits.scan_entries_max as u64);
                let entries = self.shard.entries(queue, from, read_end).await?;
                let caught = self.with_queue(ask, index, epoch, |gq| {
                    let moved = gq.catch_up_fair(tenant, &entries, read_end, keep, limits);
                    let resume =
                        gq.fair_backlog().catch_ups(limits.backlog_max).into_iter().find(|(t, _)| *t == tenant);
                    (moved, resume)
                });
                let Some((moved, resume)) = caught else { return Ok(changed) };
                changed |= moved;
                match resume {
                    Some((_, at)) if moved && at > from => from = at,
                    _ => break,
                }
            }
        }
        if changed {
            self.mark_dirty(ask.group, ask.topic, index);
        }
        Ok(changed)
    }

    /// Leases one message at a time, from the tenant whose next message starts first on the
    /// group's fair clock, until the pop is full. No I/O.
    fn lease_fairly(&self, ask: &PopAsk<'_>, queues: &[(u32, Rc<str>)]) -> Vec<(u32, Delivery)> {
        let now = now_ms();
        let limits = self.queue_limits();
        let mut out: Vec<(u32, Delivery)> = Vec::new();
        let mut scheduler = self.scheduler.borrow_mut();
        let Some(gt) = scheduler.group_mut(ask.group, ask.topic) else { return out };
        let weights = gt.weights.clone();
        let (mut bytes, mut fresh, mut again) = (0usize, 0u64, 0u64);
        // Leases due again, per tenant in the order they came due: each competes on the clock
        // as its tenant's next message, ahead of that tenant's held ones.
        let mut due: HashMap<u64, VecDeque<(u32, u64)>> = HashMap::new();
        for (index, _) in queues {
            let Some(gq) = gt.queues.get(index) else { continue };
            for offset in gq.due(now, limits.leases_max) {
                if let Some(entry) = gq.leased_entry(offset) {
                    due.entry(entry.key_hash).or_default().push_back((*index, offset));
                }
            }
        }
        let mut heads = fair_heads(gt, queues, limits);
        while out.len() < ask.max_count && bytes < ask.max_bytes {
            let Some(tenant) = gt.fair.pick(heads.keys().chain(due.keys()).copied()) else { break };
            if let Some((index, offset)) = due.get_mut(&tenant).and_then(VecDeque::pop_front) {
                if due.get(&tenant).is_some_and(VecDeque::is_empty) {
                    due.remove(&tenant);
                }
                let Some(gq) = gt.queues.get_mut(&index) else { continue };
                // A message given back never reached a consumer: it was charged when first leased.
                let charged = gq.was_released(offset);
                if let Some(d) = gq.redeliver(offset, ask.terms(now), self.lease_id()) {
                    if !charged {
                        gt.fair.charge(tenant, &weights);
                    }
                    bytes += d.entry.size_bytes as usize;
                    again += 1;
                    out.push((index, d));
                }
                continue;
            }
            let index = heads[&tenant].1;
            let gq = gt.queues.get_mut(&index).expect("a head's queue is held");
            let Some(d) = gq.lease_fair(tenant, ask.terms(now), limits, self.lease_id()) else { break };
            let queue_full = gq.leased() >= limits.leases_max;
            gt.fair.charge(tenant, &weights);
            bytes += d.entry.size_bytes as usize;
            fresh += 1;
            out.push((index, d));
            if queue_full {
                heads = fair_heads(gt, queues, limits);
            } else {
                match tenant_head(gt, queues, limits, tenant) {
                    Some(head) => heads.insert(tenant, head),
                    None => heads.remove(&tenant),
                };
            }
        }
        Counters::add(&self.counters.popped, fresh);
        Counters::add(&self.counters.redelivered, again);
        out
    }
}

/// Every tenant's oldest held message across the queues that have a lease free.
fn fair_heads(
    gt: &crate::broker::scheduler::GroupTopic,
    queues: &[(u32, Rc<str>)],
    limits: crate::broker::pop::QueueLimits,
) -> HashMap<u64, Head> {
    let mut heads: HashMap<u64, Head> = HashMap::new();
    for (index, _) in queues {
        let Some(gq) = gt.queues.get(index).filter(|gq| gq.leased() < limits.leases_max) else { continue };
        for e in gq.fair_backlog().heads() {
            let head = (e.store_ms, *index);
            heads.entry(e.key_hash).and_modify(|h| *h = (*h).min(head)).or_insert(head);
        }
    }
    heads
}

/// One tenant's oldest held message across the queues that have a lease free.
fn tenant_head(
    gt: &crate::broker::scheduler::GroupTopic,
    queues: &[(u32, Rc<str>)],
    limits: crate::broker::pop::QueueLimits,
    tenant: u64,
) -> Option<Head> {
    queues
        .iter()
        .filter_map(|(index, _)| {
            let gq = gt.queues.get(index).filter(|gq| gq.leased() < limits.leases_max)?;
            gq.fair_backlog().head_of(tenant).map(|e| (e.store_ms, *index))
        })
        .min()
}
