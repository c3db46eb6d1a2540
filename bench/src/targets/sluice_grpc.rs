//! Sluice through the proxy, with the RocketMQ v2 gRPC API the official SDKs use.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use sluice_proto::apache::rocketmq::v2;
use sluice_proto::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::sluice::admin::v1 as admin;
use sluice_proto::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use super::sessions::{Changes, SessionPlan, Subscriptions};
use super::sluice_broker::{check_level, durability_from_counters};
use super::{
    connect_error, Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session, TargetSpec, RECEIVE_BATCH_MAX,
    RECEIVE_WAIT_MS,
};
use crate::error::BenchError;
use crate::workload::{DurabilityLevel, TopicKind, Workload};

const TARGET: &str = "sluice-grpc";
/// gRPC messages up to the proxy's own request limit.
const GRPC_MESSAGE_MAX_BYTES: usize = 64 << 20;
const INVISIBLE_SECS: i64 = 30;
/// Lite topics of a bench topic are reclaimed this long after their last write.
const LITE_TTL_MINUTES: u32 = 1;

fn error(e: impl std::fmt::Display) -> BenchError {
    BenchError::target(TARGET, e)
}

fn resource(name: &str) -> v2::Resource {
    v2::Resource { resource_namespace: String::new(), name: name.into() }
}

fn check_status(status: Option<&v2::Status>, what: &str) -> Result<(), BenchError> {
    match status {
        Some(s) if s.code == v2::Code::Ok as i32 => Ok(()),
        Some(s) => Err(error(format!("{what}: {} {}", s.code, s.message))),
        None => Err(error(format!("{what}: no status in the reply"))),
    }
}

/// One HTTP/2 connection per client, as each SDK client opens its own.
async fn channel(spec: &TargetSpec) -> Result<Channel, BenchError> {
    let url = if spec.endpoint.contains("://") { spec.endpoint.clone() } else { format!("http://{}", spec.endpoint) };
    Channel::from_shared(url).map_err(|e| connect_error(spec, e))?.connect().await.map_err(|e| connect_error(spec, e))
}

async fn proxy_durability(admin: &mut AdminClient<Channel>) -> Result<DurabilityInfo, BenchError> {
    let stats = admin.get_stats(admin::GetStatsRequest {}).await.map_err(error)?.into_inner();
    check_status(stats.status.as_ref(), "GetStats")?;
    let shard = stats.brokers.first().ok_or_else(|| error("the proxy reports no brokers"))?;
    let counter = |name: &str| shard.counters.iter().find(|c| c.name == name).map(|c| c.value);
    Ok(durability_from_counters(counter("durability_sync"), counter("flush_interval_ms")))
}

pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    level: DurabilityLevel,
) -> Result<Session, BenchError> {
    let admin_channel = channel(spec).await?;
    let mut admin = AdminClient::new(admin_channel);
    let durability = proxy_durability(&mut admin).await?;
    check_level(spec, &durability, level)?;
    let queue_count = workload.queues_per_topic();
    let lite = workload.topic_kind == TopicKind::Lite;
    let plan = lite.then(|| SessionPlan::new(workload));
    let topics: Vec<String> = (0..workload.topics as usize).map(|t| names.topic(t)).collect();
    for topic in &topics {
        let (message_type, lite_ttl_minutes) =
            if lite { (v2::MessageType::Lite, LITE_TTL_MINUTES) } else { (v2::MessageType::Normal, 0) };
        let request = admin::CreateTopicRequest {
            name: topic.clone(),
            message_type: message_type as i32,
            queue_count,
            lite_ttl_minutes,
            ..Default::default()
        };
        let reply = admin.create_topic(request).await.map_err(error)?.into_inner();
        check_status(reply.status.as_ref(), &format!("creating topic {topic}"))?;
    }
    let topics = Arc::new(topics);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        let client =
            MessagingServiceClient::new(channel(spec).await?).max_encoding_message_size(GRPC_MESSAGE_MAX_BYTES);
        producers.push(Arc::new(GrpcProducer { client, topics: topics.clone(), plan }));
    }
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    let mut lite_clients = Vec::new();
    let per_topic = workload.consumers_per_topic() as usize;
    for c in 0..workload.consumers as usize {
        let client =
            MessagingServiceClient::new(channel(spec).await?).max_decoding_message_size(GRPC_MESSAGE_MAX_BYTES);
        let (topic, group) = (topics[c / per_topic].clone(), names.group());
        if let Some(plan) = plan {
            let client_id = format!("{}-c{c}", names.prefix);
            let subscriptions = Subscriptions::new(plan, c / per_topic, (c % per_topic) as u32, per_topic as u32);
            lite_clients.push((client.clone(), client_id.clone(), topic.clone()));
            consumers.push(Box::new(GrpcLiteConsumer {
                client,
                client_id,
                topic,
                group,
                subscriptions,
                entries: vec![],
            }));
            continue;
        }
        consumers.push(Box::new(GrpcConsumer {
            client,
            topic,
            queue_id: (c % per_topic) as i32,
            group,
            entries: Vec::new(),
        }));
    }
    let group = names.group();
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(async move {
        for (mut client, client_id, topic) in lite_clients {
            let request = lite_sync(&client_id, v2::LiteSubscriptionAction::CompleteRemove, &topic, &group, vec![]);
            let reply = client.sync_lite_subscription(request).await.map_err(error)?.into_inner();
            check_status(reply.status.as_ref(), "SyncLiteSubscription COMPLETE_REMOVE")?;
        }
        for topic in topics.iter() {
            let reply = admin.delete_topic(admin::DeleteTopicRequest { name: topic.clone() }).await.map_err(error)?;
            check_status(reply.get_ref().status.as_ref(), &format!("deleting topic {topic}"))?;
        }
        Ok(())
    });
    Ok(Session {
        producers,
        consumers,
        durability,
        path: "RocketMQ v2 gRPC to the proxy, proxy to broker as configured".into(),
        teardown: Some(teardown),
    })
}

struct GrpcProducer {
    client: MessagingServiceClient<Channel>,
    topics: Arc<Vec<String>>,
    /// Lite workloads: which session each message goes to.
    plan: Option<SessionPlan>,
}

impl Producer for GrpcProducer {
    fn send(&self, topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let mut client = self.client.clone();
        let topic = self.topics[topic].clone();
        let (message_type, lite_topic) = match self.plan {
            Some(plan) => (v2::MessageType::Lite, Some(SessionPlan::name(plan.slot(sequence).session))),
            None => (v2::MessageType::Normal, None),
        };
        Box::pin(async move {
            let message = v2::Message {
                topic: Some(resource(&topic)),
                user_properties: Default::default(),
                system_properties: Some(v2::SystemProperties {
                    message_id: format!("{sequence:032X}"),
                    message_type: message_type as i32,
                    body_encoding: v2::Encoding::Identity as i32,
                    lite_topic,
                    ..Default::default()
                }),
                body: body.to_vec(),
            };
            let reply = client.send_message(v2::SendMessageRequest { messages: vec![message] }).await.map_err(error)?;
            check_status(reply.get_ref().status.as_ref(), "SendMessage")
        })
    }
}

fn with_client_id<T>(client_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = client_id.parse() {
        request.metadata_mut().insert("x-mq-client-id", value);
    }
    request
}

fn lite_sync(
    client_id: &str,
    action: v2::LiteSubscriptionAction,
    topic: &str,
    group: &str,
    lite_topic_set: Vec<String>,
) -> tonic::Request<v2::SyncLiteSubscriptionRequest> {
    let request = v2::SyncLiteSubscriptionRequest {
        action: action as i32,
        topic: Some(resource(topic)),
        group: Some(resource(group)),
        lite_topic_set,
        version: None,
        offset_option: None,
    };
    with_client_id(client_id, request)
}

fn receive_request(topic: &str, group: &str, queue_id: i32) -> v2::ReceiveMessageRequest {
    v2::ReceiveMessageRequest {
        group: Some(resource(group)),
        message_queue: Some(v2::MessageQueue { topic: Some(resource(topic)), id: queue_id, ..Default::default() }),
        filter_expression: None,
        batch_size: RECEIVE_BATCH_MAX as i32,
        invisible_duration: Some(prost_types::Duration { seconds: INVISIBLE_SECS, nanos: 0 }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: (RECEIVE_WAIT_MS / 1000) as i64,
            nanos: ((RECEIVE_WAIT_MS % 1000) * 1_000_000) as i32,
        }),
        attempt_id: None,
    }
}

