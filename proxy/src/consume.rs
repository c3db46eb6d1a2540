//! Pop consumption through the proxy: receive, ack, change invisible duration, dead-lettering,
//! and offsets. The proxy decides nothing about what a group gets next: the brokers do.
//!
//! A receive sends one pop per broker shard holding queues of the topic, all at once, and takes
//! what they have now. Only if that is nothing does it long-poll every shard at the (group,
//! topic) level: the first answer with messages is returned, the other polls are cancelled, and
//! whatever they had already taken is released at once, so it is neither lost nor hidden for an
//! invisible time. This runs in its own task: a client that goes away mid-poll cancels the polls
//! the same way. An empty long poll answers MESSAGE_NOT_FOUND a
//! little before the caller's gRPC deadline, never after it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use sluice_transport::cluster::{ClusterError, Owner};
use sluice_transport::messages::{
    AckRequest, AckResponse, AppendEntry, AppendRequest, ChangeInvisibleRequest, ChangeInvisibleResponse,
    CommitOffsetRequest, EntryAttributes, FilterSpec, GroupPolicy, PopCancelRequest, PopRequest, PopResponse,
    QueryOffsetRequest as BrokerQueryOffset, QueryOffsetResponse as BrokerQueryOffsetReply, ReadRequest, ReadResponse,
    ReleaseRequest,
};
use sluice_transport::model::{message_type, RecordView};
use sluice_transport::Frame;
use tracing::Instrument as _;

use crate::convert::{self, ClientHandle, Delivery};
use crate::error::{ok_status, status, ProxyError, Result};
use crate::lite::Caller;
use crate::pb::apache::rocketmq::v2::*;
use crate::renew::Renewal;
use crate::service::{duration_of, timestamp_now, Messaging};
use crate::state::{Counters, ProxyState};
use crate::topics::{queue_name, TopicMeta};

/// Prefix of a group's dead-letter topic (RocketMQ's naming).
pub const DLQ_PREFIX: &str = "%DLQ%";
/// An empty long poll answers this long before the caller's gRPC deadline, so the answer
/// arrives before the client gives up on the call.
pub const DEADLINE_RESERVE: Duration = Duration::from_millis(200);

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
    /// (client handle, queue, broker receipt) when the delivery is auto-renewed.
    renew: Option<(String, String, String)>,
}

/// A shard's pop reply and how many of its messages (from the first) this receive keeps.
struct Kept {
    owner: Owner,
    frame: Frame,
    keep: usize,
}

/// What a receive keeps, on its way to the client. Dropped before it gets there (the client
/// went away, the task was cancelled, the answer was never read), its messages are released at
/// once rather than staying hidden, and holding their FIFO groups, for the invisible time.
struct KeptBatch {
    state: Arc<ProxyState>,
    group: String,
    kept: Vec<Kept>,
}

impl KeptBatch {
    fn new(state: &Arc<ProxyState>, group: &str, kept: Vec<Kept>) -> KeptBatch {
        KeptBatch { state: state.clone(), group: group.to_string(), kept }
    }

    /// The messages reached the client's answer: nothing to release any more.
    fn handed_over(mut self) {
        self.kept.clear();
    }
}

impl Drop for KeptBatch {
    fn drop(&mut self) {
        if self.kept.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        for k in self.kept.drain(..) {
            release_messages(&self.state, &self.group, &k.frame, 0..k.keep);
        }
    }
}

fn popped_count(frame: &Frame) -> usize {
    frame.access::<PopResponse>().map_or(0, |r| r.messages.len())
}

/// Pops `request` from every shard in `owners` at once; see the module comment.
async fn pop_across(
    state: &Arc<ProxyState>,
    owners: BTreeSet<Owner>,
    request: PopRequest,
    want: Want,
) -> Result<KeptBatch> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    // The pops run in a task of their own (they may outlive a caller that went away); they
    // stay in the receive's trace.
    tokio::spawn(coordinate(state.clone(), owners, request, want, reply).in_current_span());
    tokio::select! {
        got = answer => got.unwrap_or_else(|_| Err(ProxyError::ShuttingDown)),
        _ = state.shutdown_started() => Ok(KeptBatch::new(state, "", Vec::new())),
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<KeptBatch>>;

/// How many messages a receive keeps, and which.
#[derive(Clone, Copy)]
struct Want {
    max_count: usize,
    merge: Merge,
}

/// How the shards' replies to one receive are merged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// In the order they arrive, up to `max_count`.
    FirstArrived,
    /// A PRIORITY topic: each shard's reply is in priority order, and the receive keeps the
    /// best `max_count` across the shards rather than the first to arrive.
    ByPriority,
    /// A fair topic: each shard's reply is in its fair clock's order, and the receive takes
    /// from the shards in turn, so every shard's tenants progress (taking the first reply
    /// whole would let one shard's tenants have every receive while it answers first).
    InTurn,
}

