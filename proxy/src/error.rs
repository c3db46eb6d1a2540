//! Proxy errors and their RocketMQ status codes. Errors reach clients inside the response's
//! `Status{code, message}` (the v2 API's convention), never as bare gRPC errors.

use sluice_transport::cluster::ClusterError;
use sluice_transport::model::codes as broker_code;
use sluice_transport::{FrameError, TransportError};

use crate::pb::apache::rocketmq::v2::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("topic {0:?} does not exist: create it with `sluice topic create {0} --type normal`")]
    TopicNotFound(String),
    #[error("consumer group {0:?} does not exist: create it with `sluice group create {0}`")]
    GroupNotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{what} is not supported by Sluice yet")]
    NotImplemented { what: String },
    #[error("topic {topic:?} takes {expected} messages, not {given}")]
    MessageTypeMismatch { topic: String, expected: String, given: String },
    #[error("message body of {size} bytes exceeds the {max}-byte limit (proxy.max_body_bytes)")]
    BodyTooLarge { size: usize, max: usize },
    #[error("message body is empty")]
    BodyEmpty,
    #[error("invalid receipt handle: {0}")]
    InvalidReceipt(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("broker {endpoint} is unavailable: {source}")]
    BrokerUnavailable { endpoint: String, source: TransportError },
    #[error("broker {endpoint} timed out: {source}")]
    BrokerTimeout { endpoint: String, source: TransportError },
    #[error("broker error {code}: {message}")]
    Broker { code: u32, message: String },
    #[error("the group has no committed offset on this queue yet")]
    OffsetNotFound,
    #[error("the proxy is shutting down; reconnect to another proxy")]
    ShuttingDown,
    #[error("illegal filter expression: {0}")]
    IllegalFilter(String),
    #[error("illegal delivery time: {0}")]
    IllegalDeliveryTime(String),
    #[error("illegal message group: {0}")]
    IllegalMessageGroup(String),
    #[error("invalid transaction id: {0}")]
    InvalidTransactionId(String),
    #[error("invalid recall handle: {0}")]
    InvalidRecallHandle(String),
    #[error("illegal lite topic: {0}")]
    IllegalLiteTopic(String),
    #[error("lite subscription quota exceeded: {0}")]
    LiteSubscriptionQuota(String),
    #[error("{0}")]
    Throttled(String),
    #[error(
        "message properties of {size} bytes exceed the {max}-byte limit (keys, values, tag and message keys together)"
    )]
    PropertiesTooLarge { size: usize, max: usize },
}

impl From<ClusterError> for ProxyError {
    fn from(e: ClusterError) -> ProxyError {
        match e {
            ClusterError::Config(message) => ProxyError::Config(message),
            ClusterError::Unavailable { endpoint, source } => ProxyError::BrokerUnavailable { endpoint, source },
            ClusterError::Timeout { endpoint, source } => ProxyError::BrokerTimeout { endpoint, source },
            ClusterError::Remote { code, message } => ProxyError::Broker { code, message },
            ClusterError::Frame(e) => e.into(),
        }
    }
}

/// A broker reply that does not validate as the expected kind.
impl From<FrameError> for ProxyError {
    fn from(e: FrameError) -> ProxyError {
        ProxyError::Broker { code: e.code(), message: e.to_string() }
    }
}

