//! Transactional and delay messages through the proxy: EndTransaction, RecallMessage, and the
//! check-back of transactions nobody ended.
//!
//! Check-back: a producer that opens a Telemetry stream announces the topics it publishes to.
//! For each broker shard the proxy asks (long-polling) for half messages of those topics that
//! are due for a check; the broker hands each to one asker and schedules its next check. The
//! proxy sends a `RecoverOrphanedTransactionCommand` to one producer of the topic (in turn), and
//! the producer answers with EndTransaction (source SERVER_CHECK). The producer streams are
//! soft state: if this proxy goes away, another one's producers get the next check.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_transport::cluster::Owner;
use sluice_transport::messages::{
    EndTransactionRequest as BrokerEndTransaction, EndTransactionResponse as BrokerEndTransactionReply, RecallRequest,
    RecallResponse, TransactionCheckRequest, TransactionCheckResponse,
};
use sluice_transport::model::codes;
use tokio::sync::mpsc;

use crate::convert::{self, RecallHandle, TransactionId};
use crate::error::{ProxyError, Result};
use crate::pb::apache::rocketmq::v2::*;
use crate::service::Messaging;
use crate::state::{Counters, ProxyState};

/// Producer Telemetry streams one proxy tracks for check-backs.
const PRODUCER_STREAMS_MAX: usize = 100_000;
/// Topics one producer stream may announce.
const TOPICS_PER_PRODUCER_MAX: usize = 256;
/// How long one check request to a broker waits for a due check.
const CHECK_POLL_MS: u64 = 1_000;
/// Half messages asked for per check request.
const CHECKS_PER_POLL_MAX: u32 = 32;
/// Pause after a failed check request, and while no producer is connected.
const CHECK_IDLE: Duration = Duration::from_millis(500);

pub type TelemetrySender = mpsc::Sender<std::result::Result<TelemetryCommand, tonic::Status>>;

/// The producers connected to this proxy, by the topics they publish to.
#[derive(Default)]
pub struct Producers {
    streams: Mutex<HashMap<u64, (Vec<String>, TelemetrySender)>>,
    next_id: AtomicU64,
    turn: AtomicU64,
}

impl Producers {
    /// A stream announced (or re-announced) its transaction topics (see `transaction_topics`);
    /// returns the stream's id.
    pub fn register(&self, id: Option<u64>, topics: Vec<String>, tx: &TelemetrySender) -> Option<u64> {
        let mut streams = self.streams.lock().expect("producers lock");
        if id.is_none() && streams.len() >= PRODUCER_STREAMS_MAX {
            tracing::warn!("{PRODUCER_STREAMS_MAX} producer streams tracked; this one gets no transaction checks");
            return None;
        }
        let id = id.unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        debug_assert!(topics.len() <= TOPICS_PER_PRODUCER_MAX);
        streams.insert(id, (topics, tx.clone()));
        Some(id)
    }

    pub fn unregister(&self, id: u64) {
        self.streams.lock().expect("producers lock").remove(&id);
    }

