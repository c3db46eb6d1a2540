//! Lite topics on one shard: each lite consumer's subscription set, kept here and changed
//! incrementally; the group's position in each lite queue; forgetting clients that went away;
//! and reclaiming lite topics nobody writes or reads any more.
//!
//! A lite topic `L` of a LITE topic `T` is the queue `T#i/L` (`placement::lite_queue`): it
//! lives in the index only (queue-index entries and one queue-meta row), created by its first
//! append. A group has delivery state (`GroupQueue`, ordered) on a lite queue only while some
//! client of the group subscribes to it or holds a lease on it; its position is persisted as
//! the usual consumer offset, so it outlives its consumers. Appends mark exactly the
//! subscribers' ready sets (`scheduler::LiteClients`), so idle subscriptions cost no work.

use std::rc::Rc;

use sluice_transport::messages::*;
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{split_lite_queue, LITE_TTL_ATTRIBUTE};
use sluice_transport::Frame;

use crate::broker::error::BrokerError;
use crate::broker::handler::{now_ms, Counters, Result, ShardHandler};
use crate::broker::pop::GroupQueue;
use crate::error::EngineError;

/// Longest client id, in bytes (RocketMQ clients send `host@pid#…`, well under this).
pub const CLIENT_ID_MAX_BYTES: usize = 255;

/// Where a group starts in a lite topic it has no delivery state for.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Its committed offset, else the first retained message.
    Last,
    Min,
    Max,
    Offset(u64),
    Tail(u64),
}

impl Start {
    fn of(start: u8, value: u64) -> Result<Start> {
        Ok(match start {
            LITE_START_LAST => Start::Last,
            LITE_START_MIN => Start::Min,
            LITE_START_MAX => Start::Max,
            LITE_START_OFFSET => Start::Offset(value),
            LITE_START_TAIL => Start::Tail(value),
            other => return Err(BrokerError::InvalidRequest(format!("unknown lite subscription start {other}"))),
        })
    }
}

impl ShardHandler {
    pub(super) fn check_lite_client(client: &str) -> Result<()> {
        if client.is_empty() || client.len() > CLIENT_ID_MAX_BYTES || client.bytes().any(|b| b.is_ascii_control()) {
            return Err(BrokerError::InvalidRequest(format!(
                "client id must be 1..={CLIENT_ID_MAX_BYTES} bytes without control characters"
            )));
        }
        Ok(())
    }

    /// A new lite consumer of the group is taken only while the group has room for it.
    pub(super) fn check_lite_client_room(&self, group: &str, topic: &str, client: &str) -> Result<()> {
        let scheduler = self.scheduler.borrow();
        let clients = scheduler.group(group, topic).map(|gt| &gt.lite.clients);
        let known = clients.is_some_and(|c| c.contains_key(client));
        let max = self.limits.lite_clients_per_group_max;
        if !known && clients.is_some_and(|c| c.len() >= max) {
            return Err(BrokerError::TooManyLiteClients { max });
        }
        Ok(())
    }

    /// The topic must have queues on this shard, and be a LITE topic.
    fn check_lite_topic(&self, topic: &str) -> Result<()> {
        let first = self.scheduler.borrow().topic_queues(topic).and_then(|q| q.values().next().cloned());
        let first = first.ok_or_else(|| BrokerError::QueueNotFound(format!("{topic}#*")))?;
        if self.queue_type(&first) != message_type::LITE {
            return Err(BrokerError::InvalidRequest(format!("{topic} is not a LITE topic")));
        }
        Ok(())
    }

