//! Engine configuration. Every limit is named, has a default, and is checked by `validate`.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{EngineError, Result};

/// Default size of one CommitLog segment file.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 1 << 30;
/// Default largest record (body, properties, keys and framing together).
pub const RECORD_SIZE_MAX_BYTES_DEFAULT: u64 = 64 << 20;
/// Default largest number of records in one append call.
pub const APPEND_BATCH_RECORDS_MAX_DEFAULT: usize = 4096;
/// Default largest number of queues one shard holds (a million lite topics per 2-core broker).
pub const QUEUES_PER_SHARD_MAX_DEFAULT: usize = 1_000_000;
/// Default size of one group-commit write. Larger single records get a write of their own.
pub const GROUP_COMMIT_MAX_BYTES_DEFAULT: usize = 4 << 20;
/// Default number of appends a group commit waits for at most before it writes.
pub const GROUP_COMMIT_RECORDS_MAX_DEFAULT: usize = 16_384;
/// Default bound on appended bytes a shard holds in memory before they are durable.
pub const APPEND_INFLIGHT_MAX_BYTES_DEFAULT: u64 = 64 << 20;
/// Default longest wait of a message append for room in `append_inflight_max_bytes`: clients'
/// send timeouts are 3 s and up, so a refusal arrives before they give up.
pub const APPEND_WAIT_MAX_MS_DEFAULT: u64 = 1000;
/// Default bound on the requests queued for one shard from other threads.
pub const SHARD_INBOX_MAX_DEFAULT: usize = 4096;
/// Default number of log bytes after which the index is flushed, bounding recovery replay.
pub const INDEX_FLUSH_INTERVAL_BYTES_DEFAULT: u64 = 256 << 20;
/// Default memory per shard for written batch buffers kept to serve reads of the log's tail.
pub const LOG_TAIL_CACHE_BYTES_DEFAULT: usize = 32 << 20;
/// Zeroed log kept ahead of the end while idle: about 8,000 appends of a 1 KiB message.
pub const LOG_ZERO_AHEAD_BYTES_DEFAULT: u64 = 8 << 20;
/// Default time a queue stays in the shard's memory after its last append; it is then read
/// from the index when used, so a million idle lite topics cost no memory.
pub const QUEUE_IDLE_EVICT_MS_DEFAULT: u64 = 10_000;
/// Default free space a shard keeps on its file system: below it, new messages are refused
/// with a retryable error (control records, such as acks and offsets, still go in). It leaves
/// room for RocksDB flushes and compactions, which fail hard on a full disk.
pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 256 << 20;
/// Smallest allowed segment: one maximal group-commit write has to fit in it.
pub const SEGMENT_SIZE_MIN_BYTES: u64 = 64 << 10;
// Record limits live with the record format.
pub use sluice_transport::model::record::{RECORD_ID_MAX_BYTES, RECORD_KEYS_MAX, RECORD_QUEUES_MAX};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Group commit: a batch is written and fdatasync'd before any append in it is acked.
    /// No acked record is lost on process crash or power loss.
    Sync,
    /// Acked once written with O_DIRECT (so it survives a process crash); fdatasync runs every
    /// `flush_interval_ms`. A power loss can lose up to `flush_interval_ms` of acked records
    /// (those the device still held in its volatile cache).
    Async { flush_interval_ms: u64 },
}

/// How old log segments are deleted. The active segment is never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delete a sealed segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest sealed segments while a shard's log is larger than this.
    pub max_log_bytes_per_shard: Option<u64>,
    /// How often each shard checks the two limits above.
    pub check_interval_ms: u64,
}