impl Want {
    /// How many a frame may add before the final choice.
    fn take_limit(&self) -> usize {
        if self.merge == Merge::FirstArrived {
            self.max_count
        } else {
            usize::MAX
        }
    }

    /// Settles what each shard's reply keeps (its first `keep` messages); the rest is
    /// released by the caller.
    fn settle(&self, kept: &mut [Kept]) {
        match self.merge {
            Merge::FirstArrived => {}
            Merge::ByPriority => self.settle_by_priority(kept),
            Merge::InTurn => self.settle_in_turn(kept),
        }
    }

    fn settle_in_turn(&self, kept: &mut [Kept]) {
        let available: Vec<usize> = kept.iter().map(|k| k.keep).collect();
        let mut taken = vec![0usize; kept.len()];
        let mut total = 0;
        while total < self.max_count {
            let before = total;
            for (i, have) in available.iter().enumerate() {
                if taken[i] < *have && total < self.max_count {
                    taken[i] += 1;
                    total += 1;
                }
            }
            if total == before {
                break;
            }
        }
        for (k, keep) in kept.iter_mut().zip(taken) {
            k.keep = keep;
        }
    }

    fn settle_by_priority(&self, kept: &mut [Kept]) {
        let priorities: Vec<Vec<i32>> = kept.iter().map(|k| priorities_of(&k.frame)).collect();
        let mut taken = vec![0usize; kept.len()];
        for _ in 0..self.max_count {
            let best = (0..kept.len())
                .filter(|&i| taken[i] < priorities[i].len())
                .max_by_key(|&i| (priorities[i][taken[i]], std::cmp::Reverse(i)));
            let Some(i) = best else { break };
            taken[i] += 1;
        }
        for (k, keep) in kept.iter_mut().zip(taken) {
            k.keep = keep;
        }
    }
}

/// The priority of each message of a pop reply, in reply order.
fn priorities_of(frame: &Frame) -> Vec<i32> {
    let Ok(popped) = frame.access::<PopResponse>() else { return Vec::new() };
    popped
        .messages
        .iter()
        .map(|m| RecordView::parse_unverified(&m.record).map_or(0, |r| r.attributes.priority))
        .collect()
}

/// First what every shard has now (pops that do not wait, all at once, merged); only if that
/// is nothing, long polls on every shard with the first answer winning. Taking everything
/// available at once keeps busy topics from bouncing messages through cancelled polls; waiting
/// on every shard keeps an idle topic's wake-up one hop.
async fn coordinate(state: Arc<ProxyState>, owners: BTreeSet<Owner>, request: PopRequest, want: Want, reply: Reply) {
    if owners.len() > 1 && request.long_poll_ms > 0 {
        let quick = PopRequest { long_poll_ms: 0, poll_id: 0, ..request.clone() };
        let (kept, failures) = pop_now(&state, &owners, &quick, want).await;
        if !kept.is_empty() || failures.len() == owners.len() {
            let answer = match failures.into_iter().next() {
                Some(e) if kept.is_empty() => Err(e.into()),
                _ => Ok(KeptBatch::new(&state, &request.group, kept)),
            };
            // Unread, the batch is dropped and so released.
            let _ = reply.send(answer);
            return;
        }
    }
    long_poll(state, owners, request, want, reply).await
}

