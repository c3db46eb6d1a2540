//! SendMessage: validate, pick each message's queue, one append per owning shard (sent
//! concurrently), answer per message. A FIFO message goes to the queue its message group hashes
//! to, so a group stays in one queue; a delay message due later comes back with a recall
//! handle, and a transactional one with its transaction id. A LITE message goes to its lite
//! topic's own queue, created by the append.

use std::collections::HashMap;

use sluice_transport::cluster::Owner;
use sluice_transport::messages::{AppendEntry, AppendRequest, AppendResponse};
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{check_lite_topic_name, lite_queue};
use sluice_transport::model::record::OFFSET_HELD;

use crate::convert::{self, Outgoing, RecallHandle, TransactionId};
use crate::error::{ok_status, status, ProxyError};
use crate::pb::apache::rocketmq::v2::{
    Code, Message, SendMessageRequest, SendMessageResponse, SendResultEntry, Status as PbStatus,
};
use crate::service::Messaging;
use crate::state::Counters;

/// A topic takes messages of its own type (RocketMQ refuses any other); a message that names
/// no type is taken as the topic's. A PRIORITY topic also takes NORMAL messages (clients send
/// a message without a priority as NORMAL): they have priority 0, the lowest.
fn accepts(topic_type: u8, given: u8) -> bool {
    given == topic_type || given == 0 || (topic_type == message_type::PRIORITY && given == message_type::NORMAL)
}

struct Prepared<'a> {
    index: usize,
    queue: String,
    outgoing: Outgoing,
    body: &'a [u8],
    /// Its topic has a send quota (as this proxy last read the topic).
    send_quota: bool,
}

/// A message the broker stored, and what the client is told about it.
struct Sent {
    offset: u64,
    position: u64,
    queue: String,
    kind: u8,
    due_ms: u64,
}

fn check_message(this: &Messaging, message: &Message, meta: &crate::topics::TopicMeta) -> Result<u8, ProxyError> {
    let given = message.system_properties.as_ref().map_or(0, |s| s.message_type);
    let given = u8::try_from(given).unwrap_or(0);
    if let Some(priority) = message.system_properties.as_ref().and_then(|s| s.priority) {
        if meta.message_type != message_type::PRIORITY {
            return Err(ProxyError::MessageTypeMismatch {
                topic: meta.name.clone(),
                expected: message_type::name(meta.message_type).into(),
                given: format!("{} (it has a priority)", message_type::name(message_type::PRIORITY)),
            });
        }
        if priority < 0 {
            return Err(ProxyError::BadRequest(format!("priority {priority} is negative; priorities are 0 and up")));
        }
    }
    let lite = message.system_properties.as_ref().and_then(|s| s.lite_topic.as_deref()).unwrap_or("");
    if meta.message_type == message_type::LITE {
        check_lite_topic_name(lite).map_err(|why| {
            ProxyError::IllegalLiteTopic(format!(
                "a message to LITE topic {} needs a lite_topic: {lite:?} is {why}",
                meta.name
            ))
        })?;
    } else if !lite.is_empty() {
        return Err(ProxyError::IllegalLiteTopic(format!(
            "{} is a {} topic; only LITE topics take a lite_topic",
            meta.name,
            message_type::name(meta.message_type)
        )));
    }
    if !accepts(meta.message_type, given) {
        return Err(ProxyError::MessageTypeMismatch {
            topic: meta.name.clone(),
            expected: message_type::name(meta.message_type).into(),
            given: message_type::name(given).into(),
        });
    }
    if message.body.is_empty() {
        return Err(ProxyError::BodyEmpty);
    }
    let max = this.state.settings.max_body_bytes;
    if message.body.len() > max {
        return Err(ProxyError::BodyTooLarge { size: message.body.len(), max });
    }
    Ok(meta.message_type)
}

