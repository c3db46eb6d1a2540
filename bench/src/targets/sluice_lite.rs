//! Lite workloads straight to the broker: a LITE parent topic per workload topic, sends routed
//! to each session's lite queue, and consumers that keep a subscription set per client on every
//! shard and pop whatever of it is ready (the broker's event-driven pull), as the proxy does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use sluice_transport::cluster::{BrokerPool, Owner};
use sluice_transport::messages::{
    AckRequest, AckResponse, AppendEntry, AppendRequest, AppendResponse, CreateQueueRequest, DeleteQueueRequest,
    EntryAttributes, FilterSpec, GroupPolicy, LiteSubscriptionRequest, PopRequest, PopResponse, LITE_ADD, LITE_REMOVE,
    LITE_REMOVE_ALL, LITE_START_LAST,
};
use sluice_transport::model::placement::{lite_queue, topic_queue, LITE_TTL_ATTRIBUTE};
use sluice_transport::model::{message_type, RecordView};
use tokio::sync::mpsc;

use super::sessions::{Changes, SessionPlan, Subscriptions};
use super::sluice_broker::pool;
use super::{Consumer, Delivered, Producer, RunNames, Session, TargetSpec, RECEIVE_BATCH_MAX, RECEIVE_WAIT_MS};
use crate::error::BenchError;
use crate::workload::Workload;

const INVISIBLE_MS: u64 = 30_000;
const POP_MAX_BYTES: u32 = 16 << 20;
/// Lite topics of a bench topic are reclaimed this long after their last write (the least a
/// topic can ask for), so runs do not leave millions behind.
const LITE_TTL_MINUTES: u32 = 1;
/// Popped batches waiting for the consumer's next receive, per consumer.
const POPPED_BATCHES_MAX: usize = 4;
const TARGET: &str = "sluice-broker";

fn error(e: impl std::fmt::Display) -> BenchError {
    BenchError::target(TARGET, e)
}

/// Creates the LITE parent topics' queues; returns each topic's name.
pub async fn create_topics(
    admin: &BrokerPool,
    workload: &Workload,
    names: &RunNames,
) -> Result<Vec<String>, BenchError> {
    let queue_count = workload.queues_per_topic();
    let mut topics = Vec::new();
    for t in 0..workload.topics as usize {
        let topic = names.topic(t);
        for index in 0..queue_count {
            let queue = topic_queue(&topic, index);
            let attributes = vec![
                ("topic".to_string(), topic.clone()),
                ("queue_count".to_string(), queue_count.to_string()),
                (LITE_TTL_ATTRIBUTE.to_string(), LITE_TTL_MINUTES.to_string()),
            ];
            let create = CreateQueueRequest {
                queue: queue.clone(),
                message_type: message_type::LITE,
                attributes,
                update: false,
            };
            admin.call_for(&queue, &create).await.map_err(error)?;
        }
        topics.push(topic);
    }
    Ok(topics)
}

/// Drops every consumer's subscriptions, then the parent queues; the lite queues are reclaimed
/// by the broker once their parent is gone.
pub async fn teardown(
    admin: Arc<BrokerPool>,
    topics: Vec<String>,
    queue_count: u32,
    group: String,
    clients: Vec<String>,
) -> Result<(), BenchError> {
    for client_id in clients {
        for owner in admin.all_shards() {
            let request = LiteSubscriptionRequest {
                group: group.clone(),
                client_id: client_id.clone(),
                topic: String::new(),
                action: LITE_REMOVE_ALL,
                queues: vec![],
                start: LITE_START_LAST,
                start_value: 0,
            };
            admin.call(owner, &request).await.map_err(error)?;
        }
    }
    for topic in topics {
        for index in 0..queue_count {
            let queue = topic_queue(&topic, index);
            admin.call_for(&queue, &DeleteQueueRequest { queue: queue.clone() }).await.map_err(error)?;
        }
    }
    Ok(())
}

pub struct LiteBrokerProducer {
    pub pool: Arc<BrokerPool>,
    pub topics: Arc<Vec<String>>,
    pub queue_count: u32,
    pub plan: SessionPlan,
}