/// Which shard's reply a receive considers first, turned on every receive: answers are
/// gathered in shard order, and always starting from the same shard would let it have every
/// receive whose batch it fills (with small batches, under a quota, the others never delivered).
static FIRST_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Pops every shard without waiting; keeps up to `max_count` and gives the rest back.
async fn pop_now(
    state: &Arc<ProxyState>,
    owners: &BTreeSet<Owner>,
    request: &PopRequest,
    want: Want,
) -> (Vec<Kept>, Vec<ClusterError>) {
    let calls = owners.iter().map(|&owner| async move { (owner, state.brokers.call(owner, request).await) });
    let mut kept = Vec::new();
    let mut count = 0;
    let mut failures = Vec::new();
    let mut results = futures::future::join_all(calls).await;
    if !results.is_empty() {
        let first = FIRST_SHARD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % results.len();
        results.rotate_left(first);
    }
    for (owner, result) in results {
        match result {
            Ok(frame) => take(&mut kept, &mut count, want.take_limit(), owner, frame),
            Err(e) => failures.push(e),
        }
    }
    want.settle(&mut kept);
    for k in &kept {
        release_popped(state, &request.group, &k.frame, k.keep);
    }
    (kept, failures)
}

async fn long_poll(state: Arc<ProxyState>, owners: BTreeSet<Owner>, request: PopRequest, want: Want, reply: Reply) {
    let request = Arc::new(request);
    let total = owners.len();
    let mut pending: FuturesUnordered<_> = owners
        .iter()
        .map(|&owner| {
            let (state, request) = (state.clone(), request.clone());
            async move { (owner, state.brokers.call(owner, &*request).await) }
        })
        .collect();
    let mut waiting = owners;
    let mut reply = Some(reply);
    let mut kept: Vec<Kept> = Vec::new();
    let mut count = 0usize;
    let mut failures: Vec<ClusterError> = Vec::new();
    loop {
        let next = tokio::select! {
            next = pending.next() => next,
            _ = client_gone(&mut reply) => {
                // The client went away: end the polls; what they took is released below.
                reply = None;
                cancel_polls(&state, &waiting, request.poll_id);
                continue;
            }
        };
        let Some((owner, result)) = next else { break };
        waiting.remove(&owner);
        let frame = match result {
            Ok(frame) => frame,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        if reply.is_none() {
            release_popped(&state, &request.group, &frame, 0);
            continue;
        }
        take(&mut kept, &mut count, want.take_limit(), owner, frame);
        if count == 0 {
            continue;
        }
        // Merge what the other shards have already answered, then answer the client.
        while let Some(Some((owner, result))) = pending.next().now_or_never() {
            waiting.remove(&owner);
            if let Ok(frame) = result {
                take(&mut kept, &mut count, want.take_limit(), owner, frame);
            }
        }
        cancel_polls(&state, &waiting, request.poll_id);
        want.settle(&mut kept);
        for k in &kept {
            release_popped(&state, &request.group, &k.frame, k.keep);
        }
        let tx = reply.take().expect("checked above");
        // Unread, the batch is dropped and so released.
        let _ = tx.send(Ok(KeptBatch::new(&state, &request.group, std::mem::take(&mut kept))));
        // Keep going: cancelled polls may still bring messages, which are released.
    }
    if let Some(tx) = reply {
        // The receive fails only when every shard failed; otherwise it is just empty.
        let all_failed = failures.len() == total;
        let answer = match failures.into_iter().next() {
            Some(e) if all_failed => Err(e.into()),
            _ => Ok(KeptBatch::new(&state, &request.group, kept)),
        };
        let _ = tx.send(answer);
    }
}

/// Completes when the receiver of `reply` is dropped; never when there is no `reply`.
async fn client_gone(reply: &mut Option<Reply>) {
    match reply {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// Keeps as many of `frame`'s messages as there is room for.
fn take(kept: &mut Vec<Kept>, count: &mut usize, max_count: usize, owner: Owner, frame: Frame) {
    let n = popped_count(&frame);
    if n == 0 {
        return;
    }
    let keep = n.min(max_count - *count);
    *count += keep;
    kept.push(Kept { owner, frame, keep });
}

fn cancel_polls(state: &Arc<ProxyState>, owners: &BTreeSet<Owner>, poll_id: u64) {
    for &owner in owners {
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = state.brokers.call(owner, &PopCancelRequest { poll_id }).await {
                tracing::debug!(error = %e, "cancelling a long poll failed; it ends at its own deadline");
            }
        });
    }
}

/// Gives back, unconsumed, the messages of a pop reply after the first `keep`.
fn release_popped(state: &Arc<ProxyState>, group: &str, frame: &Frame, keep: usize) {
    release_messages(state, group, frame, keep..usize::MAX);
}

/// Gives back, unconsumed, the messages of a pop reply in `range` (by position).
fn release_messages(state: &Arc<ProxyState>, group: &str, frame: &Frame, range: std::ops::Range<usize>) {
    let Ok(popped) = frame.access::<PopResponse>() else { return };
    let mut by_queue: HashMap<String, Vec<String>> = HashMap::new();
    for m in popped.messages.iter().skip(range.start).take(range.end.saturating_sub(range.start)) {
        by_queue.entry(m.queue.as_str().to_string()).or_default().push(m.receipt.as_str().to_string());
    }
    for (queue, receipts) in by_queue {
        let state = state.clone();
        let request = ReleaseRequest { queue: queue.clone(), group: group.to_string(), receipts };
        tokio::spawn(async move {
            Counters::add(&state.counters.released, request.receipts.len() as u64);
            if let Err(e) = state.brokers.call_for(&queue, &request).await {
                tracing::warn!(error = %e, queue, "releasing popped messages failed; they come back after their invisible time");
            }
        });
    }
}

/// The retry delays a group announces to its clients (Telemetry settings) and the brokers apply
/// when a delivery expires: the proxy's initial delay × 1, 5, 10, 30, 60, 120, … capped at its
/// maximum, one per attempt up to the group's max.
pub fn retry_delays_ms(state: &ProxyState, max_attempts: u32) -> Vec<u32> {
    const STEPS: [u64; 16] = [1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800];
    let s = &state.settings;
    let initial = s.retry_initial_ms.max(1);
    STEPS
        .iter()
        .take(max_attempts.max(1) as usize)
        .map(|k| (initial * k).min(s.retry_max_ms.max(initial)).min(u64::from(u32::MAX)) as u32)
        .collect()
}

/// Builds the client's messages from kept pop replies; dead-letters what has used up its
/// attempts (and what this proxy cannot decode).
async fn deliver(
    this: &Messaging,
    meta: &TopicMeta,
    group: &str,
    kept: &[Kept],
    invisible: Duration,
    auto_renew: bool,
    max_attempts: u32,
) -> Vec<Received> {
    let mut out = Vec::new();
    for k in kept {
        let Ok(popped) = k.frame.access::<PopResponse>() else { continue };
        let store_host = this.state.brokers.shard_endpoint(k.owner).to_string();
        for m in popped.messages.iter().take(k.keep) {
            let (queue, offset, receipt) = (m.queue.as_str(), m.offset.to_native(), m.receipt.as_str());
            let record: &[u8] = &m.record;
            let handle =
                ClientHandle { queue: queue.to_string(), offset, receipt: receipt.to_string(), traceparent: None };
            if m.delivery_attempt.to_native() > max_attempts {
                // Consumers that never forward (non-FIFO) rely on the server to dead-letter.
                if let Err(e) = dead_letter_record(this, group, &handle, record, receipt).await {
                    tracing::warn!(error = %e, queue, "moving a message to the dead-letter queue failed; it will be retried");
                }
                continue;
            }
            let queue_id = sluice_transport::model::placement::split_topic_queue(queue).map_or(0, |(_, i)| i as i32);
            let delivery = Delivery {
                queue_id,
                offset,
                attempt: m.delivery_attempt.to_native(),
                receipt_handle: handle.encode(),
                invisible,
                store_host: &store_host,
            };
            match convert::incoming(record, &delivery) {
                Ok(message) => {
                    // The handle as the client got it (with the message's traceparent, if any).
                    let client_handle = message.system_properties.as_ref().and_then(|s| s.receipt_handle.clone());
                    let renew =
                        auto_renew.then(|| (client_handle.unwrap_or_default(), queue.to_string(), receipt.to_string()));
                    out.push(Received { message, renew });
                }
                Err(e) => {
                    // Not a message this proxy can decode (written some other way): park it in
                    // the dead-letter topic rather than fail the whole batch.
                    tracing::warn!(error = %e, queue, offset, topic = meta.name, "undecodable message goes to the dead-letter queue");
                    if let Err(e) = dead_letter_record(this, group, &handle, record, receipt).await {
                        tracing::warn!(error = %e, queue, "dead-lettering failed; the message comes back after its invisible time");
                    }
                }
            }
        }
    }
    out
}

/// The parts of a receive the request states.
struct ReceiveAsk {
    group: String,
    meta: TopicMeta,
    filter: FilterSpec,
    max_count: u32,
    invisible: Duration,
    wait: Duration,
}

fn receive_ask(
    this: &Messaging,
    request: &ReceiveMessageRequest,
    group: String,
    meta: TopicMeta,
    remaining: Option<Duration>,
) -> Result<ReceiveAsk> {
    let filter = convert::filter_spec(request.filter_expression.as_ref())?;
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
    let asked = this.state.long_poll(request.long_polling_timeout.as_ref().map(duration_of));
    // Answer before the caller's deadline: an empty answer beats a deadline error.
    let wait = remaining.map_or(asked, |r| asked.min(r.saturating_sub(DEADLINE_RESERVE)));
    Ok(ReceiveAsk { group, meta, filter, max_count, invisible, wait })
}

async fn receive_messages(
    this: &Messaging,
    request: &ReceiveMessageRequest,
    remaining: Option<Duration>,
    caller: &Caller,
) -> Result<Vec<Received>> {
    let group = group_name(request.group.as_ref())?;
    let group_meta = this.group(&group).await?;
    let mq =
        request.message_queue.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue is required".into()))?;
    let topic = mq.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue.topic is required".into()))?;
    let meta = this.topic(&topic.name).await?;
    // A LITE topic is received from by lite consumers: each gets its own subscriptions.
    let client_id =
        if meta.message_type == message_type::LITE { caller.require_id()?.to_string() } else { String::new() };
    let ask = receive_ask(this, request, group, meta, remaining)?;
    // The group's quota first: a receive pops at most the permits it got.
    let asked_at = Instant::now();
    let quota = crate::quota::Quota::receive(&group_meta);
    let permits = crate::quota::acquire(&this.state, &quota, ask.max_count, ask.wait).await?;
    if permits == 0 {
        return Ok(Vec::new());
    }
    let ask = ReceiveAsk { max_count: permits, wait: ask.wait.saturating_sub(asked_at.elapsed()), ..ask };
    let owners: BTreeSet<Owner> =
        (0..ask.meta.queue_count).map(|i| this.state.brokers.owner(&ask.meta.queue(i))).collect();
    let pop = PopRequest {
        group: ask.group.clone(),
        topic: ask.meta.name.clone(),
        queue: String::new(),
        max_count: ask.max_count,
        max_bytes: this.state.settings.receive_bytes_max,
        invisible_ms: ask.invisible.as_millis() as u64,
        long_poll_ms: ask.wait.as_millis() as u64,
        poll_id: rand::random::<u64>().max(1),
        filter: ask.filter.clone(),
        policy: GroupPolicy {
            fifo: group_meta.fifo,
            retry_delays_ms: retry_delays_ms(&this.state, group_meta.max_delivery_attempts),
        },
        client_id,
    };
    let by_priority = ask.meta.message_type == message_type::PRIORITY;
    let merge = if by_priority {
        Merge::ByPriority
    } else if !ask.meta.fairness.key.is_empty() {
        Merge::InTurn
    } else {
        Merge::FirstArrived
    };
    let want = Want { max_count: ask.max_count as usize, merge };
    let batch = match pop_across(&this.state, owners, pop, want).await {
        Ok(batch) => batch,
        Err(e) => {
            crate::quota::refund(&this.state, &quota, permits);
            return Err(e);
        }
    };
    let attempts_max = group_meta.max_delivery_attempts;
    let mut received =
        deliver(this, &ask.meta, &ask.group, &batch.kept, ask.invisible, request.auto_renew, attempts_max).await;
    if by_priority {
        // Shards' replies, each in priority order, merged into one.
        received.sort_by_key(|r| std::cmp::Reverse(r.message.system_properties.as_ref().and_then(|s| s.priority)));
    }
    batch.handed_over();
    if !received.is_empty() {
        let bytes = received.iter().map(|r| r.message.body.len() as u64).sum();
        crate::metrics::messages_out(&ask.meta.name, &ask.group, received.len() as u64, bytes);
    }
    crate::quota::refund(&this.state, &quota, permits.saturating_sub(received.len() as u32));
    track_renewals(this, &ask.group, ask.invisible, &received);
    Ok(received)
}

/// Auto-renewal starts only for a batch handed to the client whole.
fn track_renewals(this: &Messaging, group: &str, invisible: Duration, received: &[Received]) {
    let now = Instant::now();
    for r in received {
        if let Some((handle, queue, receipt)) = &r.renew {
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
}

/// The responses of one ReceiveMessage: a status, one message each, then the delivery time.
/// `remaining` is the time left before the caller's gRPC deadline, if it set one.
pub async fn receive(
    this: &Messaging,
    request: ReceiveMessageRequest,
    remaining: Option<Duration>,
    caller: &Caller,
) -> Vec<ReceiveMessageResponse> {
    use receive_message_response::Content;
    match receive_messages(this, &request, remaining, caller).await {
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
    let outcomes = ack_all(this, &group, &request.entries).await;
    let mut entries = Vec::with_capacity(request.entries.len());
    for (entry, outcome) in request.entries.iter().zip(outcomes) {
        if outcome.is_ok() {
            Counters::add(&this.state.counters.acked, 1);
        }
        entries.push(AckMessageResultEntry {
            message_id: entry.message_id.clone(),
            receipt_handle: entry.receipt_handle.clone(),
            status: Some(outcome.err().unwrap_or_else(ok_status)),
        });
    }
    let overall = match entries.iter().map(|e| e.status.as_ref().map_or(0, |s| s.code)).collect::<Vec<_>>() {
        codes if codes.iter().all(|c| *c == Code::Ok as i32) => ok_status(),
        codes if codes.len() == 1 => entries[0].status.clone().unwrap_or_else(ok_status),
        _ => status(Code::MultipleResults, "some entries failed; see each entry"),
    };
    AckMessageResponse { status: Some(overall), entries }
}

/// One entry's ack outcome: `Err` holds the status to answer.
type AckOutcome = std::result::Result<(), Status>;

/// Acks every entry with one broker call per queue (in chunks of a receive batch), all at once:
/// a batch's ack costs one round trip, not one per message. Outcomes are in entry order.
async fn ack_all(this: &Messaging, group: &str, entries: &[AckMessageEntry]) -> Vec<AckOutcome> {
    let mut outcomes: Vec<AckOutcome> = Vec::with_capacity(entries.len());
    let mut by_queue: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        match ClientHandle::decode(&entry.receipt_handle) {
            Ok(handle) => {
                this.state.renewals.stop(&entry.receipt_handle);
                by_queue.entry(handle.queue).or_default().push((i, handle.receipt));
                outcomes.push(Ok(()));
            }
            Err(e) => outcomes.push(Err(e.status())),
        }
    }
    let chunk = this.state.settings.receive_batch_max.max(1) as usize;
    let calls = by_queue.iter().flat_map(|(queue, receipts)| {
        receipts.chunks(chunk).map(move |part| async move { (part, ack_on_broker(this, group, queue, part).await) })
    });
    for (part, result) in futures::future::join_all(calls).await {
        for ((i, _), outcome) in part.iter().zip(result) {
            outcomes[*i] = outcome;
        }
    }
    outcomes
}

/// One broker ack call for receipts of one queue; one outcome per receipt.
async fn ack_on_broker(this: &Messaging, group: &str, queue: &str, receipts: &[(usize, String)]) -> Vec<AckOutcome> {
    let request = AckRequest {
        queue: queue.to_string(),
        group: group.to_string(),
        receipts: receipts.iter().map(|(_, r)| r.clone()).collect(),
    };
    let codes: Result<Vec<u32>> = async {
        let frame = this.state.brokers.call_for(queue, &request).await?;
        let reply = frame.access::<AckResponse>()?;
        Ok(reply.statuses.iter().map(|s| s.to_native()).collect())
    }
    .await;
    let codes = match codes {
        Ok(codes) if codes.len() == receipts.len() => codes,
        Ok(_) => {
            let e = ProxyError::Broker { code: 0, message: "the broker sent the wrong number of ack statuses".into() };
            return vec![Err(e.status()); receipts.len()];
        }
        Err(e) => return vec![Err(e.status()); receipts.len()],
    };
    codes
        .into_iter()
        .map(|code| match code {
            0 => Ok(()),
            code => Err(ProxyError::Broker {
                code,
                message: "the broker refused this receipt handle: it expired, was acked already, or is forged".into(),
            }
            .status()),
        })
        .collect()
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
        suspend: request.suspend.unwrap_or(false),
    };
    let frame = this.state.brokers.call_for(&handle.queue, &broker_request).await?;
    let changed = frame.access::<ChangeInvisibleResponse>()?;
    Ok(ClientHandle { receipt: changed.receipt.as_str().to_string(), ..handle }.encode())
}

/// Copies the message into the group's dead-letter topic, then acks it. Clients treat this as
/// the end of the message (they do not ack after it).
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
        suspend: false,
    };
    let frame = this.state.brokers.call_for(&handle.queue, &hold).await?;
    let reply = frame.access::<ChangeInvisibleResponse>()?;
    if reply.offset.to_native() != handle.offset {
        return Err(ProxyError::InvalidReceipt("the handle's offset does not match its receipt".into()));
    }
    let held = reply.receipt.as_str().to_string();
    let read =
        ReadRequest { queue: handle.queue.clone(), from_offset: handle.offset, max_count: 1, max_bytes: 1, wait_ms: 0 };
    let frame = this.state.brokers.call_for(&handle.queue, &read).await?;
    let records = frame.access::<ReadResponse>()?;
    let record = records
        .records
        .iter()
        .find(|r| r.offset.to_native() == handle.offset)
        .ok_or_else(|| ProxyError::Broker { code: 0, message: "the message is no longer stored".into() })?;
    dead_letter_record(this, &group, &handle, &record.record, &held).await
}

