//! A shard's RocksDB index. The CommitLog is the log, so RocksDB's WAL is off: every write
//! batch also records the log position it covers (the checkpoint), and column families are
//! flushed atomically, so whatever survives a crash is a consistent prefix of the log. Recovery
//! replays the log from that checkpoint.
//!
//! Keys are length-prefixed so one queue's entries are one contiguous, prefix-free range.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, FlushOptions, Options, ReadOptions, ReadTier, WriteBatch,
    WriteOptions, DB,
};

use crate::error::{EngineError, Result};

pub const CF_QUEUE_INDEX: &str = "queue_index";
pub const CF_QUEUE_META: &str = "queue_meta";
/// A message id's latest location (written before `CF_MESSAGE_ID_AT`; read for older data).
pub const CF_MESSAGE_ID: &str = "message_id";
/// Every location of a message id (an original and its dead-letter copy share their id).
pub const CF_MESSAGE_ID_AT: &str = "message_id_at";
pub const CF_MESSAGE_KEY: &str = "message_key";
pub const CF_CONSUMER_OFFSET: &str = "consumer_offset";
pub const CF_POP_STATE: &str = "pop_state";
pub const CF_TIMER: &str = "timer";
/// Half messages of open transactions, by log position.
pub const CF_HALF: &str = "half";
pub const CF_LITE_META: &str = "lite_meta";
pub const CF_QUEUE_CONFIG: &str = "queue_config";
const CF_META: &str = "meta";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// Memtable size of the queue-index column family.
const QUEUE_INDEX_MEMTABLE_BYTES: usize = 128 << 20;
/// Marks a block-cache-only read that would have needed disk I/O.
const NOT_CACHED: &str = "queue range (not cached)";

const ALL_CFS: [&str; 12] = [
    CF_QUEUE_INDEX,
    CF_HALF,
    CF_QUEUE_META,
    CF_MESSAGE_ID,
    CF_MESSAGE_ID_AT,
    CF_MESSAGE_KEY,
    CF_CONSUMER_OFFSET,
    CF_POP_STATE,
    CF_TIMER,
    CF_LITE_META,
    CF_QUEUE_CONFIG,
    CF_META,
];

/// Tables of opaque durable state kept for the layers above (pop consumption, delay timers,
/// lite-topic subscriptions). Writes to them go through the CommitLog like everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateTable {
    PopState = 1,
    Timer = 2,
    LiteMeta = 3,
    /// Per-queue settings of the layers above (a topic queue's message type).
    QueueConfig = 4,
}

impl StateTable {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(StateTable::PopState),
            2 => Some(StateTable::Timer),
            3 => Some(StateTable::LiteMeta),
            4 => Some(StateTable::QueueConfig),
            _ => None,
        }
    }

    fn cf(self) -> &'static str {
        match self {
            StateTable::PopState => CF_POP_STATE,
            StateTable::Timer => CF_TIMER,
            StateTable::LiteMeta => CF_LITE_META,
            StateTable::QueueConfig => CF_QUEUE_CONFIG,
        }
    }
}

/// The log prefix an index covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub end: u64,
    pub last_batch: Option<u64>,
}

/// Where one queue offset's record lives, and what the scheduler reads about it without
/// reading the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueEntry {
    pub offset: u64,
    pub position: u64,
    pub size_bytes: u32,
    pub tag_hash: u32,
    pub store_ms: u64,
    pub message_type: u8,
    pub txn_state: u8,
    pub priority: i32,
    /// `record::name_hash` of the message group; 0 for none.
    pub group_hash: u64,
    /// `record::name_hash` of the entry's sub-stream key: the lite topic on a lite queue, the
    /// fairness key (`fair_key`, the tenant) on a fair topic; 0 for none.
    pub key_hash: u64,
    pub delivery_ms: u64,
}

/// Value bytes of a queue entry written before attributes existed (format v2).
const ENTRY_V2_BYTES: usize = 24;
/// Value bytes of a queue entry now.
pub const ENTRY_BYTES: usize = 56;