impl Producer for LiteBrokerProducer {
    fn send(&self, _topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let slot = self.plan.slot(sequence);
        let name = SessionPlan::name(slot.session);
        let queue = lite_queue(&self.topics[slot.topic], self.queue_count, &name);
        let pool = self.pool.clone();
        Box::pin(async move {
            let entry = AppendEntry {
                queues: vec![queue.clone()],
                message_id: format!("{sequence:016X}"),
                tag: String::new(),
                keys: vec![],
                attributes: EntryAttributes {
                    message_type: message_type::LITE,
                    lite_topic: name,
                    ..Default::default()
                },
                properties: &[],
                body: &body,
            };
            let frame = pool.call_for(&queue, &AppendRequest { entries: vec![entry] }).await.map_err(error)?;
            let acks = frame.access::<AppendResponse>().map_err(error)?.acks.len();
            if acks != 1 {
                return Err(error(format!("the broker acked {acks} appends for 1")));
            }
            Ok(())
        })
    }
}

/// A popped message: its lite queue, receipt and header.
type Popped = (String, String, Option<Delivered>);

pub struct LiteBrokerConsumer {
    pool: Arc<BrokerPool>,
    topic: String,
    queue_count: u32,
    group: String,
    client_id: String,
    subscriptions: Subscriptions,
    popped: mpsc::Receiver<Result<Vec<Popped>, BenchError>>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
    receipts: Vec<(String, String)>,
}

impl LiteBrokerConsumer {
    /// Starts one long-polling pop per shard for this client; they run until it is dropped.
    pub fn start(
        pool: Arc<BrokerPool>,
        topic: String,
        queue_count: u32,
        group: String,
        client_id: String,
        subscriptions: Subscriptions,
    ) -> LiteBrokerConsumer {
        let (sender, popped) = mpsc::channel(POPPED_BATCHES_MAX);
        // Only shards holding a queue of the topic have its lite queues (the proxy does the same).
        let owners: std::collections::BTreeSet<Owner> =
            (0..queue_count).map(|index| pool.owner(&topic_queue(&topic, index))).collect();
        let pollers = owners
            .into_iter()
            .map(|owner| {
                let pop = PopRequest {
                    group: group.clone(),
                    topic: topic.clone(),
                    queue: String::new(),
                    max_count: RECEIVE_BATCH_MAX,
                    max_bytes: POP_MAX_BYTES,
                    invisible_ms: INVISIBLE_MS,
                    long_poll_ms: RECEIVE_WAIT_MS,
                    poll_id: 0,
                    filter: FilterSpec::default(),
                    policy: GroupPolicy::default(),
                    client_id: client_id.clone(),
                };
                tokio::spawn(poll_shard(pool.clone(), owner, pop, sender.clone()))
            })
            .collect();
        LiteBrokerConsumer {
            pool,
            topic,
            queue_count,
            group,
            client_id,
            subscriptions,
            popped,
            pollers,
            receipts: Vec::new(),
        }
    }

    /// Applies the pending subscription changes; what fails is kept for the next try (adding
    /// or removing a lite topic twice is harmless).
    async fn apply_changes(&mut self) -> Result<(), BenchError> {
        let changes = self.subscriptions.take_changes();
        if changes.is_empty() {
            return Ok(());
        }
        let applied = self.apply(&changes).await;
        if applied.is_err() {
            self.subscriptions.restore(changes);
        }
        applied
    }

    async fn apply(&self, changes: &Changes) -> Result<(), BenchError> {
        for (action, names) in [(LITE_ADD, &changes.add), (LITE_REMOVE, &changes.remove)] {
            let mut by_owner: HashMap<Owner, Vec<String>> = HashMap::new();
            for name in names {
                let queue = lite_queue(&self.topic, self.queue_count, name);
                by_owner.entry(self.pool.owner(&queue)).or_default().push(queue);
            }
            for (owner, queues) in by_owner {
                let request = LiteSubscriptionRequest {
                    group: self.group.clone(),
                    client_id: self.client_id.clone(),
                    topic: self.topic.clone(),
                    action,
                    queues,
                    start: LITE_START_LAST,
                    start_value: 0,
                };
                self.pool.call(owner, &request).await.map_err(error)?;
            }
        }
        Ok(())
    }
}

