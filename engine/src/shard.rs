//! A shard: one core's CommitLog, RocksDB index and queue table. Everything here runs on the
//! shard's own glommio executor; nothing is shared with other shards, so there are no locks.
//!
//! Append path: validate → assign queue offsets → encode straight into the open group-commit
//! batch → the committer task writes every staged batch, fdatasyncs once (policy `sync`),
//! indexes the round in log order, makes it visible, and only then releases the acks.
//!
//! Queue table: only queues appended to recently are in memory (`queues`). An idle one is
//! evicted and read back from its index metadata when it is next used, so idle queues (a
//! million lite topics) cost index space, not memory. A queue with staged appends or a staged
//! deletion is never evicted, so the index metadata of an evicted queue is its whole state.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures::channel::oneshot;
// FxHash: queue names are short and trusted to this shard; SipHash cost showed up in profiles.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::commitlog::{batch_records, CommitLog, LogBytes, LogLimits, RecoveryReport, SealedBatch, READ_RANGES_MAX};
use crate::config::{Durability, EngineConfig};
use crate::control::{ControlOp, STATE_KEY_MAX_BYTES, STATE_VALUE_MAX_BYTES};
use crate::error::{EngineError, Result};
use crate::index::{
    held_key, HeldKind, HeldMessage, Index, IndexBatch, QueueEntry, QueueMeta, RecordLocation, StateTable,
};
use crate::notify::Notify;
use crate::queue::{shard_for_queue, validate_queue_name};
use crate::record::{self, encode_record, encoded_len, txn_state, NewRecord, RecordView, FLAG_CONTROL, OFFSET_HELD};
use crate::segment::SegmentStore;
use sluice_transport::model::message_type;

/// Where an appended record went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    pub position: u64,
    /// The record's offset in each of its queues, in the order the queues were given.
    pub offsets: Vec<u64>,
}

/// A record read from the log. The bytes stay in the DMA read buffer (no copy).
pub struct StoredRecord {
    pub offset: u64,
    pub position: u64,
    bytes: LogBytes,
}

impl StoredRecord {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn view(&self) -> RecordView<'_> {
        // CRC and structure were verified when the record was read.
        RecordView::parse_unverified(&self.bytes).expect("verified at read")
    }
}

/// Result of reading a queue.
pub struct ReadBatch {
    pub records: Vec<StoredRecord>,
    /// Offset to ask for next.
    pub next_offset: u64,
    pub min_offset: u64,
    /// Offsets below this are readable.
    pub max_offset: u64,
}

/// A queue's counters, as seen by readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub min_offset: u64,
    pub max_offset: u64,
    pub created_ms: u64,
    pub last_append_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub shard: usize,
    pub queues: usize,
    pub log_start: u64,
    pub log_end: u64,
    pub durable_end: u64,
    pub records_appended: u64,
    pub bytes_appended: u64,
    pub group_commits: u64,
    pub recovery: Option<RecoveryReport>,
    /// Record reads the log's tail cache answered, and those it did not.
    pub tail_cache_hits: u64,
    pub tail_cache_misses: u64,
    pub tail_cache_bytes: u64,
    /// Log bytes written with zeros ahead of the end since open (`log_zero_ahead_bytes`).
    pub log_zeroed_bytes: u64,
    pub index_memtable_bytes: u64,
    pub index_block_cache_bytes: u64,
    /// Of `queues`, those held in memory (appended to recently); the rest live in the index.
    pub queues_resident: usize,
    pub queues_evicted: u64,
    /// Free space on the shard's file system (at most `DISK_CHECK_INTERVAL_MS` old).
    pub disk_free_bytes: u64,
    /// Message appends refused because the disk was at its floor.
    pub appends_refused_disk_full: u64,
    /// Message appends refused after `append_wait_max_ms` without room in the in-flight budget.
    pub appends_refused_busy: u64,
}

struct QueueState {
    /// Distinguishes a queue from an earlier one of the same name (deleted and re-created).
    generation: u64,
    /// A deletion is staged: appends are refused until it is applied.
    deleting: bool,
    /// Next offset to assign (includes staged, not yet durable records).
    next_offset: u64,
    /// Offsets below this are durable, indexed and readable.
    visible_offset: u64,
    min_offset: u64,
    created_ms: u64,
    last_append_ms: u64,
}

/// The in-memory queue table: recently active queues only.
type QueueTable = HashMap<Rc<str>, QueueState>;

/// When to look at a resident queue again to evict it if it went idle.
struct EvictionCheck {
    check_after_ms: u64,
    generation: u64,
    name: Rc<str>,
}

/// How long the committer must stay idle before the log is zeroed ahead (`start_zeroing_ahead`).
const ZERO_AHEAD_IDLE_US: u64 = 500;
/// The log is zeroed ahead only after rounds up to this size (light load).
const ZERO_AHEAD_ROUND_MAX_BYTES: u64 = 64 << 10;
/// Eviction checks one tick may do, bounding the time it holds the reactor.
const EVICTION_CHECKS_PER_TICK_MAX: usize = 8192;
/// Longest time between eviction ticks.
const EVICTION_TICK_MAX_MS: u64 = 100;
/// An evicted queue whose first entries point at deleted log: (name, metadata read, new minimum).
type EvictedTrim = (String, QueueMeta, u64);

/// Evicted queues one step of a retention pass looks at.
const TRIM_PAGE_QUEUES: usize = 1024;
/// A table or check queue this much bigger than its contents is shrunk.
const SHRINK_FACTOR: usize = 4;

struct Waiter {
    log_end: u64,
    done: oneshot::Sender<Result<()>>,
}

/// The storage metrics a shard records on its commit path (see `crate::metrics`).
struct StorageMetrics {
    group_commit_records: metrics::Histogram,
    index_write: metrics::Histogram,
}

impl StorageMetrics {
    fn new() -> StorageMetrics {
        let labels = &[crate::metrics::NODE_TYPE];
        StorageMetrics {
            group_commit_records: metrics::histogram!(crate::metrics::GROUP_COMMIT_RECORDS, labels),
            index_write: metrics::histogram!(crate::metrics::INDEX_WRITE, labels),
        }
    }
}

pub struct Shard {
    pub id: usize,
    config: EngineConfig,
    log: CommitLog,
    index: Index,
    queues: RefCell<QueueTable>,
    /// Every resident queue once, in the order its next eviction check is due.
    eviction_checks: RefCell<VecDeque<EvictionCheck>>,
    /// Queues the shard holds, resident or not.
    queue_count: Cell<u64>,
    waiters: RefCell<VecDeque<Waiter>>,
    committer_wake: Notify,
    /// Cleared by the first failure of zeroing ahead (`start_zeroing_ahead`).
    zero_ahead_enabled: Cell<bool>,
    /// A zeroing task is running.
    zeroing_ahead: Cell<bool>,
    /// Bytes of the last round the committer wrote.
    last_round_bytes: Cell<u64>,
    failed: RefCell<Option<String>>,
    closing: Cell<bool>,
    /// End of the log the index holds (written to RocksDB, maybe not yet flushed).
    indexed_end: Cell<u64>,
    /// End of the log the index holds durably (as of the last completed flush).
    index_flushed_at: Cell<u64>,
    flush_lock: futures::lock::Mutex<()>,
    /// A background index flush is queued or running.
    flush_scheduled: Cell<bool>,
    retention_running: Cell<bool>,
    next_generation: Cell<u64>,
    /// Bytes of appends staged but not yet acked; bounds the memory appenders can pin.
    inflight_bytes: glommio::sync::Semaphore,
    /// The file system's free space as last read, for the `disk_free_min_bytes` check.
    disk: RefCell<DiskRoom>,
    stats: RefCell<ShardStats>,
    metrics: StorageMetrics,
}

