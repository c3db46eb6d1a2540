//! RocketMQ messages to stored records and back, and the receipt handles clients see.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use prost::Message as _;
use sluice_engine::RecordView;

use crate::error::{ProxyError, Result};
use crate::pb::apache::rocketmq::v2;
use crate::pb::sluice::store::v1::StoredProperties;

/// Most keys one message carries.
pub const KEYS_MAX: usize = 32;
/// Longest tag, key or property key/value, in bytes.
pub const FIELD_MAX_BYTES: usize = 1024;
/// Most user properties one message carries.
pub const USER_PROPERTIES_MAX: usize = 128;
/// Longest client message id.
pub const MESSAGE_ID_MAX_BYTES: usize = 128;

/// A message ready to append: everything but the queue and body is in `properties`.
pub struct Outgoing {
    pub message_id: String,
    pub tag: String,
    pub keys: Vec<String>,
    pub properties: Vec<u8>,
}

fn check_field(what: &str, value: &str) -> Result<()> {
    if value.len() > FIELD_MAX_BYTES || value.chars().any(char::is_control) {
        return Err(ProxyError::BadRequest(format!(
            "{what} must be at most {FIELD_MAX_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// Validates a client message and encodes what the record needs. Body limits are checked by
/// the caller (they need the configured maximum).
pub fn outgoing(message: &v2::Message, topic: &str) -> Result<Outgoing> {
    let system = message
        .system_properties
        .as_ref()
        .ok_or_else(|| ProxyError::BadRequest("message has no system_properties".into()))?;
    if system.message_id.is_empty() || system.message_id.len() > MESSAGE_ID_MAX_BYTES {
        return Err(ProxyError::BadRequest(format!("message_id must be 1..={MESSAGE_ID_MAX_BYTES} bytes")));
    }
    check_field("message_id", &system.message_id)?;
    let tag = system.tag.clone().unwrap_or_default();
    check_field("tag", &tag)?;
    if tag.contains("||") {
        return Err(ProxyError::BadRequest("a tag may not contain '||'".into()));
    }
    if system.keys.len() > KEYS_MAX {
        return Err(ProxyError::BadRequest(format!("at most {KEYS_MAX} keys per message")));
    }
    for key in &system.keys {
        check_field("key", key)?;
    }
    if message.user_properties.len() > USER_PROPERTIES_MAX {
        return Err(ProxyError::BadRequest(format!("at most {USER_PROPERTIES_MAX} user properties per message")));
    }
    for (k, v) in &message.user_properties {
        check_field("property key", k)?;
        if v.len() > FIELD_MAX_BYTES * 16 {
            return Err(ProxyError::BadRequest(format!(
                "property {k:?} is longer than {} bytes",
                FIELD_MAX_BYTES * 16
            )));
        }
    }
    let stored = StoredProperties {
        user_properties: message.user_properties.clone(),
        message_type: system.message_type,
        born_timestamp: system.born_timestamp,
        born_host: system.born_host.clone(),
        message_group: system.message_group.clone(),
        delivery_timestamp: system.delivery_timestamp,
        trace_context: system.trace_context.clone(),
        topic: topic.to_string(),
        topic_namespace: message.topic.as_ref().map(|t| t.resource_namespace.clone()).unwrap_or_default(),
        priority: system.priority,
        body_encoding: system.body_encoding,
    };
    Ok(Outgoing {
        message_id: system.message_id.clone(),
        tag,
        keys: system.keys.clone(),
        properties: stored.encode_to_vec(),
    })
}

/// Where and how a popped record is delivered.
pub struct Delivery<'a> {
    pub queue_id: i32,
    pub offset: u64,
    pub attempt: u32,
    pub receipt_handle: String,
    pub invisible: std::time::Duration,
    pub store_host: &'a str,
}

/// Builds the client's message from a stored record.
pub fn incoming(record: &[u8], delivery: &Delivery<'_>) -> Result<v2::Message> {
    let view = RecordView::parse(record)
        .map_err(|e| ProxyError::Broker { code: 0, message: format!("stored record is corrupt: {e}") })?;
    let stored = StoredProperties::decode(view.properties)
        .map_err(|e| ProxyError::Broker { code: 0, message: format!("stored properties are corrupt: {e}") })?;
    let digest = hex::encode_upper(Md5::digest(view.body));
    let store_ms = view.store_ms as i64;
    let system = v2::SystemProperties {
        tag: (!view.tag.is_empty()).then(|| view.tag.to_string()),
        keys: view.keys().map(str::to_string).collect(),
        message_id: view.message_id.to_string(),
        body_digest: Some(v2::Digest { r#type: v2::DigestType::Md5 as i32, checksum: digest }),
        body_encoding: if stored.body_encoding == 0 { v2::Encoding::Identity as i32 } else { stored.body_encoding },
        message_type: stored.message_type,
        born_timestamp: stored.born_timestamp,
        born_host: stored.born_host,
        store_timestamp: Some(prost_types::Timestamp {
            seconds: store_ms / 1000,
            nanos: ((store_ms % 1000) * 1_000_000) as i32,
        }),
        store_host: delivery.store_host.to_string(),
        delivery_timestamp: stored.delivery_timestamp,
        receipt_handle: Some(delivery.receipt_handle.clone()),
        queue_id: delivery.queue_id,
        queue_offset: Some(delivery.offset as i64),
        invisible_duration: Some(prost_types::Duration {
            seconds: delivery.invisible.as_secs() as i64,
            nanos: delivery.invisible.subsec_nanos() as i32,
        }),
        delivery_attempt: Some(delivery.attempt as i32),
        message_group: stored.message_group,
        trace_context: stored.trace_context,
        orphaned_transaction_recovery_duration: None,
        dead_letter_queue: None,
        lite_topic: None,
        priority: stored.priority,
    };
    Ok(v2::Message {
        topic: Some(v2::Resource { resource_namespace: stored.topic_namespace, name: stored.topic }),
        user_properties: stored.user_properties,
        system_properties: Some(system),
        body: view.body.to_vec(),
    })
}

/// The tag of a stored record, for filtering.
pub fn record_tag(record: &[u8]) -> Option<String> {
    RecordView::parse(record).ok().map(|v| v.tag.to_string())
}

/// The receipt handle a client holds: the queue, the offset and the broker's authenticated
/// receipt. The proxy reads queue and offset to route; the broker checks the receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandle {
    pub queue: String,
    pub offset: u64,
    pub receipt: String,
}

/// Longest receipt handle accepted from a client.
pub const HANDLE_MAX_BYTES: usize = 1024;

impl ClientHandle {
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(self.queue.as_bytes()), self.offset, self.receipt)
    }

    pub fn decode(text: &str) -> Result<ClientHandle> {
        let bad = || ProxyError::InvalidReceipt("not a receipt handle this proxy issued".into());
        if text.len() > HANDLE_MAX_BYTES {
            return Err(bad());
        }
        let mut parts = text.splitn(3, '.');
        let (Some(queue), Some(offset), Some(receipt)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let queue = String::from_utf8(URL_SAFE_NO_PAD.decode(queue).map_err(|_| bad())?).map_err(|_| bad())?;
        sluice_engine::queue::validate_queue_name(&queue).map_err(|_| bad())?;
        let offset = offset.parse().map_err(|_| bad())?;
        if receipt.is_empty() {
            return Err(bad());
        }
        Ok(ClientHandle { queue, offset, receipt: receipt.to_string() })
    }
}

/// Parses a RocketMQ tag expression: `*` (or empty) for all, else `a || b || c`.
pub fn tag_filter(expression: Option<&v2::FilterExpression>) -> Result<Option<Vec<String>>> {
    let Some(expression) = expression else { return Ok(None) };
    if expression.r#type == v2::FilterType::Sql as i32 {
        return Err(ProxyError::NotImplemented { what: "SQL92 filter expressions".into() });
    }
    let text = expression.expression.trim();
    if text.is_empty() || text == "*" {
        return Ok(None);
    }
    if text.len() > FIELD_MAX_BYTES * 4 {
        return Err(ProxyError::BadRequest("filter expression too long".into()));
    }
    Ok(Some(text.split("||").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_round_trips_and_rejects_garbage() {
        let handle = ClientHandle { queue: "orders#3".into(), offset: 42, receipt: "abc_-DEF".into() };
        assert_eq!(ClientHandle::decode(&handle.encode()).unwrap(), handle);
        for bad in ["", "x", "a.b", "!!.1.r", "b3JkZXJzIzM.notanumber.r", "b3JkZXJzIzM.1.", &"a".repeat(5000)] {
            assert!(ClientHandle::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tag_expressions() {
        let expr = |s: &str| v2::FilterExpression { r#type: v2::FilterType::Tag as i32, expression: s.into() };
        assert_eq!(tag_filter(None).unwrap(), None);
        assert_eq!(tag_filter(Some(&expr("*"))).unwrap(), None);
        assert_eq!(tag_filter(Some(&expr("a || b"))).unwrap(), Some(vec!["a".into(), "b".into()]));
    }
}
