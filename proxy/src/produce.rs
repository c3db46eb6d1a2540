//! SendMessage: validate, pick each message's queue, one append per owning shard (sent
//! concurrently), answer per message.

use std::collections::HashMap;

use sluice_engine::broker::queues::message_type;
use sluice_transport::messages::{AppendEntry, AppendRequest, AppendResponse};

use crate::convert::{self, Outgoing};
use crate::error::{ok_status, status, ProxyError};
use crate::pb::apache::rocketmq::v2::{
    Code, Message, SendMessageRequest, SendMessageResponse, SendResultEntry, Status as PbStatus,
};
use crate::routing::Owner;
use crate::service::Messaging;
use crate::state::Counters;
use crate::topics::message_type_name;

struct Prepared<'a> {
    index: usize,
    queue: String,
    outgoing: Outgoing,
    body: &'a [u8],
}

fn check_message(this: &Messaging, message: &Message, meta: &crate::topics::TopicMeta) -> Result<(), ProxyError> {
    let given = message.system_properties.as_ref().map_or(0, |s| s.message_type);
    let given = u8::try_from(given).unwrap_or(0);
    if meta.message_type != message_type::NORMAL {
        return Err(ProxyError::NotImplemented {
            what: format!("sending to a {} topic", message_type_name(meta.message_type)),
        });
    }
    if given != 0 && given != meta.message_type {
        return Err(ProxyError::MessageTypeMismatch {
            topic: meta.name.clone(),
            expected: message_type_name(meta.message_type).into(),
            given: message_type_name(given).into(),
        });
    }
    if message.body.is_empty() {
        return Err(ProxyError::BodyEmpty);
    }
    let max = this.state.settings.max_body_bytes;
    if message.body.len() > max {
        return Err(ProxyError::BodyTooLarge { size: message.body.len(), max });
    }
    Ok(())
}

async fn prepare<'a>(this: &Messaging, index: usize, message: &'a Message) -> Result<Prepared<'a>, ProxyError> {
    let topic = message.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message has no topic".into()))?;
    let meta = this.topic(&topic.name).await?;
    check_message(this, message, &meta)?;
    let outgoing = convert::outgoing(message, &meta.name)?;
    // Clients leave queue_id at 0 whichever queue they picked, so the proxy spreads
    // messages by their id instead.
    let queue_index = crc32c::crc32c(outgoing.message_id.as_bytes()) % meta.queue_count;
    Ok(Prepared { index, queue: meta.queue(queue_index), outgoing, body: &message.body })
}

pub async fn send(this: &Messaging, request: SendMessageRequest) -> SendMessageResponse {
    let messages = request.messages;
    if messages.is_empty() || messages.len() > this.state.settings.send_batch_max {
        let why = format!("a send carries 1..={} messages", this.state.settings.send_batch_max);
        return SendMessageResponse { status: Some(status(Code::BadRequest, why)), entries: Vec::new() };
    }
    let mut results: Vec<Option<Result<u64, PbStatus>>> = (0..messages.len()).map(|_| None).collect();
    let mut per_shard: HashMap<Owner, Vec<Prepared<'_>>> = HashMap::new();
    for (index, message) in messages.iter().enumerate() {
        match prepare(this, index, message).await {
            Ok(prepared) => per_shard.entry(this.state.brokers.owner(&prepared.queue)).or_default().push(prepared),
            Err(e) => results[index] = Some(Err(e.status())),
        }
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
                    properties: &p.outgoing.properties,
                    body: p.body,
                })
                .collect(),
        };
        let reply = this.state.brokers.call(owner, &request).await;
        let offsets: Result<Vec<u64>, ProxyError> = reply.and_then(|frame| {
            let acks = frame
                .access::<AppendResponse>()
                .map_err(|e| ProxyError::Broker { code: e.code(), message: e.to_string() })?;
            Ok(acks.acks.iter().map(|a| a.offsets.first().map_or(0, |o| o.to_native())).collect())
        });
        (batch.into_iter().map(|p| p.index).collect::<Vec<_>>(), offsets)
    });
    for (indexes, outcome) in futures::future::join_all(calls).await {
        match outcome {
            Ok(offsets) => {
                for (index, offset) in indexes.into_iter().zip(offsets) {
                    results[index] = Some(Ok(offset));
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
    let mut codes = Vec::with_capacity(messages.len());
    for (message, result) in messages.iter().zip(results) {
        let message_id = message.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default();
        let (entry_status, offset) =
            match result.unwrap_or_else(|| Err(status(Code::InternalServerError, "message was not sent"))) {
                Ok(offset) => {
                    Counters::add(&this.state.counters.sent, 1);
                    (ok_status(), offset as i64)
                }
                Err(failed) => {
                    Counters::add(&this.state.counters.errors, 1);
                    (failed, 0)
                }
            };
        codes.push(entry_status.code);
        entries.push(SendResultEntry {
            status: Some(entry_status),
            message_id,
            transaction_id: String::new(),
            offset,
            recall_handle: String::new(),
        });
    }
    let overall = if codes.iter().all(|c| *c == codes[0]) {
        entries[0].status.clone()
    } else {
        Some(status(Code::MultipleResults, "messages of this batch had different outcomes; see each entry"))
    };
    SendMessageResponse { status: overall, entries }
}