impl QueueEntry {
    /// The entry of a record at `position`, from the record's own fields.
    pub fn of_record(view: &crate::record::RecordView<'_>, position: u64, size_bytes: u32) -> QueueEntry {
        let a = &view.attributes;
        QueueEntry {
            offset: 0,
            position,
            size_bytes,
            tag_hash: crate::record::tag_hash(view.tag),
            store_ms: view.store_ms,
            message_type: a.message_type,
            txn_state: a.txn_state,
            priority: a.priority,
            group_hash: crate::record::name_hash(a.message_group),
            key_hash: crate::record::name_hash(if a.lite_topic.is_empty() { a.fair_key } else { a.lite_topic }),
            delivery_ms: a.delivery_ms,
        }
    }

    pub fn at(self, offset: u64) -> QueueEntry {
        QueueEntry { offset, ..self }
    }

    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0..8].copy_from_slice(&self.position.to_le_bytes());
        out[8..12].copy_from_slice(&self.size_bytes.to_le_bytes());
        out[12..16].copy_from_slice(&self.tag_hash.to_le_bytes());
        out[16..24].copy_from_slice(&self.store_ms.to_le_bytes());
        out[24] = self.message_type;
        out[25] = self.txn_state;
        out[28..32].copy_from_slice(&self.priority.to_le_bytes());
        out[32..40].copy_from_slice(&self.group_hash.to_le_bytes());
        out[40..48].copy_from_slice(&self.key_hash.to_le_bytes());
        out[48..56].copy_from_slice(&self.delivery_ms.to_le_bytes());
        out
    }

    /// Reads an entry value of either format; `None` for any other length.
    pub fn decode(offset: u64, value: &[u8]) -> Option<QueueEntry> {
        if value.len() != ENTRY_V2_BYTES && value.len() != ENTRY_BYTES {
            return None;
        }
        let mut entry = QueueEntry {
            offset,
            position: crate::record::le_u64(value, 0),
            size_bytes: crate::record::le_u32(value, 8),
            tag_hash: crate::record::le_u32(value, 12),
            store_ms: crate::record::le_u64(value, 16),
            message_type: sluice_transport::model::message_type::NORMAL,
            ..QueueEntry::default()
        };
        if value.len() == ENTRY_BYTES {
            entry.message_type = if value[24] == 0 { entry.message_type } else { value[24] };
            entry.txn_state = value[25];
            entry.priority = i32::from_le_bytes([value[28], value[29], value[30], value[31]]);
            entry.group_hash = crate::record::le_u64(value, 32);
            entry.key_hash = crate::record::le_u64(value, 40);
            entry.delivery_ms = crate::record::le_u64(value, 48);
        }
        Some(entry)
    }
}

/// A stored record that waits before it enters its queues: a delay message (until `due_ms`)
/// or the half message of an open transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMessage {
    pub kind: HeldKind,
    /// For a timer, when it is due; 0 for a half message.
    pub due_ms: u64,
    /// The record's entry (offset unset until it is dispatched).
    pub entry: QueueEntry,
    pub message_id: String,
    /// The queues it enters when dispatched.
    pub queues: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeldKind {
    Timer = 1,
    Half = 2,
}

impl HeldKind {
    pub fn from_u8(v: u8) -> Option<HeldKind> {
        match v {
            1 => Some(HeldKind::Timer),
            2 => Some(HeldKind::Half),
            _ => None,
        }
    }
}

impl HeldMessage {
    fn key(&self) -> Vec<u8> {
        held_key(self.kind, self.due_ms, self.entry.position)
    }

    /// `entry | id_len u8, id | queue_count u8 | (len u8, name)*`
    fn encode_value(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENTRY_BYTES + 2 + self.message_id.len() + self.queues.len() * 32);
        out.extend_from_slice(&self.entry.encode());
        out.push(self.message_id.len() as u8);
        out.extend_from_slice(self.message_id.as_bytes());
        out.push(self.queues.len() as u8);
        for queue in &self.queues {
            out.push(queue.len() as u8);
            out.extend_from_slice(queue.as_bytes());
        }
        out
    }

    fn decode(kind: HeldKind, key: &[u8], value: &[u8]) -> Option<HeldMessage> {
        let (due_ms, position) = match kind {
            HeldKind::Timer if key.len() == 16 => (be_u64(&key[..8]), be_u64(&key[8..])),
            HeldKind::Half if key.len() == 8 => (0, be_u64(key)),
            _ => return None,
        };
        let entry = QueueEntry::decode(0, value.get(..ENTRY_BYTES)?)?;
        if entry.position != position {
            return None;
        }
        let mut at = ENTRY_BYTES;
        let mut text = || -> Option<String> {
            let len = usize::from(*value.get(at)?);
            let bytes = value.get(at + 1..at + 1 + len)?;
            at += 1 + len;
            String::from_utf8(bytes.to_vec()).ok()
        };
        let message_id = text()?;
        let count = usize::from(*value.get(at)?);
        at += 1;
        let mut queues = Vec::with_capacity(count);
        for _ in 0..count {
            let len = usize::from(*value.get(at)?);
            queues.push(String::from_utf8(value.get(at + 1..at + 1 + len)?.to_vec()).ok()?);
            at += 1 + len;
        }
        (at == value.len()).then_some(HeldMessage { kind, due_ms, entry, message_id, queues })
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    u64::from_be_bytes(b)
}