impl Drop for LiteBrokerConsumer {
    fn drop(&mut self) {
        for poller in &self.pollers {
            poller.abort();
        }
    }
}

async fn poll_shard(
    pool: Arc<BrokerPool>,
    owner: Owner,
    pop: PopRequest,
    sender: mpsc::Sender<Result<Vec<Popped>, BenchError>>,
) {
    loop {
        let batch = match pool.call(owner, &pop).await {
            Ok(frame) => frame.access::<PopResponse>().map_err(error).map(|popped| {
                popped
                    .messages
                    .iter()
                    .map(|m| {
                        let view = RecordView::parse(&m.record).ok();
                        let delivered = view.and_then(|v| Delivered::parse(v.body));
                        (m.queue.as_str().to_string(), m.receipt.as_str().to_string(), delivered)
                    })
                    .collect::<Vec<_>>()
            }),
            Err(e) => Err(error(e)),
        };
        let failed = batch.is_err();
        if matches!(&batch, Ok(b) if b.is_empty()) {
            continue;
        }
        if sender.send(batch).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Consumer for LiteBrokerConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            self.apply_changes().await?;
            let wait = Duration::from_millis(RECEIVE_WAIT_MS);
            let batch = match tokio::time::timeout(wait, self.popped.recv()).await {
                Ok(Some(batch)) => batch?,
                Ok(None) => return Err(error("every shard's poller stopped")),
                Err(_) => return Ok(Vec::new()),
            };
            let mut delivered = Vec::with_capacity(batch.len());
            for (queue, receipt, d) in batch {
                if let Some(d) = d {
                    self.subscriptions.delivered(d.sequence);
                }
                self.receipts.push((queue, receipt));
                delivered.push(d);
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            let mut by_queue: HashMap<String, Vec<String>> = HashMap::new();
            for (queue, receipt) in self.receipts.drain(..) {
                by_queue.entry(queue).or_default().push(receipt);
            }
            let acks = by_queue.into_iter().map(|(queue, receipts)| {
                let (pool, group) = (self.pool.clone(), self.group.clone());
                async move {
                    let count = receipts.len();
                    let request = AckRequest { queue: queue.clone(), group, receipts };
                    let frame = pool.call_for(&queue, &request).await.map_err(error)?;
                    let reply = frame.access::<AckResponse>().map_err(error)?;
                    let refused = reply.statuses.iter().filter(|s| s.to_native() != 0).count();
                    if reply.statuses.len() != count || refused > 0 {
                        return Err(error(format!("{refused} of {count} acks refused in {queue}")));
                    }
                    Ok(())
                }
            });
            futures::future::try_join_all(acks).await?;
            self.apply_changes().await
        })
    }
}

/// Opens a lite workload: parent topics, producers routing by session, one lite client per
/// consumer.
pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    durability: super::DurabilityInfo,
    path: String,
) -> Result<Session, BenchError> {
    let admin = pool(spec).await?;
    let topics = Arc::new(create_topics(&admin, workload, names).await?);
    let (queue_count, plan) = (workload.queues_per_topic(), SessionPlan::new(workload));
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        let pool = pool(spec).await?;
        producers.push(Arc::new(LiteBrokerProducer { pool, topics: topics.clone(), queue_count, plan }));
    }
    let per_topic = workload.consumers_per_topic();
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    let mut clients = Vec::new();
    for c in 0..workload.consumers {
        let (topic, index) = ((c / per_topic) as usize, c % per_topic);
        let client_id = format!("{}-c{c}", names.prefix);
        let subscriptions = Subscriptions::new(plan, topic, index, per_topic);
        let (pool, group) = (pool(spec).await?, names.group());
        let topic_name = topics[topic].clone();
        consumers.push(Box::new(LiteBrokerConsumer::start(
            pool,
            topic_name,
            queue_count,
            group,
            client_id.clone(),
            subscriptions,
        )));
        clients.push(client_id);
    }
    let topics = topics.to_vec();
    let teardown = Box::pin(teardown(admin, topics, queue_count, names.group(), clients));
    Ok(Session { producers, consumers, durability, path, teardown: Some(teardown) })
}
