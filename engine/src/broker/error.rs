//! Errors the broker sends back in error frames. Codes (`sluice_transport::model::codes`) 3001+
//! are the broker's; engine errors keep their own (1001+). Never renumber or reuse a code.

use sluice_transport::messages::ErrorReply;
use sluice_transport::model::codes;

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
    InvalidFilter(#[from] sluice_transport::model::filter::FilterError),
    #[error("delivery time {delivery_ms} is {ahead_ms} ms ahead; at most {max_ms} ms (40 days) is allowed")]
    DeliveryTooFar { delivery_ms: u64, ahead_ms: u64, max_ms: u64 },
    #[error("{what} at log position {position} of {queue:?} is not held by this broker: it was delivered, ended, or never existed")]
    HeldNotFound { what: &'static str, queue: String, position: u64 },
    #[error("this shard already holds {max} half messages of open transactions (broker.half_messages_max); end some transactions first")]
    TooManyHeld { max: usize },
    #[error("queue {queue:?} takes {expected} messages, not {given}")]
    MessageTypeMismatch { queue: String, expected: &'static str, given: &'static str },
    #[error("this client is subscribed to {max} lite topics on one shard (broker.lite_subscriptions_per_client_max); unsubscribe some first")]
    LiteSubscriptionQuota { max: usize },
    #[error("this consumer group already has {max} lite consumers on this shard (broker.lite_clients_per_group_max); stop idle ones or use another group")]
    TooManyLiteClients { max: usize },
    #[error("illegal lite topic {name:?}: {reason}")]
    IllegalLiteTopic { name: String, reason: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl BrokerError {
    pub fn code(&self) -> u32 {
        match self {
            BrokerError::QueueNotFound(_) => codes::QUEUE_NOT_FOUND,
            BrokerError::WrongShard { .. } => codes::WRONG_SHARD,
            BrokerError::InvalidReceipt => codes::INVALID_RECEIPT,
            BrokerError::ReceiptExpired => codes::RECEIPT_EXPIRED,
            BrokerError::QueueTypeConflict { .. } => codes::QUEUE_TYPE_CONFLICT,
            BrokerError::InvalidRequest(_) => codes::INVALID_REQUEST,
            BrokerError::TooManyGroups { .. } => codes::TOO_MANY_GROUPS,
            BrokerError::ShuttingDown => codes::SHUTTING_DOWN,
            BrokerError::NotSupported(_) => codes::NOT_SUPPORTED,
            BrokerError::InvalidFilter(_) => codes::INVALID_FILTER,
            BrokerError::DeliveryTooFar { .. } => codes::INVALID_DELIVERY_TIME,
            BrokerError::HeldNotFound { .. } => codes::HELD_MESSAGE_NOT_FOUND,
            BrokerError::TooManyHeld { .. } => codes::TOO_MANY_HELD,
            BrokerError::MessageTypeMismatch { .. } => codes::MESSAGE_TYPE_MISMATCH,
            BrokerError::LiteSubscriptionQuota { .. } => codes::LITE_SUBSCRIPTION_QUOTA,
            BrokerError::IllegalLiteTopic { .. } => codes::ILLEGAL_LITE_TOPIC,
            BrokerError::TooManyLiteClients { .. } => codes::TOO_MANY_LITE_CLIENTS,
            BrokerError::Engine(e) => e.code(),
        }
    }
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
            (BrokerError::QueueNotFound(String::new()), codes::QUEUE_NOT_FOUND),
            (BrokerError::WrongShard { queue: String::new(), owner: 0, here: 1 }, codes::WRONG_SHARD),
            (BrokerError::InvalidReceipt, codes::INVALID_RECEIPT),
            (BrokerError::ReceiptExpired, codes::RECEIPT_EXPIRED),
            (
                BrokerError::QueueTypeConflict { queue: String::new(), existing: 1, requested: 2 },
                codes::QUEUE_TYPE_CONFLICT,
            ),
            (BrokerError::InvalidRequest(String::new()), codes::INVALID_REQUEST),
            (BrokerError::TooManyGroups { max: 1 }, codes::TOO_MANY_GROUPS),
            (BrokerError::ShuttingDown, codes::SHUTTING_DOWN),
            (BrokerError::NotSupported(""), codes::NOT_SUPPORTED),
            (
                BrokerError::InvalidFilter(sluice_transport::model::filter::FilterError {
                    expression: String::new(),
                    reason: String::new(),
                }),
                codes::INVALID_FILTER,
            ),
            (BrokerError::DeliveryTooFar { delivery_ms: 0, ahead_ms: 0, max_ms: 0 }, codes::INVALID_DELIVERY_TIME),
            (BrokerError::HeldNotFound { what: "", queue: String::new(), position: 0 }, codes::HELD_MESSAGE_NOT_FOUND),
            (BrokerError::TooManyHeld { max: 0 }, codes::TOO_MANY_HELD),
            (
                BrokerError::MessageTypeMismatch { queue: String::new(), expected: "", given: "" },
                codes::MESSAGE_TYPE_MISMATCH,
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (error, expected) in samples {
            assert_eq!(error.code(), expected);
            assert!(seen.insert(error.code()));
        }
    }
}
