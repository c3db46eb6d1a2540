//! RocketMQ messages to stored records and back, and the handles clients hold: receipt
//! handles, transaction ids and recall handles.
//!
//! What the broker schedules and filters by (type, message group, delivery time, priority,
//! lite topic, user properties) goes into the record's attributes; the rest of the metadata
//! (born time and host, trace context, topic name, body encoding) into `StoredProperties`, which
//! only the proxy reads. Records written before attributes existed kept everything in
//! `StoredProperties`; `incoming` reads both.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use prost::Message as _;
use sluice_transport::messages::EntryAttributes;
use sluice_transport::model::record::FLAG_ATTRIBUTES;
use sluice_transport::model::{message_type, RecordView};

use crate::error::{ProxyError, Result};
use crate::pb::apache::rocketmq::v2;
use crate::pb::sluice::store::v1::StoredProperties;

/// Most keys one message carries.
pub const KEYS_MAX: usize = 32;
/// Longest tag, key or property key/value, in bytes.
pub const FIELD_MAX_BYTES: usize = 1024;
/// Most user properties one message carries.
pub const USER_PROPERTIES_MAX: usize = 128;
/// User property keys and values, tag and keys together, in bytes (RocketMQ's 16 KiB).
pub const PROPERTIES_MAX_BYTES: usize = 16 << 10;
/// Longest client message id.
pub const MESSAGE_ID_MAX_BYTES: usize = 128;
/// Longest message group, in bytes (RocketMQ refuses 64 and more).
pub const MESSAGE_GROUP_MAX_BYTES: usize = 63;
/// How far ahead a delay message may be due (RocketMQ's 40 days; the broker checks it too).
pub const DELAY_MAX_MS: u64 = 40 * 24 * 3600 * 1000;

/// A message ready to append.
pub struct Outgoing {
    pub message_id: String,
    pub tag: String,
    pub keys: Vec<String>,
    pub attributes: EntryAttributes,
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

pub fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64).saturating_mul(1000).saturating_add((t.nanos.max(0) / 1_000_000) as u64)
}

pub fn timestamp_of_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Validates a client message of type `kind` and encodes what the record needs. Body limits
/// and the topic's type are checked by the caller.
pub fn outgoing(message: &v2::Message, topic: &str, kind: u8, now_ms: u64) -> Result<Outgoing> {
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
    check_user_properties(message, &tag, &system.keys)?;
    let attributes = attributes_of(message, system, kind, now_ms)?;
    let stored = StoredProperties {
        born_timestamp: system.born_timestamp,
        born_host: system.born_host.clone(),
        trace_context: system.trace_context.clone(),
        topic: topic.to_string(),
        topic_namespace: message.topic.as_ref().map(|t| t.resource_namespace.clone()).unwrap_or_default(),
        body_encoding: system.body_encoding,
        ..Default::default()
    };
    Ok(Outgoing {
        message_id: system.message_id.clone(),
        tag,
        keys: system.keys.clone(),
        attributes,
        properties: stored.encode_to_vec(),
    })
}

fn check_user_properties(message: &v2::Message, tag: &str, keys: &[String]) -> Result<()> {
    if message.user_properties.len() > USER_PROPERTIES_MAX {
        return Err(ProxyError::BadRequest(format!("at most {USER_PROPERTIES_MAX} user properties per message")));
    }
    for k in message.user_properties.keys() {
        check_field("property key", k)?;
    }
    let size = message.user_properties.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + tag.len()
        + keys.iter().map(String::len).sum::<usize>();
    if size > PROPERTIES_MAX_BYTES {
        return Err(ProxyError::PropertiesTooLarge { size, max: PROPERTIES_MAX_BYTES });
    }
    Ok(())
}