/// Free space, read with statvfs at most every `DISK_CHECK_INTERVAL_MS` and after every
/// segment creation (the one thing that takes space in bulk; writes fill preallocated space).
#[derive(Default)]
struct DiskRoom {
    free_bytes: u64,
    checked_ms: u64,
    segments_created: u64,
    checked: bool,
    /// The last append was refused for space; logged once per episode.
    refusing: bool,
    statvfs_failing: bool,
}

/// Longest time an append trusts a free-space figure.
const DISK_CHECK_INTERVAL_MS: u64 = 100;

/// Marker a cleanly closed shard leaves; its absence at start means "recover from a crash".
const CLEAN_SHUTDOWN_MARKER: &str = "clean-shutdown";

/// A delay message due later, or a transaction's half message: stored now, queued later.
fn is_held(record: &NewRecord, store_ms: u64) -> bool {
    let a = &record.attributes;
    a.txn_state == txn_state::HALF || (a.message_type == message_type::DELAY && a.delivery_ms > store_ms)
}

/// Store times and deadlines: the broker's step-free clock (`clock.rs`).
pub(crate) fn now_ms() -> u64 {
    crate::clock::now_ms()
}

impl Shard {
    /// Opens the shard's index and log, replays the log from the index checkpoint, and starts
    /// the committer and the background tasks. An index that claims more log than the log holds
    /// (possible after a power loss under `async`) is discarded and rebuilt from the log.
    pub async fn open(config: EngineConfig, id: usize, store: Rc<dyn SegmentStore>) -> Result<Rc<Shard>> {
        let dir = config.shard_dir(id);
        let index_dir = dir.join("index");
        let marker = dir.join(CLEAN_SHUTDOWN_MARKER);
        let clean = marker.exists();
        if clean {
            // Gone (durably) before anything is written, so a crash from here on is seen as one.
            std::fs::remove_file(&marker)
                .map_err(|e| EngineError::io("removing shutdown marker", marker.display(), e))?;
            sync_dir(&dir)?;
        }
        let limits = LogLimits {
            segment_size_bytes: config.segment_size_bytes,
            group_commit_max_bytes: config.group_commit_max_bytes,
            group_commit_records_max: config.group_commit_records_max,
            record_size_max_bytes: config.record_size_max_bytes,
            tail_cache_bytes: config.log_tail_cache_bytes,
            zero_ahead_bytes: config.log_zero_ahead_bytes,
        };
        for attempt in 0..2 {
            std::fs::create_dir_all(&index_dir)
                .map_err(|e| EngineError::io("creating index directory", index_dir.display(), e))?;
            let index = Index::open(&index_dir, config.index_block_cache_bytes)?;
            let checkpoint = index.checkpoint()?;
            let holds = match checkpoint.last_batch {
                Some(last) => CommitLog::checkpoint_holds(&*store, limits, last, checkpoint.end).await?,
                None => true,
            };
            let log_start = store
                .list()
                .map_err(|e| EngineError::io("listing segments", store.describe(0), e))?
                .first()
                .map(|s| s.0);
            if !holds && log_start.is_some_and(|start| start > 0) {
                return Err(EngineError::Index {
                    what: "checkpoint",
                    message: format!(
                        "the index covers log up to {} that is not intact, and older segments were deleted by retention, \
                         so a rebuild from the log would lose consumer offsets and deletions they held. To accept that, \
                         delete {} and restart",
                        checkpoint.end,
                        index_dir.display()
                    ),
                });
            }
            if holds {
                let opened = Self::recover(&config, id, store.clone(), limits, index, checkpoint.end, clean).await?;
                if let Some(shard) = opened {
                    shard.start_background_tasks();
                    return Ok(shard);
                }
            } else {
                drop(index);
            }
            tracing::warn!(shard = id, attempt, "index covers more log than survived; rebuilding it from the log");
            std::fs::remove_dir_all(&index_dir)
                .map_err(|e| EngineError::io("removing stale index", index_dir.display(), e))?;
        }
        Err(EngineError::Index { what: "rebuild", message: "index still ahead of the log after a rebuild".into() })
    }

    /// Replays the log into `index`. `None` if the log turned out shorter than the checkpoint.
    async fn recover(
        config: &EngineConfig,
        id: usize,
        store: Rc<dyn SegmentStore>,
        limits: LogLimits,
        index: Index,
        checkpoint: u64,
        clean: bool,
    ) -> Result<Option<Rc<Shard>>> {
        // Only queues the replay touches become resident; the rest stay in the index.
        let mut queues = QueueTable::default();
        let mut deleted_in_replay = HashSet::default();
        let mut next_generation = 0;
        let replay_index = index.clone();
        let mut pending: Option<IndexBatch<'_>> = None;
        let mut replayed_records = 0usize;
        let (log, report) = CommitLog::open(store, limits, checkpoint, clean, |position, bytes| {
            let batch = pending.get_or_insert_with(|| replay_index.batch());
            let mut touched = HashMap::default();
            for (record_position, record_bytes) in batch_records(bytes, position) {
                let view =
                    record::parse_record(record_bytes).map_err(|e| replay_error(record_position, e.to_string()))?;
                let size = record_bytes.len() as u32;
                let replay = Replay::Rebuilding {
                    next_generation: &mut next_generation,
                    index: &replay_index,
                    deleted: &mut deleted_in_replay,
                };
                index_record(batch, &mut touched, record_position, size, &view, &mut queues, replay)?;
                replayed_records += 1;
            }
            write_queue_meta(batch, &touched, &queues);
            batch.set_checkpoint(position + bytes.len() as u64, position);
            if replayed_records >= 65_536 {
                replay_index.write(pending.take().expect("batch exists"))?;
                replayed_records = 0;
            }
            Ok(())
        })
        .await?;
        if let Some(batch) = pending {
            index.write(batch)?;
        }
        if report.end < checkpoint {
            return Ok(None);
        }
        if report.batches_replayed > 0 || report.truncated_tail.is_some() {
            tracing::info!(shard = id, ?report, "recovered shard from its log");
        }
        let end = log.written_end();
        let queue_count = index.count_queues()?;
        let now = now_ms();
        let eviction_checks = match config.queue_idle_evict_ms {
            0 => VecDeque::new(),
            idle_ms => queues
                .iter()
                .map(|(name, q)| EvictionCheck {
                    check_after_ms: now + idle_ms,
                    generation: q.generation,
                    name: name.clone(),
                })
                .collect(),
        };
        let shard = Rc::new(Shard {
            id,
            config: config.clone(),
            log,
            index,
            queues: RefCell::new(queues),
            eviction_checks: RefCell::new(eviction_checks),
            queue_count: Cell::new(queue_count),
            waiters: RefCell::new(VecDeque::new()),
            committer_wake: Notify::default(),
            zero_ahead_enabled: Cell::new(true),
            zeroing_ahead: Cell::new(false),
            last_round_bytes: Cell::new(0),
            failed: RefCell::new(None),
            closing: Cell::new(false),
            indexed_end: Cell::new(end),
            index_flushed_at: Cell::new(checkpoint),
            flush_lock: futures::lock::Mutex::new(()),
            flush_scheduled: Cell::new(false),
            retention_running: Cell::new(false),
            next_generation: Cell::new(next_generation),
            inflight_bytes: glommio::sync::Semaphore::new(config.append_inflight_max_bytes),
            disk: RefCell::new(DiskRoom::default()),
            stats: RefCell::new(ShardStats { shard: id, recovery: Some(report), ..Default::default() }),
            metrics: StorageMetrics::new(),
        });
        if end > checkpoint {
            // Persist what replay rebuilt, so the next start does not replay it again.
            shard.flush_index().await?;
        }
        Ok(Some(shard))
    }