/// Default interval between retention checks.
pub const RETENTION_CHECK_INTERVAL_MS_DEFAULT: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Root directory. Shard `n` lives in `data_dir/shard-NNN/{log,index}`.
    pub data_dir: PathBuf,
    /// Number of shards, one executor thread each.
    pub shard_count: usize,
    /// Pin shard `n` to CPU `n % cpus`. Off for tests that run many engines at once.
    pub pin_shards: bool,
    pub durability: Durability,
    pub retention: Retention,
    pub segment_size_bytes: u64,
    pub record_size_max_bytes: u64,
    pub append_batch_records_max: usize,
    /// Queues one shard holds, in memory or only in its index.
    pub queues_per_shard_max: usize,
    /// A queue with no append for this long leaves the shard's memory (between one and two
    /// times this after its last append); its state stays in the index. 0 keeps every queue.
    pub queue_idle_evict_ms: u64,
    pub group_commit_max_bytes: usize,
    pub group_commit_records_max: usize,
    /// A message append waits at most this long for room in `append_inflight_max_bytes` (the
    /// disk is slower than the offered load); then it is refused with `ShardBusy` (retryable).
    pub append_wait_max_ms: u64,
    /// Free space (bytes) the file system keeps: a message append that would leave less, or a
    /// log roll that would leave less than this plus a segment, is refused with `DiskFull`
    /// (retryable). 0 turns the floor off: a log roll that meets a full disk then holds the
    /// shard's writes until space returns, and RocksDB may fail the shard's index.
    pub disk_free_min_bytes: u64,
    /// Appends beyond this many staged, not yet durable bytes wait (back-pressure).
    pub append_inflight_max_bytes: u64,
    pub shard_inbox_max: usize,
    pub index_flush_interval_bytes: u64,
    /// RocksDB block cache per shard.
    pub index_block_cache_bytes: usize,
    /// Written batch buffers kept per shard so records read right after their append (a
    /// waiting consumer's) need no disk read; 0 turns it off. At most half of
    /// `io_memory_bytes`, whose blocks it holds (counted as the power-of-two blocks they are).
    pub log_tail_cache_bytes: usize,
    /// How far ahead of its end the log is kept written with zeros while the shard is idle
    /// (0: off). Appends into preallocated, never-written blocks make every fdatasync commit
    /// file-system metadata; into zeroed ones it is a plain flush.
    pub log_zero_ahead_bytes: u64,
    /// Memory glommio registers with io_uring per shard. Group-commit buffers come from it, so
    /// it is reused instead of freshly mapped (and page-faulted) for every batch; keep it above
    /// `append_inflight_max_bytes` (its allocator rounds blocks up to powers of two).
    pub io_memory_bytes: usize,
}

