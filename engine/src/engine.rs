//! The thread-safe handle to a running engine. It starts one glommio executor per shard (pinned
//! when configured) and talks to each shard only by sending it work over a bounded channel:
//! shards share nothing and no lock is taken on the append path.
//!
//! Code that already runs on a shard's executor (the broker's transport, later) uses `Shard`
//! directly and gets zero-copy reads; this handle copies record bytes once, into `Bytes`,
//! because they cross threads.

use std::rc::Rc;
use std::thread::JoinHandle;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};

use crate::config::{Durability, EngineConfig};
use crate::error::{EngineError, Result};
use crate::index::StateTable;
use crate::queue::shard_for_queue;
use crate::record::{NewRecord, RecordView};
use crate::segment::DmaSegmentStore;
use crate::shard::{AppendAck, QueueInfo, Shard, ShardStats, StoredRecord};

type Job = Box<dyn FnOnce(Rc<Shard>) -> LocalBoxFuture<'static, ()> + Send>;

enum Command {
    Run(Job),
    Close(oneshot::Sender<Result<()>>),
}

/// A record copied out of a shard, safe to send anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub offset: u64,
    pub position: u64,
    pub bytes: Bytes,
}

impl OwnedRecord {
    fn copy_of(record: &StoredRecord) -> Self {
        // The one copy on this path: DMA read buffers belong to the shard's thread.
        OwnedRecord { offset: record.offset, position: record.position, bytes: Bytes::copy_from_slice(record.bytes()) }
    }

    pub fn view(&self) -> RecordView<'_> {
        // The shard checked the CRC when it read the record; no second pass over the bytes.
        RecordView::parse_unverified(&self.bytes).expect("verified by the shard when read")
    }
}

/// Records read from a queue.
#[derive(Debug, Clone)]
pub struct OwnedReadBatch {
    pub records: Vec<OwnedRecord>,
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
}

struct ShardThread {
    inbox: flume::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

pub struct Engine {
    config: EngineConfig,
    shards: Vec<ShardThread>,
}

impl Engine {
    /// Starts every shard and waits until each has recovered its log.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| EngineError::io("creating data directory", config.data_dir.display(), e))?;
        let cpus = core_affinity::get_core_ids().map_or(1, |ids| ids.len().max(1));
        let mut shards = Vec::with_capacity(config.shard_count);
        let mut ready = Vec::with_capacity(config.shard_count);
        for id in 0..config.shard_count {
            let (inbox, commands) = flume::bounded(config.shard_inbox_max);
            let (ready_tx, ready_rx) = flume::bounded(1);
            let placement = if config.pin_shards { Placement::Fixed(id % cpus) } else { Placement::Unbound };
            let builder = LocalExecutorBuilder::new(placement)
                .name(&format!("sluice-shard-{id}"))
                .io_memory(config.io_memory_bytes)
                .blocking_thread_pool_placement(PoolPlacement::Unbound(2));
            let shard_config = config.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sluice-shard-{id}"))
                .spawn(move || run_shard(builder, shard_config, id, commands, ready_tx))
                .map_err(|e| EngineError::io("starting shard thread", id, e))?;
            shards.push(ShardThread { inbox, thread: Some(thread) });
            ready.push(ready_rx);
        }
        let mut engine = Engine { config, shards };
        let mut first_error = None;
        for (id, rx) in ready.into_iter().enumerate() {
            let outcome = rx
                .recv()
                .unwrap_or_else(|_| Err(EngineError::Config(format!("shard {id} thread exited during start"))));
            if let Err(err) = outcome {
                first_error.get_or_insert(err);
            }
        }
        if let Some(err) = first_error {
            let _ = engine.close_all();
            return Err(err);
        }
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn shard_of(&self, queue: &str) -> usize {
        shard_for_queue(queue, self.shards.len())
    }

