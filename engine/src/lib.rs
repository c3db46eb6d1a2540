//! Sluice's broker storage engine.
//!
//! One shard per core, each on its own pinned glommio executor, each owning a CommitLog (the
//! only log: preallocated O_DIRECT segment files written through io_uring with group commit)
//! and a RocksDB index used only from that shard. See `ARCHITECTURE.md` at the repository root.
#![forbid(unsafe_code)]

pub mod broker;
pub mod clock;
pub mod commitlog;
pub mod config;
pub mod control;
pub mod engine;
pub mod error;
pub mod index;
pub mod load;
pub mod metrics;
mod notify;
pub mod queue;
pub mod record;
pub mod segment;
pub mod shard;
mod tail_cache;

pub use config::{Durability, EngineConfig, Retention};
pub use engine::{Engine, OwnedReadBatch, OwnedRecord};
pub use error::{EngineError, Result};
pub use index::StateTable;
pub use record::{NewRecord, RecordView};
pub use shard::{AppendAck, QueueInfo, ReadBatch, Shard, ShardStats, StoredRecord};