    pub(super) async fn lite_subscription(&self, request: &Frame) -> Result<LiteSubscriptionResponse> {
        let req = request.access::<LiteSubscriptionRequest>()?;
        let (group, client, topic) = (req.group.as_str(), req.client_id.as_str(), req.topic.as_str());
        Self::check_group(group)?;
        Self::check_lite_client(client)?;
        if req.queues.len() > self.limits.lite_subscriptions_per_client_max {
            return Err(BrokerError::LiteSubscriptionQuota { max: self.limits.lite_subscriptions_per_client_max });
        }
        if req.action == LITE_REMOVE_ALL {
            let topics: Vec<Rc<str>> = if topic.is_empty() {
                self.scheduler.borrow().lite_topics_of(group, client)
            } else {
                vec![topic.into()]
            };
            for topic in topics {
                self.remove_lite_client(group, &topic, client).await?;
            }
            return Ok(LiteSubscriptionResponse { subscribed: 0 });
        }
        self.check_lite_topic(topic)?;
        self.check_lite_client_room(group, topic, client)?;
        let mut queues = Vec::with_capacity(req.queues.len());
        for queue in req.queues.iter() {
            let queue = queue.as_str();
            self.check_queue(queue)?;
            if split_lite_queue(queue).map(|(t, _, _)| t) != Some(topic) {
                return Err(BrokerError::InvalidRequest(format!("{queue:?} is not a lite queue of {topic}")));
            }
            queues.push(queue);
        }
        let start = Start::of(req.start, req.start_value.to_native())?;
        match req.action {
            LITE_ADD => self.lite_add(group, topic, client, &queues, start).await?,
            LITE_REMOVE => self.lite_remove(group, topic, client, &queues).await?,
            LITE_REPLACE => {
                let current = self.subscribed_queues(group, topic, client);
                let wanted: std::collections::HashSet<&str> = queues.iter().copied().collect();
                let gone: Vec<&str> = current.iter().map(|q| &**q).filter(|q| !wanted.contains(q)).collect();
                self.lite_remove(group, topic, client, &gone).await?;
                self.lite_add(group, topic, client, &queues, start).await?;
            }
            other => return Err(BrokerError::InvalidRequest(format!("unknown lite subscription action {other}"))),
        }
        let subscribed = self
            .scheduler
            .borrow()
            .group(group, topic)
            .and_then(|gt| gt.lite.clients.get(client))
            .map_or(0, |c| c.subscribed.len());
        Ok(LiteSubscriptionResponse { subscribed: subscribed as u32 })
    }

    /// Queue names the client is subscribed to on this shard.
    fn subscribed_queues(&self, group: &str, topic: &str, client: &str) -> Vec<Rc<str>> {
        let scheduler = self.scheduler.borrow();
        let Some(c) = scheduler.group(group, topic).and_then(|gt| gt.lite.clients.get(client)) else {
            return Vec::new();
        };
        c.subscribed.iter().filter_map(|i| scheduler.queue_name(topic, *i)).collect()
    }

    async fn lite_add(&self, group: &str, topic: &str, client_id: &str, queues: &[&str], start: Start) -> Result<()> {
        let now = now_ms();
        let max = self.limits.lite_subscriptions_per_client_max;
        for queue in queues {
            // The quota first, so a refused subscription creates no state and moves no position.
            let over_quota = {
                let scheduler = self.scheduler.borrow();
                let index = scheduler.locate(queue).map(|(_, i)| i);
                let client = scheduler.group(group, topic).and_then(|gt| gt.lite.clients.get(client_id));
                let subscribed = client.map_or(0, |c| c.subscribed.len());
                let already = client.zip(index).is_some_and(|(c, i)| c.subscribed.contains(&i));
                !already && subscribed >= max
            };
            if over_quota {
                return Err(BrokerError::LiteSubscriptionQuota { max });
            }
            let index = self.ensure_lite_queue(group, topic, queue, start).await?;
            // No await since the group's state was made: nothing can drop it before this.
            self.scheduler.borrow_mut().group_entry(group, topic).lite.subscribe(client_id, index, now);
            self.refresh(group, topic, index);
        }
        Ok(())
    }

    /// The group's delivery state on a lite queue, created at `start` if it has none. The
    /// index is taken in the same step as the state is made, so no other request can forget
    /// it in between.
    async fn ensure_lite_queue(&self, group: &str, topic: &str, queue: &str, start: Start) -> Result<u32> {
        let known = {
            let scheduler = self.scheduler.borrow();
            scheduler
                .locate(queue)
                .map(|(_, i)| i)
                .filter(|i| scheduler.group(group, topic).is_some_and(|gt| gt.queues.contains_key(i)))
        };
        if let Some(index) = known {
            return Ok(index);
        }
        let committed = match start {
            Start::Last => self.load_offset(group, queue).await?,
            _ => None,
        };
        // Read after the await: the queue may have grown, or been reclaimed (then it is gone).
        let (min, max) = self.shard.queue_info(queue)?.map_or((0, 0), |q| (q.min_offset, q.max_offset));
        let offset = match start {
            // A lite topic the group never consumed starts at its first message, so a reply
            // sent just before the subscription is not lost.
            Start::Last => committed.unwrap_or(min),
            Start::Min => min,
            Start::Max => max,
            Start::Offset(offset) => offset,
            Start::Tail(n) => max.saturating_sub(n),
        };
        let mut scheduler = self.scheduler.borrow_mut();
        let index = scheduler
            .lite_index(topic, queue)
            .ok_or(BrokerError::TooManyGroups { max: self.limits.group_queues_max })?;
        if scheduler.group(group, topic).is_some_and(|gt| gt.queues.contains_key(&index)) {
            // Another request made it while this one read the offset.
            return Ok(index);
        }
        let gq = GroupQueue::new(offset.clamp(min, max.max(min)));
        if !scheduler.insert_group_queue(group, topic, index, gq, self.limits.group_queues_max) {
            scheduler.forget_lite_index(topic, index);
            return Err(BrokerError::TooManyGroups { max: self.limits.group_queues_max });
        }
        drop(scheduler);
        if !matches!(start, Start::Last) {
            // An explicit start is a position the group chose: persisted like a commit.
            self.dirty_offsets.borrow_mut().insert((group.into(), queue.into()));
        }
        Ok(index)
    }