    fn start_background_tasks(self: &Rc<Self>) {
        glommio::spawn_local(self.clone().run_committer()).detach();
        if let Durability::Async { flush_interval_ms } = self.config.durability {
            glommio::spawn_local(Shard::run_periodic_sync(Rc::downgrade(self), flush_interval_ms)).detach();
        }
        if self.config.retention.max_age.is_some() || self.config.retention.max_log_bytes_per_shard.is_some() {
            let interval = self.config.retention.check_interval_ms;
            glommio::spawn_local(Shard::run_retention(Rc::downgrade(self), interval)).detach();
        }
        if self.config.queue_idle_evict_ms > 0 {
            glommio::spawn_local(Shard::run_eviction(Rc::downgrade(self))).detach();
        }
    }

    fn check_writable(&self) -> Result<()> {
        if let Some(cause) = self.failed.borrow().as_ref() {
            return Err(EngineError::ShardFailed { shard: self.id, cause: cause.clone() });
        }
        if self.closing.get() {
            return Err(EngineError::ShuttingDown);
        }
        Ok(())
    }

    fn validate(&self, record: &NewRecord) -> Result<usize> {
        if record.queues.is_empty() {
            return Err(EngineError::InvalidRecord("a record needs at least one queue".into()));
        }
        for (i, queue) in record.queues.iter().enumerate() {
            validate_queue_name(queue)?;
            let shard = shard_for_queue(queue, self.config.shard_count);
            if shard != self.id {
                return Err(EngineError::DispatchAcrossShards {
                    first: record.queues[0].clone(),
                    first_shard: shard_for_queue(&record.queues[0], self.config.shard_count),
                    other: queue.clone(),
                    other_shard: shard,
                });
            }
            if record.queues[..i].contains(queue) {
                return Err(EngineError::InvalidRecord(format!("queue {queue:?} listed twice")));
            }
            if self.queues.borrow().get(queue.as_str()).is_some_and(|q| q.deleting) {
                return Err(EngineError::QueueBeingDeleted(queue.clone()));
            }
        }
        let len = encoded_len(record).map_err(EngineError::InvalidRecord)?;
        if len as u64 > self.config.record_size_max_bytes {
            return Err(EngineError::RecordTooLarge {
                size_bytes: len as u64,
                max_bytes: self.config.record_size_max_bytes,
            });
        }
        Ok(len)
    }

    /// Appends records (each with one stored copy, indexed into all its queues) and resolves
    /// once they are durable under the shard's policy and readable. A delay message due later
    /// and a transaction's half message are stored but held out of their queues (their offsets
    /// are `OFFSET_HELD`) until `dispatch_held`.
    pub async fn append(&self, records: &[NewRecord]) -> Result<Vec<AppendAck>> {
        self.append_flagged(records, 0).await
    }

