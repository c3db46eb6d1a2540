//! Errors the broker sends back in error frames. Codes 3001+ are the broker's; engine errors
//! keep their own codes (1001+). Never renumber or reuse a code.

use sluice_transport::messages::ErrorReply;

use crate::error::EngineError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("queue {0:?} does not exist on this broker: create its topic first")]
    QueueNotFound(String),
    #[error(
        "queue {queue:?} belongs to shard {owner}, not shard {here}: reconnect and route by the HelloAck shard count"
    )]
    WrongShard { queue: String, owner: usize, here: usize },
    #[error(
        "receipt handle is not valid for this queue and group (forged, truncated, or issued before a broker restart)"
    )]
    InvalidReceipt,
    #[error("receipt handle expired: the invisible time ran out or the message was acked or delivered again")]
    ReceiptExpired,
    #[error("queue {queue:?} already exists with message type {existing}, not {requested}")]
    QueueTypeConflict { queue: String, existing: u8, requested: u8 },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("too many consumer groups on this shard ({max}); raise broker.group_queues_max")]
    TooManyGroups { max: usize },
    #[error("the broker is shutting down; retry on another proxy or after restart")]
    ShuttingDown,
    #[error("not supported by this broker yet: {0}")]
    NotSupported(&'static str),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl BrokerError {
    pub fn code(&self) -> u32 {
        match self {
            BrokerError::QueueNotFound(_) => 3001,
            BrokerError::WrongShard { .. } => 3002,
            BrokerError::InvalidReceipt => 3003,
            BrokerError::ReceiptExpired => 3004,
            BrokerError::QueueTypeConflict { .. } => 3005,
            BrokerError::InvalidRequest(_) => 3006,
            BrokerError::TooManyGroups { .. } => 3007,
            BrokerError::ShuttingDown => 3008,
            BrokerError::NotSupported(_) => 3009,
            BrokerError::Engine(e) => e.code(),
        }
    }
}

/// Codes the proxy maps to client statuses.
pub mod code {
    pub const QUEUE_NOT_FOUND: u32 = 3001;
    pub const WRONG_SHARD: u32 = 3002;
    pub const INVALID_RECEIPT: u32 = 3003;
    pub const RECEIPT_EXPIRED: u32 = 3004;
    pub const QUEUE_TYPE_CONFLICT: u32 = 3005;
    pub const INVALID_REQUEST: u32 = 3006;
    pub const TOO_MANY_GROUPS: u32 = 3007;
    pub const SHUTTING_DOWN: u32 = 3008;
    pub const NOT_SUPPORTED: u32 = 3009;
    /// Engine: a record larger than the engine accepts.
    pub const RECORD_TOO_LARGE: u32 = 1010;
    /// An ack status meaning success.
    pub const OK: u32 = 0;
}

/// A request that does not validate as its kind.
impl From<sluice_transport::FrameError> for BrokerError {
    fn from(e: sluice_transport::FrameError) -> BrokerError {
        BrokerError::InvalidRequest(e.to_string())
    }
}

impl From<BrokerError> for ErrorReply {
    fn from(e: BrokerError) -> ErrorReply {
        ErrorReply { code: e.code(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_match_the_table() {
        let samples = [
            (BrokerError::QueueNotFound(String::new()), code::QUEUE_NOT_FOUND),
            (BrokerError::WrongShard { queue: String::new(), owner: 0, here: 1 }, code::WRONG_SHARD),
            (BrokerError::InvalidReceipt, code::INVALID_RECEIPT),
            (BrokerError::ReceiptExpired, code::RECEIPT_EXPIRED),
            (
                BrokerError::QueueTypeConflict { queue: String::new(), existing: 1, requested: 2 },
                code::QUEUE_TYPE_CONFLICT,
            ),
            (BrokerError::InvalidRequest(String::new()), code::INVALID_REQUEST),
            (BrokerError::TooManyGroups { max: 1 }, code::TOO_MANY_GROUPS),
            (BrokerError::ShuttingDown, code::SHUTTING_DOWN),
            (BrokerError::NotSupported(""), code::NOT_SUPPORTED),
        ];
        let mut seen = std::collections::HashSet::new();
        for (error, expected) in samples {
            assert_eq!(error.code(), expected);
            assert!(seen.insert(error.code()));
        }
    }
}
