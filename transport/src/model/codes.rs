//! Error codes a broker sends in error frames and ack statuses. Engine errors are 1001+,
//! broker errors 3001+. They are wire format: never renumber or reuse one.

/// An ack status meaning success.
pub const OK: u32 = 0;

// Engine (the storage layer).
pub const CONFIG: u32 = 1001;
pub const IO: u32 = 1002;
pub const INDEX: u32 = 1003;
pub const RECORD_TOO_LARGE: u32 = 1010;
pub const BATCH_TOO_LARGE: u32 = 1011;
pub const INVALID_RECORD: u32 = 1012;
pub const INVALID_QUEUE_NAME: u32 = 1013;
pub const TOO_MANY_QUEUES: u32 = 1014;
pub const ENGINE_QUEUE_NOT_FOUND: u32 = 1015;
pub const DISPATCH_ACROSS_SHARDS: u32 = 1016;
pub const QUEUE_BEING_DELETED: u32 = 1017;
pub const CORRUPT_RECORD: u32 = 1020;
pub const POSITION_NOT_STORED: u32 = 1021;
pub const SHARD_FAILED: u32 = 1030;
pub const ENGINE_SHUTTING_DOWN: u32 = 1031;
/// A shard's file system is at its free-space floor: new messages wait for space (retryable).
pub const DISK_FULL: u32 = 1032;
/// A shard's appends wait on a disk slower than the load: a message found no room in time.
pub const SHARD_BUSY: u32 = 1033;

// Broker (requests, leases, scheduling).
pub const QUEUE_NOT_FOUND: u32 = 3001;
pub const WRONG_SHARD: u32 = 3002;
pub const INVALID_RECEIPT: u32 = 3003;
pub const RECEIPT_EXPIRED: u32 = 3004;
pub const QUEUE_TYPE_CONFLICT: u32 = 3005;
pub const INVALID_REQUEST: u32 = 3006;
pub const TOO_MANY_GROUPS: u32 = 3007;
pub const SHUTTING_DOWN: u32 = 3008;
pub const NOT_SUPPORTED: u32 = 3009;
/// A filter expression that does not parse.
pub const INVALID_FILTER: u32 = 3010;
/// A delivery time too far ahead.
pub const INVALID_DELIVERY_TIME: u32 = 3011;
/// A transaction id or recall handle that names nothing this broker holds.
pub const HELD_MESSAGE_NOT_FOUND: u32 = 3012;
/// Too many timers or half messages held on one shard.
pub const TOO_MANY_HELD: u32 = 3013;
/// A message whose type the queue does not take.
pub const MESSAGE_TYPE_MISMATCH: u32 = 3014;
/// A lite consumer subscribed to more lite topics than allowed.
pub const LITE_SUBSCRIPTION_QUOTA: u32 = 3015;
/// A lite topic name that is empty, too long or has characters it may not.
pub const ILLEGAL_LITE_TOPIC: u32 = 3016;
/// A consumer group has as many lite consumers on one shard as it may.
pub const TOO_MANY_LITE_CLIENTS: u32 = 3017;
