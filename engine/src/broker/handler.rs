//! One shard's broker service: decodes transport requests on the shard's own executor (so a
//! request never crosses a thread inside the broker) and hands them to the part that owns the
//! answer: appends and queue administration here, consumption in `delivery`, delay timers and
//! transactions in `held`. Nothing here is shared with other shards.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use bytes::Bytes;
use sluice_transport::messages::*;
use sluice_transport::model::record::{txn_state, Attributes, OFFSET_HELD};
use sluice_transport::model::{codes, fairness, message_type};
use sluice_transport::{Frame, Handler, OutFrame};

use crate::broker::error::BrokerError;
use crate::broker::held::{HalfChecks, TimerWake};
use crate::broker::pop::QueueLimits;
use crate::broker::queues::{QueueConfig, QueueConfigs};
use crate::broker::receipt::ReceiptKey;
use crate::broker::scheduler::Scheduler;
use crate::broker::BrokerLimits;
use crate::config::Durability;
use crate::index::StateTable;
use crate::queue::{shard_for_queue, validate_queue_name};
use crate::record::NewRecord;
use crate::shard::Shard;
use sluice_transport::model::placement::{check_lite_topic_name, split_lite_queue, topic_queue};

pub(crate) type Result<T> = std::result::Result<T, BrokerError>;

/// Reads waiting on one queue: woken together, and how many there are.
pub(super) type Readers = (Rc<tokio::sync::Notify>, usize);

/// (group, topic, lite queue index).
pub(super) type LiteQueueKey = (Rc<str>, Rc<str>, u32);

/// Longest consumer group name, in bytes.
pub const GROUP_NAME_MAX_BYTES: usize = 255;
/// Stored offsets removed per step when a queue is deleted.
const OFFSET_SCAN_CHUNK: usize = 1024;
/// Most (group, topic) entries one GroupStats reply carries (and one metrics scrape reports).
const GROUP_STATS_MAX: u32 = 10_000;
/// Queues per (group, topic) whose oldest messages a scrape looks up for the latency gauges.
/// (A group lagging on more queues gets no latency figures rather than wrong ones.)
const LAG_QUEUES_PER_GROUP_MAX: usize = 256;
/// Index lookups one scrape makes per shard; groups past it get no latency gauges.
const LAG_LOOKUPS_MAX: usize = 4_096;

pub struct ShardHandler {
    pub(super) shard: Rc<Shard>,
    pub(super) shard_id: usize,
    shard_count: usize,
    pub(super) key: ReceiptKey,
    pub(super) limits: BrokerLimits,
    pub(super) configs: RefCell<QueueConfigs>,
    pub(super) scheduler: RefCell<Scheduler>,
    /// Lite queues whose last subscriber of a group left while messages were still leased:
    /// the group's state there is dropped once they are settled (`sweep_lite`).
    pub(super) lite_unsubscribed: RefCell<HashSet<LiteQueueKey>>,
    /// Where the lite-topic reclaim walk goes on (a queue name; empty: from the start).
    pub(super) lite_reclaim_from: RefCell<Vec<u8>>,
    /// When this handler started: subscriptions are in memory, so none are reclaimed until
    /// clients had the time to sync theirs again.
    pub(super) started_ms: u64,
    /// (group, queue) whose floor moved since it was last persisted.
    pub(super) dirty_offsets: RefCell<HashSet<(Rc<str>, Rc<str>)>>,
    /// Reads waiting for a queue to grow, by queue (with how many wait).
    pub(super) readers: RefCell<HashMap<Rc<str>, Readers>>,
    /// Long polls that can be cancelled, by poll id.
    pub(super) polls: RefCell<HashMap<u64, Rc<tokio::sync::Notify>>>,
    pub(super) closing: Cell<bool>,
    pub(super) closing_signal: tokio::sync::Notify,
    create_lock: glommio::sync::Semaphore,
    /// Orders changes to held messages (see `held`).
    pub(super) held_lock: glommio::sync::Semaphore,
    next_lease_id: Cell<u64>,
    pub(super) timers: TimerWake,
    pub(super) halves: RefCell<HalfChecks>,
    /// Rate quotas of the group records this shard owns (see `quota`).
    pub(super) quotas: RefCell<crate::broker::quota::Quotas>,
    pub(super) counters: Counters,
    pub(super) metrics: crate::metrics::ShardMetrics,
}