async fn prepare<'a>(
    this: &Messaging,
    index: usize,
    message: &'a Message,
    now_ms: u64,
) -> Result<Prepared<'a>, ProxyError> {
    let topic = message.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message has no topic".into()))?;
    let meta = this.topic(&topic.name).await?;
    let kind = check_message(this, message, &meta)?;
    let outgoing = convert::outgoing(message, &meta.name, kind, now_ms)?;
    if kind == message_type::LITE {
        // A lite topic is one queue (created by this first append), placed under the topic
        // queue its name hashes to: one lite topic, one order.
        let queue = lite_queue(&meta.name, meta.queue_count, &outgoing.attributes.lite_topic);
        return Ok(Prepared { index, queue, outgoing, body: &message.body, send_quota: meta.max_send_tps > 0 });
    }
    // Clients leave queue_id at 0 whichever queue they picked, so the proxy chooses: a FIFO
    // message by its group (one group, one queue, one order), others by message id.
    let spread = if kind == message_type::FIFO { &outgoing.attributes.message_group } else { &outgoing.message_id };
    let queue_index = crc32c::crc32c(spread.as_bytes()) % meta.queue_count;
    let send_quota = meta.max_send_tps > 0;
    Ok(Prepared { index, queue: meta.queue(queue_index), outgoing, body: &message.body, send_quota })
}

/// Keeps the messages their topics' send quotas have permits for (one each, in batch order);
/// the others get TOO_MANY_REQUESTS in `results`.
async fn within_send_quotas<'a>(
    this: &Messaging,
    messages: &[Message],
    ready: Vec<Prepared<'a>>,
    results: &mut [Option<Result<Sent, PbStatus>>],
) -> Vec<Prepared<'a>> {
    if !ready.iter().any(|p| p.send_quota) {
        // The usual send: no quota, nothing to look up or allocate.
        return ready;
    }
    let topic_of = |p: &Prepared<'_>| messages[p.index].topic.as_ref().map_or("", |t| t.name.as_str()).to_string();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for p in ready.iter().filter(|p| p.send_quota) {
        *counts.entry(topic_of(p)).or_default() += 1;
    }
    // Per topic with a quota: permits left, and what the messages beyond them are told.
    let mut permits: HashMap<String, (u32, PbStatus)> = HashMap::new();
    let until = std::time::Instant::now() + crate::quota::SEND_WAIT_MAX;
    for (topic, count) in counts {
        let Ok(meta) = this.topic(&topic).await else { continue };
        let quota = crate::quota::Quota::send(&meta);
        let wait = until.saturating_duration_since(std::time::Instant::now());
        let left = match crate::quota::acquire_all(&this.state, &quota, count, wait).await {
            Ok(granted) => (granted, crate::quota::over_quota(&quota, meta.max_send_tps, 0).status()),
            Err(e) => (0, e.status()),
        };
        permits.insert(topic, left);
    }
    let mut kept = Vec::with_capacity(ready.len());
    for p in ready {
        if !p.send_quota {
            kept.push(p);
            continue;
        }
        match permits.get_mut(&topic_of(&p)) {
            Some((0, refused)) => results[p.index] = Some(Err(refused.clone())),
            Some((left, _)) => {
                *left -= 1;
                kept.push(p);
            }
            None => kept.push(p),
        }
    }
    kept
}