fn attributes_of(
    message: &v2::Message,
    system: &v2::SystemProperties,
    kind: u8,
    now_ms: u64,
) -> Result<EntryAttributes> {
    let message_group = system.message_group.clone().unwrap_or_default();
    if kind == message_type::FIFO {
        if message_group.is_empty() || message_group.len() > MESSAGE_GROUP_MAX_BYTES {
            return Err(ProxyError::IllegalMessageGroup(format!(
                "a FIFO message needs a message group of 1..={MESSAGE_GROUP_MAX_BYTES} bytes"
            )));
        }
        if message_group.chars().any(char::is_control) {
            return Err(ProxyError::IllegalMessageGroup("no control characters in a message group".into()));
        }
    }
    let delivery_ms = system.delivery_timestamp.as_ref().map_or(0, timestamp_ms);
    if kind == message_type::DELAY {
        if delivery_ms == 0 {
            return Err(ProxyError::IllegalDeliveryTime("a DELAY message needs a delivery_timestamp".into()));
        }
        if delivery_ms > now_ms + DELAY_MAX_MS {
            return Err(ProxyError::IllegalDeliveryTime(format!(
                "the delivery time is {} s ahead; at most 40 days ({} s) is allowed",
                (delivery_ms - now_ms) / 1000,
                DELAY_MAX_MS / 1000
            )));
        }
    }
    let mut user_properties: Vec<(String, String)> =
        message.user_properties.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    // A stable order, so the same message is stored the same way.
    user_properties.sort();
    Ok(EntryAttributes {
        message_type: kind,
        priority: system.priority.unwrap_or(0),
        delivery_ms,
        message_group,
        lite_topic: system.lite_topic.clone().unwrap_or_default(),
        user_properties,
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
    let a = &view.attributes;
    // Records written before attributes existed kept these in the stored properties.
    let legacy = view.flags & FLAG_ATTRIBUTES == 0;
    let (kind, group, delivery_timestamp, priority, user_properties) = if legacy {
        (stored.message_type, stored.message_group, stored.delivery_timestamp, stored.priority, stored.user_properties)
    } else {
        (
            i32::from(a.message_type),
            (!a.message_group.is_empty()).then(|| a.message_group.to_string()),
            (a.delivery_ms != 0).then(|| timestamp_of_ms(a.delivery_ms)),
            (a.priority != 0).then_some(a.priority),
            a.user_properties().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        )
    };
    let system = v2::SystemProperties {
        tag: (!view.tag.is_empty()).then(|| view.tag.to_string()),
        keys: view.keys().map(str::to_string).collect(),
        message_id: view.message_id.to_string(),
        body_digest: Some(v2::Digest { r#type: v2::DigestType::Md5 as i32, checksum: digest }),
        body_encoding: if stored.body_encoding == 0 { v2::Encoding::Identity as i32 } else { stored.body_encoding },
        message_type: if kind == 0 { i32::from(message_type::NORMAL) } else { kind },
        born_timestamp: stored.born_timestamp,
        born_host: stored.born_host,
        store_timestamp: Some(timestamp_of_ms(view.store_ms)),
        store_host: delivery.store_host.to_string(),
        delivery_timestamp,
        // While spans are exported, the handle `ClientHandle::encode` gives with the message's
        // traceparent in it (so the ack's span can link to it). Not otherwise: an older proxy
        // cannot read that handle unless its brokers are new enough to ignore the extra part.
        receipt_handle: Some(match stored.trace_context.as_deref().and_then(traceparent) {
            Some(t) if !delivery.receipt_handle.is_empty() && sluice_transport::spans::exported() => {
                format!("{}.{t}", delivery.receipt_handle)
            }
            _ => delivery.receipt_handle.clone(),
        }),
        queue_id: delivery.queue_id,
        queue_offset: Some(delivery.offset as i64),
        invisible_duration: Some(prost_types::Duration {
            seconds: delivery.invisible.as_secs() as i64,
            nanos: delivery.invisible.subsec_nanos() as i32,
        }),
        delivery_attempt: Some(delivery.attempt.max(1) as i32),
        message_group: group,
        trace_context: stored.trace_context,
        orphaned_transaction_recovery_duration: None,
        dead_letter_queue: None,
        lite_topic: (!a.lite_topic.is_empty()).then(|| a.lite_topic.to_string()),
        priority,
    };
    Ok(v2::Message {
        topic: Some(v2::Resource { resource_namespace: stored.topic_namespace, name: stored.topic }),
        user_properties,
        system_properties: Some(system),
        body: view.body.to_vec(),
    })
}

/// The receipt handle a client holds: the queue, the offset and the broker's authenticated
/// receipt. The proxy reads queue and offset to route; the broker checks the receipt. When the
/// message carried a W3C `traceparent`, the handle carries it too, so the span of the ack can
/// link to the producer's trace (it is not authenticated: it only ever names a span link).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandle {
    pub queue: String,
    pub offset: u64,
    pub receipt: String,
    pub traceparent: Option<String>,
}

/// Length of a version-00 W3C `traceparent`: `00-{32 hex trace id}-{16 hex span id}-{2 hex flags}`.
const TRACEPARENT_BYTES: usize = 55;

/// `text` when it is a well-formed version-00 W3C `traceparent` with a non-zero trace and span
/// id (what RocketMQ clients put in a message's `trace_context`); anything else is `None`.
pub fn traceparent(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    if bytes.len() != TRACEPARENT_BYTES || !text.starts_with("00-") || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let hex = |range: std::ops::Range<usize>| bytes[range].iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let non_zero = |range: std::ops::Range<usize>| bytes[range].iter().any(|b| *b != b'0');
    let well_formed = hex(3..35) && hex(36..52) && hex(53..55) && non_zero(3..35) && non_zero(36..52);
    well_formed.then_some(text)
}

/// Longest receipt handle, transaction id or recall handle accepted from a client.
pub const HANDLE_MAX_BYTES: usize = 1024;

fn decode_queue(text: &str) -> Option<String> {
    let queue = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
    sluice_transport::model::placement::check_queue_name(&queue).ok()?;
    Some(queue)
}

impl ClientHandle {
    pub fn encode(&self) -> String {
        let queue = URL_SAFE_NO_PAD.encode(self.queue.as_bytes());
        match &self.traceparent {
            Some(traceparent) => format!("{queue}.{}.{}.{traceparent}", self.offset, self.receipt),
            None => format!("{queue}.{}.{}", self.offset, self.receipt),
        }
    }

    /// Reads `queue.offset.receipt[.traceparent]` (receipts are base64url, so never hold a dot).
    pub fn decode(text: &str) -> Result<ClientHandle> {
        let bad = || ProxyError::InvalidReceipt("not a receipt handle this proxy issued".into());
        if text.len() > HANDLE_MAX_BYTES {
            return Err(bad());
        }
        let mut parts = text.splitn(4, '.');
        let (Some(queue), Some(offset), Some(receipt)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let queue = decode_queue(queue).ok_or_else(bad)?;
        let offset = offset.parse().map_err(|_| bad())?;
        if receipt.is_empty() {
            return Err(bad());
        }
        let traceparent = match parts.next() {
            None => None,
            Some(part) => Some(traceparent(part).ok_or_else(bad)?.to_string()),
        };
        Ok(ClientHandle { queue, offset, receipt: receipt.to_string(), traceparent })
    }
}

/// A transaction id: where the half message is stored (queue and log position). The broker
/// also checks the message id the client sends with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionId {
    pub queue: String,
    pub position: u64,
}

impl TransactionId {
    pub fn encode(&self) -> String {
        format!("{}.{}", URL_SAFE_NO_PAD.encode(self.queue.as_bytes()), self.position)
    }

    pub fn decode(text: &str) -> Result<TransactionId> {
        let bad = || ProxyError::InvalidTransactionId("not a transaction id this cluster issued".into());
        if text.len() > HANDLE_MAX_BYTES {
            return Err(bad());
        }
        let (queue, position) = text.split_once('.').ok_or_else(bad)?;
        Ok(TransactionId {
            queue: decode_queue(queue).ok_or_else(bad)?,
            position: position.parse().map_err(|_| bad())?,
        })
    }
}

/// A recall handle: which delay message (queue, log position, due time, id) to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallHandle {
    pub queue: String,
    pub position: u64,
    pub due_ms: u64,
    pub message_id: String,
}

impl RecallHandle {
    pub fn encode(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            URL_SAFE_NO_PAD.encode(self.queue.as_bytes()),
            self.position,
            self.due_ms,
            URL_SAFE_NO_PAD.encode(self.message_id.as_bytes())
        )
    }

    pub fn decode(text: &str) -> Result<RecallHandle> {
        let bad = || ProxyError::InvalidRecallHandle("not a recall handle this cluster issued".into());
        if text.len() > HANDLE_MAX_BYTES {
            return Err(bad());
        }
        let parts: Vec<&str> = text.split('.').collect();
        let [queue, position, due_ms, id] = parts[..] else { return Err(bad()) };
        Ok(RecallHandle {
            queue: decode_queue(queue).ok_or_else(bad)?,
            position: position.parse().map_err(|_| bad())?,
            due_ms: due_ms.parse().map_err(|_| bad())?,
            message_id: String::from_utf8(URL_SAFE_NO_PAD.decode(id).map_err(|_| bad())?).map_err(|_| bad())?,
        })
    }
}

/// A client's filter expression as the broker takes it, refused here if it does not parse.
pub fn filter_spec(expression: Option<&v2::FilterExpression>) -> Result<sluice_transport::messages::FilterSpec> {
    use sluice_transport::model::filter::{Filter, KIND_ALL, KIND_SQL, KIND_TAG};
    let Some(expression) = expression else {
        return Ok(sluice_transport::messages::FilterSpec::default());
    };
    let kind = if expression.r#type == v2::FilterType::Sql as i32 { KIND_SQL } else { KIND_TAG };
    let text = expression.expression.trim();
    Filter::parse(kind, text).map_err(|e| ProxyError::IllegalFilter(e.to_string()))?;
    if kind == KIND_TAG && (text.is_empty() || text == "*") {
        return Ok(sluice_transport::messages::FilterSpec { kind: KIND_ALL, expression: String::new() });
    }
    Ok(sluice_transport::messages::FilterSpec { kind, expression: text.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_reject_garbage() {
        let handle =
            ClientHandle { queue: "orders#3".into(), offset: 42, receipt: "abc_-DEF".into(), traceparent: None };
        assert_eq!(ClientHandle::decode(&handle.encode()).unwrap(), handle);
        let traced = ClientHandle { traceparent: Some(TRACEPARENT.into()), ..handle.clone() };
        assert_eq!(ClientHandle::decode(&traced.encode()).unwrap(), traced);
        let not_traceparent = format!("{}.00-zz", handle.encode());
        for bad in [
            "",
            "x",
            "a.b",
            "!!.1.r",
            "b3JkZXJzIzM.notanumber.r",
            "b3JkZXJzIzM.1.",
            &not_traceparent,
            &"a".repeat(5000),
        ] {
            assert!(ClientHandle::decode(bad).is_err(), "{bad:?}");
        }
        let id = TransactionId { queue: "t#1".into(), position: 4096 };
        assert_eq!(TransactionId::decode(&id.encode()).unwrap(), id);
        assert!(TransactionId::decode("x.y").is_err());
        let recall = RecallHandle { queue: "t#1".into(), position: 8, due_ms: 99, message_id: "M.1".into() };
        assert_eq!(RecallHandle::decode(&recall.encode()).unwrap(), recall);
        assert!(RecallHandle::decode("a.b.c").is_err());
    }

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_well_formed_traceparents_are_taken() {
        assert_eq!(traceparent(TRACEPARENT), Some(TRACEPARENT));
        let zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zero_span = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let version = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let dashes = "00-4bf92f3577b34da6a3ce929d0e0e4736+00f067aa0ba902b7-01";
        for bad in ["", "00-abc", zero_trace, zero_span, upper, version, dashes, &format!("{TRACEPARENT}0")] {
            assert_eq!(traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn filter_expressions() {
        let expr = |t: v2::FilterType, s: &str| v2::FilterExpression { r#type: t as i32, expression: s.into() };
        assert_eq!(filter_spec(None).unwrap().kind, 0);
        assert_eq!(filter_spec(Some(&expr(v2::FilterType::Tag, "*"))).unwrap().kind, 0);
        assert_eq!(filter_spec(Some(&expr(v2::FilterType::Tag, "a || b"))).unwrap().expression, "a || b");
        assert_eq!(filter_spec(Some(&expr(v2::FilterType::Sql, "a > 1"))).unwrap().kind, 2);
        let err = filter_spec(Some(&expr(v2::FilterType::Sql, "a >"))).unwrap_err();
        assert_eq!(err.code(), v2::Code::IllegalFilterExpression);
    }

    fn message(kind: u8, group: Option<&str>, delivery_ms: u64) -> v2::Message {
        v2::Message {
            topic: Some(v2::Resource { resource_namespace: String::new(), name: "t".into() }),
            user_properties: [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into(),
            system_properties: Some(v2::SystemProperties {
                message_id: "M1".into(),
                message_type: i32::from(kind),
                message_group: group.map(str::to_string),
                delivery_timestamp: (delivery_ms > 0).then(|| timestamp_of_ms(delivery_ms)),
                ..Default::default()
            }),
            body: b"x".to_vec(),
        }
    }

    #[test]
    fn type_specific_fields_are_checked() {
        let now = 1_700_000_000_000;
        let send = |m: &v2::Message| outgoing(m, "t", m.system_properties.as_ref().unwrap().message_type as u8, now);
        let fifo = send(&message(message_type::FIFO, Some("g1"), 0)).unwrap();
        assert_eq!(fifo.attributes.message_group, "g1");
        assert_eq!(fifo.attributes.user_properties, vec![("a".into(), "1".into()), ("b".into(), "2".into())]);
        let err = send(&message(message_type::FIFO, None, 0)).err().unwrap();
        assert_eq!(err.code(), v2::Code::IllegalMessageGroup);
        let delay = send(&message(message_type::DELAY, None, now + 5000)).unwrap();
        assert_eq!(delay.attributes.delivery_ms, now + 5000);
        let err = send(&message(message_type::DELAY, None, now + DELAY_MAX_MS + 1000)).err().unwrap();
        assert_eq!(err.code(), v2::Code::IllegalDeliveryTime);
        assert!(send(&message(message_type::DELAY, None, 0)).is_err());
    }
}
