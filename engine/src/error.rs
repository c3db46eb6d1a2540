//! The engine's one error type. Every variant has a stable numeric code that appears in logs
//! and, later, on the wire. A retired code is never reused.

use std::sync::Arc;

use sluice_transport::model::codes;

/// Result alias used across the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything that can go wrong inside the storage engine.
///
/// Errors are `Clone` because one failed group commit has to be reported to every appender
/// waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("configuration: {0}")]
    Config(String),

    #[error("{what} at {path}: {source}")]
    Io { what: &'static str, path: String, source: Arc<std::io::Error> },

    #[error("index (RocksDB) {what}: {message}")]
    Index { what: &'static str, message: String },

    #[error("record of {size_bytes} bytes exceeds the limit of {max_bytes} bytes (record_size_max_bytes); split the payload or raise the limit")]
    RecordTooLarge { size_bytes: u64, max_bytes: u64 },

    #[error("batch of {count} records exceeds the limit of {max} (append_batch_records_max); send smaller batches")]
    BatchTooLarge { count: usize, max: usize },

    #[error("invalid record: {0}")]
    InvalidRecord(String),

    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName { name: String, reason: &'static str },

    #[error(
        "shard {shard} already holds {max} queues (queues_per_shard_max); delete unused queues or raise the limit"
    )]
    TooManyQueues { shard: usize, max: usize },

    #[error("queue {0:?} not found")]
    QueueNotFound(String),

    #[error("queue {0:?} is being deleted; retry once the deletion completes")]
    QueueBeingDeleted(String),

    #[error("record targets queues on different shards ({first:?} on shard {first_shard}, {other:?} on shard {other_shard}); multi-dispatch needs co-located queues: name children `parent/child`")]
    DispatchAcrossShards { first: String, first_shard: usize, other: String, other_shard: usize },

    #[error("segment {segment} at byte {offset_in_segment} (log position {position}): {detail}; refusing to serve past this record. Restore the segment from a replica, or truncate the log at this position")]
    CorruptRecord { segment: String, offset_in_segment: u64, position: u64, detail: String },

    #[error("log position {position} is not stored (the segment was deleted by retention or never existed)")]
    PositionNotStored { position: u64 },

    #[error("shard {shard} stopped accepting writes after a storage failure ({cause}); restart the broker to recover from the log")]
    ShardFailed { shard: usize, cause: String },

    #[error("engine is shutting down")]
    ShuttingDown,

    #[error("shard {shard} refuses new messages: its disk has {free_bytes} bytes free and this append needs {needed_bytes} (disk_free_min_bytes, plus a segment when the log rolls). Retry later; accepted messages are safe, and reads and acks go on. Free disk space or let retention delete old segments")]
    DiskFull { shard: usize, free_bytes: u64, needed_bytes: u64 },

    #[error("shard {shard} is busy: {inflight_max_bytes} bytes of appends are waiting for the disk (append_inflight_max_bytes) and this append found no room within {waited_ms} ms (append_wait_max_ms). Retry later; the disk is slower than the offered load")]
    ShardBusy { shard: usize, inflight_max_bytes: u64, waited_ms: u64 },
}

impl EngineError {
    /// Stable numeric code. Never renumber or reuse a code.
    pub fn code(&self) -> u32 {
        match self {
            EngineError::Config(_) => codes::CONFIG,
            EngineError::Io { .. } => codes::IO,
            EngineError::Index { .. } => codes::INDEX,
            EngineError::RecordTooLarge { .. } => codes::RECORD_TOO_LARGE,
            EngineError::BatchTooLarge { .. } => codes::BATCH_TOO_LARGE,
            EngineError::InvalidRecord(_) => codes::INVALID_RECORD,
            EngineError::InvalidQueueName { .. } => codes::INVALID_QUEUE_NAME,
            EngineError::TooManyQueues { .. } => codes::TOO_MANY_QUEUES,
            EngineError::QueueNotFound(_) => codes::ENGINE_QUEUE_NOT_FOUND,
            EngineError::DispatchAcrossShards { .. } => codes::DISPATCH_ACROSS_SHARDS,
            EngineError::QueueBeingDeleted(_) => codes::QUEUE_BEING_DELETED,
            EngineError::CorruptRecord { .. } => codes::CORRUPT_RECORD,
            EngineError::PositionNotStored { .. } => codes::POSITION_NOT_STORED,
            EngineError::ShardFailed { .. } => codes::SHARD_FAILED,
            EngineError::ShuttingDown => codes::ENGINE_SHUTTING_DOWN,
            EngineError::DiskFull { .. } => codes::DISK_FULL,
            EngineError::ShardBusy { .. } => codes::SHARD_BUSY,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl std::fmt::Display, source: std::io::Error) -> Self {
        EngineError::Io { what, path: path.to_string(), source: Arc::new(source) }
    }

    pub(crate) fn index(what: &'static str, err: rocksdb::Error) -> Self {
        EngineError::Index { what, message: err.into_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let samples = [
            EngineError::Config(String::new()),
            EngineError::io("x", "p", std::io::Error::other("e")),
            EngineError::Index { what: "x", message: String::new() },
            EngineError::RecordTooLarge { size_bytes: 0, max_bytes: 0 },
            EngineError::BatchTooLarge { count: 0, max: 0 },
            EngineError::InvalidRecord(String::new()),
            EngineError::InvalidQueueName { name: String::new(), reason: "" },
            EngineError::TooManyQueues { shard: 0, max: 0 },
            EngineError::QueueNotFound(String::new()),
            EngineError::DispatchAcrossShards {
                first: String::new(),
                first_shard: 0,
                other: String::new(),
                other_shard: 1,
            },
            EngineError::CorruptRecord {
                segment: String::new(),
                offset_in_segment: 0,
                position: 0,
                detail: String::new(),
            },
            EngineError::PositionNotStored { position: 0 },
            EngineError::ShardFailed { shard: 0, cause: String::new() },
            EngineError::ShuttingDown,
            EngineError::DiskFull { shard: 0, free_bytes: 0, needed_bytes: 0 },
            EngineError::ShardBusy { shard: 0, inflight_max_bytes: 0, waited_ms: 0 },
        ];
        let mut codes: Vec<u32> = samples.iter().map(EngineError::code).collect();
        codes.sort_unstable();
        let before = codes.len();
        codes.dedup();
        assert_eq!(before, codes.len(), "duplicate error codes");
    }
}