    /// Runs `work` on shard `shard`'s executor and returns its result.
    pub async fn on_shard<R, F>(&self, shard: usize, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(Rc<Shard>) -> LocalBoxFuture<'static, Result<R>> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |shard| {
            Box::pin(async move {
                let _ = done.send(work(shard).await);
            })
        });
        let inbox = &self.shards.get(shard).ok_or_else(|| EngineError::Config(format!("no shard {shard}")))?.inbox;
        // A full inbox makes the caller wait: back-pressure instead of unbounded queueing.
        inbox.send_async(Command::Run(job)).await.map_err(|_| EngineError::ShuttingDown)?;
        result.await.unwrap_or(Err(EngineError::ShuttingDown))
    }

    /// Appends records; each goes to the shard of its first queue. Acks come back in input
    /// order once durable. Records on one shard are atomic as a group commit is; records on
    /// different shards are independent.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<AppendAck>> {
        if records.len() > self.config.append_batch_records_max {
            return Err(EngineError::BatchTooLarge { count: records.len(), max: self.config.append_batch_records_max });
        }
        let mut per_shard: Vec<(Vec<usize>, Vec<NewRecord>)> = vec![(Vec::new(), Vec::new()); self.shards.len()];
        for (i, record) in records.into_iter().enumerate() {
            let Some(first) = record.queues.first() else {
                return Err(EngineError::InvalidRecord("a record needs at least one queue".into()));
            };
            let shard = self.shard_of(first);
            per_shard[shard].0.push(i);
            per_shard[shard].1.push(record);
        }
        let total: usize = per_shard.iter().map(|p| p.0.len()).sum();
        let calls = per_shard.into_iter().enumerate().filter(|(_, p)| !p.0.is_empty()).map(
            |(shard, (slots, group))| async move {
                let acks = self.on_shard(shard, move |s| Box::pin(async move { s.append(&group).await })).await?;
                Ok::<_, EngineError>((slots, acks))
            },
        );
        let mut out: Vec<Option<AppendAck>> = vec![None; total];
        for result in futures::future::join_all(calls).await {
            let (slots, acks) = result?;
            for (slot, ack) in slots.into_iter().zip(acks) {
                out[slot] = Some(ack);
            }
        }
        Ok(out.into_iter().map(|a| a.expect("every record acked")).collect())
    }

    pub async fn read(&self, queue: &str, from: u64, max_count: usize, max_bytes: usize) -> Result<OwnedReadBatch> {
        let q = queue.to_string();
        self.on_shard(self.shard_of(queue), move |s| {
            Box::pin(async move {
                let batch = s.read(&q, from, max_count, max_bytes).await?;
                Ok(OwnedReadBatch {
                    records: batch.records.iter().map(OwnedRecord::copy_of).collect(),
                    next_offset: batch.next_offset,
                    min_offset: batch.min_offset,
                    max_offset: batch.max_offset,
                })
            })
        })
        .await
    }

    /// Looks a message id up on every shard; the id index is per shard.
    pub async fn by_message_id(&self, message_id: &str) -> Result<Option<OwnedRecord>> {
        for shard in 0..self.shards.len() {
            let id = message_id.to_string();
            let found = self
                .on_shard(shard, move |s| {
                    Box::pin(async move { Ok(s.by_message_id(&id).await?.as_ref().map(OwnedRecord::copy_of)) })
                })
                .await?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Up to `limit` records carrying `key`, from every shard.
    pub async fn by_key(&self, key: &str, limit: usize) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        for shard in 0..self.shards.len() {
            let k = key.to_string();
            let found = self
                .on_shard(shard, move |s| {
                    Box::pin(async move {
                        Ok(s.by_key(&k, limit).await?.iter().map(OwnedRecord::copy_of).collect::<Vec<_>>())
                    })
                })
                .await?;
            out.extend(found);
        }
        out.truncate(limit);
        Ok(out)
    }

    pub async fn commit_consumer_offset(&self, group: &str, queue: &str, offset: u64) -> Result<()> {
        let (g, q) = (group.to_string(), queue.to_string());
        self.on_shard(self.shard_of(queue), move |s| {
            Box::pin(async move { s.commit_consumer_offset(&g, &q, offset).await })
        })
        .await
    }

    pub async fn consumer_offset(&self, group: &str, queue: &str) -> Result<Option<u64>> {
        let (g, q) = (group.to_string(), queue.to_string());
        self.on_shard(self.shard_of(queue), move |s| Box::pin(async move { s.consumer_offset(&g, &q).await })).await
    }

    /// Durable state kept on the shard of `placement` (a queue name).
    pub async fn put_state(&self, placement: &str, table: StateTable, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.on_shard(self.shard_of(placement), move |s| Box::pin(async move { s.put_state(table, key, value).await }))
            .await
    }

    pub async fn delete_state(&self, placement: &str, table: StateTable, key: Vec<u8>) -> Result<()> {
        self.on_shard(self.shard_of(placement), move |s| Box::pin(async move { s.delete_state(table, key).await }))
            .await
    }

    pub async fn state(&self, placement: &str, table: StateTable, key: Vec<u8>) -> Result<Option<Vec<u8>>> {
        self.on_shard(self.shard_of(placement), move |s| Box::pin(async move { s.state(table, key).await })).await
    }

    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.on_shard(self.shard_of(queue), move |s| Box::pin(async move { s.delete_queue(&q).await })).await
    }

    pub async fn queue_info(&self, queue: &str) -> Result<Option<QueueInfo>> {
        let q = queue.to_string();
        self.on_shard(self.shard_of(queue), move |s| Box::pin(async move { s.queue_info(&q) })).await
    }

    /// Runs a retention pass on every shard now; returns the number of segments deleted.
    pub async fn enforce_retention(&self) -> Result<usize> {
        let mut deleted = 0;
        for shard in 0..self.shards.len() {
            deleted += self.on_shard(shard, |s| Box::pin(async move { s.enforce_retention().await })).await?;
        }
        Ok(deleted)
    }

    pub async fn stats(&self) -> Result<Vec<ShardStats>> {
        let mut out = Vec::new();
        for shard in 0..self.shards.len() {
            out.push(self.on_shard(shard, |s| Box::pin(async move { Ok(s.stats()) })).await?);
        }
        Ok(out)
    }

    /// Finishes in-flight appends, syncs every log, flushes every index and stops the shards.
    pub fn close(mut self) -> Result<()> {
        self.close_all()
    }

    fn close_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for shard in &mut self.shards {
            let (done, mut result) = oneshot::channel();
            // The thread may already be gone (a shard that failed to open); then the command
            // just sits in the channel. Joining first, then polling the reply, cannot hang.
            let _ = shard.inbox.send(Command::Close(done));
            if let Some(thread) = shard.thread.take() {
                let _ = thread.join();
            }
            if let Ok(Some(Err(err))) = result.try_recv() {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.shards.iter().any(|s| s.thread.is_some()) {
            let _ = self.close_all();
        }
    }
}