/// Timers sort by due time, then position; half messages by position.
pub fn held_key(kind: HeldKind, due_ms: u64, position: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    if kind == HeldKind::Timer {
        key.extend_from_slice(&due_ms.to_be_bytes());
    }
    key.extend_from_slice(&position.to_be_bytes());
    key
}

fn held_cf(kind: HeldKind) -> &'static str {
    match kind {
        HeldKind::Timer => CF_TIMER,
        HeldKind::Half => CF_HALF,
    }
}

/// Persistent per-queue counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueMeta {
    pub next_offset: u64,
    pub min_offset: u64,
    pub created_ms: u64,
    pub last_append_ms: u64,
}

impl QueueMeta {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [self.next_offset, self.min_offset, self.created_ms, self.last_append_ms].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(src: &[u8]) -> Option<Self> {
        if src.len() != 32 {
            return None;
        }
        let f = |i: usize| crate::record::le_u64(src, i * 8);
        Some(QueueMeta { next_offset: f(0), min_offset: f(1), created_ms: f(2), last_append_ms: f(3) })
    }
}

fn decode_entry(key: &[u8], value: &[u8]) -> Option<QueueEntry> {
    if key.len() < 8 {
        return None;
    }
    QueueEntry::decode(be_u64(&key[key.len() - 8..]), value)
}

/// `[len][name]`, the prefix of all of one name's keys.
fn prefixed(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 9);
    key.push(name.len() as u8);
    key.extend_from_slice(name.as_bytes());
    key
}

fn queue_key(queue: &str, offset: u64) -> Vec<u8> {
    let mut key = prefixed(queue);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

fn consumer_key(group: &str, queue: &str) -> Vec<u8> {
    let mut key = prefixed(group);
    key.extend_from_slice(&prefixed(queue));
    key
}

/// Location of a stored record, from the id and key indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLocation {
    pub position: u64,
    pub size_bytes: u32,
}

fn decode_location(value: &[u8]) -> Option<RecordLocation> {
    (value.len() == 12).then(|| RecordLocation {
        position: crate::record::le_u64(value, 0),
        size_bytes: crate::record::le_u32(value, 8),
    })
}

fn corrupt(what: &'static str) -> EngineError {
    EngineError::Index {
        what,
        message: "malformed value; rebuild the index by deleting it (it is replayed from the log)".into(),
    }
}

/// RocksDB's process-wide environment with its flush and compaction threads at the lowest CPU
/// priority (nice 19). A group commit's O_DSYNC write completes in a kernel worker on the CPU
/// that takes the disk's interrupt; on a small host that CPU also runs these threads, and at
/// equal priority the worker waited behind them for milliseconds per write. They still get
/// every idle cycle, and if they fall behind RocksDB slows the writer as it would anyway.
fn background_env() -> Result<rocksdb::Env> {
    let mut env = rocksdb::Env::new().map_err(|e| EngineError::index("environment", e))?;
    env.lower_thread_pool_cpu_priority();
    env.lower_high_priority_thread_pool_cpu_priority();
    Ok(env)
}

/// The RocksDB instance of one shard. Cloning shares the same database.
#[derive(Clone)]
pub struct Index {
    db: Arc<DB>,
    block_cache: Cache,
}

