//! Pop consumption through the proxy: receive (with long polling and tag filtering), ack,
//! change invisible duration, dead-lettering, and offsets.
//!
//! A receive names one queue of the topic, but waiting on it alone would leave messages on
//! the others unseen for the whole poll. So it first takes what any queue has (starting with
//! the named one), and only then long-polls the named queue, in slices of at most
//! `SWEEP_SLICE` so the others are looked at again.

use std::time::{Duration, Instant};

use sluice_transport::messages::{
    AckRequest, AckResponse, AppendEntry, AppendRequest, ChangeInvisibleRequest, ChangeInvisibleResponse,
    CommitOffsetRequest, PopRequest, PopResponse, QueryOffsetRequest as BrokerQueryOffset,
    QueryOffsetResponse as BrokerQueryOffsetReply, ReadRequest, ReadResponse,
};

use crate::convert::{self, ClientHandle, Delivery};
use crate::error::{ok_status, status, ProxyError, Result};
use crate::pb::apache::rocketmq::v2::*;
use crate::renew::Renewal;
use crate::service::{duration_of, timestamp_now, Messaging};
use crate::state::Counters;
use crate::topics::{queue_name, TopicMeta};

/// Longest wait on one queue before the others of the topic are looked at again.
const SWEEP_SLICE: Duration = Duration::from_millis(1000);
/// Prefix of a group's dead-letter topic (RocketMQ's naming).
pub const DLQ_PREFIX: &str = "%DLQ%";

/// Longest consumer group name: its dead-letter topic `%DLQ%group` must be a valid topic name.
pub const GROUP_NAME_MAX_BYTES: usize = crate::topics::TOPIC_NAME_MAX_BYTES - DLQ_PREFIX.len();

pub fn group_name(group: Option<&Resource>) -> Result<String> {
    let group = group.map(|g| g.name.clone()).unwrap_or_default();
    if group.is_empty()
        || group.len() > GROUP_NAME_MAX_BYTES
        || !group.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'_' | b'-'))
    {
        return Err(ProxyError::BadRequest(format!(
            "consumer group {group:?} must be 1..={GROUP_NAME_MAX_BYTES} characters of a-z A-Z 0-9 % | _ -"
        )));
    }
    Ok(group)
}

struct Received {
    message: Message,
    /// (client handle, broker receipt) when the delivery is auto-renewed.
    renew: Option<(String, String)>,
}

