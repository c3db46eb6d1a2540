//! NATS JetStream: publish and wait for the stream's ack; durable pull consumers with
//! explicit acks, one per topic, shared by that topic's consumers.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::StorageType};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::{connect_error, Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session, TargetSpec};
use super::{RECEIVE_BATCH_MAX, RECEIVE_WAIT_MS};
use crate::error::BenchError;
use crate::workload::Workload;

const TARGET: &str = "nats";

/// How long one pull request stays open on the server. async-nats's default is 30 s, and its
/// stream otherwise re-pulls only by counting what it is still owed; if that count goes wrong,
/// nothing puts it right until the request expires, far past the 10 s drain. A short expiry
/// bounds such a stall to about a second (the server answers each expired request with what it
/// still owed) for one small request per consumer per second. A loaded CI machine once saw 272
/// of 8,000 acked messages not delivered within the drain; it did not happen here in 33 runs
/// with or without CPU hogs, so the cause is not confirmed.
const PULL_EXPIRES_MS: u64 = 1_000;

fn error(e: impl std::fmt::Display) -> BenchError {
    BenchError::target(TARGET, e)
}

fn subject(names: &RunNames, topic: usize) -> String {
    format!("sb.{}", names.topic(topic))
}

/// What JetStream promises for an acked message: nats-server before 2.10 has no sync_interval
/// and fsyncs file storage every 2 minutes, so it cannot match `sync`.
pub fn durability(version: &str) -> DurabilityInfo {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let detail = if (major, minor) < (2, 10) {
        format!("JetStream file storage; nats-server {version} fsyncs every 2 min and has no sync_interval setting: acked ≠ on disk")
    } else {
        format!("JetStream file storage; nats-server {version}: fsync per its sync_interval (scripts/bench.sh sets `always` for sync)")
    };
    DurabilityInfo { level: None, detail }
}

async fn connect(spec: &TargetSpec) -> Result<async_nats::Client, BenchError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(spec.endpoint.as_str())
        .await
        .map_err(|e| connect_error(spec, e))
}

pub async fn open(spec: &TargetSpec, workload: &Workload, names: &RunNames) -> Result<Session, BenchError> {
    let admin_client = connect(spec).await?;
    let version = admin_client.server_info().version;
    let admin = jetstream::new(admin_client);
    let stream_name = names.prefix.replace('.', "_");
    let subjects: Vec<String> = (0..workload.topics as usize).map(|t| subject(names, t)).collect();
    let stream = admin
        .get_or_create_stream(jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: subjects.clone(),
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| error(format!("creating stream {stream_name}: {e} (is nats-server running with -js?)")))?;
    let subjects = Arc::new(subjects);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        producers
            .push(Arc::new(NatsProducer { context: jetstream::new(connect(spec).await?), subjects: subjects.clone() }));
    }
    let per_topic = workload.consumers_per_topic() as usize;
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    for c in 0..workload.consumers as usize {
        let topic = c / per_topic;
        let durable = format!("c{topic}");
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: subjects[topic].clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        };
        stream.get_or_create_consumer::<pull::Config>(&durable, config).await.map_err(error)?;
        // Each consumer pulls over its own connection.
        let own = jetstream::new(connect(spec).await?);
        let consumer: jetstream::consumer::PullConsumer =
            own.get_consumer_from_stream(&durable, &stream_name).await.map_err(error)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(RECEIVE_BATCH_MAX as usize)
            .expires(Duration::from_millis(PULL_EXPIRES_MS))
            .messages()
            .await
            .map_err(error)?;
        consumers.push(Box::new(NatsConsumer { messages, pending: Vec::new() }));
    }
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(async move {
        admin.delete_stream(&stream_name).await.map_err(error)?;
        Ok(())
    });
    Ok(Session {
        producers,
        consumers,
        durability: durability(&version),
        path: "NATS protocol over TCP (async-nats)".into(),
        teardown: Some(teardown),
    })
}

struct NatsProducer {
    context: jetstream::Context,
    subjects: Arc<Vec<String>>,
}

impl Producer for NatsProducer {
    fn send(&self, topic: usize, _sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let context = self.context.clone();
        let subject = self.subjects[topic].clone();
        Box::pin(async move {
            let ack = context.publish(subject, body).await.map_err(error)?;
            ack.await.map_err(error)?;
            Ok(())
        })
    }
}

struct NatsConsumer {
    messages: pull::Stream,
    pending: Vec<jetstream::Message>,
}

impl Consumer for NatsConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            let wait = Duration::from_millis(RECEIVE_WAIT_MS);
            let first = match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(None) => return Err(error("the pull subscription ended")),
                Ok(Some(message)) => message.map_err(error)?,
            };
            let mut delivered = vec![Delivered::parse(&first.payload)];
            self.pending.push(first);
            // Take whatever else is already here, without waiting.
            while delivered.len() < RECEIVE_BATCH_MAX as usize {
                match self.messages.next().now_or_never() {
                    Some(Some(Ok(message))) => {
                        delivered.push(Delivered::parse(&message.payload));
                        self.pending.push(message);
                    }
                    Some(Some(Err(e))) => return Err(error(e)),
                    _ => break,
                }
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            for message in self.pending.drain(..) {
                message.ack().await.map_err(error)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_nats_servers_are_labelled_as_not_syncing_per_message() {
        assert!(durability("2.9.10").detail.contains("every 2 min"));
        assert!(durability("2.10.3").detail.contains("sync_interval"));
        assert!(durability("2.11.0").detail.contains("sync_interval"));
        assert_eq!(durability("2.9.10").level, None);
    }
}