#[derive(Default)]
pub(super) struct Counters {
    pub appended: Cell<u64>,
    pub popped: Cell<u64>,
    pub redelivered: Cell<u64>,
    pub acked: Cell<u64>,
    pub released: Cell<u64>,
    pub filtered: Cell<u64>,
    /// Records that failed verification on the delivery path: consumed, never delivered.
    pub damaged_skipped: Cell<u64>,
    /// Index entries whose record retention deleted before the group read it.
    pub gone_unread: Cell<u64>,
    pub receipts_refused: Cell<u64>,
    pub lite_clients_expired: Cell<u64>,
    pub lite_topics_reclaimed: Cell<u64>,
    pub long_polls: Cell<u64>,
    pub polls_cancelled: Cell<u64>,
    pub timers_dispatched: Cell<u64>,
    pub timers_recalled: Cell<u64>,
    pub held_lost: Cell<u64>,
    pub transactions_committed: Cell<u64>,
    pub transactions_rolled_back: Cell<u64>,
    pub transaction_checks: Cell<u64>,
    pub transactions_discarded: Cell<u64>,
    /// Quota requests granted less than they asked for.
    pub quota_throttled: Cell<u64>,
}

impl Counters {
    pub fn add(counter: &Cell<u64>, n: u64) {
        counter.set(counter.get() + n);
    }
}

/// Leases, long polls, quotas and timers: the broker's step-free clock (`clock.rs`).
pub(super) fn now_ms() -> u64 {
    crate::clock::now_ms()
}

/// A lite topic name as the broker accepts it.
pub(super) fn check_lite_name(name: &str) -> Result<()> {
    check_lite_topic_name(name)
        .map_err(|reason| BrokerError::IllegalLiteTopic { name: name.to_string(), reason: reason.to_string() })
}

pub(super) fn bounded(value: u32, max: u32) -> u32 {
    value.clamp(1, max)
}

impl ShardHandler {
    /// Loads the shard's queue configurations and open transactions and builds its handler.
    pub async fn open(
        shard: Rc<Shard>,
        shard_id: usize,
        shard_count: usize,
        key: ReceiptKey,
        limits: BrokerLimits,
    ) -> Result<ShardHandler> {
        // A pop or read reads all its records in one `read_ranges` call.
        assert!(
            limits.pop_records_max as usize <= crate::commitlog::READ_RANGES_MAX
                && limits.read_records_max as usize <= crate::commitlog::READ_RANGES_MAX,
            "pop_records_max and read_records_max must not exceed READ_RANGES_MAX"
        );
        let configs = QueueConfigs::load(&shard, limits.queue_configs_max).await?;
        let mut scheduler = Scheduler::default();
        for (name, _) in configs.range_from("", "") {
            scheduler.add_queue(name);
        }
        let halves = HalfChecks::load(&shard, &limits).await?;
        Ok(ShardHandler {
            shard,
            shard_id,
            shard_count,
            key,
            limits,
            configs: RefCell::new(configs),
            scheduler: RefCell::new(scheduler),
            dirty_offsets: RefCell::new(HashSet::new()),
            lite_unsubscribed: RefCell::new(HashSet::new()),
            lite_reclaim_from: RefCell::new(Vec::new()),
            started_ms: now_ms(),
            polls: RefCell::new(HashMap::new()),
            readers: RefCell::new(HashMap::new()),
            closing: Cell::new(false),
            closing_signal: tokio::sync::Notify::new(),
            create_lock: glommio::sync::Semaphore::new(1),
            held_lock: glommio::sync::Semaphore::new(1),
            next_lease_id: Cell::new(1),
            timers: TimerWake::default(),
            halves: RefCell::new(halves),
            quotas: RefCell::default(),
            counters: Counters::default(),
            metrics: crate::metrics::ShardMetrics::new(),
        })
    }

    /// Ends long polls early (they answer with what they have) so a drain finishes quickly.
    pub fn begin_close(&self) {
        self.closing.set(true);
        self.closing_signal.notify_waiters();
        self.scheduler.borrow().wake_all();
        self.timers.wake();
    }