/// Pops from one queue without waiting longer than `wait`.
#[allow(clippy::too_many_arguments)]
async fn pop_queue(
    this: &Messaging,
    meta: &TopicMeta,
    index: u32,
    group: &str,
    max_count: u32,
    invisible: Duration,
    wait: Duration,
    tags: Option<&[String]>,
    auto_renew: bool,
    max_attempts: u32,
) -> Result<Vec<Received>> {
    let queue = meta.queue(index);
    let request = PopRequest {
        queue: queue.clone(),
        group: group.to_string(),
        max_count,
        max_bytes: this.state.settings.receive_bytes_max,
        invisible_ms: invisible.as_millis() as u64,
        long_poll_ms: wait.as_millis() as u64,
    };
    let frame = this.state.brokers.call_for(&queue, &request).await?;
    let popped = frame.access::<PopResponse>()?;
    let owner = this.state.brokers.owner(&queue);
    let store_host = this.state.brokers.shard_endpoint(owner).to_string();
    let mut out = Vec::with_capacity(popped.messages.len());
    let mut filtered = Vec::new();
    for m in popped.messages.iter() {
        let record: &[u8] = &m.record;
        if m.delivery_attempt.to_native() > max_attempts {
            // Consumers that never forward (non-FIFO) rely on the server to dead-letter.
            let handle = ClientHandle {
                queue: queue.clone(),
                offset: m.offset.to_native(),
                receipt: m.receipt.as_str().to_string(),
            };
            if let Err(e) = dead_letter_record(this, group, &handle, record, m.receipt.as_str()).await {
                tracing::warn!(error = %e, queue, "moving a message to the dead-letter queue failed; it will be retried");
            }
            continue;
        }
        if let Some(tags) = tags {
            let tag = convert::record_tag(record).unwrap_or_default();
            if !tags.contains(&tag) {
                // Not for this subscription: consumed as filtered for the group.
                filtered.push(m.receipt.as_str().to_string());
                continue;
            }
        }
        let handle = ClientHandle {
            queue: queue.clone(),
            offset: m.offset.to_native(),
            receipt: m.receipt.as_str().to_string(),
        }
        .encode();
        let delivery = Delivery {
            queue_id: index as i32,
            offset: m.offset.to_native(),
            attempt: m.delivery_attempt.to_native(),
            receipt_handle: handle.clone(),
            invisible,
            store_host: &store_host,
        };
        let message = match convert::incoming(record, &delivery) {
            Ok(message) => message,
            Err(e) => {
                // Not a message this proxy can decode (written some other way): park it in the
                // dead-letter topic rather than fail the whole batch.
                let offset = m.offset.to_native();
                tracing::warn!(error = %e, queue, offset, "undecodable message goes to the dead-letter queue");
                let handle = ClientHandle { queue: queue.clone(), offset, receipt: m.receipt.as_str().to_string() };
                if let Err(e) = dead_letter_record(this, group, &handle, record, m.receipt.as_str()).await {
                    tracing::warn!(error = %e, queue, "dead-lettering failed; the message comes back after its invisible time");
                }
                continue;
            }
        };
        out.push(Received { message, renew: auto_renew.then(|| (handle, m.receipt.as_str().to_string())) });
    }
    if !filtered.is_empty() {
        Counters::add(&this.state.counters.filtered, filtered.len() as u64);
        let ack = AckRequest { queue: queue.clone(), group: group.to_string(), receipts: filtered };
        if let Err(e) = this.state.brokers.call_for(&queue, &ack).await {
            tracing::warn!(error = %e, queue, "acking filtered messages failed; they are filtered again when they come back");
        }
    }
    // Renewals start only for a batch that is returned whole.
    let now = Instant::now();
    for received in &out {
        if let Some((handle, receipt)) = &received.renew {
            this.state.renewals.track(
                handle.clone(),
                Renewal {
                    queue: queue.clone(),
                    group: group.to_string(),
                    receipt: receipt.clone(),
                    invisible_ms: invisible.as_millis() as u64,
                    renew_at: now + invisible / 2,
                    until: now + Duration::from_millis(this.state.settings.renew_max_ms),
                },
            );
        }
    }
    Ok(out)
}

async fn receive_messages(this: &Messaging, request: &ReceiveMessageRequest) -> Result<Vec<Received>> {
    let group = group_name(request.group.as_ref())?;
    let max_attempts = this.group(&group).await?.max_delivery_attempts;
    let mq =
        request.message_queue.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue is required".into()))?;
    let topic = mq.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue.topic is required".into()))?;
    let meta = this.topic(&topic.name).await?;
    let tags = convert::tag_filter(request.filter_expression.as_ref())?;
    let s = &this.state.settings;
    let max_count = u32::try_from(request.batch_size).unwrap_or(1).clamp(1, s.receive_batch_max);
    let in_range =
        |d: Duration| u64::try_from(d.as_millis()).is_ok_and(|ms| ms >= s.invisible_min_ms && ms <= s.invisible_max_ms);
    let invisible = match request.invisible_duration.as_ref().map(duration_of) {
        Some(d) if in_range(d) => d,
        Some(d) => {
            return Err(ProxyError::BadRequest(format!(
                "invisible_duration {d:?} is outside {}..={} ms",
                s.invisible_min_ms, s.invisible_max_ms
            )))
        }
        None => Duration::from_millis(s.invisible_default_ms),
    };
    let wait = this.state.long_poll(request.long_polling_timeout.as_ref().map(duration_of));
    let deadline = Instant::now() + wait;
    let first = u32::try_from(mq.id).ok().filter(|id| *id < meta.queue_count).unwrap_or(0);
    let order: Vec<u32> = (0..meta.queue_count).map(|i| (first + i) % meta.queue_count).collect();
    loop {
        // A queue whose broker is down is skipped; the receive fails only if all of them do.
        let mut last_error = None;
        let mut failures = 0;
        for &index in &order {
            let got = pop_queue(
                this,
                &meta,
                index,
                &group,
                max_count,
                invisible,
                Duration::ZERO,
                tags.as_deref(),
                request.auto_renew,
                max_attempts,
            )
            .await;
            match got {
                Ok(got) if !got.is_empty() => return Ok(got),
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    last_error = Some(e);
                }
            }
        }
        if let Some(e) = last_error.filter(|_| failures == order.len()) {
            return Err(e);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || this.state.is_shutting_down() {
            return Ok(Vec::new());
        }
        let slice = if meta.queue_count == 1 { left } else { left.min(SWEEP_SLICE) };
        let waited = tokio::select! {
            got = pop_queue(this, &meta, first, &group, max_count, invisible, slice, tags.as_deref(), request.auto_renew, max_attempts) => got?,
            _ = this.state.shutdown_started() => Vec::new(),
        };
        if !waited.is_empty() {
            return Ok(waited);
        }
    }
}