    async fn append_flagged(&self, records: &[NewRecord], flags: u16) -> Result<Vec<AppendAck>> {
        self.check_writable()?;
        if records.len() > self.config.append_batch_records_max {
            return Err(EngineError::BatchTooLarge { count: records.len(), max: self.config.append_batch_records_max });
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Wait for memory first and validate after: state may change while waiting. A call
        // bigger than the whole budget still proceeds alone rather than never.
        let payload: u64 = records.iter().map(|r| (r.body.len() + r.properties.len() + 512) as u64).sum();
        let permit = self.inflight_bytes.acquire_permit(payload.min(self.config.append_inflight_max_bytes));
        let _inflight = if flags == 0 {
            // A producer gets a retryable refusal rather than a wait its client times out on.
            let wait_ms = self.config.append_wait_max_ms;
            match glommio::timer::timeout(Duration::from_millis(wait_ms), permit).await {
                Ok(permit) => permit,
                Err(glommio::GlommioError::TimedOut(_)) => {
                    self.stats.borrow_mut().appends_refused_busy += 1;
                    return Err(EngineError::ShardBusy {
                        shard: self.id,
                        inflight_max_bytes: self.config.append_inflight_max_bytes,
                        waited_ms: wait_ms,
                    });
                }
                Err(_) => return Err(EngineError::ShuttingDown),
            }
        } else {
            permit.await.map_err(|_| EngineError::ShuttingDown)?
        };
        self.check_writable()?;
        let lens = records.iter().map(|r| self.validate(r)).collect::<Result<Vec<usize>>>()?;
        if flags == 0 {
            // Producers' messages only: what is already accepted (due delay messages, acks,
            // offsets) keeps going in, using the space the floor keeps.
            self.check_disk_room(lens.iter().sum())?;
        }
        self.check_queue_room(records)?;
        let store_ms = now_ms();
        let mut acks = Vec::with_capacity(records.len());
        let mut end = 0;
        let mut coming_bytes: usize = lens.iter().sum();
        for (record, len) in records.iter().zip(lens) {
            let offsets = if flags == 0 && is_held(record, store_ms) {
                vec![OFFSET_HELD; record.queues.len()]
            } else {
                self.assign_offsets(&record.queues, store_ms)
            };
            let position =
                self.log.stage(len, coming_bytes, |dst| encode_record(dst, record, &offsets, flags, store_ms));
            coming_bytes -= len;
            end = position + len as u64;
            acks.push(AppendAck { position, offsets });
        }
        {
            let mut stats = self.stats.borrow_mut();
            stats.records_appended += records.len() as u64;
            stats.bytes_appended += records.iter().map(|r| r.body.len() as u64).sum::<u64>();
        }
        self.wait_committed(end).await?;
        Ok(acks)
    }

    /// Refuses a message append that would leave less than `disk_free_min_bytes` free, or less
    /// than that plus a segment when the log has to roll (or a roll already waits for space).
    fn check_disk_room(&self, coming_bytes: usize) -> Result<()> {
        let floor_bytes = self.config.disk_free_min_bytes;
        // A creation that already met a full disk refuses more, floor or not.
        let waiting = self.log.waiting_for_space();
        if floor_bytes == 0 && !waiting {
            return Ok(());
        }
        let free_bytes = self.disk_free_bytes();
        let rolling = self.log.needs_new_segment(coming_bytes);
        let needed_bytes = floor_bytes.saturating_add(if rolling { self.config.segment_size_bytes } else { 0 });
        let mut disk = self.disk.borrow_mut();
        if !waiting && free_bytes >= needed_bytes {
            if std::mem::take(&mut disk.refusing) {
                tracing::info!(shard = self.id, free_bytes, "disk space above the floor again; accepting messages");
            }
            return Ok(());
        }
        if !std::mem::replace(&mut disk.refusing, true) {
            tracing::warn!(
                shard = self.id,
                free_bytes,
                needed_bytes,
                "disk at its free-space floor (disk_free_min_bytes); refusing new messages until space is freed"
            );
        }
        self.stats.borrow_mut().appends_refused_disk_full += 1;
        Err(EngineError::DiskFull { shard: self.id, free_bytes, needed_bytes })
    }

    /// Free bytes on the shard's file system (for unprivileged use), refreshed when stale.
    fn disk_free_bytes(&self) -> u64 {
        let now = now_ms();
        let mut disk = self.disk.borrow_mut();
        let created = self.log.segments_created();
        let fresh = disk.checked
            && disk.segments_created == created
            && now.saturating_sub(disk.checked_ms) < DISK_CHECK_INTERVAL_MS;
        if !fresh {
            let dir = self.config.shard_dir(self.id);
            match rustix::fs::statvfs(&dir) {
                Ok(vfs) => {
                    disk.free_bytes = vfs.f_bavail.saturating_mul(vfs.f_frsize);
                    disk.statvfs_failing = false;
                }
                // A failing statvfs says nothing about space: keep the last figure (none yet:
                // no refusal), and say so once.
                Err(e) => {
                    if !disk.checked {
                        disk.free_bytes = u64::MAX;
                    }
                    if !std::mem::replace(&mut disk.statvfs_failing, true) {
                        tracing::warn!(shard = self.id, error = %e, dir = %dir.display(), "statvfs failed; the disk floor uses the last figure");
                    }
                }
            }
            disk.checked = true;
            disk.checked_ms = now;
            disk.segments_created = created;
        }
        disk.free_bytes
    }

    /// Makes every existing queue of `records` resident (so `assign_offsets` creates only new
    /// ones) and checks that the new ones fit.
    fn check_queue_room(&self, records: &[NewRecord]) -> Result<()> {
        let mut queues = self.queues.borrow_mut();
        let mut new: HashSet<&str> = HashSet::default();
        for name in records.iter().flat_map(|r| r.queues.iter()) {
            if !self.make_resident(&mut queues, name)? {
                new.insert(name);
            }
        }
        if self.queue_count.get() + new.len() as u64 > self.config.queues_per_shard_max as u64 {
            return Err(EngineError::TooManyQueues { shard: self.id, max: self.config.queues_per_shard_max });
        }
        Ok(())
    }

    /// Loads an evicted queue back from the index; false if the queue does not exist.
    fn make_resident(&self, queues: &mut QueueTable, name: &str) -> Result<bool> {
        if queues.contains_key(name) {
            return Ok(true);
        }
        let Some(meta) = self.index.queue_meta(name)? else { return Ok(false) };
        let generation = self.next_generation.replace(self.next_generation.get() + 1);
        self.insert_resident(queues, name, QueueState::from_meta(generation, &meta));
        Ok(true)
    }

    fn insert_resident(&self, queues: &mut QueueTable, name: &str, state: QueueState) {
        let name: Rc<str> = name.into();
        if self.config.queue_idle_evict_ms > 0 {
            self.eviction_checks.borrow_mut().push_back(EvictionCheck {
                check_after_ms: now_ms() + self.config.queue_idle_evict_ms,
                generation: state.generation,
                name: name.clone(),
            });
        }
        queues.insert(name, state);
    }

    fn assign_offsets(&self, names: &[String], store_ms: u64) -> Vec<u64> {
        let mut queues = self.queues.borrow_mut();
        names
            .iter()
            .map(|name| {
                if !queues.contains_key(name.as_str()) {
                    // `check_queue_room` made every existing queue resident: this one is new.
                    let generation = self.next_generation.replace(self.next_generation.get() + 1);
                    self.insert_resident(&mut queues, name, QueueState::new(generation, 0, store_ms));
                    self.queue_count.set(self.queue_count.get() + 1);
                }
                let queue = queues.get_mut(name.as_str()).expect("present or inserted above");
                let offset = queue.next_offset;
                queue.next_offset += 1;
                queue.last_append_ms = store_ms;
                offset
            })
            .collect()
    }

    /// Stages a control record and waits until it is durable and applied.
    async fn append_control(&self, op: &ControlOp) -> Result<()> {
        self.check_writable()?;
        let record = NewRecord { body: op.encode().into(), ..Default::default() };
        let len = encoded_len(&record).map_err(EngineError::InvalidRecord)?;
        if len as u64 > self.config.record_size_max_bytes {
            return Err(EngineError::RecordTooLarge {
                size_bytes: len as u64,
                max_bytes: self.config.record_size_max_bytes,
            });
        }
        let store_ms = now_ms();
        let position = self.log.stage(len, len, |dst| encode_record(dst, &record, &[], FLAG_CONTROL, store_ms));
        self.wait_committed(position + len as u64).await
    }

    async fn wait_committed(&self, log_end: u64) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.waiters.borrow_mut().push_back(Waiter { log_end, done });
        self.committer_wake.notify();
        wait.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    /// Group commit, pipelined: while round k+1 is written (and synced), round k, already
    /// durable, is indexed and acked, so the CPU work overlaps disk I/O. Rounds are indexed and
    /// acked strictly in log order.
    async fn run_committer(self: Rc<Self>) {
        loop {
            self.committer_wake.wait().await;
            let mut durable: Option<(Vec<SealedBatch>, u64)> = None;
            loop {
                let round = self.log.has_staged().then(|| self.log.take_round());
                let previous = durable.take();
                if round.is_none() && previous.is_none() {
                    break;
                }
                let persist = async {
                    match &round {
                        Some(round) => self.persist_round(round).await.map(Some),
                        None => Ok(None),
                    }
                };
                let publish = async {
                    match &previous {
                        Some((round, end)) => self.publish_round(round, *end),
                        None => Ok(()),
                    }
                };
                let (persisted, published) = futures::join!(persist, publish);
                match published.and(persisted) {
                    Ok(Some(end)) => durable = round.map(|round| (round, end)),
                    Ok(None) => {}
                    Err(err) => {
                        tracing::error!(shard = self.id, error = %err, "group commit failed; shard stops accepting writes");
                        *self.failed.borrow_mut() = Some(err.to_string());
                        for waiter in self.waiters.borrow_mut().drain(..) {
                            let _ = waiter.done.send(Err(err.clone()));
                        }
                        return;
                    }
                }
            }
            if self.closing.get() {
                return;
            }
            self.start_zeroing_ahead();
        }
    }

    /// When the committer goes idle after a round of at most `ZERO_AHEAD_ROUND_MAX_BYTES`, and
    /// still has nothing staged `ZERO_AHEAD_IDLE_US` later, zeroes the log ahead of its end a
    /// chunk at a time in a task of its own, so the next appends' fdatasyncs find written
    /// blocks (see `LogLimits::zero_ahead_bytes`); it stops when appends are staged again.
    /// After a failure it stops for good: that costs only the saving, and the data path
    /// reports real disk trouble. Holds a `Weak`, like the other background loops.
    fn start_zeroing_ahead(self: &Rc<Self>) {
        // Big rounds mean heavy load: their syncs are few and amortised, and zeros written
        // between them would compete for the disk.
        let light_load = self.last_round_bytes.get() <= ZERO_AHEAD_ROUND_MAX_BYTES;
        if !light_load || !self.zero_ahead_enabled.get() || !self.log.zeroing_due() || self.zeroing_ahead.replace(true)
        {
            return;
        }
        let shard = Rc::downgrade(self);
        glommio::spawn_local(async move {
            // Only a real pause: under full load the committer is idle for microseconds between
            // rounds, and a chunk started then would hold up the next round.
            glommio::timer::sleep(Duration::from_micros(ZERO_AHEAD_IDLE_US)).await;
            let Some(shard) = shard.upgrade() else { return };
            while !shard.closing.get() && !shard.log.has_staged() {
                match shard.log.zero_ahead().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(shard = shard.id, error = %err, "zeroing the log ahead failed; no longer zeroing ahead");
                        shard.zero_ahead_enabled.set(false);
                        break;
                    }
                }
            }
            shard.zeroing_ahead.set(false);
        })
        .detach();
    }

    /// Writes a round and, under `sync`, makes it durable. Returns the log end it covers.
    async fn persist_round(&self, round: &[SealedBatch]) -> Result<u64> {
        let end = round.last().map_or(self.log.written_end(), SealedBatch::end);
        self.last_round_bytes.set(round.iter().map(|b| b.len as u64).sum());
        self.log.write_round(round).await?;
        if self.config.durability == Durability::Sync {
            let durable = self.log.sync().await?;
            assert!(durable >= end, "acks need the whole round durable");
        }
        Ok(end)
    }

    /// Indexes a persisted round, makes it visible, and acks its appends.
    fn publish_round(self: &Rc<Self>, round: &[SealedBatch], end: u64) -> Result<()> {
        self.index_round(round, end)?;
        self.stats.borrow_mut().group_commits += 1;
        self.release_waiters(end);
        let unflushed = end - self.index_flushed_at.get();
        if unflushed >= self.config.index_flush_interval_bytes && !self.flush_scheduled.replace(true) {
            // Bounds how much log a restart has to replay.
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Err(err) = shard.flush_index().await {
                    tracing::warn!(shard = shard.id, error = %err, "index flush failed");
                }
                shard.flush_scheduled.set(false);
            })
            .detach();
        }
        Ok(())
    }

    /// Indexes a written round in log order and makes its records visible.
    fn index_round(&self, round: &[SealedBatch], end: u64) -> Result<()> {
        let mut batch = self.index.batch();
        let mut touched = HashMap::default();
        let mut queues = self.queues.borrow_mut();
        // Live indexing never adds to the table; a shrink is applied deletions.
        let resident_before = queues.len();
        let mut records = 0u64;
        for sealed in round {
            for (position, bytes) in batch_records(sealed.bytes(), sealed.position) {
                let view = RecordView::parse_unverified(bytes).map_err(|e| replay_error(position, e.to_string()))?;
                index_record(&mut batch, &mut touched, position, bytes.len() as u32, &view, &mut queues, Replay::Live)?;
                records += 1;
            }
        }
        write_queue_meta(&mut batch, &touched, &queues);
        if let Some(last) = round.last() {
            batch.set_checkpoint(end, last.position);
        }
        let started = std::time::Instant::now();
        self.index.write(batch)?;
        self.metrics.index_write.record(started.elapsed().as_secs_f64());
        self.metrics.group_commit_records.record(records as f64);
        self.queue_count.set(self.queue_count.get() - (resident_before - queues.len()) as u64);
        for (name, touch) in touched {
            if let Some(queue) = queues.get_mut(name) {
                assert!(touch.next_offset <= queue.next_offset, "visible offset beyond assigned offset");
                queue.visible_offset = queue.visible_offset.max(touch.next_offset);
            }
        }
        self.indexed_end.set(end);
        Ok(())
    }

    fn release_waiters(&self, end: u64) {
        let mut waiters = self.waiters.borrow_mut();
        while waiters.front().is_some_and(|w| w.log_end <= end) {
            let waiter = waiters.pop_front().expect("front exists");
            let _ = waiter.done.send(Ok(()));
        }
    }

    /// Background loops hold a `Weak` so a stopped executor releases the shard (and RocksDB).
    async fn run_periodic_sync(shard: Weak<Shard>, flush_interval_ms: u64) {
        loop {
            glommio::timer::sleep(Duration::from_millis(flush_interval_ms)).await;
            let Some(shard) = shard.upgrade() else { return };
            if shard.closing.get() || shard.failed.borrow().is_some() {
                return;
            }
            if shard.log.written_end() > shard.log.durable_end() {
                if let Err(err) = shard.log.sync().await {
                    tracing::error!(shard = shard.id, error = %err, "periodic fdatasync failed; shard stops accepting writes");
                    *shard.failed.borrow_mut() = Some(err.to_string());
                }
            }
        }
    }

    /// Makes the index durable as far as it has indexed. The log is synced first, so the
    /// persisted checkpoint never points past durable log data. Flushes run one at a time; a
    /// caller always waits for a flush that started after its call.
    pub async fn flush_index(&self) -> Result<()> {
        let _one_at_a_time = self.flush_lock.lock().await;
        let covered = self.indexed_end.get();
        self.log.sync().await?;
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.flush()).await?;
        self.index_flushed_at.set(self.index_flushed_at.get().max(covered));
        Ok(())
    }

    /// Reads up to `max_count` records (and about `max_bytes`, at least one record) of a queue
    /// from `from`. Offsets below the queue's minimum are skipped.
    pub async fn read(&self, queue: &str, from: u64, max_count: usize, max_bytes: usize) -> Result<ReadBatch> {
        let info = self.queue_info(queue)?.ok_or_else(|| EngineError::QueueNotFound(queue.to_string()))?;
        let (min_offset, max_offset) = (info.min_offset, info.max_offset);
        let start = from.max(min_offset);
        let end = max_offset.min(start.saturating_add(max_count as u64));
        let mut batch = ReadBatch { records: Vec::new(), next_offset: start, min_offset, max_offset };
        if start >= end {
            return Ok(batch);
        }
        let entries = self.entries(queue, start, end).await?;
        let log_start = self.log.start();
        batch.next_offset = entries.iter().rev().find(|e| e.position < log_start).map_or(start, |e| e.offset + 1);
        let stored: Vec<QueueEntry> = entries.into_iter().filter(|e| e.position >= log_start).collect();
        batch.records = self.read_entries(&stored, max_bytes).await?;
        if let Some(last) = batch.records.last() {
            batch.next_offset = last.offset + 1;
        }
        Ok(batch)
    }

    /// Reads the records of `entries` in order, as many as fit in about `max_bytes` (at least
    /// one, at most `READ_RANGES_MAX`); records close together in the log share one I/O, and
    /// the I/Os run at once (`CommitLog::read_ranges`). Entries whose
    /// record was deleted by retention must be left out by the caller (see `log_start`).
    pub async fn read_entries(&self, entries: &[QueueEntry], max_bytes: usize) -> Result<Vec<StoredRecord>> {
        self.read_each(entries, max_bytes).await?.into_iter().collect()
    }

    /// Like `read_entries`, but a record that fails verification is an error of its own
    /// (the others still come back), so one damaged record cannot stop a queue's delivery.
    /// The outer error is the read itself failing.
    pub async fn read_each(&self, entries: &[QueueEntry], max_bytes: usize) -> Result<Vec<Result<StoredRecord>>> {
        let mut chosen = Vec::with_capacity(entries.len().min(READ_RANGES_MAX));
        let mut bytes_read = 0usize;
        for entry in entries.iter().take(READ_RANGES_MAX) {
            if !chosen.is_empty() && bytes_read + entry.size_bytes as usize > max_bytes {
                break;
            }
            bytes_read += entry.size_bytes as usize;
            chosen.push(*entry);
        }
        let ranges: Vec<(u64, usize)> = chosen.iter().map(|e| (e.position, e.size_bytes as usize)).collect();
        let reads = self.log.read_ranges(&ranges).await?;
        let records = chosen
            .into_iter()
            .zip(reads)
            .map(|(entry, record)| {
                self.verify_read(entry.position, &record)?;
                Ok(StoredRecord { offset: entry.offset, position: entry.position, bytes: record })
            })
            .collect();
        Ok(records)
    }

    /// Queue entries `[start, end)` (fewer where retention trimmed them). Served from memory
    /// when RocksDB has them cached, else off the reactor.
    pub async fn entries(&self, queue: &str, start: u64, end: u64) -> Result<Vec<QueueEntry>> {
        if let Some(entries) = self.index.queue_range_cached(queue, start, end)? {
            return Ok(entries);
        }
        // Not in memory: the iterator may block on disk, so it runs off the reactor.
        let index = self.index.clone();
        let queue = queue.to_string();
        glommio::executor().spawn_blocking(move || index.queue_range(&queue, start, end)).await
    }

    /// The first log position still stored; entries below it point at deleted segments.
    pub fn log_start(&self) -> u64 {
        self.log.start()
    }

    /// Up to `limit` held messages of `kind` in key order from the first key >= `from`
    /// (timers by due time, half messages by position); see `index::held_key`.
    pub async fn held_scan(&self, kind: HeldKind, from: Vec<u8>, limit: usize) -> Result<Vec<HeldMessage>> {
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.held_scan(kind, &from, limit)).await
    }

    /// The earliest timers, due or not (to know when to wake).
    pub async fn first_timers(&self, limit: usize) -> Result<Vec<HeldMessage>> {
        self.held_scan(HeldKind::Timer, held_key(HeldKind::Timer, 0, 0), limit).await
    }

    pub async fn held(&self, kind: HeldKind, due_ms: u64, position: u64) -> Result<Option<HeldMessage>> {
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.held(kind, due_ms, position)).await
    }

    /// Puts held messages into their queues, each at the next offsets there. Returns, per
    /// message, its offsets in the order of its `queues`. A committed half message's entries
    /// say so (`txn_state::COMMITTED`).
    pub async fn dispatch_held(&self, held: &[HeldMessage]) -> Result<Vec<AppendAck>> {
        let records: Vec<NewRecord> = held
            .iter()
            .map(|h| {
                let mut entry = h.entry;
                if h.kind == HeldKind::Half {
                    entry.txn_state = txn_state::COMMITTED;
                }
                let op = ControlOp::Dispatch { kind: h.kind, due_ms: h.due_ms, entry };
                NewRecord { queues: h.queues.clone(), body: op.encode().into(), ..Default::default() }
            })
            .collect();
        self.append_flagged(&records, FLAG_CONTROL).await
    }

    /// Drops a held message without delivering it.
    pub async fn discard_held(&self, held: &HeldMessage) -> Result<()> {
        self.append_control(&ControlOp::DiscardHeld {
            kind: held.kind,
            due_ms: held.due_ms,
            position: held.entry.position,
        })
        .await
    }

    /// The CRC check paired with the one made when the record was written.
    fn verify_read(&self, position: u64, bytes: &[u8]) -> Result<()> {
        record::parse_record(bytes).map(|_| ()).map_err(|e| EngineError::CorruptRecord {
            segment: format!("shard {}", self.id),
            offset_in_segment: position,
            position,
            detail: format!("record read back failed verification: {e}"),
        })
    }

    /// The record at a location, or `None` if retention deleted it.
    pub async fn read_location(&self, loc: RecordLocation) -> Result<Option<StoredRecord>> {
        if loc.position < self.log.start() {
            return Ok(None);
        }
        let bytes = self.log.read(loc.position, loc.size_bytes as usize).await?;
        self.verify_read(loc.position, &bytes)?;
        Ok(Some(StoredRecord { offset: 0, position: loc.position, bytes }))
    }

    /// The latest record stored with this message id.
    pub async fn by_message_id(&self, message_id: &str) -> Result<Option<StoredRecord>> {
        let (index, id) = (self.index.clone(), message_id.to_string());
        let loc = glommio::executor().spawn_blocking(move || index.message_id(&id)).await?;
        match loc {
            Some(loc) => self.read_location(loc).await,
            None => Ok(None),
        }
    }

    /// Up to `limit` records stored with this message id, newest first (a message and its
    /// dead-letter copy share their id). Records retention removed are left out.
    pub async fn all_by_message_id(&self, message_id: &str, limit: usize) -> Result<Vec<StoredRecord>> {
        let (index, id) = (self.index.clone(), message_id.to_string());
        let locs = glommio::executor().spawn_blocking(move || index.message_ids(&id, limit)).await?;
        self.read_locations(locs).await
    }

    /// Up to `limit` records carrying `key`, newest first. Records retention removed are
    /// left out.
    pub async fn by_key(&self, key: &str, limit: usize) -> Result<Vec<StoredRecord>> {
        let (index, k) = (self.index.clone(), key.to_string());
        let locs = glommio::executor().spawn_blocking(move || index.message_key(&k, limit)).await?;
        self.read_locations(locs).await
    }

    async fn read_locations(&self, locs: Vec<RecordLocation>) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::with_capacity(locs.len());
        for loc in locs {
            out.extend(self.read_location(loc).await?);
        }
        Ok(out)
    }

    pub async fn commit_consumer_offset(&self, group: &str, queue: &str, offset: u64) -> Result<()> {
        validate_queue_name(queue)?;
        if group.is_empty() || group.len() > crate::config::RECORD_ID_MAX_BYTES {
            return Err(EngineError::InvalidRecord(format!(
                "consumer group name must be 1..=255 bytes, got {}",
                group.len()
            )));
        }
        self.append_control(&ControlOp::SetConsumerOffset { group: group.into(), queue: queue.into(), offset }).await
    }

    pub async fn consumer_offset(&self, group: &str, queue: &str) -> Result<Option<u64>> {
        let (index, g, q) = (self.index.clone(), group.to_string(), queue.to_string());
        glommio::executor().spawn_blocking(move || index.consumer_offset(&g, &q)).await
    }

    pub async fn put_state(&self, table: StateTable, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        check_state_sizes(&key, Some(&value))?;
        self.append_control(&ControlOp::PutState { table, key, value }).await
    }

    pub async fn delete_state(&self, table: StateTable, key: Vec<u8>) -> Result<()> {
        check_state_sizes(&key, None)?;
        self.append_control(&ControlOp::DeleteState { table, key }).await
    }

    pub async fn state(&self, table: StateTable, key: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.state(table, &key)).await
    }

    /// Up to `limit` entries of a state table in key order, from the first key >= `from`.
    /// Reads the index, so a write is seen once it is indexed (after its append returned).
    pub async fn state_scan(&self, table: StateTable, from: Vec<u8>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.state_scan(table, &from, limit)).await
    }

    /// Up to `limit` names of indexed queues in name order, from the first one >= `from`:
    /// a cursor for walking every queue in bounded steps.
    pub async fn queue_names_from(&self, from: Vec<u8>, limit: usize) -> Result<Vec<String>> {
        let index = self.index.clone();
        glommio::executor().spawn_blocking(move || index.queue_names_from(&from, limit)).await
    }

    /// Deletes a queue and its index entries. Its records stay in the log until retention.
    /// The queue disappears when the deletion is indexed; appends meanwhile are refused.
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.check_writable()?;
        self.mark_deleting(queue)?;
        let result = self.append_control(&ControlOp::DeleteQueue { queue: queue.into() }).await;
        if result.is_err() {
            if let Some(state) = self.queues.borrow_mut().get_mut(queue) {
                state.deleting = false;
            }
        }
        result
    }

    /// Makes the queue resident (a deletion in progress keeps it so) and marks it.
    fn mark_deleting(&self, queue: &str) -> Result<()> {
        let mut queues = self.queues.borrow_mut();
        self.make_resident(&mut queues, queue)?;
        match queues.get_mut(queue) {
            Some(state) if state.deleting => Err(EngineError::QueueBeingDeleted(queue.to_string())),
            Some(state) => {
                state.deleting = true;
                Ok(())
            }
            None => Err(EngineError::QueueNotFound(queue.to_string())),
        }
    }

    /// A queue's counters, from memory if it is resident, else from its index metadata (an
    /// evicted queue has nothing unindexed; a point read, normally from RocksDB's memtable or
    /// block cache, else the OS page cache). `None` if it does not exist.
    pub fn queue_info(&self, queue: &str) -> Result<Option<QueueInfo>> {
        if let Some(q) = self.queues.borrow().get(queue) {
            return Ok(Some(QueueInfo {
                min_offset: q.min_offset,
                max_offset: q.visible_offset,
                created_ms: q.created_ms,
                last_append_ms: q.last_append_ms,
            }));
        }
        Ok(self.index.queue_meta(queue)?.map(|m| QueueInfo {
            min_offset: m.min_offset,
            max_offset: m.next_offset,
            created_ms: m.created_ms,
            last_append_ms: m.last_append_ms,
        }))
    }

    /// When this shard acknowledges appends (reported in the broker's stats).
    pub fn durability(&self) -> Durability {
        self.config.durability
    }

    pub fn stats(&self) -> ShardStats {
        let mut stats = self.stats.borrow().clone();
        stats.queues = self.queue_count.get() as usize;
        stats.queues_resident = self.queues.borrow().len();
        stats.log_start = self.log.start();
        stats.log_end = self.log.written_end();
        stats.durable_end = self.log.durable_end();
        let (hits, misses, held_bytes) = self.log.tail_cache_stats();
        (stats.tail_cache_hits, stats.tail_cache_misses, stats.tail_cache_bytes) = (hits, misses, held_bytes as u64);
        stats.log_zeroed_bytes = self.log.zeroed_bytes();
        stats.index_memtable_bytes = self.index.memtable_bytes();
        stats.index_block_cache_bytes = self.index.block_cache_bytes();
        stats.disk_free_bytes = self.disk_free_bytes();
        stats
    }

    async fn run_eviction(shard: Weak<Shard>) {
        let Some(idle_ms) = shard.upgrade().map(|s| s.config.queue_idle_evict_ms) else { return };
        let tick_ms = (idle_ms / 2).clamp(1, EVICTION_TICK_MAX_MS);
        loop {
            glommio::timer::sleep(Duration::from_millis(tick_ms)).await;
            let Some(shard) = shard.upgrade() else { return };
            if shard.closing.get() {
                return;
            }
            shard.evict_idle(now_ms());
        }
    }

    /// Evicts resident queues idle for `queue_idle_evict_ms` as of `now_ms` (wall clock),
    /// looking at no more than `EVICTION_CHECKS_PER_TICK_MAX` of them. Returns how many went.
    /// The shard runs this itself; it is public so tests can run a pass at a chosen time.
    pub fn evict_idle(&self, now_ms: u64) -> usize {
        let idle_ms = self.config.queue_idle_evict_ms;
        let mut queues = self.queues.borrow_mut();
        let mut checks = self.eviction_checks.borrow_mut();
        let mut evicted = 0;
        for _ in 0..EVICTION_CHECKS_PER_TICK_MAX {
            // A check further out than one idle period means the clock stepped back: due now,
            // so one such step cannot stall eviction for as long as it went back.
            if checks.front().is_none_or(|c| c.check_after_ms > now_ms && c.check_after_ms <= now_ms + idle_ms) {
                break;
            }
            let check = checks.pop_front().expect("front exists");
            // Gone (deleted) or re-created since: the new one has a check of its own.
            let Some(queue) = queues.get(&*check.name).filter(|q| q.generation == check.generation) else {
                continue;
            };
            let settled = queue.next_offset == queue.visible_offset && !queue.deleting;
            if settled && now_ms.saturating_sub(queue.last_append_ms) >= idle_ms {
                queues.remove(&*check.name);
                evicted += 1;
            } else {
                checks.push_back(EvictionCheck { check_after_ms: now_ms + idle_ms, ..check });
            }
        }
        if queues.capacity() > 1024 && queues.len() * SHRINK_FACTOR < queues.capacity() {
            let keep = queues.len() * 2;
            queues.shrink_to(keep);
        }
        if checks.capacity() > 1024 && checks.len() * SHRINK_FACTOR < checks.capacity() {
            let keep = checks.len() * 2;
            checks.shrink_to(keep);
        }
        self.stats.borrow_mut().queues_evicted += evicted as u64;
        evicted
    }

    async fn run_retention(shard: Weak<Shard>, check_interval_ms: u64) {
        loop {
            glommio::timer::sleep(Duration::from_millis(check_interval_ms)).await;
            let Some(shard) = shard.upgrade() else { return };
            if shard.closing.get() {
                return;
            }
            if let Err(err) = shard.enforce_retention().await {
                tracing::warn!(shard = shard.id, error = %err, "retention pass failed");
            }
        }
    }

    /// Deletes the oldest sealed segments that are too old or over the size budget, then drops
    /// index entries that pointed into them. Only segments the durable index covers are deleted,
    /// and one pass runs at a time.
    pub async fn enforce_retention(&self) -> Result<usize> {
        if self.retention_running.replace(true) {
            return Ok(0);
        }
        let result = self.retention_pass().await;
        self.retention_running.set(false);
        result
    }

    async fn retention_pass(&self) -> Result<usize> {
        let retention = self.config.retention;
        let mut total = self.log.size_bytes();
        let mut doomed = Vec::new();
        for (base, end) in self.log.sealed_segments() {
            let too_big = retention.max_log_bytes_per_shard.is_some_and(|max| total > max);
            let too_old = match retention.max_age {
                Some(max_age) => self.log.segment_modified(base)?.elapsed().is_ok_and(|age| age > max_age),
                None => false,
            };
            if !too_big && !too_old {
                break;
            }
            total -= end - base;
            doomed.push((base, end));
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        // The durable index must cover a segment before it goes, or a restart would lose what
        // only its records held (consumer offsets, deletions, queue offsets).
        self.flush_index().await?;
        let covered = self.index_flushed_at.get();
        let mut deleted = 0;
        for (base, end) in doomed {
            // Strictly below: the checkpoint's own last batch must stay readable.
            if end >= covered {
                break;
            }
            self.log.remove_oldest(base).await?;
            tracing::info!(shard = self.id, base, "retention deleted segment");
            deleted += 1;
        }
        self.trim_queues().await?;
        Ok(deleted)
    }

    /// Advances queue minimum offsets past deleted log and removes their stale index entries:
    /// the resident queues', then the evicted ones', found by walking the index.
    async fn trim_queues(&self) -> Result<()> {
        let log_start = self.log.start();
        let queues: Vec<(String, u64, u64, u64)> = self
            .queues
            .borrow()
            .iter()
            .map(|(n, q)| (n.to_string(), q.generation, q.min_offset, q.visible_offset))
            .collect();
        let index = self.index.clone();
        let found = glommio::executor()
            .spawn_blocking(move || -> Result<Vec<(String, u64, u64)>> {
                let mut out = Vec::new();
                for (name, generation, min, max) in queues {
                    let new_min = first_offset_at_or_after(&index, &name, min, max, log_start)?;
                    if new_min > min {
                        out.push((name, generation, new_min));
                    }
                }
                Ok(out)
            })
            .await?;
        self.apply_resident_trims(found)?;
        self.trim_evicted_queues(log_start).await
    }

    fn apply_resident_trims(&self, found: Vec<(String, u64, u64)>) -> Result<()> {
        let mut queues = self.queues.borrow_mut();
        let mut batch = self.index.batch();
        for (name, generation, new_min) in found {
            // The queue may have been deleted and re-created while the search ran.
            let Some(queue) = queues.get_mut(name.as_str()).filter(|q| q.generation == generation && !q.deleting)
            else {
                continue;
            };
            queue.min_offset = queue.min_offset.max(new_min);
            batch.trim_queue(&name, queue.min_offset);
            batch.put_queue_meta(&name, &meta_of(queue, queue.visible_offset));
        }
        self.index.write(batch)
    }

    async fn trim_evicted_queues(&self, log_start: u64) -> Result<()> {
        let mut after: Option<String> = None;
        loop {
            let index = self.index.clone();
            let cursor = after.take();
            let (last, found) = glommio::executor()
                .spawn_blocking(move || -> Result<(Option<String>, Vec<EvictedTrim>)> {
                    let metas = index.queue_metas_after(cursor.as_deref(), TRIM_PAGE_QUEUES)?;
                    let mut found = Vec::new();
                    for (name, meta) in &metas {
                        let new_min =
                            first_offset_at_or_after(&index, name, meta.min_offset, meta.next_offset, log_start)?;
                        if new_min > meta.min_offset {
                            found.push((name.clone(), *meta, new_min));
                        }
                    }
                    let last = (metas.len() == TRIM_PAGE_QUEUES).then(|| metas.last().expect("full page").0.clone());
                    Ok((last, found))
                })
                .await?;
            self.apply_evicted_trims(found)?;
            let Some(last) = last else { return Ok(()) };
            after = Some(last);
        }
    }

    fn apply_evicted_trims(&self, found: Vec<EvictedTrim>) -> Result<()> {
        let queues = self.queues.borrow();
        let mut batch = self.index.batch();
        for (name, meta, new_min) in found {
            // Resident ones were trimmed already (or are new); an evicted one is trimmed only
            // if its metadata did not change while the search ran.
            if queues.contains_key(name.as_str()) || self.index.queue_meta(&name)? != Some(meta) {
                continue;
            }
            batch.trim_queue(&name, new_min);
            batch.put_queue_meta(&name, &QueueMeta { min_offset: new_min, ..meta });
        }
        self.index.write(batch)
    }

    /// Finishes every staged append, syncs the log and flushes the index.
    pub async fn close(&self) -> Result<()> {
        self.closing.set(true);
        self.log.abandon_space_waits();
        while self.log.has_staged() || !self.waiters.borrow().is_empty() {
            if self.failed.borrow().is_some() {
                break;
            }
            self.committer_wake.notify();
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        self.committer_wake.notify();
        if self.failed.borrow().is_some() {
            return Ok(());
        }
        self.flush_index().await?;
        // Everything is durable and indexed: the next start need not look for torn writes.
        let dir = self.config.shard_dir(self.id);
        let marker = dir.join(CLEAN_SHUTDOWN_MARKER);
        std::fs::write(&marker, b"").map_err(|e| EngineError::io("writing shutdown marker", marker.display(), e))?;
        sync_dir(&dir)
    }
}

fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io("syncing directory", dir.display(), e))
}

