//! Straight to a Sluice broker over the transport: append, pop (long poll) and ack frames,
//! routed to each queue's shard the way the proxy routes them. No proxy, no gRPC.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use sluice_transport::cluster::{BrokerAddress, BrokerPool};
use sluice_transport::messages::{
    AckRequest, AckResponse, AppendEntry, AppendRequest, AppendResponse, CreateQueueRequest, DeleteQueueRequest,
    EntryAttributes, FilterSpec, GroupPolicy, PopRequest, PopResponse, StatsRequest, StatsResponse,
};
use sluice_transport::model::{message_type, RecordView};
use sluice_transport::Client;

use super::{
    connect_error, durability_mismatch, Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session, TargetSpec,
    RECEIVE_BATCH_MAX, RECEIVE_WAIT_MS,
};
use crate::error::BenchError;
use crate::workload::{DurabilityLevel, TopicKind, Workload};

/// A popped message stays invisible this long; the run acks long before.
const INVISIBLE_MS: u64 = 30_000;
const POP_MAX_BYTES: u32 = 16 << 20;
const TARGET: &str = "sluice-broker";

fn error(e: impl std::fmt::Display) -> BenchError {
    BenchError::target(TARGET, e)
}

/// The queues of one topic: one per consumer of the topic (at least one).
fn queues(names: &RunNames, workload: &Workload, topic: usize) -> Vec<String> {
    let count = workload.consumers_per_topic().max(1);
    (0..count).map(|q| format!("{}#{q}", names.topic(topic))).collect()
}

/// Each broker-direct consumer pops its own queue, so the topic has one queue per consumer.
fn check_shape(spec: &TargetSpec, workload: &Workload) -> Result<(), BenchError> {
    if workload.queues_per_topic != 0 && workload.queues_per_topic != workload.consumers_per_topic().max(1) {
        return Err(BenchError::target(
            &spec.label,
            format!(
                "workload {:?}: the broker-direct target gives each consumer one queue, so it needs \
                 queues_per_topic = consumers per topic ({}); leave it out of this workload's targets",
                workload.name,
                workload.consumers_per_topic()
            ),
        ));
    }
    Ok(())
}

pub(super) async fn pool(spec: &TargetSpec) -> Result<Arc<BrokerPool>, BenchError> {
    let url = super::pingpong::transport_url(&spec.endpoint);
    let (scheme, address) = url.split_once("://").unwrap_or(("tcp", &url));
    let pool = BrokerPool::connect(
        vec![BrokerAddress::Base(address.to_string())],
        scheme,
        super::client_transport(),
        "sluice-bench",
    )
    .await
    .map_err(|e| connect_error(spec, e))?;
    Ok(Arc::new(pool))
}

/// Reads the broker's durability from its stats (every shard runs with the same setting).
pub async fn broker_durability(pool: &BrokerPool) -> Result<DurabilityInfo, BenchError> {
    let owner = pool.all_shards()[0];
    let frame = pool.call(owner, &StatsRequest {}).await.map_err(error)?;
    let stats = frame.access::<StatsResponse>().map_err(error)?;
    let counter = |name: &str| stats.counters.iter().find(|c| c.0.as_str() == name).map(|c| c.1.to_native());
    Ok(durability_from_counters(counter("durability_sync"), counter("flush_interval_ms")))
}

pub fn durability_from_counters(sync: Option<u64>, flush_interval_ms: Option<u64>) -> DurabilityInfo {
    match (sync, flush_interval_ms) {
        (Some(1), _) => DurabilityInfo {
            level: Some(DurabilityLevel::Sync),
            detail: "sync: group commit, fdatasync before the ack".into(),
        },
        (Some(0), Some(ms)) => DurabilityInfo {
            level: Some(DurabilityLevel::Async),
            detail: format!("async: acked once written (O_DIRECT), fdatasync every {ms} ms"),
        },
        _ => DurabilityInfo { level: None, detail: "unknown (the broker does not report its durability)".into() },
    }
}

pub fn check_level(spec: &TargetSpec, info: &DurabilityInfo, level: DurabilityLevel) -> Result<(), BenchError> {
    match info.level {
        Some(actual) if actual == level => Ok(()),
        Some(actual) => Err(durability_mismatch(spec, level, &info.detail, &actual.to_string())),
        None => Err(durability_mismatch(spec, level, &info.detail, "sync|async")),
    }
}

pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    level: DurabilityLevel,
) -> Result<Session, BenchError> {
    let admin = pool(spec).await?;
    let durability = broker_durability(&admin).await?;
    check_level(spec, &durability, level)?;
    let path = format!("transport over {}, straight to the broker", transport_name(spec).await?);
    if workload.topic_kind == TopicKind::Lite {
        return super::sluice_lite::open(spec, workload, names, durability, path).await;
    }
    check_shape(spec, workload)?;
    let topic_queues: Vec<Vec<String>> = (0..workload.topics as usize).map(|t| queues(names, workload, t)).collect();
    for (topic, queues) in topic_queues.iter().enumerate() {
        for queue in queues {
            let attributes =
                vec![("topic".to_string(), names.topic(topic)), ("queue_count".to_string(), queues.len().to_string())];
            let create = CreateQueueRequest {
                queue: queue.clone(),
                message_type: message_type::NORMAL,
                attributes,
                update: false,
            };
            admin.call_for(queue, &create).await.map_err(error)?;
        }
    }
    let topic_queues = Arc::new(topic_queues);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        producers.push(Arc::new(BrokerProducer { pool: pool(spec).await?, queues: topic_queues.clone() }));
    }
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    let per_topic = workload.consumers_per_topic() as usize;
    for c in 0..workload.consumers as usize {
        let queue = topic_queues[c / per_topic][c % per_topic].clone();
        consumers.push(Box::new(BrokerConsumer {
            pool: pool(spec).await?,
            topic: names.topic(c / per_topic),
            queue,
            group: names.group(),
            receipts: vec![],
        }));
    }
    let all: Vec<String> = topic_queues.iter().flatten().cloned().collect();
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(async move {
        for queue in all {
            admin.call_for(&queue, &DeleteQueueRequest { queue: queue.clone() }).await.map_err(error)?;
        }
        Ok(())
    });
    Ok(Session { producers, consumers, durability, path, teardown: Some(teardown) })
}

/// What `auto` chose: a probe connection says which transport this host gets.
async fn transport_name(spec: &TargetSpec) -> Result<String, BenchError> {
    let url = super::pingpong::transport_url(&spec.endpoint);
    let probe =
        Client::connect(&url, super::client_transport(), "sluice-bench").await.map_err(|e| connect_error(spec, e))?;
    Ok(format!("{:?}", probe.transport()).to_uppercase())
}

struct BrokerProducer {
    pool: Arc<BrokerPool>,
    queues: Arc<Vec<Vec<String>>>,
}

impl Producer for BrokerProducer {
    fn send(&self, topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let pool = self.pool.clone();
        let queues = self.queues.clone();
        Box::pin(async move {
            let topic_queues = &queues[topic];
            let queue = &topic_queues[(sequence as usize / queues.len()) % topic_queues.len()];
            let entry = AppendEntry {
                queues: vec![queue.clone()],
                message_id: format!("{sequence:016X}"),
                tag: String::new(),
                keys: vec![],
                attributes: EntryAttributes::default(),
                properties: &[],
                body: &body,
            };
            let frame = pool.call_for(queue, &AppendRequest { entries: vec![entry] }).await.map_err(error)?;
            let acks = frame.access::<AppendResponse>().map_err(error)?.acks.len();
            if acks != 1 {
                return Err(error(format!("the broker acked {acks} appends for 1")));
            }
            Ok(())
        })
    }
}

/// Pops its own queue of the topic (each consumer of a topic has one), so no two consumers
/// contend and each pop is one request to one shard.
struct BrokerConsumer {
    pool: Arc<BrokerPool>,
    topic: String,
    queue: String,
    group: String,
    receipts: Vec<String>,
}

impl Consumer for BrokerConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            let pop = PopRequest {
                group: self.group.clone(),
                topic: self.topic.clone(),
                queue: self.queue.clone(),
                max_count: RECEIVE_BATCH_MAX,
                max_bytes: POP_MAX_BYTES,
                invisible_ms: INVISIBLE_MS,
                long_poll_ms: RECEIVE_WAIT_MS,
                poll_id: 0,
                filter: FilterSpec::default(),
                policy: GroupPolicy::default(),
                client_id: String::new(),
            };
            let frame = self.pool.call_for(&self.queue, &pop).await.map_err(error)?;
            let popped = frame.access::<PopResponse>().map_err(error)?;
            let mut delivered = Vec::with_capacity(popped.messages.len());
            for m in popped.messages.iter() {
                self.receipts.push(m.receipt.as_str().to_string());
                let record: &[u8] = &m.record;
                delivered.push(RecordView::parse(record).ok().and_then(|view| Delivered::parse(view.body)));
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            if self.receipts.is_empty() {
                return Ok(());
            }
            let receipts = std::mem::take(&mut self.receipts);
            let count = receipts.len();
            let request = AckRequest { queue: self.queue.clone(), group: self.group.clone(), receipts };
            let frame = self.pool.call_for(&self.queue, &request).await.map_err(error)?;
            let reply = frame.access::<AckResponse>().map_err(error)?;
            let refused = reply.statuses.iter().filter(|s| s.to_native() != 0).count();
            if reply.statuses.len() != count || refused > 0 {
                return Err(error(format!("{refused} of {count} acks refused")));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_comes_from_the_broker_counters_and_must_match() {
        let spec: TargetSpec = "sluice-broker=tcp://127.0.0.1:1".parse().unwrap();
        let sync = durability_from_counters(Some(1), Some(0));
        let slow = durability_from_counters(Some(0), Some(1000));
        assert_eq!((sync.level, slow.level), (Some(DurabilityLevel::Sync), Some(DurabilityLevel::Async)));
        assert!(slow.detail.contains("1000 ms"));
        assert!(check_level(&spec, &sync, DurabilityLevel::Sync).is_ok());
        let err = check_level(&spec, &slow, DurabilityLevel::Sync).unwrap_err();
        assert_eq!(err.code(), 6005);
        assert!(err.to_string().contains("--durability async"), "{err}");
        // A broker too old to say is refused rather than guessed.
        assert_eq!(durability_from_counters(None, None).level, None);
        assert!(check_level(&spec, &durability_from_counters(None, None), DurabilityLevel::Async).is_err());
    }
}