impl ProxyError {
    pub fn from_transport(endpoint: &str, e: TransportError) -> ProxyError {
        match e {
            TransportError::Remote { code, message } => ProxyError::Broker { code, message },
            e @ TransportError::Timeout { .. } => ProxyError::BrokerTimeout { endpoint: endpoint.into(), source: e },
            e => ProxyError::BrokerUnavailable { endpoint: endpoint.into(), source: e },
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ProxyError::Config(_) => Code::InternalServerError,
            ProxyError::TopicNotFound(_) => Code::TopicNotFound,
            ProxyError::GroupNotFound(_) => Code::ConsumerGroupNotFound,
            ProxyError::BadRequest(_) => Code::BadRequest,
            ProxyError::NotImplemented { .. } => Code::NotImplemented,
            ProxyError::MessageTypeMismatch { .. } => Code::MessagePropertyConflictWithType,
            ProxyError::BodyTooLarge { .. } => Code::MessageBodyTooLarge,
            ProxyError::BodyEmpty => Code::MessageBodyEmpty,
            ProxyError::InvalidReceipt(_) => Code::InvalidReceiptHandle,
            ProxyError::Unauthorized(_) => Code::Unauthorized,
            ProxyError::Forbidden(_) => Code::Forbidden,
            ProxyError::BrokerUnavailable { .. } => Code::InternalServerError,
            ProxyError::BrokerTimeout { .. } => Code::ProxyTimeout,
            ProxyError::ShuttingDown => Code::InternalServerError,
            ProxyError::OffsetNotFound => Code::OffsetNotFound,
            ProxyError::IllegalFilter(_) => Code::IllegalFilterExpression,
            ProxyError::IllegalDeliveryTime(_) => Code::IllegalDeliveryTime,
            ProxyError::IllegalMessageGroup(_) => Code::IllegalMessageGroup,
            ProxyError::InvalidTransactionId(_) => Code::InvalidTransactionId,
            ProxyError::InvalidRecallHandle(_) => Code::BadRequest,
            ProxyError::PropertiesTooLarge { .. } => Code::MessagePropertiesTooLarge,
            ProxyError::IllegalLiteTopic(_) => Code::IllegalLiteTopic,
            ProxyError::LiteSubscriptionQuota(_) => Code::LiteSubscriptionQuotaExceeded,
            ProxyError::Throttled(_) => Code::TooManyRequests,
            ProxyError::Broker { code, .. } => match *code {
                broker_code::QUEUE_NOT_FOUND => Code::TopicNotFound,
                broker_code::INVALID_RECEIPT | broker_code::RECEIPT_EXPIRED => Code::InvalidReceiptHandle,
                broker_code::RECORD_TOO_LARGE => Code::MessageBodyTooLarge,
                broker_code::INVALID_REQUEST => Code::BadRequest,
                broker_code::TOO_MANY_GROUPS => Code::TooManyRequests,
                broker_code::NOT_SUPPORTED => Code::NotImplemented,
                broker_code::INVALID_FILTER => Code::IllegalFilterExpression,
                broker_code::INVALID_DELIVERY_TIME => Code::IllegalDeliveryTime,
                broker_code::HELD_MESSAGE_NOT_FOUND => Code::NotFound,
                broker_code::TOO_MANY_HELD => Code::TooManyRequests,
                broker_code::MESSAGE_TYPE_MISMATCH => Code::MessagePropertyConflictWithType,
                broker_code::LITE_SUBSCRIPTION_QUOTA => Code::LiteSubscriptionQuotaExceeded,
                broker_code::ILLEGAL_LITE_TOPIC => Code::IllegalLiteTopic,
                broker_code::TOO_MANY_LITE_CLIENTS => Code::TooManyRequests,
                // Only sends to lite topics create queues, so a full shard is the lite-topic quota.
                broker_code::TOO_MANY_QUEUES => Code::LiteTopicQuotaExceeded,
                // Retryable: clients back off and send again once the shard has space.
                broker_code::DISK_FULL | broker_code::SHARD_BUSY => Code::TooManyRequests,
                _ => Code::InternalServerError,
            },
        }
    }

    pub fn status(&self) -> Status {
        Status { code: self.code() as i32, message: self.to_string() }
    }
}

pub fn ok_status() -> Status {
    Status { code: Code::Ok as i32, message: "OK".into() }
}

pub fn status(code: Code, message: impl Into<String>) -> Status {
    Status { code: code as i32, message: message.into() }
}

pub type Result<T> = std::result::Result<T, ProxyError>;