impl Index {
    pub fn open(path: &Path, block_cache_bytes: usize) -> Result<Index> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // All CFs flush together, so the checkpoint in `meta` matches the entries on disk.
        opts.set_atomic_flush(true);
        opts.set_max_background_jobs(2);
        opts.set_max_open_files(512);
        opts.set_env(&background_env()?);
        let cache = Cache::new_lru_cache(block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_block_based_table_factory(&table);
            // Entries are small and short-lived: compressing them cost more CPU than it saved.
            cf_opts.set_compression_type(rocksdb::DBCompressionType::None);
            if *name == CF_QUEUE_INDEX {
                // The busiest family: bigger memtables mean fewer flushes and compactions.
                cf_opts.set_write_buffer_size(QUEUE_INDEX_MEMTABLE_BYTES);
            }
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| EngineError::index("open", e))?;
        Ok(Index { db: Arc::new(db), block_cache: cache })
    }

    /// Bytes the memtables of every column family hold (bounded by their write buffer sizes;
    /// flushed to disk beyond them).
    pub fn memtable_bytes(&self) -> u64 {
        ALL_CFS
            .iter()
            .filter_map(|name| {
                self.db.property_int_value_cf(self.cf(name), "rocksdb.cur-size-all-mem-tables").ok().flatten()
            })
            .sum()
    }

    /// Bytes the block cache holds (bounded by `index_block_cache_bytes`).
    pub fn block_cache_bytes(&self) -> u64 {
        self.block_cache.get_usage() as u64
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every column family is created at open")
    }

    /// How far the index covers the log: the end position and the start of the last batch
    /// indexed (so the log can be checked to really hold that batch).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let value =
            self.db.get_cf(self.cf(CF_META), CHECKPOINT_KEY).map_err(|e| EngineError::index("read checkpoint", e))?;
        match value {
            None => Ok(Checkpoint::default()),
            Some(v) if v.len() == 16 => {
                let end = crate::record::le_u64(&v, 0);
                let last_batch = crate::record::le_u64(&v, 8);
                Ok(Checkpoint { end, last_batch: (end > 0).then_some(last_batch) })
            }
            Some(_) => Err(corrupt("checkpoint")),
        }
    }

    /// How many queues the index holds (one metadata key each).
    pub fn count_queues(&self) -> Result<u64> {
        let mut count = 0;
        for item in self.db.iterator_cf(self.cf(CF_QUEUE_META), rocksdb::IteratorMode::Start) {
            item.map_err(|e| EngineError::index("count queues", e))?;
            count += 1;
        }
        Ok(count)
    }

    /// A queue's metadata, `None` if the queue does not exist. A point read: served by the
    /// memtable or block cache for any recently used queue, and the bloom filter answers most
    /// lookups of names that do not exist.
    pub fn queue_meta(&self, queue: &str) -> Result<Option<QueueMeta>> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_QUEUE_META), queue.as_bytes())
            .map_err(|e| EngineError::index("read queue meta", e))?;
        value.map(|v| QueueMeta::decode(&v).ok_or_else(|| corrupt("queue meta"))).transpose()
    }

    /// Up to `limit` queues with their metadata in name order, from the first name > `after`
    /// (all from the start when `after` is `None`).
    pub fn queue_metas_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, QueueMeta)>> {
        let from = after.map_or(&[][..], str::as_bytes);
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_QUEUE_META), mode) {
            let (key, value) = item.map_err(|e| EngineError::index("queue metas", e))?;
            if after.is_some_and(|a| a.as_bytes() == &key[..]) {
                continue;
            }
            let name = String::from_utf8(key.into_vec()).map_err(|_| corrupt("queue name"))?;
            out.push((name, QueueMeta::decode(&value).ok_or_else(|| corrupt("queue meta"))?));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Up to `limit` queue names in name order, from the first one >= `from`.
    pub fn queue_names_from(&self, from: &[u8], limit: usize) -> Result<Vec<String>> {
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_QUEUE_META), mode).take(limit) {
            let (key, _) = item.map_err(|e| EngineError::index("queue names", e))?;
            out.push(String::from_utf8(key.into_vec()).map_err(|_| corrupt("queue name"))?);
        }
        Ok(out)
    }

    pub fn batch(&self) -> IndexBatch<'_> {
        IndexBatch { index: self, batch: WriteBatch::default() }
    }

    /// Entries `[from, end)` of a queue if they can be read without disk I/O (memtable or block
    /// cache); `None` means the caller should retry with `queue_range` off the reactor.
    pub fn queue_range_cached(&self, queue: &str, from: u64, end: u64) -> Result<Option<Vec<QueueEntry>>> {
        let mut opts = ReadOptions::default();
        opts.set_read_tier(ReadTier::BlockCache);
        match self.queue_range_with(queue, from, end, opts) {
            Ok(entries) => Ok(Some(entries)),
            Err(EngineError::Index { what: NOT_CACHED, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Entries `[from, end)` of a queue; may block on disk reads.
    pub fn queue_range(&self, queue: &str, from: u64, end: u64) -> Result<Vec<QueueEntry>> {
        self.queue_range_with(queue, from, end, ReadOptions::default())
    }

    fn queue_range_with(&self, queue: &str, from: u64, end: u64, mut opts: ReadOptions) -> Result<Vec<QueueEntry>> {
        if end <= from {
            return Ok(Vec::new());
        }
        opts.set_iterate_upper_bound(queue_key(queue, end));
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_QUEUE_INDEX), opts);
        iter.seek(queue_key(queue, from));
        let mut out = Vec::with_capacity((end - from).min(1024) as usize);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            out.push(decode_entry(key, value).ok_or_else(|| corrupt("queue entry"))?);
            iter.next();
        }
        iter.status().map_err(|e| match e.kind() {
            rocksdb::ErrorKind::Incomplete => EngineError::Index { what: NOT_CACHED, message: e.into_string() },
            _ => EngineError::index("queue range", e),
        })?;
        Ok(out)
    }

    pub fn queue_entry(&self, queue: &str, offset: u64) -> Result<Option<QueueEntry>> {
        let key = queue_key(queue, offset);
        let value =
            self.db.get_pinned_cf(self.cf(CF_QUEUE_INDEX), &key).map_err(|e| EngineError::index("queue entry", e))?;
        value.map(|v| decode_entry(&key, &v).ok_or_else(|| corrupt("queue entry"))).transpose()
    }

    /// The latest location of a message id.
    pub fn message_id(&self, message_id: &str) -> Result<Option<RecordLocation>> {
        Ok(self.message_ids(message_id, 1)?.into_iter().next())
    }

    /// Up to `limit` locations of a message id, newest first.
    pub fn message_ids(&self, message_id: &str, limit: usize) -> Result<Vec<RecordLocation>> {
        let mut found = self.locations_newest(CF_MESSAGE_ID_AT, message_id, limit, "message id")?;
        if found.len() >= limit {
            return Ok(found);
        }
        // A record stored before every location was kept is in the older table (its latest).
        let value = self.db.get_pinned_cf(self.cf(CF_MESSAGE_ID), message_id.as_bytes());
        let value = value.map_err(|e| EngineError::index("message id", e))?;
        if let Some(older) = value.map(|v| decode_location(&v).ok_or_else(|| corrupt("message id"))).transpose()? {
            if !found.iter().any(|l| l.position == older.position) {
                found.push(older);
                found.sort_by_key(|l| std::cmp::Reverse(l.position));
            }
        }
        Ok(found)
    }

    /// Up to `limit` records carrying `key`, newest first.
    pub fn message_key(&self, key: &str, limit: usize) -> Result<Vec<RecordLocation>> {
        self.locations_newest(CF_MESSAGE_KEY, key, limit, "message key")
    }

    /// Locations under `name` in a (name, position) → size table, from the highest position.
    fn locations_newest(&self, cf: &str, name: &str, limit: usize, what: &'static str) -> Result<Vec<RecordLocation>> {
        let prefix = prefixed(name);
        let mut last = prefix.clone();
        last.extend_from_slice(&[0xff; 8]);
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(prefix.clone());
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(cf), opts);
        iter.seek_for_prev(&last);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (iter.key(), iter.value()) {
            if out.len() >= limit || !k.starts_with(&prefix) {
                break;
            }
            // A longer name sharing the prefix bytes has another length byte, so this is ours.
            let position = k[prefix.len()..].try_into().map(u64::from_be_bytes).map_err(|_| corrupt(what))?;
            let size_bytes = (v.len() == 4).then(|| crate::record::le_u32(v, 0)).ok_or_else(|| corrupt(what))?;
            out.push(RecordLocation { position, size_bytes });
            iter.prev();
        }
        iter.status().map_err(|e| EngineError::index(what, e))?;
        Ok(out)
    }

    pub fn consumer_offset(&self, group: &str, queue: &str) -> Result<Option<u64>> {
        let value = self.db.get_pinned_cf(self.cf(CF_CONSUMER_OFFSET), consumer_key(group, queue));
        let value = value.map_err(|e| EngineError::index("consumer offset", e))?;
        value
            .map(|v| (v.len() == 8).then(|| crate::record::le_u64(&v, 0)).ok_or_else(|| corrupt("consumer offset")))
            .transpose()
    }

    pub fn state(&self, table: StateTable, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(table.cf()), key).map_err(|e| EngineError::index("state", e))
    }

    /// Up to `limit` entries of a state table in key order, from the first key >= `from`.
    pub fn state_scan(&self, table: StateTable, from: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(table.cf()), mode).take(limit) {
            let (key, value) = item.map_err(|e| EngineError::index("state scan", e))?;
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` held messages of `kind` in key order from the first key >= `from`
    /// (timers: due time then position; half messages: position).
    pub fn held_scan(&self, kind: HeldKind, from: &[u8], limit: usize) -> Result<Vec<HeldMessage>> {
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(held_cf(kind)), mode).take(limit) {
            let (key, value) = item.map_err(|e| EngineError::index("held scan", e))?;
            out.push(HeldMessage::decode(kind, &key, &value).ok_or_else(|| corrupt("held message"))?);
        }
        Ok(out)
    }

    pub fn held(&self, kind: HeldKind, due_ms: u64, position: u64) -> Result<Option<HeldMessage>> {
        let key = held_key(kind, due_ms, position);
        let value = self.db.get_pinned_cf(self.cf(held_cf(kind)), &key).map_err(|e| EngineError::index("held", e))?;
        value.map(|v| HeldMessage::decode(kind, &key, &v).ok_or_else(|| corrupt("held message"))).transpose()
    }

    /// Persists memtables of all column families atomically and waits for it.
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&rocksdb::ColumnFamily> = ALL_CFS.iter().map(|n| self.cf(n)).collect();
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &opts).map_err(|e| EngineError::index("flush", e))
    }

    pub fn write(&self, batch: IndexBatch<'_>) -> Result<()> {
        let mut opts = WriteOptions::default();
        // The CommitLog is the write-ahead log; this index is rebuilt from it after a crash.
        opts.disable_wal(true);
        self.db.write_opt(batch.batch, &opts).map_err(|e| EngineError::index("write", e))
    }
}

/// Index changes applied atomically, in log order.
pub struct IndexBatch<'a> {
    index: &'a Index,
    batch: WriteBatch,
}

impl IndexBatch<'_> {
    pub fn put_entry(&mut self, queue: &str, entry: &QueueEntry) {
        self.batch.put_cf(self.index.cf(CF_QUEUE_INDEX), queue_key(queue, entry.offset), entry.encode());
    }

    pub fn put_queue_meta(&mut self, queue: &str, meta: &QueueMeta) {
        self.batch.put_cf(self.index.cf(CF_QUEUE_META), queue.as_bytes(), meta.encode());
    }

    pub fn put_message_id(&mut self, message_id: &str, loc: RecordLocation) {
        let mut k = prefixed(message_id);
        k.extend_from_slice(&loc.position.to_be_bytes());
        self.batch.put_cf(self.index.cf(CF_MESSAGE_ID_AT), k, loc.size_bytes.to_le_bytes());
    }

    pub fn put_message_key(&mut self, key: &str, loc: RecordLocation) {
        let mut k = prefixed(key);
        k.extend_from_slice(&loc.position.to_be_bytes());
        self.batch.put_cf(self.index.cf(CF_MESSAGE_KEY), k, loc.size_bytes.to_le_bytes());
    }

    /// Removes a queue's entries and metadata.
    pub fn delete_queue(&mut self, queue: &str) {
        let cf = self.index.cf(CF_QUEUE_INDEX);
        self.batch.delete_range_cf(cf, queue_key(queue, 0), queue_key(queue, u64::MAX));
        self.batch.delete_cf(cf, queue_key(queue, u64::MAX));
        self.batch.delete_cf(self.index.cf(CF_QUEUE_META), queue.as_bytes());
    }

    pub fn set_consumer_offset(&mut self, group: &str, queue: &str, offset: u64) {
        self.batch.put_cf(self.index.cf(CF_CONSUMER_OFFSET), consumer_key(group, queue), offset.to_le_bytes());
    }

    pub fn put_state(&mut self, table: StateTable, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.index.cf(table.cf()), key, value);
    }

    pub fn delete_state(&mut self, table: StateTable, key: &[u8]) {
        self.batch.delete_cf(self.index.cf(table.cf()), key);
    }

    pub fn put_held(&mut self, held: &HeldMessage) {
        self.batch.put_cf(self.index.cf(held_cf(held.kind)), held.key(), held.encode_value());
    }

    pub fn delete_held(&mut self, kind: HeldKind, due_ms: u64, position: u64) {
        self.batch.delete_cf(self.index.cf(held_cf(kind)), held_key(kind, due_ms, position));
    }

    /// Removes index entries of `queue` below `offset` (their records were deleted by retention).
    pub fn trim_queue(&mut self, queue: &str, offset: u64) {
        self.batch.delete_range_cf(self.index.cf(CF_QUEUE_INDEX), queue_key(queue, 0), queue_key(queue, offset));
    }

    /// Records that the index covers the log up to `end`, whose last batch starts at `last_batch`.
    pub fn set_checkpoint(&mut self, end: u64, last_batch: u64) {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&end.to_le_bytes());
        value[8..].copy_from_slice(&last_batch.to_le_bytes());
        self.batch.put_cf(self.index.cf(CF_META), CHECKPOINT_KEY, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nice values of this process's threads named `name` (from /proc/self/task/*/stat).
    fn nice_of_threads(name: &str) -> Vec<i64> {
        let mut nice = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised command: state is field 3, nice is field 19.
            let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
            nice.push(after_comm.split(' ').nth(16).unwrap().parse().unwrap());
        }
        nice
    }

    #[test]
    fn rocksdb_flush_and_compaction_threads_run_at_the_lowest_cpu_priority() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let mut batch = index.batch();
        let entry = QueueEntry { offset: 0, position: 0, size_bytes: 10, store_ms: 1, ..Default::default() };
        batch.put_entry("q", &entry);
        index.write(batch).unwrap();
        // A flush runs on the high-priority pool; a thread takes its priority with its first job.
        index.flush().unwrap();
        let flushers = nice_of_threads("rocksdb:high");
        assert!(!flushers.is_empty(), "no RocksDB flush thread found");
        // Every index opens with the same pool sizes, so there is one flush thread, the one that
        // just ran; `contains` keeps the test true if RocksDB ever adds an idle one.
        assert!(flushers.contains(&19), "flush threads' nice values: {flushers:?}");
    }

    #[test]
    fn queue_ranges_do_not_bleed_into_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let mut batch = index.batch();
        for (queue, count) in [("a", 5u64), ("a/b", 3), ("ab", 4)] {
            for offset in 0..count {
                let entry =
                    QueueEntry { offset, position: offset * 100, size_bytes: 10, store_ms: 1, ..Default::default() };
                batch.put_entry(queue, &entry);
            }
        }
        batch.set_checkpoint(777, 700);
        index.write(batch).unwrap();
        let offsets = |q: &str| index.queue_range(q, 0, 100).unwrap().iter().map(|e| e.offset).collect::<Vec<_>>();
        assert_eq!(offsets("a"), vec![0, 1, 2, 3, 4]);
        assert_eq!(offsets("a/b"), vec![0, 1, 2]);
        assert_eq!(offsets("ab"), vec![0, 1, 2, 3]);
        assert_eq!(index.queue_range("a", 2, 4).unwrap().len(), 2);
        assert_eq!(index.queue_range_cached("a", 1, 3).unwrap().map(|v| v.len()), Some(2));
        assert_eq!(index.checkpoint().unwrap(), Checkpoint { end: 777, last_batch: Some(700) });

        let mut batch = index.batch();
        batch.delete_queue("a");
        index.write(batch).unwrap();
        assert!(offsets("a").is_empty());
        assert_eq!(offsets("a/b").len(), 3);
    }

    #[test]
    fn entries_of_both_formats_decode() {
        let entry = QueueEntry {
            offset: 9,
            position: 4096,
            size_bytes: 100,
            tag_hash: 7,
            store_ms: 123,
            message_type: 2,
            txn_state: 2,
            priority: -3,
            group_hash: 11,
            key_hash: 12,
            delivery_ms: 13,
        };
        assert_eq!(QueueEntry::decode(9, &entry.encode()), Some(entry));
        // A v2 value (24 bytes) reads with defaults for what it did not have.
        let old = QueueEntry::decode(9, &entry.encode()[..24]).unwrap();
        assert_eq!((old.position, old.size_bytes, old.tag_hash, old.store_ms), (4096, 100, 7, 123));
        assert_eq!((old.message_type, old.group_hash, old.priority), (1, 0, 0));
        assert_eq!(QueueEntry::decode(9, &[0u8; 30]), None);
    }

    #[test]
    fn held_messages_round_trip_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let held = |due_ms: u64, position: u64| HeldMessage {
            kind: HeldKind::Timer,
            due_ms,
            entry: QueueEntry { position, size_bytes: 10, message_type: 1, ..Default::default() },
            message_id: format!("m{position}"),
            queues: vec!["t#0".into(), "t#0/x".into()],
        };
        let mut batch = index.batch();
        for (due, pos) in [(300, 1), (100, 2), (200, 3)] {
            batch.put_held(&held(due, pos));
        }
        index.write(batch).unwrap();
        let scanned = index.held_scan(HeldKind::Timer, &[], 10).unwrap();
        assert_eq!(scanned.iter().map(|h| h.due_ms).collect::<Vec<_>>(), vec![100, 200, 300]);
        assert_eq!(scanned[0], held(100, 2));
        assert_eq!(index.held(HeldKind::Timer, 200, 3).unwrap(), Some(held(200, 3)));
        let mut batch = index.batch();
        batch.delete_held(HeldKind::Timer, 200, 3);
        index.write(batch).unwrap();
        assert_eq!(index.held(HeldKind::Timer, 200, 3).unwrap(), None);
    }

    #[test]
    fn keys_find_every_record_that_carries_them() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let mut batch = index.batch();
        batch.put_message_key("order-1", RecordLocation { position: 10, size_bytes: 5 });
        batch.put_message_key("order-1", RecordLocation { position: 20, size_bytes: 6 });
        batch.put_message_key("order-10", RecordLocation { position: 30, size_bytes: 7 });
        index.write(batch).unwrap();
        let found = index.message_key("order-1", 10).unwrap();
        assert_eq!(found.iter().map(|l| l.position).collect::<Vec<_>>(), vec![20, 10], "newest first");
        assert_eq!(index.message_key("order-1", 1).unwrap(), vec![RecordLocation { position: 20, size_bytes: 6 }]);
        assert!(index.message_key("order", 10).unwrap().is_empty(), "a prefix of a key is another key");
    }

    #[test]
    fn a_message_id_keeps_every_location_and_reads_the_older_table() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 1 << 20).unwrap();
        let mut batch = index.batch();
        batch.put_message_id("m1", RecordLocation { position: 10, size_bytes: 5 });
        batch.put_message_id("m1", RecordLocation { position: 40, size_bytes: 6 });
        // What an older version wrote: the latest location only, in its own table.
        batch.batch.put_cf(index.cf(CF_MESSAGE_ID), b"old", [7u8, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]);
        index.write(batch).unwrap();
        let positions = |id: &str| index.message_ids(id, 10).unwrap().iter().map(|l| l.position).collect::<Vec<_>>();
        assert_eq!(positions("m1"), vec![40, 10]);
        assert_eq!(index.message_id("m1").unwrap(), Some(RecordLocation { position: 40, size_bytes: 6 }));
        assert_eq!(index.message_id("old").unwrap(), Some(RecordLocation { position: 7, size_bytes: 9 }));
        assert_eq!(index.message_id("none").unwrap(), None);
        // An id stored before the upgrade and again after (its dead-letter copy): both.
        let mut batch = index.batch();
        batch.put_message_id("old", RecordLocation { position: 90, size_bytes: 4 });
        index.write(batch).unwrap();
        assert_eq!(positions("old"), vec![90, 7]);
    }
}
