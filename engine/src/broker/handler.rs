//! One shard's broker service: answers transport requests on the shard's own executor, so a
//! request never crosses a thread inside the broker. Holds the shard's pop state (leases),
//! its queue configurations, and long-poll wake-ups; none of it is shared with other shards.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use sluice_transport::messages::*;
use sluice_transport::{Frame, Handler, OutFrame};

use crate::broker::error::{code, BrokerError};
use crate::broker::pop::{GroupQueue, Lease, LeaseError};
use crate::broker::queues::{QueueConfig, QueueConfigs};
use crate::broker::receipt::ReceiptKey;
use crate::broker::BrokerLimits;
use crate::config::Durability;
use crate::index::StateTable;
use crate::queue::{shard_for_queue, validate_queue_name};
use crate::record::NewRecord;
use crate::shard::Shard;

type Result<T> = std::result::Result<T, BrokerError>;

/// Longest consumer group name, in bytes.
pub const GROUP_NAME_MAX_BYTES: usize = 255;
/// Stored offsets removed per step when a queue is deleted.
const OFFSET_SCAN_CHUNK: usize = 1024;

pub struct ShardHandler {
    shard: Rc<Shard>,
    shard_id: usize,
    shard_count: usize,
    key: ReceiptKey,
    limits: BrokerLimits,
    configs: RefCell<QueueConfigs>,
    groups: RefCell<HashMap<(String, String), GroupQueue>>,
    /// (group, queue) whose floor moved since it was last persisted.
    dirty_offsets: RefCell<HashSet<(String, String)>>,
    /// Wakes long polls on a queue when it is appended to.
    signals: RefCell<HashMap<String, Rc<tokio::sync::Notify>>>,
    closing: Cell<bool>,
    closing_signal: tokio::sync::Notify,
    create_lock: glommio::sync::Semaphore,
    next_lease_id: Cell<u64>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    appended: Cell<u64>,
    popped: Cell<u64>,
    redelivered: Cell<u64>,
    acked: Cell<u64>,
    receipts_refused: Cell<u64>,
    long_polls: Cell<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn bounded(value: u32, max: u32) -> u32 {
    value.clamp(1, max)
}

impl ShardHandler {
    /// Loads the shard's queue configurations and builds its handler.
    pub async fn open(
        shard: Rc<Shard>,
        shard_id: usize,
        shard_count: usize,
        key: ReceiptKey,
        limits: BrokerLimits,
    ) -> Result<ShardHandler> {
        let configs = QueueConfigs::load(&shard, limits.queue_configs_max).await?;
        Ok(ShardHandler {
            shard,
            shard_id,
            shard_count,
            key,
            limits,
            configs: RefCell::new(configs),
            groups: RefCell::new(HashMap::new()),
            dirty_offsets: RefCell::new(HashSet::new()),
            signals: RefCell::new(HashMap::new()),
            closing: Cell::new(false),
            closing_signal: tokio::sync::Notify::new(),
            create_lock: glommio::sync::Semaphore::new(1),
            next_lease_id: Cell::new(1),
            counters: Counters::default(),
        })
    }

    /// Ends long polls early (they answer with what they have) so a drain finishes quickly.
    pub fn begin_close(&self) {
        self.closing.set(true);
        self.closing_signal.notify_waiters();
    }

    /// Writes every consumer offset that moved since it was last written. One that fails (or
    /// is cancelled) stays marked, so the next round writes it.
    pub async fn persist_offsets(&self) -> Result<usize> {
        let dirty: Vec<(String, String)> = self.dirty_offsets.borrow().iter().cloned().collect();
        let mut written = 0;
        for key in dirty {
            let floor = self.groups.borrow().get(&key).map(GroupQueue::floor);
            if let Some(floor) = floor {
                self.store_offset(&key.0, &key.1, floor).await?;
                written += 1;
            }
            // Only if nothing moved it again while it was written.
            if self.groups.borrow().get(&key).map(GroupQueue::floor) == floor {
                self.dirty_offsets.borrow_mut().remove(&key);
            }
        }
        Ok(written)
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

    async fn store_offset(&self, group: &str, queue: &str, offset: u64) -> Result<()> {
        let key = Self::offset_key(queue, group);
        Ok(self.shard.put_state(StateTable::PopState, key, offset.to_le_bytes().to_vec()).await?)
    }

    async fn load_offset(&self, group: &str, queue: &str) -> Result<Option<u64>> {
        let value = self.shard.state(StateTable::PopState, Self::offset_key(queue, group)).await?;
        Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(u64::from_le_bytes))
    }

