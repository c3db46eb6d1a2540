//! Lite workloads on Redis Streams: one stream per session, as a Redis user would build chat
//! sessions. A consumer creates its group on each session's stream when it subscribes (from
//! the stream's start, so nothing sent before is missed) and reads all of its open sessions
//! with one XREADGROUP; a finished session is dropped from the read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncCommands, Value};

use super::redis::{connect, error, xadd, BODY_FIELD};
use super::sessions::{Changes, SessionPlan, Subscriptions};
use super::{Consumer, Delivered, DurabilityInfo, Producer, RunNames, Session, TargetSpec};
use super::{RECEIVE_BATCH_MAX, RECEIVE_WAIT_MS};
use crate::error::BenchError;
use crate::workload::Workload;

/// Keys deleted per UNLINK while cleaning up.
const UNLINK_BATCH: usize = 1000;

fn stream_key(names: &RunNames, topic: usize, session: &str) -> String {
    format!("{}:{session}", names.topic(topic))
}

pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    durability: DurabilityInfo,
    admin: MultiplexedConnection,
) -> Result<Session, BenchError> {
    let plan = SessionPlan::new(workload);
    let names = Arc::new(names.clone());
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        producers.push(Arc::new(RedisLiteProducer { conn: connect(spec).await?, names: names.clone(), plan }));
    }
    let per_topic = workload.consumers_per_topic();
    let mut consumers: Vec<Box<dyn Consumer>> = Vec::new();
    for c in 0..workload.consumers {
        let topic = (c / per_topic) as usize;
        consumers.push(Box::new(RedisLiteConsumer {
            conn: connect(spec).await?,
            names: names.clone(),
            topic,
            group: names.group(),
            name: format!("c{c}"),
            subscriptions: Subscriptions::new(plan, topic, c % per_topic, per_topic),
            keys: Vec::new(),
            pending: Vec::new(),
        }));
    }
    let pattern = format!("{}-t*", names.prefix);
    let teardown: BoxFuture<'static, Result<(), BenchError>> = Box::pin(delete_matching(admin, pattern));
    Ok(Session {
        producers,
        consumers,
        durability,
        path: "RESP over TCP (redis crate), a stream per session".into(),
        teardown: Some(teardown),
    })
}

async fn delete_matching(mut admin: MultiplexedConnection, pattern: String) -> Result<(), BenchError> {
    let mut keys: Vec<String> = Vec::new();
    {
        let mut scan = admin.scan_match::<_, String>(&pattern).await.map_err(error)?;
        while let Some(key) = futures::StreamExt::next(&mut scan).await {
            keys.push(key.map_err(error)?);
        }
    }
    for chunk in keys.chunks(UNLINK_BATCH) {
        let _: i64 = redis::cmd("UNLINK").arg(chunk).query_async(&mut admin).await.map_err(error)?;
    }
    Ok(())
}

struct RedisLiteProducer {
    conn: MultiplexedConnection,
    names: Arc<RunNames>,
    plan: SessionPlan,
}

impl Producer for RedisLiteProducer {
    fn send(&self, _topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let slot = self.plan.slot(sequence);
        let key = stream_key(&self.names, slot.topic, &SessionPlan::name(slot.session));
        let mut conn = self.conn.clone();
        Box::pin(async move { xadd(&mut conn, &key, &body).await })
    }
}

struct RedisLiteConsumer {
    conn: MultiplexedConnection,
    names: Arc<RunNames>,
    topic: usize,
    group: String,
    name: String,
    subscriptions: Subscriptions,
    /// The open sessions' streams, read together.
    keys: Vec<String>,
    /// Read and not yet acked: (stream, entry id).
    pending: Vec<(String, String)>,
}

impl RedisLiteConsumer {
    /// Applies the pending subscription changes; sessions whose group could not be created are
    /// kept for the next try (an existing group, BUSYGROUP, counts as created).
    async fn apply_changes(&mut self) -> Result<(), BenchError> {
        let changes = self.subscriptions.take_changes();
        if !changes.remove.is_empty() {
            let gone: HashSet<String> = changes.remove.iter().map(|s| stream_key(&self.names, self.topic, s)).collect();
            self.keys.retain(|k| !gone.contains(k));
        }
        if changes.add.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for session in &changes.add {
            let key = stream_key(&self.names, self.topic, session);
            pipe.cmd("XGROUP").arg("CREATE").arg(key).arg(&self.group).arg("0").arg("MKSTREAM");
        }
        let replies: Vec<redis::RedisResult<Value>> = match pipe.query_async(&mut self.conn).await {
            Ok(replies) => replies,
            Err(e) => {
                self.subscriptions.restore(Changes { add: changes.add, remove: vec![] });
                return Err(error(e));
            }
        };
        let mut failed = Vec::new();
        let mut first_error = None;
        for (session, reply) in changes.add.into_iter().zip(replies) {
            match reply {
                Err(e) if e.code() != Some("BUSYGROUP") => {
                    first_error.get_or_insert_with(|| format!("XGROUP CREATE for session {session}: {e}"));
                    failed.push(session);
                }
                _ => self.keys.push(stream_key(&self.names, self.topic, &session)),
            }
        }
        match first_error {
            Some(why) => {
                self.subscriptions.restore(Changes { add: failed, remove: vec![] });
                Err(error(why))
            }
            None => Ok(()),
        }
    }
}

impl Consumer for RedisLiteConsumer {
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>> {
        Box::pin(async move {
            self.apply_changes().await?;
            if self.keys.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(RECEIVE_WAIT_MS)).await;
                return Ok(Vec::new());
            }
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP").arg(&self.group).arg(&self.name);
            read.arg("COUNT").arg(RECEIVE_BATCH_MAX).arg("BLOCK").arg(RECEIVE_WAIT_MS).arg("STREAMS");
            read.arg(self.keys.as_slice());
            for _ in &self.keys {
                read.arg(">");
            }
            let reply: Option<StreamReadReply> = read.query_async(&mut self.conn).await.map_err(error)?;
            let mut delivered = Vec::new();
            for stream in reply.into_iter().flat_map(|r| r.keys) {
                for entry in stream.ids {
                    let body = match entry.map.get(BODY_FIELD) {
                        Some(Value::BulkString(bytes)) => Delivered::parse(bytes),
                        _ => None,
                    };
                    if let Some(d) = body {
                        self.subscriptions.delivered(d.sequence);
                    }
                    delivered.push(body);
                    self.pending.push((stream.key.clone(), entry.id));
                }
            }
            Ok(delivered)
        })
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>> {
        Box::pin(async move {
            let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
            for (key, id) in self.pending.drain(..) {
                by_key.entry(key).or_default().push(id);
            }
            if !by_key.is_empty() {
                let mut pipe = redis::pipe();
                for (key, ids) in &by_key {
                    pipe.cmd("XACK").arg(key).arg(&self.group).arg(ids.as_slice());
                }
                let acked: Vec<usize> = pipe.query_async(&mut self.conn).await.map_err(error)?;
                let want: usize = by_key.values().map(Vec::len).sum();
                if acked.iter().sum::<usize>() != want {
                    return Err(error(format!("XACK acknowledged {} of {want}", acked.iter().sum::<usize>())));
                }
            }
            self.apply_changes().await
        })
    }
}