    async fn lite_remove(&self, group: &str, topic: &str, client: &str, queues: &[&str]) -> Result<()> {
        for queue in queues {
            let Some(index) = self.scheduler.borrow().locate(queue).map(|(_, i)| i) else { continue };
            let removed = self
                .scheduler
                .borrow_mut()
                .group_mut(group, topic)
                .is_some_and(|gt| gt.lite.unsubscribe(client, index));
            if removed {
                self.drop_if_unused(group, topic, index).await?;
            }
        }
        Ok(())
    }

    /// Forgets a client of the group on a topic: its subscriptions go, its position stays.
    pub(super) async fn remove_lite_client(&self, group: &str, topic: &str, client: &str) -> Result<()> {
        let indexes = match self.scheduler.borrow_mut().group_mut(group, topic) {
            Some(gt) => gt.lite.remove_client(client),
            None => return Ok(()),
        };
        // Every index is looked at even if one fails (that one is left for the sweep).
        let mut failure = Ok(());
        for index in indexes {
            if let Err(e) = self.drop_if_unused(group, topic, index).await {
                self.lite_unsubscribed.borrow_mut().insert((group.into(), topic.into(), index));
                failure = Err(e);
            }
        }
        failure
    }

    /// Drops the group's state on a lite queue nobody of the group subscribes to and nothing
    /// is out with a consumer, after writing its position (its lowest unacked offset, so an
    /// expired delivery comes again to the next subscriber). Otherwise keeps it for later
    /// (the sweep looks again once the leases are settled or expired).
    async fn drop_if_unused(&self, group: &str, topic: &str, index: u32) -> Result<()> {
        let (unused, queue) = {
            let scheduler = self.scheduler.borrow();
            let Some(gt) = scheduler.group(group, topic) else { return Ok(()) };
            let unused =
                !gt.lite.has_subscribers(index) && gt.queues.get(&index).is_none_or(|gq| !gq.has_live_lease(now_ms()));
            (unused, scheduler.queue_name(topic, index))
        };
        let Some(queue) = queue else { return Ok(()) };
        if !unused {
            self.lite_unsubscribed.borrow_mut().insert((group.into(), topic.into(), index));
            return Ok(());
        }
        let key: (Rc<str>, Rc<str>) = (group.into(), queue.clone());
        if self.dirty_offsets.borrow().contains(&key) {
            if let Some(floor) = self.floor_of(group, &queue) {
                self.store_offset(group, &queue, floor).await?;
            }
        }
        // Looked at again after the write: a pop or subscribe may have come in meanwhile.
        let still_unused = self.scheduler.borrow().group(group, topic).is_some_and(|gt| {
            !gt.lite.has_subscribers(index) && gt.queues.get(&index).is_none_or(|gq| !gq.has_live_lease(now_ms()))
        });
        if still_unused {
            self.dirty_offsets.borrow_mut().remove(&key);
            self.scheduler.borrow_mut().remove_group_queue(group, topic, index);
            self.lite_unsubscribed.borrow_mut().remove(&(group.into(), topic.into(), index));
        }
        Ok(())
    }