    /// Every topic some connected producer publishes to.
    pub fn topics(&self) -> Vec<String> {
        let streams = self.streams.lock().expect("producers lock");
        let mut topics: Vec<String> = streams.values().flat_map(|(t, _)| t.iter().cloned()).collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// One producer of `topic`, taking turns.
    fn pick(&self, topic: &str) -> Option<TelemetrySender> {
        let streams = self.streams.lock().expect("producers lock");
        let mut candidates: Vec<(&u64, &TelemetrySender)> =
            streams.iter().filter(|(_, (t, _))| t.iter().any(|x| x == topic)).map(|(id, (_, tx))| (id, tx)).collect();
        candidates.sort_by_key(|(id, _)| **id);
        if candidates.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        Some(candidates[turn % candidates.len()].1.clone())
    }

    pub fn len(&self) -> usize {
        self.streams.lock().expect("producers lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub async fn end_transaction(this: &Messaging, request: EndTransactionRequest) -> Result<()> {
    let id = TransactionId::decode(&request.transaction_id)?;
    let commit = match TransactionResolution::try_from(request.resolution) {
        Ok(TransactionResolution::Commit) => true,
        Ok(TransactionResolution::Rollback) => false,
        _ => return Err(ProxyError::BadRequest("resolution must be COMMIT or ROLLBACK".into())),
    };
    if let Some(topic) = request.topic.as_ref() {
        let named = sluice_transport::model::placement::split_topic_queue(&id.queue).map(|(t, _)| t);
        if named != Some(topic.name.as_str()) {
            return Err(ProxyError::InvalidTransactionId(format!("the transaction is not on topic {:?}", topic.name)));
        }
    }
    let broker_request =
        BrokerEndTransaction { queue: id.queue.clone(), position: id.position, message_id: request.message_id, commit };
    match this.state.brokers.call_for(&id.queue, &broker_request).await {
        Ok(frame) => {
            frame.access::<BrokerEndTransactionReply>()?;
            Counters::add(&this.state.counters.transactions_ended, 1);
            Ok(())
        }
        Err(e) if e.code() == codes::HELD_MESSAGE_NOT_FOUND => Err(ProxyError::InvalidTransactionId(
            "no open transaction with this id and message id: it was already committed, rolled back or given up".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn recall(this: &Messaging, request: RecallMessageRequest) -> Result<String> {
    let handle = RecallHandle::decode(&request.recall_handle)?;
    let broker_request = RecallRequest {
        queue: handle.queue.clone(),
        position: handle.position,
        due_ms: handle.due_ms,
        message_id: handle.message_id.clone(),
    };
    match this.state.brokers.call_for(&handle.queue, &broker_request).await {
        Ok(frame) => Ok(frame.access::<RecallResponse>()?.message_id.as_str().to_string()),
        Err(e) if e.code() == codes::HELD_MESSAGE_NOT_FOUND => Err(ProxyError::Broker {
            code: e.code(),
            message: "the delay message was already delivered or recalled, or never existed".into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Asks every broker shard for due transaction checks until shutdown.
pub async fn run_checks(state: Arc<ProxyState>) {
    let tasks: Vec<_> =
        state.brokers.all_shards().into_iter().map(|owner| tokio::spawn(check_shard(state.clone(), owner))).collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn check_shard(state: Arc<ProxyState>, owner: Owner) {
    while !state.is_shutting_down() {
        let topics = state.producers.topics();
        if topics.is_empty() {
            pause(&state, CHECK_IDLE).await;
            continue;
        }
        let request = TransactionCheckRequest { topics, max_count: CHECKS_PER_POLL_MAX, long_poll_ms: CHECK_POLL_MS };
        let answer = tokio::select! {
            answer = state.brokers.call(owner, &request) => answer,
            _ = state.shutdown_started() => return,
        };
        match answer {
            Ok(frame) => forward_checks(&state, owner, &frame),
            Err(e) => {
                tracing::debug!(error = %e, "asking a broker for transaction checks failed; retrying");
                pause(&state, CHECK_IDLE).await;
            }
        }
    }
}

async fn pause(state: &ProxyState, how_long: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(how_long) => {}
        _ = state.shutdown_started() => {}
    }
}

/// Sends each due check to one producer of its topic. A check with no producer to take it is
/// skipped: the broker asks again at its next check time.
fn forward_checks(state: &ProxyState, owner: Owner, frame: &sluice_transport::Frame) {
    let Ok(reply) = frame.access::<TransactionCheckResponse>() else { return };
    let store_host = state.brokers.shard_endpoint(owner).to_string();
    for half in reply.messages.iter() {
        let queue = half.queue.as_str();
        let Some((topic, queue_id)) = sluice_transport::model::placement::split_topic_queue(queue) else { continue };
        let transaction_id = TransactionId { queue: queue.to_string(), position: half.position.to_native() }.encode();
        let delivery = convert::Delivery {
            queue_id: queue_id as i32,
            offset: 0,
            attempt: half.checks.to_native() + 1,
            receipt_handle: String::new(),
            invisible: Duration::ZERO,
            store_host: &store_host,
        };
        let message = match convert::incoming(&half.record, &delivery) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, queue, "a half message could not be decoded for its check");
                continue;
            }
        };
        let Some(producer) = state.producers.pick(topic) else { continue };
        let command = TelemetryCommand {
            status: Some(crate::error::ok_status()),
            command: Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(
                RecoverOrphanedTransactionCommand { message: Some(message), transaction_id },
            )),
        };
        // A producer too slow to read its stream misses this check; the broker asks again.
        if producer.try_send(Ok(command)).is_ok() {
            Counters::add(&state.counters.transaction_checks_sent, 1);
        }
    }
}

/// Of the topics a producer announces, the existing transaction topics (the only ones with
/// checks), at most `TOPICS_PER_PRODUCER_MAX`: names a client makes up are neither created nor
/// sent to the brokers with every check request.
pub async fn transaction_topics(this: &Messaging, announced: &[Resource]) -> Vec<String> {
    let mut topics = Vec::new();
    for resource in announced.iter().take(TOPICS_PER_PRODUCER_MAX) {
        if let Ok(meta) = this.state.topics.get(&this.state.brokers, &resource.name).await {
            if meta.message_type == sluice_transport::model::message_type::TRANSACTION {
                topics.push(meta.name);
            }
        }
    }
    topics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_take_turns_and_leave_when_their_stream_ends() {
        let producers = Producers::default();
        let (a, _ra) = mpsc::channel(1);
        let (b, _rb) = mpsc::channel(1);
        let ida = producers.register(None, vec!["t".into()], &a).unwrap();
        let idb = producers.register(None, vec!["t".into(), "u".into()], &b).unwrap();
        assert_eq!(producers.topics(), vec!["t".to_string(), "u".to_string()]);
        let first = producers.pick("t").unwrap();
        let second = producers.pick("t").unwrap();
        assert!(!first.same_channel(&second), "turns alternate");
        assert!(producers.pick("u").unwrap().same_channel(&b));
        assert!(producers.pick("v").is_none());
        producers.unregister(idb);
        assert!(producers.pick("u").is_none());
        producers.unregister(ida);
        assert!(producers.is_empty());
    }
}