/// The responses of one ReceiveMessage: a status, one message each, then the delivery time.
pub async fn receive(
    this: &Messaging,
    request: ReceiveMessageRequest,
    _access: Endpoints,
) -> Vec<ReceiveMessageResponse> {
    use receive_message_response::Content;
    match receive_messages(this, &request).await {
        Ok(received) if received.is_empty() => {
            vec![ReceiveMessageResponse {
                content: Some(Content::Status(status(Code::MessageNotFound, "no new message"))),
            }]
        }
        Ok(received) => {
            Counters::add(&this.state.counters.received, received.len() as u64);
            let mut out = Vec::with_capacity(received.len() + 2);
            out.push(ReceiveMessageResponse { content: Some(Content::Status(ok_status())) });
            out.extend(
                received.into_iter().map(|r| ReceiveMessageResponse { content: Some(Content::Message(r.message)) }),
            );
            out.push(ReceiveMessageResponse { content: Some(Content::DeliveryTimestamp(timestamp_now())) });
            out
        }
        Err(e) => {
            Counters::add(&this.state.counters.errors, 1);
            vec![ReceiveMessageResponse { content: Some(Content::Status(e.status())) }]
        }
    }
}

pub async fn ack(this: &Messaging, request: AckMessageRequest) -> AckMessageResponse {
    let group = match group_name(request.group.as_ref()) {
        Ok(group) => group,
        Err(e) => return AckMessageResponse { status: Some(e.status()), entries: Vec::new() },
    };
    if let Err(e) = this.group(&group).await {
        return AckMessageResponse { status: Some(e.status()), entries: Vec::new() };
    }
    if request.entries.len() > this.state.settings.receive_batch_max as usize * 4 {
        let e = ProxyError::BadRequest("too many entries in one ack".into());
        return AckMessageResponse { status: Some(e.status()), entries: Vec::new() };
    }
    let mut entries = Vec::with_capacity(request.entries.len());
    for entry in &request.entries {
        let outcome = ack_one(this, &group, &entry.receipt_handle).await;
        if outcome.is_ok() {
            Counters::add(&this.state.counters.acked, 1);
        }
        entries.push(AckMessageResultEntry {
            message_id: entry.message_id.clone(),
            receipt_handle: entry.receipt_handle.clone(),
            status: Some(outcome.map_or_else(|e| e.status(), |()| ok_status())),
        });
    }
    let overall = match entries.iter().map(|e| e.status.as_ref().map_or(0, |s| s.code)).collect::<Vec<_>>() {
        codes if codes.iter().all(|c| *c == Code::Ok as i32) => ok_status(),
        codes if codes.len() == 1 => entries[0].status.clone().unwrap_or_else(ok_status),
        _ => status(Code::MultipleResults, "some entries failed; see each entry"),
    };
    AckMessageResponse { status: Some(overall), entries }
}