impl QueueState {
    fn new(generation: u64, first_offset: u64, now_ms: u64) -> Self {
        QueueState {
            generation,
            deleting: false,
            next_offset: first_offset,
            visible_offset: first_offset,
            min_offset: first_offset,
            created_ms: now_ms,
            last_append_ms: now_ms,
        }
    }

    /// An existing queue as its index metadata describes it (nothing staged, all visible).
    fn from_meta(generation: u64, meta: &QueueMeta) -> Self {
        let mut state = QueueState::new(generation, meta.next_offset, meta.created_ms);
        state.min_offset = meta.min_offset;
        state.last_append_ms = meta.last_append_ms;
        state
    }
}

fn check_state_sizes(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    if key.is_empty() || key.len() > STATE_KEY_MAX_BYTES {
        return Err(EngineError::InvalidRecord(format!("state key must be 1..={STATE_KEY_MAX_BYTES} bytes")));
    }
    if value.is_some_and(|v| v.len() > STATE_VALUE_MAX_BYTES) {
        return Err(EngineError::InvalidRecord(format!("state value must be at most {STATE_VALUE_MAX_BYTES} bytes")));
    }
    Ok(())
}

/// Binary search for the first offset in `[min, max)` whose record is at or after `log_start`.
fn first_offset_at_or_after(index: &Index, queue: &str, min: u64, max: u64, log_start: u64) -> Result<u64> {
    let (mut lo, mut hi) = (min, max);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match index.queue_entry(queue, mid)? {
            Some(entry) if entry.position >= log_start => hi = mid,
            _ => lo = mid + 1,
        }
    }
    Ok(lo)
}