    pub(super) fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            leases_max: self.limits.leases_per_group_queue_max,
            waiting_max: self.limits.fifo_waiting_per_group_queue_max,
            backlog_max: self.limits.priority_backlog_per_group_queue_max,
        }
    }

    pub(super) fn lease_id(&self) -> u64 {
        let id = self.next_lease_id.get();
        self.next_lease_id.set(id + 1);
        id
    }

    async fn dispatch(&self, request: &Frame) -> Result<OutFrame> {
        let id = request.request_id();
        let max = self.limits.max_frame_bytes;
        let encoded = match request.kind()? {
            FrameKind::AppendRequest => OutFrame::encode(id, &self.append(request).await?, max),
            FrameKind::ReadRequest => return self.read(request).await,
            FrameKind::PopRequest => return self.pop(request).await,
            FrameKind::PopCancelRequest => OutFrame::encode(id, &self.cancel_pop(request)?, max),
            FrameKind::AckRequest => OutFrame::encode(id, &self.ack(request)?, max),
            FrameKind::ReleaseRequest => OutFrame::encode(id, &self.release(request)?, max),
            FrameKind::ChangeInvisibleRequest => OutFrame::encode(id, &self.change_invisible(request)?, max),
            FrameKind::CommitOffsetRequest => OutFrame::encode(id, &self.commit_offset(request).await?, max),
            FrameKind::QueryOffsetRequest => OutFrame::encode(id, &self.query_offset(request).await?, max),
            FrameKind::CreateQueueRequest => OutFrame::encode(id, &self.create_queue(request).await?, max),
            FrameKind::DeleteQueueRequest => OutFrame::encode(id, &self.delete_queue(request).await?, max),
            FrameKind::ListQueuesRequest => OutFrame::encode(id, &self.list_queues(request)?, max),
            FrameKind::StatsRequest => OutFrame::encode(id, &self.stats(), max),
            FrameKind::EndTransactionRequest => OutFrame::encode(id, &self.end_transaction(request).await?, max),
            FrameKind::RecallRequest => OutFrame::encode(id, &self.recall(request).await?, max),
            FrameKind::TransactionCheckRequest => return self.transaction_checks(request).await,
            FrameKind::LiteSubscriptionRequest => OutFrame::encode(id, &self.lite_subscription(request).await?, max),
            FrameKind::QuotaRequest => OutFrame::encode(id, &self.quota(request)?, max),
            FrameKind::GroupStatsRequest => OutFrame::encode(id, &self.group_stats(request).await?, max),
            FrameKind::FindMessagesRequest => return self.find_messages(request).await,
            FrameKind::SeekRequest => OutFrame::encode(id, &self.seek(request).await?, max),
            other => return Err(BrokerError::InvalidRequest(format!("{other:?} is not a request a broker serves"))),
        };
        encoded.map_err(Self::unencodable)
    }

    pub(super) fn unencodable(e: sluice_transport::FrameError) -> BrokerError {
        BrokerError::InvalidRequest(format!("reply does not fit in a frame: {e}"))
    }

    /// The queue must be valid, on this shard and configured. A lite queue (`topic#i/lite`)
    /// needs no configuration of its own: its parent queue must be a configured LITE queue.
    pub(super) fn check_queue(&self, queue: &str) -> Result<()> {
        validate_queue_name(queue)?;
        let owner = shard_for_queue(queue, self.shard_count);
        if owner != self.shard_id {
            return Err(BrokerError::WrongShard { queue: queue.to_string(), owner, here: self.shard_id });
        }
        if let Some((topic, index, lite)) = split_lite_queue(queue) {
            check_lite_name(lite)?;
            let parent = topic_queue(topic, index);
            return match self.configs.borrow().get(&parent) {
                None => Err(BrokerError::QueueNotFound(parent)),
                Some(c) if c.message_type != message_type::LITE => Err(BrokerError::InvalidRequest(format!(
                    "{topic} is a {} topic; only LITE topics have lite topics",
                    message_type::name(c.message_type)
                ))),
                Some(_) => Ok(()),
            };
        }
        if !self.configs.borrow().contains(queue) {
            return Err(BrokerError::QueueNotFound(queue.to_string()));
        }
        Ok(())
    }

    pub(super) fn check_group(group: &str) -> Result<()> {
        if group.is_empty() || group.len() > GROUP_NAME_MAX_BYTES || group.bytes().any(|b| b.is_ascii_control()) {
            return Err(BrokerError::InvalidRequest(format!(
                "consumer group name must be 1..={GROUP_NAME_MAX_BYTES} bytes without control characters"
            )));
        }
        Ok(())
    }

    /// The message type a queue takes (normal for a queue configured without one).
    pub(super) fn queue_type(&self, queue: &str) -> u8 {
        self.with_queue_terms(queue, |kind, _| kind)
    }

    /// A queue's message type (a lite queue's is its parent's) and its fairness key property,
    /// if it has one, from one config lookup.
    pub(super) fn with_queue_terms<R>(&self, queue: &str, f: impl FnOnce(u8, Option<&str>) -> R) -> R {
        let parent = split_lite_queue(queue).map(|(topic, index, _)| topic_queue(topic, index));
        let configs = self.configs.borrow();
        let config = configs.get(parent.as_deref().unwrap_or(queue));
        let kind = config.map_or(message_type::NORMAL, |c| c.message_type.max(message_type::NORMAL));
        let key = config
            .and_then(|c| c.attributes.iter().find(|(k, _)| k == fairness::KEY_ATTRIBUTE))
            .map(|(_, v)| v.as_str());
        f(kind, key)
    }

    /// The broker-visible attributes of an entry, checked against its queues and the limits.
    fn attributes_of(&self, entry: &ArchivedAppendEntry<'_>, now_ms: u64) -> Result<Attributes> {
        let a = &entry.attributes;
        let given = a.message_type;
        let user_properties: Vec<(String, String)> =
            a.user_properties.iter().map(|p| (p.0.as_str().to_string(), p.1.as_str().to_string())).collect();
        // A fair topic's tenant, from its first queue's key property (found with its type).
        let mut fair_key = None;
        for (i, queue) in entry.queues.iter().enumerate() {
            let (expected, tenant) = self.with_queue_terms(queue.as_str(), |kind, key| {
                (kind, key.filter(|_| i == 0).map(|property| Self::tenant_of(property, &user_properties)))
            });
            if tenant.is_some() {
                fair_key = tenant;
            }
            let lite = split_lite_queue(queue.as_str()).map(|(_, _, lite)| lite);
            if given == message_type::LITE && lite != Some(a.lite_topic.as_str()) {
                return Err(BrokerError::InvalidRequest(format!(
                    "a LITE message goes to the queue of its own lite topic ({:?}), not {:?}",
                    a.lite_topic.as_str(),
                    queue.as_str()
                )));
            }
            if given != 0 && given != expected {
                return Err(BrokerError::MessageTypeMismatch {
                    queue: queue.as_str().to_string(),
                    expected: message_type::name(expected),
                    given: message_type::name(given),
                });
            }
        }
        let delivery_ms = a.delivery_ms.to_native();
        if given == message_type::DELAY && delivery_ms > now_ms + self.limits.delay_max_ms {
            return Err(BrokerError::DeliveryTooFar {
                delivery_ms,
                ahead_ms: delivery_ms - now_ms,
                max_ms: self.limits.delay_max_ms,
            });
        }
        // The tenant is checked last, as it was when it had a lookup of its own.
        let fair_key = fair_key.transpose()?.unwrap_or_default();
        Ok(Attributes {
            message_type: given,
            txn_state: if given == message_type::TRANSACTION { txn_state::HALF } else { txn_state::NONE },
            priority: a.priority.to_native(),
            delivery_ms,
            message_group: a.message_group.as_str().to_string(),
            lite_topic: a.lite_topic.as_str().to_string(),
            user_properties,
            fair_key,
        })
    }

    /// A message's tenant: the value of the key property, or none (a tenant of its own).
    fn tenant_of(property: &str, user_properties: &[(String, String)]) -> Result<String> {
        let tenant = user_properties.iter().find(|(k, _)| k == property).map_or("", |(_, v)| v.as_str());
        if tenant.len() > fairness::NAME_MAX_BYTES {
            return Err(BrokerError::InvalidRequest(format!(
                "the fairness key property {property:?} is {} bytes; at most {}",
                tenant.len(),
                fairness::NAME_MAX_BYTES
            )));
        }
        Ok(tenant.to_string())
    }

    async fn append(&self, request: &Frame) -> Result<AppendResponse> {
        let append = request.access::<AppendRequest>()?;
        if append.entries.len() > self.limits.append_entries_max {
            return Err(BrokerError::InvalidRequest(format!(
                "{} entries in one append; at most {}",
                append.entries.len(),
                self.limits.append_entries_max
            )));
        }
        let now = now_ms();
        let mut records = Vec::with_capacity(append.entries.len());
        for entry in append.entries.iter() {
            for queue in entry.queues.iter() {
                self.check_queue(queue.as_str())?;
            }
            records.push(NewRecord {
                queues: entry.queues.iter().map(|q| q.as_str().to_string()).collect(),
                message_id: entry.message_id.as_str().to_string(),
                tag: entry.tag.as_str().to_string(),
                keys: entry.keys.iter().map(|k| k.as_str().to_string()).collect(),
                attributes: self.attributes_of(entry, now)?,
                properties: Bytes::copy_from_slice(&entry.properties),
                // Zero copy: the body stays in the received frame until the log write.
                body: request.share(&entry.body),
            });
        }
        let halves = records.iter().filter(|r| r.attributes.txn_state == txn_state::HALF).count();
        if halves > 0 && self.halves.borrow().len() + halves > self.limits.half_messages_max {
            return Err(BrokerError::TooManyHeld { max: self.limits.half_messages_max });
        }
        let acks = self.shard.append(&records).await?;
        Counters::add(&self.counters.appended, records.len() as u64);
        for record in &records {
            let queue = &record.queues[0];
            self.metrics.message_in(queue, self.queue_type(queue), record.body.len() as u64);
        }
        self.after_append(&records, &acks);
        Ok(AppendResponse {
            acks: acks
                .into_iter()
                .map(|a| sluice_transport::messages::AppendAck { position: a.position, offsets: a.offsets })
                .collect(),
        })
    }

    /// Wakes the groups of queues that got messages, the timer loop for new delay messages,
    /// and schedules the first check of new half messages.
    fn after_append(&self, records: &[NewRecord], acks: &[crate::shard::AppendAck]) {
        let mut woken = HashSet::new();
        let now = now_ms();
        for (record, ack) in records.iter().zip(acks) {
            let held = ack.offsets.first() == Some(&OFFSET_HELD);
            if held && record.attributes.txn_state == txn_state::HALF {
                self.halves.borrow_mut().add(ack.position, &record.queues[0], now, &self.limits);
            } else if held {
                self.timers.wake();
            } else {
                woken.extend(record.queues.iter().map(String::as_str));
            }
        }
        for queue in woken {
            self.queue_grew(queue);
        }
    }

    /// A queue got new readable messages: its groups may have work.
    pub(super) fn queue_grew(&self, queue: &str) {
        let end = match self.shard.queue_info(queue) {
            Ok(info) => info.map_or(0, |q| q.max_offset),
            Err(err) => {
                tracing::warn!(queue, error = %err, "queue metadata unreadable; consumers not woken");
                0
            }
        };
        let woken = self.scheduler.borrow_mut().on_append(queue, end, now_ms(), self.queue_limits());
        self.metrics.wakeups.increment(woken);
        if let Some((readers, _)) = self.readers.borrow().get(queue) {
            readers.notify_waiters();
        }
    }

    async fn read(&self, request: &Frame) -> Result<OutFrame> {
        let read = request.access::<ReadRequest>()?;
        let queue = read.queue.as_str();
        self.check_queue(queue)?;
        let max_count = bounded(read.max_count.to_native(), self.limits.read_records_max) as usize;
        let max_bytes = bounded(read.max_bytes.to_native(), self.limits.read_bytes_max) as usize;
        let from = read.from_offset.to_native();
        let wait_ms = read.wait_ms.to_native().min(self.limits.long_poll_max_ms);
        let wait_until_ms = now_ms() + wait_ms;
        let batch = if wait_ms == 0 {
            self.read_queue(queue, from, max_count, max_bytes).await?
        } else {
            self.read_waiting(queue, from, max_count, max_bytes, wait_until_ms).await?
        };
        let reply = ReadResponse {
            records: batch
                .records
                .iter()
                .map(|r| ReadRecord { offset: r.offset, position: r.position, record: r.bytes() })
                .collect(),
            next_offset: batch.next_offset,
            min_offset: batch.min_offset,
            max_offset: batch.max_offset,
        };
        OutFrame::encode(request.request_id(), &reply, self.limits.max_frame_bytes).map_err(Self::unencodable)
    }

    /// Reads, and if nothing is there yet, waits for the queue to grow (or the deadline).
    async fn read_waiting(
        &self,
        queue: &str,
        from: u64,
        max_count: usize,
        max_bytes: usize,
        wait_until_ms: u64,
    ) -> Result<crate::shard::ReadBatch> {
        let watch = ReadWatch::new(self, queue);
        loop {
            let grew = watch.notify.notified();
            let mut grew = std::pin::pin!(grew);
            grew.as_mut().enable();
            let batch = self.read_queue(queue, from, max_count, max_bytes).await?;
            let now = now_ms();
            if !batch.records.is_empty() || now >= wait_until_ms || self.closing.get() {
                return Ok(batch);
            }
            let sleep = std::pin::pin!(glommio::timer::sleep(std::time::Duration::from_millis(wait_until_ms - now)));
            let closing = std::pin::pin!(self.closing_signal.notified());
            futures::future::select(futures::future::select(grew, closing), sleep).await;
        }
    }

    /// Reads a configured queue; one that has no records yet reads as empty.
    async fn read_queue(
        &self,
        queue: &str,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<crate::shard::ReadBatch> {
        match self.shard.read(queue, from, max_count, max_bytes).await {
            Err(crate::error::EngineError::QueueNotFound(_)) => {
                Ok(crate::shard::ReadBatch { records: Vec::new(), next_offset: 0, min_offset: 0, max_offset: 0 })
            }
            other => Ok(other?),
        }
    }

    /// Offsets are kept per queue (`queue \0 group` in the pop-state table), so deleting a
    /// queue forgets every group's position on it and a re-created queue starts afresh.
    fn offset_key(queue: &str, group: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(queue.len() + 1 + group.len());
        key.extend_from_slice(queue.as_bytes());
        key.push(0);
        key.extend_from_slice(group.as_bytes());
        key
    }

    pub(super) async fn store_offset(&self, group: &str, queue: &str, offset: u64) -> Result<()> {
        let key = Self::offset_key(queue, group);
        Ok(self.shard.put_state(StateTable::PopState, key, offset.to_le_bytes().to_vec()).await?)
    }

    pub(super) async fn load_offset(&self, group: &str, queue: &str) -> Result<Option<u64>> {
        let value = self.shard.state(StateTable::PopState, Self::offset_key(queue, group)).await?;
        Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(u64::from_le_bytes))
    }

    /// Removes every group's stored offset on `queue`.
    pub(super) async fn forget_offsets(&self, queue: &str) -> Result<()> {
        let mut prefix = queue.as_bytes().to_vec();
        prefix.push(0);
        loop {
            let entries = self.shard.state_scan(StateTable::PopState, prefix.clone(), OFFSET_SCAN_CHUNK).await?;
            let mine: Vec<Vec<u8>> =
                entries.into_iter().map(|(k, _)| k).take_while(|k| k.starts_with(&prefix)).collect();
            if mine.is_empty() {
                return Ok(());
            }
            for key in mine {
                self.shard.delete_state(StateTable::PopState, key).await?;
            }
        }
    }

    async fn create_queue(&self, request: &Frame) -> Result<CreateQueueResponse> {
        let create = request.access::<CreateQueueRequest>()?;
        let queue = create.queue.as_str();
        validate_queue_name(queue)?;
        let owner = shard_for_queue(queue, self.shard_count);
        if owner != self.shard_id {
            return Err(BrokerError::WrongShard { queue: queue.to_string(), owner, here: self.shard_id });
        }
        let config = QueueConfig {
            message_type: create.message_type,
            attributes: create
                .attributes
                .iter()
                .map(|t| (t.0.as_str().to_string(), t.1.as_str().to_string()))
                .collect(),
        };
        config.validate().map_err(BrokerError::InvalidRequest)?;
        // One create at a time per shard, so two creates of one queue cannot both pass the
        // existence check below.
        let _one_at_a_time = self.create_lock.acquire_permit(1).await.map_err(|_| BrokerError::ShuttingDown)?;
        if let Some(existing) = self.configs.borrow().get(queue) {
            if existing.message_type != config.message_type {
                return Err(BrokerError::QueueTypeConflict {
                    queue: queue.to_string(),
                    existing: existing.message_type,
                    requested: config.message_type,
                });
            }
            if !create.update || existing.attributes == config.attributes {
                return Ok(CreateQueueResponse { created: false });
            }
        } else if create.update {
            // A run-time change of something deleted meanwhile must not bring it back.
            return Err(BrokerError::QueueNotFound(queue.to_string()));
        }
        let exists = self.configs.borrow().contains(queue);
        if !exists && self.configs.borrow().len() >= self.limits.queue_configs_max {
            return Err(BrokerError::InvalidRequest(format!(
                "this shard already holds {} queues (broker.queue_configs_max)",
                self.limits.queue_configs_max
            )));
        }
        self.shard.put_state(StateTable::QueueConfig, queue.as_bytes().to_vec(), config.encode()).await?;
        let created = self.configs.borrow_mut().insert(queue.to_string(), config);
        if created {
            self.scheduler.borrow_mut().add_queue(queue);
        }
        Ok(CreateQueueResponse { created })
    }

    async fn delete_queue(&self, request: &Frame) -> Result<DeleteQueueResponse> {
        let delete = request.access::<DeleteQueueRequest>()?;
        let queue = delete.queue.as_str();
        self.check_queue(queue)?;
        self.shard.delete_state(StateTable::QueueConfig, queue.as_bytes().to_vec()).await?;
        self.configs.borrow_mut().remove(queue);
        self.quotas.borrow_mut().forget_record(queue);
        self.scheduler.borrow_mut().remove_queue(queue);
        self.dirty_offsets.borrow_mut().retain(|(_, q)| &**q != queue);
        self.forget_offsets(queue).await?;
        match self.shard.delete_queue(queue).await {
            Ok(()) | Err(crate::error::EngineError::QueueNotFound(_)) => Ok(DeleteQueueResponse { deleted: true }),
            Err(e) => Err(e.into()),
        }
    }

    fn list_queues(&self, request: &Frame) -> Result<ListQueuesResponse> {
        let list = request.access::<ListQueuesRequest>()?;
        let max = bounded(list.max_count.to_native(), self.limits.list_queues_max) as usize;
        let (prefix, after) = (list.prefix.as_str(), list.after.as_str());
        let configs = self.configs.borrow();
        let mut matching = configs.range_from(prefix, after).take_while(|(name, _)| name.starts_with(prefix));
        let mut queues = Vec::new();
        for (name, config) in matching.by_ref().take(max) {
            let info = self.shard.queue_info(name)?;
            queues.push(QueueSummary {
                name: name.clone(),
                message_type: config.message_type,
                attributes: config.attributes.clone(),
                min_offset: info.map_or(0, |i| i.min_offset),
                max_offset: info.map_or(0, |i| i.max_offset),
            });
        }
        Ok(ListQueuesResponse { queues, truncated: matching.next().is_some() })
    }

    /// Per (group, topic): ready, in flight and delivered on this shard; and how often each
    /// quota this shard keeps throttled.
    async fn group_stats(&self, request: &Frame) -> Result<GroupStatsResponse> {
        let ask = request.access::<GroupStatsRequest>()?;
        let max = bounded(ask.max_count.to_native(), GROUP_STATS_MAX) as usize;
        let end_of = |queue: &str| self.shard.queue_info(queue).ok().flatten().map_or(0, |q| q.max_offset);
        let (rows, truncated) = self.scheduler.borrow().group_stats(end_of, now_ms(), max);
        let oldest: HashMap<(String, String), u64> = self
            .lag_figures(max)
            .await
            .into_iter()
            .filter_map(|g| Some(((g.group, g.topic), g.oldest_unacked_ms?)))
            .collect();
        let groups = rows
            .into_iter()
            .map(|r| {
                let key = (r.group.to_string(), r.topic.to_string());
                GroupStat {
                    oldest_unacked_ms: oldest.get(&key).copied().unwrap_or(0),
                    group: key.0,
                    topic: key.1,
                    ready: r.ready,
                    inflight: r.inflight,
                    delivered: r.delivered,
                    rate_milli_per_s: (r.rate_per_s * 1000.0) as u64,
                }
            })
            .collect();
        let throttled = self.quotas.borrow().throttled().map(|(r, n)| (r.to_string(), n)).collect();
        Ok(GroupStatsResponse { shard: self.shard_id as u32, groups, throttled, truncated })
    }

    /// This shard's consumer and storage figures for a metrics scrape.
    pub async fn gauges(&self) -> crate::metrics::ShardGauges {
        let groups = self.lag_figures(GROUP_STATS_MAX as usize).await;
        let s = self.shard.stats();
        crate::metrics::ShardGauges {
            shard: self.shard_id,
            groups,
            log_bytes: s.log_end.saturating_sub(s.log_start),
            flush_behind_bytes: s.log_end.saturating_sub(s.durable_end),
            queues: s.queues as u64,
            group_queues: self.scheduler.borrow().group_queue_count() as u64,
            disk_free_bytes: s.disk_free_bytes,
            appends_refused_disk_full: s.appends_refused_disk_full,
            appends_refused_busy: s.appends_refused_busy,
        }
    }

    /// Per (group, topic), up to `max`: ready, in flight, and the store times of the oldest
    /// unacked and oldest waiting messages (index lookups, bounded by `LAG_LOOKUPS_MAX`).
    async fn lag_figures(&self, max: usize) -> Vec<crate::metrics::GroupGauges> {
        use crate::metrics::{min_some, GroupGauges};
        let end_of = |queue: &str| self.shard.queue_info(queue).ok().flatten().map_or(0, |q| q.max_offset);
        let rows = self.scheduler.borrow().lag_rows(end_of, now_ms(), max, LAG_QUEUES_PER_GROUP_MAX);
        let mut lookups_left = LAG_LOOKUPS_MAX;
        let mut groups = Vec::with_capacity(rows.len());
        for row in rows {
            let mut g = GroupGauges {
                group: row.group.to_string(),
                topic: row.topic.to_string(),
                ready: row.ready,
                inflight: row.inflight,
                latencies_known: !row.queues_left_out && lookups_left >= 2 * row.queues.len(),
                ..GroupGauges::default()
            };
            if g.latencies_known {
                lookups_left -= 2 * row.queues.len();
                for q in &row.queues {
                    g.oldest_unacked_ms =
                        min_some(g.oldest_unacked_ms, self.store_ms(&q.queue, q.oldest_unacked).await);
                    if let Some(offset) = q.oldest_ready {
                        g.oldest_ready_ms = min_some(g.oldest_ready_ms, self.store_ms(&q.queue, offset).await);
                    }
                }
            }
            groups.push(g);
        }
        groups
    }

    /// When the message at `offset` of `queue` entered it (none if retention removed it): its
    /// store time, or a dispatched delay message's due time.
    async fn store_ms(&self, queue: &str, offset: u64) -> Option<u64> {
        let entries = self.shard.entries(queue, offset, offset + 1).await.ok()?;
        entries.first().map(crate::broker::lookup::entered_ms)
    }

    fn stats(&self) -> StatsResponse {
        let s = self.shard.stats();
        let c = &self.counters;
        let scheduler = self.scheduler.borrow();
        let mut counters = vec![
            ("queues".to_string(), self.configs.borrow().len() as u64),
            ("log_end".to_string(), s.log_end),
            ("durable_end".to_string(), s.durable_end),
            ("records_appended".to_string(), s.records_appended),
            ("tail_cache_hits".to_string(), s.tail_cache_hits),
            ("tail_cache_misses".to_string(), s.tail_cache_misses),
            ("tail_cache_bytes".to_string(), s.tail_cache_bytes),
            ("log_zeroed_bytes".to_string(), s.log_zeroed_bytes),
            ("index_memtable_bytes".to_string(), s.index_memtable_bytes),
            ("index_block_cache_bytes".to_string(), s.index_block_cache_bytes),
            ("engine_queues".to_string(), s.queues as u64),
            ("engine_queues_resident".to_string(), s.queues_resident as u64),
            ("engine_queues_evicted".to_string(), s.queues_evicted),
            ("disk_free_bytes".to_string(), s.disk_free_bytes),
            ("appends_refused_disk_full".to_string(), s.appends_refused_disk_full),
            ("appends_refused_busy".to_string(), s.appends_refused_busy),
            ("messages_appended".to_string(), c.appended.get()),
            ("messages_popped".to_string(), c.popped.get()),
            ("messages_redelivered".to_string(), c.redelivered.get()),
            ("messages_acked".to_string(), c.acked.get()),
            ("messages_released".to_string(), c.released.get()),
            ("messages_filtered".to_string(), c.filtered.get()),
            ("damaged_records_skipped".to_string(), c.damaged_skipped.get()),
            ("records_gone_unread".to_string(), c.gone_unread.get()),
            ("receipts_refused".to_string(), c.receipts_refused.get()),
            ("long_poll_waits".to_string(), c.long_polls.get()),
            ("polls_cancelled".to_string(), c.polls_cancelled.get()),
            ("quota_throttled".to_string(), c.quota_throttled.get()),
            ("group_queues".to_string(), scheduler.group_queue_count() as u64),
            ("lite_clients".to_string(), scheduler.lite_client_count() as u64),
            ("lite_clients_expired".to_string(), c.lite_clients_expired.get()),
            ("lite_topics_reclaimed".to_string(), c.lite_topics_reclaimed.get()),
            ("leases".to_string(), scheduler.leases() as u64),
            ("timers_dispatched".to_string(), c.timers_dispatched.get()),
            ("timers_recalled".to_string(), c.timers_recalled.get()),
            ("held_lost_to_retention".to_string(), c.held_lost.get()),
            ("half_messages".to_string(), self.halves.borrow().len() as u64),
            ("transactions_committed".to_string(), c.transactions_committed.get()),
            ("transactions_rolled_back".to_string(), c.transactions_rolled_back.get()),
            ("transaction_checks".to_string(), c.transaction_checks.get()),
            ("transactions_discarded".to_string(), c.transactions_discarded.get()),
        ];
        // How appends are acknowledged, so a benchmark can print (and check) what it measured.
        let (sync, flush_interval_ms) = match self.shard.durability() {
            Durability::Sync => (1, 0),
            Durability::Async { flush_interval_ms } => (0, flush_interval_ms),
        };
        counters.push(("durability_sync".to_string(), sync));
        counters.push(("flush_interval_ms".to_string(), flush_interval_ms));
        StatsResponse { shard: self.shard_id as u32, counters }
    }

    /// Writes every consumer offset that moved since it was last written. One that fails (or
    /// is cancelled) stays marked, so the next round writes it.
    pub async fn persist_offsets(&self) -> Result<usize> {
        let dirty: Vec<(Rc<str>, Rc<str>)> = self.dirty_offsets.borrow().iter().cloned().collect();
        let mut written = 0;
        for key in dirty {
            let floor = self.floor_of(&key.0, &key.1);
            if let Some(floor) = floor {
                self.store_offset(&key.0, &key.1, floor).await?;
                written += 1;
            }
            // Only if nothing moved it again while it was written.
            if self.floor_of(&key.0, &key.1) == floor {
                self.dirty_offsets.borrow_mut().remove(&key);
            }
        }
        Ok(written)
    }
}

