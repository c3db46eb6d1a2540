//! Redis Streams: XADD (acked when Redis answers, after the AOF write its appendfsync policy
//! requires), XREADGROUP with BLOCK in one consumer group per topic, XACK.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Value};

use super::{connect_error, durability_mismatch, Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session};
use super::{TargetSpec, RECEIVE_BATCH_MAX, RECEIVE_WAIT_MS};
use crate::error::BenchError;
use crate::workload::{DurabilityLevel, TopicKind, Workload};

const TARGET: &str = "redis";
pub(super) const BODY_FIELD: &str = "d";

pub(super) fn error(e: impl std::fmt::Display) -> BenchError {
    BenchError::target(TARGET, e)
}

/// One connection per client; no response timeout, because XREADGROUP blocks on purpose.
pub(super) async fn connect(spec: &TargetSpec) -> Result<MultiplexedConnection, BenchError> {
    let url = if spec.endpoint.contains("://") { spec.endpoint.clone() } else { format!("redis://{}", spec.endpoint) };
    let client = redis::Client::open(url).map_err(|e| connect_error(spec, e))?;
    let config =
        AsyncConnectionConfig::new().set_connection_timeout(Some(Duration::from_secs(5))).set_response_timeout(None);
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| connect_error(spec, e))
}

async fn config_get(conn: &mut MultiplexedConnection, name: &str) -> Result<String, BenchError> {
    let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await.map_err(error)?;
    Ok(pair.get(1).cloned().unwrap_or_default())
}

/// Maps Redis's persistence settings onto the run's levels.
pub fn durability(appendonly: &str, appendfsync: &str) -> DurabilityInfo {
    let level = match (appendonly, appendfsync) {
        ("yes", "always") => Some(DurabilityLevel::Sync),
        ("yes", "everysec") => Some(DurabilityLevel::Async),
        _ => None,
    };
    DurabilityInfo { level, detail: format!("appendonly {appendonly}, appendfsync {appendfsync}") }
}

pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    level: DurabilityLevel,
) -> Result<Session, BenchError> {
    let mut admin = connect(spec).await?;
    let info = durability(&config_get(&mut admin, "appendonly").await?, &config_get(&mut admin, "appendfsync").await?);
    if info.level != Some(level) {
        let want = if level == DurabilityLevel::Sync { "always" } else { "everysec" };
        let have = info.level.map_or("none".to_string(), |l| l.to_string());
        return Err(durability_mismatch(
            spec,
            level,
            &format!("{} (start it with --appendonly yes --appendfsync {want})", info.detail),
            &have,
        ));
    }
    if workload.topic_kind == TopicKind::Lite {
        return super::redis_lite::open(spec, workload, names, info, admin).await;
    }
    let keys: Vec<String> = (0..workload.topics as usize).map(|t| names.topic(t)).collect();
    let group = names.group();
    for key in &keys {
        let created: Result<String, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(&group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut admin)
            .await;
        created.map_err(|e| error(format!("creating stream {key}: {e}")))?;
    }
    let keys = Arc::new(keys);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        producers.push(Arc::new(RedisProducer { conn: connect(spec).await?, keys: keys.clone() }));
    }
    let per_topic = workload.consumers_per_topic() as usize;
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    for c in 0..workload.consumers as usize {
        consumers.push(Box::new(RedisConsumer {
            conn: connect(spec).await?,
            key: keys[c / per_topic].clone(),
            group: group.clone(),
            name: format!("c{c}"),
            pending: Vec::new(),
        }));
    }
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(async move {
        let _: i64 = redis::cmd("DEL").arg(keys.as_slice()).query_async(&mut admin).await.map_err(error)?;
        Ok(())
    });
    Ok(Session {
        producers,
        consumers,
        durability: info,
        path: "RESP over TCP (redis crate)".into(),
        teardown: Some(teardown),
    })
}

struct RedisProducer {
    conn: MultiplexedConnection,
    keys: Arc<Vec<String>>,
}

impl Producer for RedisProducer {
    fn send(&self, topic: usize, _sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let mut conn = self.conn.clone();
        let key = self.keys[topic].clone();
        Box::pin(async move { xadd(&mut conn, &key, &body).await })
    }
}

/// Appends one message body to stream `key`; done when Redis answers (after its AOF write).
pub(super) async fn xadd(conn: &mut MultiplexedConnection, key: &str, body: &[u8]) -> Result<(), BenchError> {
    let _id: String =
        redis::cmd("XADD").arg(key).arg("*").arg(BODY_FIELD).arg(body).query_async(conn).await.map_err(error)?;
    Ok(())
}

struct RedisConsumer {
    conn: MultiplexedConnection,
    key: String,
    group: String,
    name: String,
    pending: Vec<String>,
}

impl Consumer for RedisConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.name)
                .arg("COUNT")
                .arg(RECEIVE_BATCH_MAX)
                .arg("BLOCK")
                .arg(RECEIVE_WAIT_MS)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(">")
                .query_async(&mut self.conn)
                .await
                .map_err(error)?;
            let mut delivered = Vec::new();
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                let body = match entry.map.get(BODY_FIELD) {
                    Some(Value::BulkString(bytes)) => Delivered::parse(bytes),
                    _ => None,
                };
                delivered.push(body);
                self.pending.push(entry.id);
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            if self.pending.is_empty() {
                return Ok(());
            }
            let ids = std::mem::take(&mut self.pending);
            let acked: usize = redis::cmd("XACK")
                .arg(&self.key)
                .arg(&self.group)
                .arg(ids.as_slice())
                .query_async(&mut self.conn)
                .await
                .map_err(error)?;
            if acked != ids.len() {
                return Err(error(format!("XACK acknowledged {acked} of {}", ids.len())));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_persistence_maps_onto_the_levels() {
        assert_eq!(durability("yes", "always").level, Some(DurabilityLevel::Sync));
        assert_eq!(durability("yes", "everysec").level, Some(DurabilityLevel::Async));
        assert_eq!(durability("yes", "no").level, None);
        assert_eq!(durability("no", "always").level, None, "appendfsync means nothing without the AOF");
    }
}
