//! Sluice through the proxy, with the RocketMQ v2 gRPC API the official SDKs use.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use sluice_proto::apache::rocketmq::v2;
use sluice_proto::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::sluice::admin::v1 as admin;
use sluice_proto::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use super::sluice_broker::{check_level, durability_from_counters};
use super::{
    connect_error, Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session, TargetSpec, RECEIVE_BATCH_MAX,
    RECEIVE_WAIT_MS,
};
use crate::error::BenchError;
use crate::workload::{DurabilityLevel, Workload};

const TARGET: &str = "sluice-grpc";
/// gRPC messages up to the proxy's own request limit.
const GRPC_MESSAGE_MAX_BYTES: usize = 64 << 20;
const INVISIBLE_SECS: i64 = 30;

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
    let topics: Vec<String> = (0..workload.topics as usize).map(|t| names.topic(t)).collect();
    for topic in &topics {
        let request = admin::CreateTopicRequest {
            name: topic.clone(),
            message_type: v2::MessageType::Normal as i32,
            queue_count,
            lite_ttl_minutes: 0,
        };
        let reply = admin.create_topic(request).await.map_err(error)?.into_inner();
        check_status(reply.status.as_ref(), &format!("creating topic {topic}"))?;
    }
    let topics = Arc::new(topics);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        let client =
            MessagingServiceClient::new(channel(spec).await?).max_encoding_message_size(GRPC_MESSAGE_MAX_BYTES);
        producers.push(Arc::new(GrpcProducer { client, topics: topics.clone() }));
    }
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    let per_topic = workload.consumers_per_topic() as usize;
    for c in 0..workload.consumers as usize {
        let client =
            MessagingServiceClient::new(channel(spec).await?).max_decoding_message_size(GRPC_MESSAGE_MAX_BYTES);
        consumers.push(Box::new(GrpcConsumer {
            client,
            topic: topics[c / per_topic].clone(),
            queue_id: (c % per_topic) as i32,
            group: names.group(),
            entries: Vec::new(),
        }));
    }
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(async move {
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
}

impl Producer for GrpcProducer {
    fn send(&self, topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let mut client = self.client.clone();
        let topic = self.topics[topic].clone();
        Box::pin(async move {
            let message = v2::Message {
                topic: Some(resource(&topic)),
                user_properties: Default::default(),
                system_properties: Some(v2::SystemProperties {
                    message_id: format!("{sequence:032X}"),
                    message_type: v2::MessageType::Normal as i32,
                    body_encoding: v2::Encoding::Identity as i32,
                    ..Default::default()
                }),
                body: body.to_vec(),
            };
            let reply = client.send_message(v2::SendMessageRequest { messages: vec![message] }).await.map_err(error)?;
            check_status(reply.get_ref().status.as_ref(), "SendMessage")
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
            let request = v2::ReceiveMessageRequest {
                group: Some(resource(&self.group)),
                message_queue: Some(v2::MessageQueue {
                    topic: Some(resource(&self.topic)),
                    id: self.queue_id,
                    ..Default::default()
                }),
                filter_expression: None,
                batch_size: RECEIVE_BATCH_MAX as i32,
                invisible_duration: Some(prost_types::Duration { seconds: INVISIBLE_SECS, nanos: 0 }),
                auto_renew: false,
                long_polling_timeout: Some(prost_types::Duration {
                    seconds: (RECEIVE_WAIT_MS / 1000) as i64,
                    nanos: ((RECEIVE_WAIT_MS % 1000) * 1_000_000) as i32,
                }),
                attempt_id: None,
            };
            let mut stream = self.client.receive_message(request).await.map_err(error)?.into_inner();
            let mut delivered = Vec::new();
            while let Some(item) = stream.message().await.map_err(error)? {
                match item.content {
                    Some(v2::receive_message_response::Content::Message(m)) => {
                        delivered.push(Delivered::parse(&m.body));
                        let system = m.system_properties.unwrap_or_default();
                        self.entries.push(v2::AckMessageEntry {
                            message_id: system.message_id,
                            receipt_handle: system.receipt_handle.unwrap_or_default(),
                            lite_topic: None,
                        });
                    }
                    Some(v2::receive_message_response::Content::Status(s))
                        if s.code != v2::Code::Ok as i32 && s.code != v2::Code::MessageNotFound as i32 =>
                    {
                        return Err(error(format!("ReceiveMessage: {} {}", s.code, s.message)));
                    }
                    _ => {}
                }
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            if self.entries.is_empty() {
                return Ok(());
            }
            let entries = std::mem::take(&mut self.entries);
            let request = v2::AckMessageRequest {
                group: Some(resource(&self.group)),
                topic: Some(resource(&self.topic)),
                entries,
            };
            let reply = self.client.ack_message(request).await.map_err(error)?.into_inner();
            check_status(reply.status.as_ref(), "AckMessage")
        })
    }
}