/// Reads one ReceiveMessage answer: each message's header and ack entry.
async fn read_received(
    mut stream: tonic::Streaming<v2::ReceiveMessageResponse>,
) -> Result<Vec<(Option<Delivered>, v2::AckMessageEntry)>, BenchError> {
    let mut received = Vec::new();
    while let Some(item) = stream.message().await.map_err(error)? {
        match item.content {
            Some(v2::receive_message_response::Content::Message(m)) => {
                let system = m.system_properties.unwrap_or_default();
                let entry = v2::AckMessageEntry {
                    message_id: system.message_id,
                    receipt_handle: system.receipt_handle.unwrap_or_default(),
                    lite_topic: system.lite_topic,
                };
                received.push((Delivered::parse(&m.body), entry));
            }
            Some(v2::receive_message_response::Content::Status(s))
                if s.code != v2::Code::Ok as i32 && s.code != v2::Code::MessageNotFound as i32 =>
            {
                return Err(error(format!("ReceiveMessage: {} {}", s.code, s.message)));
            }
            _ => {}
        }
    }
    Ok(received)
}

async fn ack_entries(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    entries: Vec<v2::AckMessageEntry>,
) -> Result<(), BenchError> {
    if entries.is_empty() {
        return Ok(());
    }
    let request = v2::AckMessageRequest { group: Some(resource(group)), topic: Some(resource(topic)), entries };
    let reply = client.ack_message(request).await.map_err(error)?.into_inner();
    check_status(reply.status.as_ref(), "AckMessage")
}

/// A lite consumer: one client id, its sessions subscribed with SyncLiteSubscription.
struct GrpcLiteConsumer {
    client: MessagingServiceClient<Channel>,
    client_id: String,
    topic: String,
    group: String,
    subscriptions: Subscriptions,
    entries: Vec<v2::AckMessageEntry>,
}

impl GrpcLiteConsumer {
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

    async fn apply(&mut self, changes: &Changes) -> Result<(), BenchError> {
        for (action, names) in [
            (v2::LiteSubscriptionAction::PartialAdd, &changes.add),
            (v2::LiteSubscriptionAction::PartialRemove, &changes.remove),
        ] {
            if names.is_empty() {
                continue;
            }
            let request = lite_sync(&self.client_id, action, &self.topic, &self.group, names.clone());
            let reply = self.client.sync_lite_subscription(request).await.map_err(error)?.into_inner();
            check_status(reply.status.as_ref(), &format!("SyncLiteSubscription {action:?}"))?;
        }
        Ok(())
    }
}

impl Consumer for GrpcLiteConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            self.apply_changes().await?;
            let request = with_client_id(&self.client_id, receive_request(&self.topic, &self.group, 0));
            let stream = self.client.receive_message(request).await.map_err(error)?.into_inner();
            let mut delivered = Vec::new();
            for (d, entry) in read_received(stream).await? {
                if let Some(d) = d {
                    self.subscriptions.delivered(d.sequence);
                }
                delivered.push(d);
                self.entries.push(entry);
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            let entries = std::mem::take(&mut self.entries);
            ack_entries(&mut self.client, &self.topic, &self.group, entries).await?;
            self.apply_changes().await
        })
    }
}

struct GrpcConsumer {
    client: MessagingServiceClient<Channel>,
    topic: String,
    queue_id: i32,
    group: String,
    entries: Vec<v2::AckMessageEntry>,
}

impl Consumer for GrpcConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            let request = receive_request(&self.topic, &self.group, self.queue_id);
            let stream = self.client.receive_message(request).await.map_err(error)?.into_inner();
            let mut delivered = Vec::new();
            for (d, entry) in read_received(stream).await? {
                delivered.push(d);
                self.entries.push(entry);
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            let entries = std::mem::take(&mut self.entries);
            ack_entries(&mut self.client, &self.topic, &self.group, entries).await
        })
    }
}