fn run_shard(
    builder: LocalExecutorBuilder,
    config: EngineConfig,
    id: usize,
    commands: flume::Receiver<Command>,
    ready: flume::Sender<Result<()>>,
) {
    let executor = match builder.make() {
        Ok(executor) => executor,
        Err(err) => {
            let _ = ready.send(Err(EngineError::Config(format!("shard {id}: cannot start executor: {err}"))));
            return;
        }
    };
    executor.run(async move {
        let opened = async {
            let store = DmaSegmentStore::new(config.shard_dir(id).join("log"))
                .await
                .map_err(|e| EngineError::io("creating log directory", config.shard_dir(id).display(), e))?
                .with_durable_writes(config.durability == Durability::Sync);
            Shard::open(config, id, Rc::new(store)).await
        }
        .await;
        let shard = match opened {
            Ok(shard) => {
                let _ = ready.send(Ok(()));
                shard
            }
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        while let Ok(command) = commands.recv_async().await {
            match command {
                Command::Run(job) => {
                    glommio::spawn_local(job(shard.clone())).detach();
                }
                Command::Close(done) => {
                    let _ = done.send(shard.close().await);
                    return;
                }
            }
        }
        // Every handle is gone without a close: still finish and flush.
        if let Err(err) = shard.close().await {
            tracing::error!(shard = id, error = %err, "closing shard failed");
        }
    });
}