    /// Removes every group's stored offset on `queue`.
    async fn forget_offsets(&self, queue: &str) -> Result<()> {
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

    async fn dispatch(&self, request: &Frame) -> Result<OutFrame> {
        let id = request.request_id();
        let max = self.limits.max_frame_bytes;
        let encoded = match request.kind()? {
            FrameKind::AppendRequest => OutFrame::encode(id, &self.append(request).await?, max),
            FrameKind::ReadRequest => return self.read(request).await,
            FrameKind::PopRequest => return self.pop(request).await,
            FrameKind::AckRequest => OutFrame::encode(id, &self.ack(request).await?, max),
            FrameKind::ChangeInvisibleRequest => OutFrame::encode(id, &self.change_invisible(request)?, max),
            FrameKind::CommitOffsetRequest => OutFrame::encode(id, &self.commit_offset(request).await?, max),
            FrameKind::QueryOffsetRequest => OutFrame::encode(id, &self.query_offset(request).await?, max),
            FrameKind::CreateQueueRequest => OutFrame::encode(id, &self.create_queue(request).await?, max),
            FrameKind::DeleteQueueRequest => OutFrame::encode(id, &self.delete_queue(request).await?, max),
            FrameKind::ListQueuesRequest => OutFrame::encode(id, &self.list_queues(request)?, max),
            FrameKind::StatsRequest => OutFrame::encode(id, &self.stats(), max),
            FrameKind::LiteSubscriptionRequest => return Err(BrokerError::NotSupported("lite subscriptions")),
            other => return Err(BrokerError::InvalidRequest(format!("{other:?} is not a request a broker serves"))),
        };
        encoded.map_err(Self::unencodable)
    }

    fn unencodable(e: sluice_transport::FrameError) -> BrokerError {
        BrokerError::InvalidRequest(format!("reply does not fit in a frame: {e}"))
    }

    /// The queue must be valid, on this shard and configured.
    fn check_queue(&self, queue: &str) -> Result<()> {
        validate_queue_name(queue)?;
        let owner = shard_for_queue(queue, self.shard_count);
        if owner != self.shard_id {
            return Err(BrokerError::WrongShard { queue: queue.to_string(), owner, here: self.shard_id });
        }
        if !self.configs.borrow().contains(queue) {
            return Err(BrokerError::QueueNotFound(queue.to_string()));
        }
        Ok(())
    }

    fn check_group(group: &str) -> Result<()> {
        if group.is_empty() || group.len() > GROUP_NAME_MAX_BYTES || group.bytes().any(|b| b.is_ascii_control()) {
            return Err(BrokerError::InvalidRequest(format!(
                "consumer group name must be 1..={GROUP_NAME_MAX_BYTES} bytes without control characters"
            )));
        }
        Ok(())
    }

    fn signal(&self, queue: &str) -> Rc<tokio::sync::Notify> {
        self.signals.borrow_mut().entry(queue.to_string()).or_default().clone()
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
                properties: Bytes::copy_from_slice(&entry.properties),
                // Zero copy: the body stays in the received frame until the log write.
                body: request.share(&entry.body),
            });
        }
        let acks = self.shard.append(&records).await?;
        self.counters.appended.set(self.counters.appended.get() + records.len() as u64);
        let mut woken = HashSet::new();
        for record in &records {
            for queue in &record.queues {
                if woken.insert(queue.as_str()) {
                    if let Some(signal) = self.signals.borrow().get(queue) {
                        signal.notify_waiters();
                    }
                }
            }
        }
        Ok(AppendResponse {
            acks: acks
                .into_iter()
                .map(|a| sluice_transport::messages::AppendAck { position: a.position, offsets: a.offsets })
                .collect(),
        })
    }

    async fn read(&self, request: &Frame) -> Result<OutFrame> {
        let read = request.access::<ReadRequest>()?;
        let queue = read.queue.as_str();
        self.check_queue(queue)?;
        let max_count = bounded(read.max_count.to_native(), self.limits.read_records_max) as usize;
        let max_bytes = bounded(read.max_bytes.to_native(), self.limits.read_bytes_max) as usize;
        let batch = self.read_queue(queue, read.from_offset.to_native(), max_count, max_bytes).await?;
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

    /// The group's state for a queue, loaded from its committed offset on first use.
    async fn ensure_group(&self, group: &str, queue: &str) -> Result<()> {
        let key = (group.to_string(), queue.to_string());
        if self.groups.borrow().contains_key(&key) {
            return Ok(());
        }
        if self.groups.borrow().len() >= self.limits.group_queues_max {
            return Err(BrokerError::TooManyGroups { max: self.limits.group_queues_max });
        }
        let committed = self.load_offset(group, queue).await?;
        // The queue may have been deleted while the offset was read.
        self.check_queue(queue)?;
        // A new group starts at the oldest retained message: nothing sent before it is skipped.
        let info = self.shard.queue_info(queue);
        let (min, max) = info.map_or((0, 0), |q| (q.min_offset, q.max_offset));
        let start = committed.unwrap_or(min).clamp(min, max.max(min));
        self.groups.borrow_mut().entry(key).or_insert_with(|| GroupQueue::new(start));
        Ok(())
    }

    fn lease_id(&self) -> u64 {
        let id = self.next_lease_id.get();
        self.next_lease_id.set(id + 1);
        id
    }

    async fn pop(&self, request: &Frame) -> Result<OutFrame> {
        let pop = request.access::<PopRequest>()?;
        let (queue, group) = (pop.queue.as_str(), pop.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let max_count = bounded(pop.max_count.to_native(), self.limits.pop_records_max) as usize;
        let max_bytes = bounded(pop.max_bytes.to_native(), self.limits.read_bytes_max) as usize;
        let invisible_ms =
            pop.invisible_ms.to_native().clamp(self.limits.invisible_min_ms, self.limits.invisible_max_ms);
        let wait_until_ms = now_ms() + pop.long_poll_ms.to_native().min(self.limits.long_poll_max_ms);
        self.ensure_group(group, queue).await?;
        let signal = self.signal(queue);
        loop {
            let notified = signal.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let delivered = self.pop_once(queue, group, max_count, max_bytes, invisible_ms).await?;
            let now = now_ms();
            if !delivered.is_empty() || now >= wait_until_ms || self.closing.get() {
                return self.pop_reply(request.request_id(), queue, group, delivered);
            }
            self.counters.long_polls.set(self.counters.long_polls.get() + 1);
            let lease_due = self
                .groups
                .borrow()
                .get(&(group.to_string(), queue.to_string()))
                .and_then(GroupQueue::earliest_deadline_ms);
            let wake_ms = lease_due.map_or(wait_until_ms, |due| due.min(wait_until_ms)).max(now + 1);
            let sleep = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(wake_ms - now)));
            let closing = std::pin::pin!(self.closing_signal.notified());
            let woken = std::pin::pin!(futures::future::select(notified, closing));
            futures::future::select(woken, sleep).await;
        }
    }

    fn pop_reply(
        &self,
        id: u64,
        queue: &str,
        group: &str,
        delivered: Vec<(Lease, crate::shard::StoredRecord)>,
    ) -> Result<OutFrame> {
        let receipts: Vec<String> = delivered.iter().map(|(lease, _)| self.key.issue(queue, group, lease)).collect();
        let reply = PopResponse {
            messages: delivered
                .iter()
                .zip(&receipts)
                .map(|((lease, record), receipt)| PoppedMessage {
                    offset: lease.offset,
                    delivery_attempt: lease.attempt,
                    receipt: receipt.clone(),
                    record: record.bytes(),
                })
                .collect(),
        };
        OutFrame::encode(id, &reply, self.limits.max_frame_bytes).map_err(Self::unencodable)
    }

    /// Delivers expired leases again, then messages never delivered, without waiting.
    /// Other pops of the same group may run while this one reads, so every lease is
    /// re-checked after each read.
    async fn pop_once(
        &self,
        queue: &str,
        group: &str,
        max_count: usize,
        max_bytes: usize,
        invisible_ms: u64,
    ) -> Result<Vec<(Lease, crate::shard::StoredRecord)>> {
        let key = (group.to_string(), queue.to_string());
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let expired = match self.groups.borrow().get(&key) {
            Some(gq) => gq.expired(now_ms(), max_count),
            None => return Ok(out),
        };
        for old in expired {
            let batch = self.read_queue(queue, old.offset, 1, max_bytes).await?;
            let mut groups = self.groups.borrow_mut();
            let Some(gq) = groups.get_mut(&key) else { return Ok(out) };
            match batch.records.into_iter().next() {
                Some(record) if record.offset == old.offset => {
                    let now = now_ms();
                    if gq.check(old.offset, old.lease_id, now) != Err(LeaseError::Expired) {
                        continue; // acked, extended or redelivered meanwhile
                    }
                    let lease =
                        gq.redeliver(old.offset, now + invisible_ms, self.lease_id()).expect("lease checked above");
                    bytes += record.bytes().len();
                    out.push((lease, record));
                    self.counters.redelivered.set(self.counters.redelivered.get() + 1);
                }
                // Retention removed it: nothing left to deliver below the queue's start.
                _ => gq.skip_to(batch.min_offset.max(old.offset + 1)),
            }
            if bytes >= max_bytes {
                return Ok(out);
            }
        }
        let (next, leased, epoch) = match self.groups.borrow().get(&key) {
            Some(gq) => (gq.next(), gq.leased(), gq.epoch()),
            None => return Ok(out),
        };
        let room =
            max_count.saturating_sub(out.len()).min(self.limits.leases_per_group_queue_max.saturating_sub(leased));
        if room == 0 || bytes >= max_bytes {
            return Ok(out);
        }
        let batch = self.read_queue(queue, next, room, max_bytes - bytes).await?;
        let mut groups = self.groups.borrow_mut();
        let Some(gq) = groups.get_mut(&key) else { return Ok(out) };
        if gq.epoch() != epoch {
            return Ok(out); // the offset was reset while this pop read: deliver nothing from before
        }
        if batch.min_offset > gq.next() {
            gq.skip_to(batch.min_offset);
        }
        let now = now_ms();
        for record in batch.records {
            if record.offset < gq.next() {
                continue; // delivered by a concurrent pop while this one read
            }
            let lease = gq.deliver(record.offset, now + invisible_ms, self.lease_id());
            out.push((lease, record));
            self.counters.popped.set(self.counters.popped.get() + 1);
        }
        Ok(out)
    }

    /// Authenticates a receipt and returns the lease it names.
    fn open_receipt(&self, queue: &str, group: &str, receipt: &str) -> Result<Lease> {
        self.key.open(queue, group, receipt).ok_or_else(|| {
            self.counters.receipts_refused.set(self.counters.receipts_refused.get() + 1);
            BrokerError::InvalidReceipt
        })
    }

    fn lease_error(&self, e: LeaseError) -> BrokerError {
        self.counters.receipts_refused.set(self.counters.receipts_refused.get() + 1);
        match e {
            LeaseError::Stale | LeaseError::Expired => BrokerError::ReceiptExpired,
        }
    }

    async fn ack(&self, request: &Frame) -> Result<AckResponse> {
        let ack = request.access::<AckRequest>()?;
        let (queue, group) = (ack.queue.as_str(), ack.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        if ack.receipts.len() > self.limits.pop_records_max as usize {
            return Err(BrokerError::InvalidRequest(format!(
                "at most {} receipts per ack",
                self.limits.pop_records_max
            )));
        }
        let key = (group.to_string(), queue.to_string());
        let now = now_ms();
        let mut statuses = Vec::with_capacity(ack.receipts.len());
        for receipt in ack.receipts.iter() {
            let status = match self.open_receipt(queue, group, receipt.as_str()) {
                Err(e) => e.code(),
                Ok(lease) => match self.groups.borrow_mut().get_mut(&key) {
                    // No state: it was issued before this broker started.
                    None => BrokerError::ReceiptExpired.code(),
                    Some(gq) => match gq.ack(lease.offset, lease.lease_id, now) {
                        Ok(floor_moved) => {
                            if floor_moved {
                                self.dirty_offsets.borrow_mut().insert(key.clone());
                            }
                            self.counters.acked.set(self.counters.acked.get() + 1);
                            code::OK
                        }
                        Err(e) => self.lease_error(e).code(),
                    },
                },
            };
            statuses.push(status);
        }
        Ok(AckResponse { statuses })
    }

    fn change_invisible(&self, request: &Frame) -> Result<ChangeInvisibleResponse> {
        let change = request.access::<ChangeInvisibleRequest>()?;
        let (queue, group) = (change.queue.as_str(), change.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let lease = self.open_receipt(queue, group, change.receipt.as_str())?;
        let invisible_ms =
            change.invisible_ms.to_native().clamp(self.limits.invisible_min_ms, self.limits.invisible_max_ms);
        let now = now_ms();
        let mut groups = self.groups.borrow_mut();
        let gq = groups.get_mut(&(group.to_string(), queue.to_string())).ok_or(BrokerError::ReceiptExpired)?;
        let renewed = if change.renew {
            gq.renew(lease.offset, lease.lease_id, now, now + invisible_ms)
        } else {
            gq.extend(lease.offset, lease.lease_id, now, now + invisible_ms, self.lease_id())
        }
        .map_err(|e| self.lease_error(e))?;
        Ok(ChangeInvisibleResponse { receipt: self.key.issue(queue, group, &renewed), offset: renewed.offset })
    }

    async fn commit_offset(&self, request: &Frame) -> Result<CommitOffsetResponse> {
        let commit = request.access::<CommitOffsetRequest>()?;
        let (queue, group) = (commit.queue.as_str(), commit.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let max = self.shard.queue_info(queue).map_or(0, |q| q.max_offset);
        let offset = commit.offset.to_native();
        if offset > max {
            return Err(BrokerError::InvalidRequest(format!("offset {offset} is past the end of {queue} ({max})")));
        }
        let key = (group.to_string(), queue.to_string());
        {
            let mut groups = self.groups.borrow_mut();
            if !groups.contains_key(&key) && groups.len() >= self.limits.group_queues_max {
                return Err(BrokerError::TooManyGroups { max: self.limits.group_queues_max });
            }
            // An explicit offset restarts delivery there; outstanding receipts become stale.
            groups.entry(key.clone()).or_insert_with(|| GroupQueue::new(offset)).reset(offset);
        }
        // Written through the same path as acks, so a timed write cannot land after it with
        // an older floor.
        self.dirty_offsets.borrow_mut().insert(key);
        self.persist_offsets().await?;
        Ok(CommitOffsetResponse {})
    }

    async fn query_offset(&self, request: &Frame) -> Result<QueryOffsetResponse> {
        let query = request.access::<QueryOffsetRequest>()?;
        let (queue, group) = (query.queue.as_str(), query.group.as_str());
        self.check_queue(queue)?;
        let info = self.shard.queue_info(queue);
        let committed = if group.is_empty() {
            None
        } else {
            Self::check_group(group)?;
            let live = self.groups.borrow().get(&(group.to_string(), queue.to_string())).map(GroupQueue::floor);
            match live {
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
            return Ok(CreateQueueResponse { created: false });
        }
        if self.configs.borrow().len() >= self.limits.queue_configs_max {
            return Err(BrokerError::InvalidRequest(format!(
                "this shard already holds {} queues (broker.queue_configs_max)",
                self.limits.queue_configs_max
            )));
        }
        self.shard.put_state(StateTable::QueueConfig, queue.as_bytes().to_vec(), config.encode()).await?;
        let created = self.configs.borrow_mut().insert(queue.to_string(), config);
        Ok(CreateQueueResponse { created })
    }

    async fn delete_queue(&self, request: &Frame) -> Result<DeleteQueueResponse> {
        let delete = request.access::<DeleteQueueRequest>()?;
        let queue = delete.queue.as_str();
        self.check_queue(queue)?;
        self.shard.delete_state(StateTable::QueueConfig, queue.as_bytes().to_vec()).await?;
        self.configs.borrow_mut().remove(queue);
        self.forget_offsets(queue).await?;
        self.groups.borrow_mut().retain(|(_, q), _| q != queue);
        self.dirty_offsets.borrow_mut().retain(|(_, q)| q != queue);
        if let Some(signal) = self.signals.borrow_mut().remove(queue) {
            signal.notify_waiters();
        }
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
            let info = self.shard.queue_info(name);
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

    fn stats(&self) -> StatsResponse {
        let s = self.shard.stats();
        let c = &self.counters;
        let mut counters = vec![
            ("queues".to_string(), self.configs.borrow().len() as u64),
            ("log_end".to_string(), s.log_end),
            ("durable_end".to_string(), s.durable_end),
            ("records_appended".to_string(), s.records_appended),
            ("messages_appended".to_string(), c.appended.get()),
            ("messages_popped".to_string(), c.popped.get()),
            ("messages_redelivered".to_string(), c.redelivered.get()),
            ("messages_acked".to_string(), c.acked.get()),
            ("receipts_refused".to_string(), c.receipts_refused.get()),
            ("long_poll_waits".to_string(), c.long_polls.get()),
            ("group_queues".to_string(), self.groups.borrow().len() as u64),
            ("leases".to_string(), self.groups.borrow().values().map(|g| g.leased() as u64).sum()),
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
}

impl Handler for ShardHandler {
    async fn handle(&self, request: Frame) -> std::result::Result<OutFrame, ErrorReply> {
        if self.closing.get() && matches!(request.kind(), Ok(FrameKind::AppendRequest)) {
            return Err(BrokerError::ShuttingDown.into());
        }
        self.dispatch(&request).await.map_err(ErrorReply::from)
    }
}