impl EngineConfig {
    /// Defaults for a broker: one shard per available core, pinned, `sync` durability.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let cores = core_affinity::get_core_ids().map_or(1, |ids| ids.len().max(1));
        EngineConfig {
            data_dir: data_dir.into(),
            shard_count: cores,
            pin_shards: true,
            durability: Durability::Sync,
            retention: Retention {
                max_age: None,
                max_log_bytes_per_shard: None,
                check_interval_ms: RETENTION_CHECK_INTERVAL_MS_DEFAULT,
            },
            segment_size_bytes: SEGMENT_SIZE_BYTES_DEFAULT,
            record_size_max_bytes: RECORD_SIZE_MAX_BYTES_DEFAULT,
            append_batch_records_max: APPEND_BATCH_RECORDS_MAX_DEFAULT,
            queues_per_shard_max: QUEUES_PER_SHARD_MAX_DEFAULT,
            queue_idle_evict_ms: QUEUE_IDLE_EVICT_MS_DEFAULT,
            group_commit_max_bytes: GROUP_COMMIT_MAX_BYTES_DEFAULT,
            group_commit_records_max: GROUP_COMMIT_RECORDS_MAX_DEFAULT,
            append_inflight_max_bytes: APPEND_INFLIGHT_MAX_BYTES_DEFAULT,
            disk_free_min_bytes: DISK_FREE_MIN_BYTES_DEFAULT,
            append_wait_max_ms: APPEND_WAIT_MAX_MS_DEFAULT,
            shard_inbox_max: SHARD_INBOX_MAX_DEFAULT,
            index_flush_interval_bytes: INDEX_FLUSH_INTERVAL_BYTES_DEFAULT,
            index_block_cache_bytes: 64 << 20,
            log_tail_cache_bytes: LOG_TAIL_CACHE_BYTES_DEFAULT,
            log_zero_ahead_bytes: LOG_ZERO_AHEAD_BYTES_DEFAULT,
            io_memory_bytes: 128 << 20,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(EngineError::Config(msg));
        if self.shard_count == 0 || self.shard_count > 1024 {
            return fail(format!("shard_count must be 1..=1024, got {}", self.shard_count));
        }
        if self.segment_size_bytes < SEGMENT_SIZE_MIN_BYTES || !self.segment_size_bytes.is_multiple_of(4096) {
            return fail(format!(
                "segment_size_bytes must be a multiple of 4096 and at least {SEGMENT_SIZE_MIN_BYTES}, got {}",
                self.segment_size_bytes
            ));
        }
        // The cache holds buffers of the I/O memory; the rest stays for writes in flight.
        if self.log_tail_cache_bytes > self.io_memory_bytes / 2 {
            return fail(format!(
                "log_tail_cache_bytes must be at most half of io_memory_bytes ({} bytes), got {}",
                self.io_memory_bytes / 2,
                self.log_tail_cache_bytes
            ));
        }
        if self.group_commit_max_bytes < 4096 || self.group_commit_max_bytes as u64 > self.segment_size_bytes / 2 {
            return fail(format!(
                "group_commit_max_bytes must be 4096..=segment_size_bytes/2, got {}",
                self.group_commit_max_bytes
            ));
        }
        if self.record_size_max_bytes + crate::record::BATCH_HEADER_BYTES as u64 + 8192 > self.segment_size_bytes {
            return fail(format!(
                "record_size_max_bytes ({}) must leave room for framing inside one segment ({} bytes)",
                self.record_size_max_bytes, self.segment_size_bytes
            ));
        }
        let control_max = (crate::control::STATE_VALUE_MAX_BYTES + crate::control::STATE_KEY_MAX_BYTES + 1024) as u64;
        if self.record_size_max_bytes < control_max {
            return fail(format!("record_size_max_bytes must be at least {control_max}, to hold control records"));
        }
        if self.record_size_max_bytes > u64::from(u32::MAX) / 2 {
            return fail("record_size_max_bytes must be below 2 GiB".into());
        }
        if let Durability::Async { flush_interval_ms } = self.durability {
            if flush_interval_ms == 0 {
                return fail("async flush_interval_ms must be > 0 (use Sync for per-batch fdatasync)".into());
            }
        }
        if self.append_inflight_max_bytes < self.record_size_max_bytes {
            return fail(format!(
                "append_inflight_max_bytes ({}) must be at least record_size_max_bytes ({})",
                self.append_inflight_max_bytes, self.record_size_max_bytes
            ));
        }
        if self.append_wait_max_ms == 0 {
            return fail("append_wait_max_ms must be > 0".into());
        }
        if self.retention.check_interval_ms == 0 {
            return fail("retention.check_interval_ms must be > 0".into());
        }
        let counts = [
            ("append_batch_records_max", self.append_batch_records_max),
            ("queues_per_shard_max", self.queues_per_shard_max),
            ("group_commit_records_max", self.group_commit_records_max),
            ("shard_inbox_max", self.shard_inbox_max),
        ];
        for (name, value) in counts {
            if value == 0 {
                return fail(format!("{name} must be > 0"));
            }
        }
        Ok(())
    }

    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        self.data_dir.join(format!("shard-{shard:03}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_validate_and_the_tail_cache_leaves_io_memory_for_writes() {
        let mut config = EngineConfig::new("/tmp/unused");
        assert!(config.validate().is_ok());
        config.log_tail_cache_bytes = config.io_memory_bytes / 2 + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("log_tail_cache_bytes must be at most half of io_memory_bytes"), "{err}");
        config.log_tail_cache_bytes = 0;
        assert!(config.validate().is_ok(), "0 turns the cache off");
    }
}