impl Handler for ShardHandler {
    async fn handle(&self, request: Frame) -> std::result::Result<OutFrame, ErrorReply> {
        if self.closing.get() && matches!(request.kind(), Ok(FrameKind::AppendRequest)) {
            return Err(BrokerError::ShuttingDown.into());
        }
        self.dispatch(&request).await.map_err(ErrorReply::from)
    }
}

/// A read's place among those waiting for its queue to grow; removed when the read ends.
struct ReadWatch<'a> {
    handler: &'a ShardHandler,
    queue: Rc<str>,
    notify: Rc<tokio::sync::Notify>,
}

impl<'a> ReadWatch<'a> {
    fn new(handler: &'a ShardHandler, queue: &str) -> ReadWatch<'a> {
        let queue: Rc<str> = queue.into();
        let mut readers = handler.readers.borrow_mut();
        let entry = readers.entry(queue.clone()).or_insert_with(|| (Rc::new(tokio::sync::Notify::new()), 0));
        entry.1 += 1;
        ReadWatch { handler, queue, notify: entry.0.clone() }
    }
}

impl Drop for ReadWatch<'_> {
    fn drop(&mut self) {
        let mut readers = self.handler.readers.borrow_mut();
        if let Some(entry) = readers.get_mut(&self.queue) {
            entry.1 -= 1;
            if entry.1 == 0 {
                readers.remove(&self.queue);
            }
        }
    }
}

/// A status per receipt: `codes::OK` or the error's code.
pub(super) fn status_of(result: Result<()>) -> u32 {
    result.map_or_else(|e| e.code(), |()| codes::OK)
}