    /// Periodic upkeep (bounded work per call): forgets lite clients not seen for
    /// `lite_client_idle_ms` and drops group state on lite queues left with neither
    /// subscribers nor leases.
    pub async fn sweep_lite(&self) -> Result<()> {
        let now = now_ms();
        let batch = self.limits.lite_sweep_batch;
        let idle_before = now.saturating_sub(self.limits.lite_client_idle_ms);
        let mut idle: Vec<(Rc<str>, Rc<str>, Rc<str>)> = Vec::new();
        {
            let scheduler = self.scheduler.borrow();
            for (group, topic) in scheduler.lite_group_keys() {
                if idle.len() >= batch {
                    break;
                }
                if let Some(gt) = scheduler.group(&group, &topic) {
                    for client in gt.lite.idle_clients(idle_before, batch - idle.len()) {
                        idle.push((group.clone(), topic.clone(), client));
                    }
                }
            }
        }
        for (group, topic, client) in idle {
            tracing::info!(
                group = &*group,
                topic = &*topic,
                client = &*client,
                "lite consumer not seen for a while; its subscriptions are dropped"
            );
            Counters::add(&self.counters.lite_clients_expired, 1);
            self.remove_lite_client(&group, &topic, &client).await?;
        }
        let pending: Vec<(Rc<str>, Rc<str>, u32)> =
            self.lite_unsubscribed.borrow().iter().take(batch).cloned().collect();
        for (group, topic, index) in pending {
            self.lite_unsubscribed.borrow_mut().remove(&(group.clone(), topic.clone(), index));
            if let Err(e) = self.drop_if_unused(&group, &topic, index).await {
                // Kept for the next round.
                self.lite_unsubscribed.borrow_mut().insert((group, topic, index));
                return Err(e);
            }
        }
        self.reclaim_lite_topics(now).await
    }

    /// One step of the walk over this shard's queues (`lite_sweep_batch` names): reclaims lite
    /// topics that had no write for their topic's TTL, and those whose parent topic is gone,
    /// once no client subscribes to them or holds a delivery of them. Reclaiming deletes the
    /// queue's index entries, its meta row and every group's offset there; its records go with
    /// the log's retention like any other.
    async fn reclaim_lite_topics(&self, now: u64) -> Result<()> {
        if now < self.started_ms + self.limits.lite_client_idle_ms {
            return Ok(());
        }
        let from = self.lite_reclaim_from.borrow().clone();
        let batch = self.limits.lite_sweep_batch;
        let names = self.shard.queue_names_from(from, batch).await?;
        *self.lite_reclaim_from.borrow_mut() = match names.last() {
            Some(last) if names.len() == batch => {
                let mut next = last.as_bytes().to_vec();
                next.push(0);
                next
            }
            _ => Vec::new(),
        };
        for name in names {
            self.reclaim_lite_topic(&name, now_ms()).await?;
        }
        Ok(())
    }

    fn lite_reclaimable(&self, queue: &str, now: u64) -> bool {
        let Some((topic, index, _)) = split_lite_queue(queue) else { return false };
        if self.scheduler.borrow().lite_in_use(queue, now) {
            return false;
        }
        let parent = sluice_transport::model::placement::topic_queue(topic, index);
        let ttl_minutes = {
            let configs = self.configs.borrow();
            match configs.get(&parent) {
                // Its topic was deleted (or re-created as another type): nobody can use it.
                None => return true,
                Some(c) if c.message_type != message_type::LITE => return true,
                Some(c) => {
                    c.attributes.iter().find(|(k, _)| k == LITE_TTL_ATTRIBUTE).and_then(|(_, v)| v.parse::<u64>().ok())
                }
            }
        };
        let Some(ttl_ms) = ttl_minutes.filter(|m| *m > 0).map(|m| m.saturating_mul(60_000)) else { return false };
        // Unreadable metadata: keep the lite topic rather than reclaim it blind.
        let Ok(Some(info)) = self.shard.queue_info(queue) else { return false };
        now.saturating_sub(info.last_append_ms.max(info.created_ms)) >= ttl_ms
    }

    /// Reclaims the lite queue if it may be. The check and the start of the deletion run with
    /// no await between them: from then on the shard refuses appends to the queue, so nothing
    /// can be acked into it, and a subscription can no longer find it to resume at an offset.
    async fn reclaim_lite_topic(&self, queue: &str, now: u64) -> Result<()> {
        if !self.lite_reclaimable(queue, now) {
            return Ok(());
        }
        self.scheduler.borrow_mut().remove_queue(queue);
        self.dirty_offsets.borrow_mut().retain(|(_, q)| &**q != queue);
        let deleted = match self.shard.delete_queue(queue).await {
            Ok(()) => true,
            Err(EngineError::QueueNotFound(_) | EngineError::QueueBeingDeleted(_)) => false,
            Err(e) => return Err(e.into()),
        };
        self.forget_offsets(queue).await?;
        if deleted {
            Counters::add(&self.counters.lite_topics_reclaimed, 1);
            tracing::debug!(queue, "lite topic reclaimed");
        }
        Ok(())
    }
}