async fn ack_one(this: &Messaging, group: &str, handle_text: &str) -> Result<()> {
    let handle = ClientHandle::decode(handle_text)?;
    this.state.renewals.stop(handle_text);
    let request =
        AckRequest { queue: handle.queue.clone(), group: group.to_string(), receipts: vec![handle.receipt.clone()] };
    let frame = this.state.brokers.call_for(&handle.queue, &request).await?;
    let reply = frame.access::<AckResponse>()?;
    match reply.statuses.first().map(|s| s.to_native()) {
        Some(0) => Ok(()),
        Some(code) => Err(ProxyError::Broker {
            code,
            message: "the broker refused this receipt handle: it expired, was acked already, or is forged".into(),
        }),
        None => Err(ProxyError::Broker { code: 0, message: "the broker sent no ack status".into() }),
    }
}

pub async fn change_invisible(this: &Messaging, request: ChangeInvisibleDurationRequest) -> Result<String> {
    let group = group_name(request.group.as_ref())?;
    this.group(&group).await?;
    let handle = ClientHandle::decode(&request.receipt_handle)?;
    let s = &this.state.settings;
    let invisible = request
        .invisible_duration
        .as_ref()
        .map(duration_of)
        .ok_or_else(|| ProxyError::BadRequest("invisible_duration is required".into()))?;
    let ms = u64::try_from(invisible.as_millis()).unwrap_or(u64::MAX);
    if ms < s.invisible_min_ms || ms > s.invisible_max_ms {
        return Err(ProxyError::BadRequest(format!(
            "invisible_duration must be {}..={} ms",
            s.invisible_min_ms, s.invisible_max_ms
        )));
    }
    // The client takes over the deadline: stop auto-renewing this delivery.
    this.state.renewals.stop(&request.receipt_handle);
    let broker_request = ChangeInvisibleRequest {
        queue: handle.queue.clone(),
        group,
        receipt: handle.receipt.clone(),
        invisible_ms: ms,
        renew: false,
    };
    let frame = this.state.brokers.call_for(&handle.queue, &broker_request).await?;
    let changed = frame.access::<ChangeInvisibleResponse>()?;
    Ok(ClientHandle { receipt: changed.receipt.as_str().to_string(), ..handle }.encode())
}

/// Copies the message into the group's dead-letter topic, then acks it.
pub async fn dead_letter(this: &Messaging, request: ForwardMessageToDeadLetterQueueRequest) -> Result<()> {
    let group = group_name(request.group.as_ref())?;
    let handle = ClientHandle::decode(&request.receipt_handle)?;
    this.state.renewals.stop(&request.receipt_handle);
    // Hold the delivery while copying, which also proves the receipt is live and tells which
    // offset it names (the offset in the handle is not authenticated).
    let hold = ChangeInvisibleRequest {
        queue: handle.queue.clone(),
        group: group.clone(),
        receipt: handle.receipt.clone(),
        invisible_ms: 60_000,
        renew: false,
    };
    let frame = this.state.brokers.call_for(&handle.queue, &hold).await?;
    let reply = frame.access::<ChangeInvisibleResponse>()?;
    if reply.offset.to_native() != handle.offset {
        return Err(ProxyError::InvalidReceipt("the handle's offset does not match its receipt".into()));
    }
    let held = reply.receipt.as_str().to_string();
    let read = ReadRequest { queue: handle.queue.clone(), from_offset: handle.offset, max_count: 1, max_bytes: 1 };
    let frame = this.state.brokers.call_for(&handle.queue, &read).await?;
    let records = frame.access::<ReadResponse>()?;
    let record = records
        .records
        .iter()
        .find(|r| r.offset.to_native() == handle.offset)
        .ok_or_else(|| ProxyError::Broker { code: 0, message: "the message is no longer stored".into() })?;
    dead_letter_record(this, &group, &handle, &record.record, &held).await
}