fn replay_error(position: u64, detail: String) -> EngineError {
    EngineError::CorruptRecord { segment: "log".into(), offset_in_segment: position, position, detail }
}

/// Per-round record of how far each touched queue got.
struct Touch {
    next_offset: u64,
    last_append_ms: u64,
}

/// Whether `index_record` runs on the live append path or rebuilds the queue table in replay.
/// Replay makes each queue it touches resident, from its index metadata if the queue existed
/// before (and was not deleted earlier in the replay).
enum Replay<'a> {
    Live,
    Rebuilding { next_generation: &'a mut u64, index: &'a Index, deleted: &'a mut HashSet<String> },
}

/// Adds one record's index entries (or applies a control record) to `batch`. The same code
/// indexes live rounds and replays the log, so recovery rebuilds exactly what was there.
fn index_record<'r>(
    batch: &mut IndexBatch<'_>,
    touched: &mut HashMap<&'r str, Touch>,
    position: u64,
    size_bytes: u32,
    view: &RecordView<'r>,
    queues: &mut QueueTable,
    mut replay: Replay<'_>,
) -> Result<()> {
    if view.is_control() {
        let op =
            ControlOp::decode(view.body).ok_or_else(|| replay_error(position, "malformed control record".into()))?;
        match op {
            ControlOp::SetConsumerOffset { group, queue, offset } => batch.set_consumer_offset(&group, &queue, offset),
            ControlOp::DeleteQueue { queue } => {
                batch.delete_queue(&queue);
                touched.remove(queue.as_str());
                queues.remove(queue.as_str());
                if let Replay::Rebuilding { deleted, .. } = &mut replay {
                    deleted.insert(queue);
                }
            }
            ControlOp::PutState { table, key, value } => batch.put_state(table, &key, &value),
            ControlOp::DeleteState { table, key } => batch.delete_state(table, &key),
            ControlOp::Dispatch { kind, due_ms, entry } => {
                // The held record enters the queues named by this control record, at the
                // offsets this control record was given.
                for (queue, offset) in view.queue_refs() {
                    add_entry(batch, touched, queues, &mut replay, queue, entry.at(offset), view.store_ms)?;
                }
                batch.delete_held(kind, due_ms, entry.position);
            }
            ControlOp::DiscardHeld { kind, due_ms, position } => batch.delete_held(kind, due_ms, position),
        }
        return Ok(());
    }
    let location = RecordLocation { position, size_bytes };
    let entry = QueueEntry::of_record(view, position, size_bytes);
    if view.is_held() {
        let kind = if view.attributes.txn_state == txn_state::HALF { HeldKind::Half } else { HeldKind::Timer };
        let held = HeldMessage {
            kind,
            due_ms: if kind == HeldKind::Timer { view.attributes.delivery_ms } else { 0 },
            entry,
            message_id: view.message_id.to_string(),
            queues: view.queue_refs().map(|(q, _)| q.to_string()).collect(),
        };
        batch.put_held(&held);
    } else {
        for (queue, offset) in view.queue_refs() {
            add_entry(batch, touched, queues, &mut replay, queue, entry.at(offset), view.store_ms)?;
        }
    }
    if !view.message_id.is_empty() {
        batch.put_message_id(view.message_id, location);
    }
    for key in view.keys() {
        batch.put_message_key(key, location);
    }
    Ok(())
}