/// Appends a stored record to the group's dead-letter topic, then acks its delivery. The copy
/// is a normal message (a DLQ is a normal topic) that keeps its group, tag, keys and properties.
async fn dead_letter_record(
    this: &Messaging,
    group: &str,
    handle: &ClientHandle,
    record: &[u8],
    receipt: &str,
) -> Result<()> {
    let view = RecordView::parse(record)
        .map_err(|e| ProxyError::Broker { code: 0, message: format!("stored record is corrupt: {e}") })?;
    let dlq = ensure_dead_letter_topic(this, &format!("{DLQ_PREFIX}{group}")).await?;
    let a = view.attributes;
    let entry = AppendEntry {
        queues: vec![dlq.queue(0)],
        message_id: view.message_id.to_string(),
        tag: view.tag.to_string(),
        keys: view.keys().map(str::to_string).collect(),
        attributes: EntryAttributes {
            message_type: message_type::NORMAL,
            priority: a.priority,
            delivery_ms: 0,
            message_group: a.message_group.to_string(),
            lite_topic: a.lite_topic.to_string(),
            user_properties: a.user_properties().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        },
        properties: view.properties,
        body: view.body,
    };
    this.state.brokers.call_for(&dlq.queue(0), &AppendRequest { entries: vec![entry] }).await?;
    let ack = AckRequest { queue: handle.queue.clone(), group: group.to_string(), receipts: vec![receipt.to_string()] };
    this.state.brokers.call_for(&handle.queue, &ack).await?;
    Counters::add(&this.state.counters.dead_lettered, 1);
    crate::metrics::dead_lettered(&handle.queue, group);
    Ok(())
}

async fn ensure_dead_letter_topic(this: &Messaging, topic: &str) -> Result<TopicMeta> {
    match this.state.topics.get(&this.state.brokers, topic).await {
        Ok(meta) => Ok(meta),
        Err(ProxyError::TopicNotFound(_)) => {
            let (_, meta) = this.state.topics.create(&this.state.brokers, topic, message_type::NORMAL, 1, 0).await?;
            Ok(meta)
        }
        Err(e) => Err(e),
    }
}

fn queue_of(mq: Option<&MessageQueue>) -> Result<(String, String)> {
    let mq = mq.ok_or_else(|| ProxyError::BadRequest("message_queue is required".into()))?;
    let topic = mq.topic.as_ref().ok_or_else(|| ProxyError::BadRequest("message_queue.topic is required".into()))?;
    let index = u32::try_from(mq.id).map_err(|_| ProxyError::BadRequest("message_queue.id must be >= 0".into()))?;
    Ok((topic.name.clone(), queue_name(&topic.name, index)))
}

async fn checked_queue(this: &Messaging, mq: Option<&MessageQueue>) -> Result<String> {
    let (topic, queue) = queue_of(mq)?;
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