/// Appends a stored record to the group's dead-letter topic, then acks its delivery.
async fn dead_letter_record(
    this: &Messaging,
    group: &str,
    handle: &ClientHandle,
    record: &[u8],
    receipt: &str,
) -> Result<()> {
    let view = sluice_engine::RecordView::parse(record)
        .map_err(|e| ProxyError::Broker { code: 0, message: format!("stored record is corrupt: {e}") })?;
    let dlq = ensure_dead_letter_topic(this, &format!("{DLQ_PREFIX}{group}")).await?;
    let entry = AppendEntry {
        queues: vec![dlq.queue(0)],
        message_id: view.message_id.to_string(),
        tag: view.tag.to_string(),
        keys: view.keys().map(str::to_string).collect(),
        properties: view.properties,
        body: view.body,
    };
    this.state.brokers.call_for(&dlq.queue(0), &AppendRequest { entries: vec![entry] }).await?;
    let ack = AckRequest { queue: handle.queue.clone(), group: group.to_string(), receipts: vec![receipt.to_string()] };
    this.state.brokers.call_for(&handle.queue, &ack).await?;
    Counters::add(&this.state.counters.dead_lettered, 1);
    Ok(())
}

async fn ensure_dead_letter_topic(this: &Messaging, topic: &str) -> Result<TopicMeta> {
    match this.state.topics.get(&this.state.brokers, topic).await {
        Ok(meta) => Ok(meta),
        Err(ProxyError::TopicNotFound(_)) => {
            let normal = sluice_engine::broker::queues::message_type::NORMAL;
            let (_, meta) = this.state.topics.create(&this.state.brokers, topic, normal, 1).await?;
            Ok(meta)
        }
        Err(e) => Err(e),
    }
}

fn queue_of(this: &Messaging, mq: Option<&MessageQueue>) -> Result<(String, String)> {
    let _ = this;
    let mq = mq.ok_or_else(|| ProxyError::BadRequest("message_queue is required".into()))?;
    let topic = mq.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue.topic is required".into()))?;
    let index = u32::try_from(mq.id).map_err(|_| ProxyError::BadRequest("message_queue.id must be >= 0".into()))?;
    Ok((topic.name.clone(), queue_name(&topic.name, index)))
}

async fn checked_queue(this: &Messaging, mq: Option<&MessageQueue>) -> Result<String> {
    let (topic, queue) = queue_of(this, mq)?;
    let meta = this.topic(&topic).await?;
    let index = mq.map_or(0, |m| m.id) as u32;
    if index >= meta.queue_count {
        return Err(ProxyError::BadRequest(format!("topic {topic:?} has queues 0..{}", meta.queue_count)));
    }
    Ok(queue)
}

pub async fn update_offset(this: &Messaging, request: UpdateOffsetRequest) -> Result<()> {
    let group = group_name(request.group.as_ref())?;
    let queue = checked_queue(this, request.message_queue.as_ref()).await?;
    let offset = u64::try_from(request.offset).map_err(|_| ProxyError::BadRequest("offset must be >= 0".into()))?;
    this.state.brokers.call_for(&queue, &CommitOffsetRequest { queue: queue.clone(), group, offset }).await?;
    Ok(())
}

async fn broker_offsets(this: &Messaging, queue: &str, group: String) -> Result<(Option<u64>, u64, u64)> {
    let frame = this.state.brokers.call_for(queue, &BrokerQueryOffset { queue: queue.to_string(), group }).await?;
    let reply = frame.access::<BrokerQueryOffsetReply>()?;
    let committed = reply.committed.as_ref().map(|c| c.to_native());
    Ok((committed, reply.min_offset.to_native(), reply.max_offset.to_native()))
}

pub async fn get_offset(this: &Messaging, request: GetOffsetRequest) -> Result<i64> {
    let group = group_name(request.group.as_ref())?;
    let queue = checked_queue(this, request.message_queue.as_ref()).await?;
    match broker_offsets(this, &queue, group).await? {
        (Some(committed), _, _) => Ok(committed as i64),
        (None, _, _) => Err(ProxyError::OffsetNotFound),
    }
}

pub async fn query_offset(this: &Messaging, request: QueryOffsetRequest) -> Result<i64> {
    let queue = checked_queue(this, request.message_queue.as_ref()).await?;
    let (_, min, max) = broker_offsets(this, &queue, String::new()).await?;
    match QueryOffsetPolicy::try_from(request.query_offset_policy) {
        Ok(QueryOffsetPolicy::Beginning) => Ok(min as i64),
        Ok(QueryOffsetPolicy::End) => Ok(max as i64),
        _ => Err(ProxyError::NotImplemented { what: "QueryOffset by timestamp".into() }),
    }
}