pub async fn send(this: &Messaging, request: SendMessageRequest) -> SendMessageResponse {
    let messages = request.messages;
    if messages.is_empty() || messages.len() > this.state.settings.send_batch_max {
        let why = format!("a send carries 1..={} messages", this.state.settings.send_batch_max);
        return SendMessageResponse { status: Some(status(Code::BadRequest, why)), entries: Vec::new() };
    }
    let now_ms = crate::service::now_ms();
    let mut results: Vec<Option<Result<Sent, PbStatus>>> = (0..messages.len()).map(|_| None).collect();
    let mut ready = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        match prepare(this, index, message, now_ms).await {
            Ok(prepared) => ready.push(prepared),
            Err(e) => results[index] = Some(Err(e.status())),
        }
    }
    let mut per_shard: HashMap<Owner, Vec<Prepared<'_>>> = HashMap::new();
    for prepared in within_send_quotas(this, &messages, ready, &mut results).await {
        per_shard.entry(this.state.brokers.owner(&prepared.queue)).or_default().push(prepared);
    }
    let calls = per_shard.into_iter().map(|(owner, batch)| async move {
        let request = AppendRequest {
            entries: batch
                .iter()
                .map(|p| AppendEntry {
                    queues: vec![p.queue.clone()],
                    message_id: p.outgoing.message_id.clone(),
                    tag: p.outgoing.tag.clone(),
                    keys: p.outgoing.keys.clone(),
                    attributes: p.outgoing.attributes.clone(),
                    properties: &p.outgoing.properties,
                    body: p.body,
                })
                .collect(),
        };
        let reply = this.state.brokers.call(owner, &request).await.map_err(ProxyError::from);
        let acks: Result<Vec<(u64, u64)>, ProxyError> = reply.and_then(|frame| {
            let acks = frame.access::<AppendResponse>()?;
            Ok(acks
                .acks
                .iter()
                .map(|a| (a.offsets.first().map_or(0, |o| o.to_native()), a.position.to_native()))
                .collect())
        });
        let sent = acks.map(|acks| {
            batch
                .iter()
                .zip(acks)
                .map(|(p, (offset, position))| {
                    let a = &p.outgoing.attributes;
                    let sent =
                        Sent { offset, position, queue: p.queue.clone(), kind: a.message_type, due_ms: a.delivery_ms };
                    (p.index, sent)
                })
                .collect::<Vec<_>>()
        });
        (batch.iter().map(|p| p.index).collect::<Vec<_>>(), sent)
    });
    for (indexes, outcome) in futures::future::join_all(calls).await {
        match outcome {
            Ok(sent) => {
                for (index, sent) in sent {
                    results[index] = Some(Ok(sent));
                }
            }
            Err(e) => {
                let failed = e.status();
                for index in indexes {
                    results[index] = Some(Err(failed.clone()));
                }
            }
        }
    }
    let mut entries = Vec::with_capacity(messages.len());
    for (message, result) in messages.iter().zip(results) {
        let message_id = message.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default();
        let result = result.unwrap_or_else(|| Err(status(Code::InternalServerError, "message was not sent")));
        entries.push(result_entry(this, message_id, result));
    }
    let overall = if entries.iter().all(|e| e.status == entries[0].status) {
        entries[0].status.clone()
    } else {
        Some(status(Code::MultipleResults, "messages of this batch had different outcomes; see each entry"))
    };
    SendMessageResponse { status: overall, entries }
}

fn result_entry(this: &Messaging, message_id: String, result: Result<Sent, PbStatus>) -> SendResultEntry {
    match result {
        Ok(Sent { offset, position, queue, kind, due_ms }) => {
            Counters::add(&this.state.counters.sent, 1);
            let held = offset == OFFSET_HELD;
            let transaction_id = if kind == message_type::TRANSACTION {
                TransactionId { queue: queue.clone(), position }.encode()
            } else {
                String::new()
            };
            let recall_handle = if kind == message_type::DELAY && held {
                RecallHandle { queue, position, due_ms, message_id: message_id.clone() }.encode()
            } else {
                String::new()
            };
            SendResultEntry {
                status: Some(ok_status()),
                message_id,
                transaction_id,
                offset: if held { 0 } else { offset as i64 },
                recall_handle,
            }
        }
        Err(failed) => {
            Counters::add(&this.state.counters.errors, 1);
            SendResultEntry {
                status: Some(failed),
                message_id,
                transaction_id: String::new(),
                offset: 0,
                recall_handle: String::new(),
            }
        }
    }
}