/// Indexes one queue offset and records how far the queue got in this round.
fn add_entry<'r>(
    batch: &mut IndexBatch<'_>,
    touched: &mut HashMap<&'r str, Touch>,
    queues: &mut QueueTable,
    replay: &mut Replay<'_>,
    queue: &'r str,
    entry: QueueEntry,
    store_ms: u64,
) -> Result<()> {
    let offset = entry.offset;
    assert_ne!(offset, OFFSET_HELD, "a held offset is never indexed");
    batch.put_entry(queue, &entry);
    // Keyed by the name inside the round's own buffer: no allocation per queue.
    let touch = touched.entry(queue).or_insert(Touch { next_offset: 0, last_append_ms: 0 });
    touch.next_offset = touch.next_offset.max(offset + 1);
    touch.last_append_ms = touch.last_append_ms.max(store_ms);
    if let Replay::Rebuilding { next_generation, index, deleted } = replay {
        if !queues.contains_key(queue) {
            let generation = **next_generation;
            **next_generation += 1;
            let known = if deleted.contains(queue) { None } else { index.queue_meta(queue)? };
            let state = match known {
                Some(meta) => QueueState::from_meta(generation, &meta),
                None => QueueState::new(generation, offset, store_ms),
            };
            queues.insert(queue.into(), state);
        }
        let state = queues.get_mut(queue).expect("inserted above");
        state.next_offset = state.next_offset.max(offset + 1);
        state.visible_offset = state.next_offset;
        state.last_append_ms = state.last_append_ms.max(store_ms);
    }
    Ok(())
}

fn meta_of(queue: &QueueState, next_offset: u64) -> QueueMeta {
    QueueMeta {
        next_offset,
        min_offset: queue.min_offset,
        created_ms: queue.created_ms,
        last_append_ms: queue.last_append_ms,
    }
}

fn write_queue_meta(batch: &mut IndexBatch<'_>, touched: &HashMap<&str, Touch>, queues: &QueueTable) {
    for (name, touch) in touched {
        if let Some(queue) = queues.get(*name) {
            let mut meta = meta_of(queue, touch.next_offset);
            meta.last_append_ms = touch.last_append_ms;
            batch.put_queue_meta(name, &meta);
        }
    }
}
