//! The lite-topic scale benchmark: many lite topics on one broker, one message each, against
//! Redis Streams doing the same (one stream per session) in the same run.
//!
//! 1. Creation: `--lite-topics` lite topics, one message each (appends of 256, 16 in flight).
//!    Reported: lite topics created per second, and the server's RSS and disk growth per lite
//!    topic (RSS from /proc/PID/status; Sluice's index directories and log bytes, Redis's AOF).
//!    For Sluice, RSS is measured twice: 2 s after the last creation, while the broker still
//!    holds every new lite topic in memory, and again once they went idle and it evicted them
//!    (`queue_idle_evict_ms`; the wait is bounded by `IDLE_WAIT_MAX`).
//! 2. Delivery: one consumer subscribes to `--subscribed` of them; a producer sends `--rate`
//!    msg/s spread over them, open loop (each message due at its time; latency counts from it).
//!    Reported: send→receive p50/p99/p99.9/max and messages lost. Redis has no subscription sets,
//!    so its consumer reads with one XREAD over every subscribed stream, which is what a Redis
//!    client has to do for the same workload.
//!
//! Talks to the broker over the transport (no proxy), like the `sluice-broker` target.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use sluice_bench::targets::{message_body, Delivered};
use sluice_transport::cluster::{BrokerAddress, BrokerPool, Owner};
use sluice_transport::messages::*;
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{lite_queue, topic_queue, LITE_TTL_ATTRIBUTE};
use sluice_transport::model::RecordView;
use sluice_transport::TransportConfig;

/// Lite topics per append request while creating them.
const CREATE_BATCH: usize = 256;
/// Append requests in flight while creating.
const CREATE_INFLIGHT: usize = 16;
/// Queue names per subscription request.
const SUBSCRIBE_BATCH: usize = 4096;
const QUEUES: u32 = 8;
const GROUP: &str = "lite-scale";
const CLIENT: &str = "lite-scale-consumer";
const POP_BATCH: u32 = 64;
const LONG_POLL_MS: u64 = 1000;
/// Latency histogram bound: 60 s in µs.
const LATENCY_MAX_US: u64 = 60_000_000;

#[derive(Parser, Debug)]
struct Args {
    /// Shard 0 of the broker, host:port.
    #[arg(long)]
    broker: String,
    #[arg(long)]
    broker_pid: u32,
    /// The broker's data directory (its disk use is measured).
    #[arg(long)]
    broker_data: PathBuf,
    /// Redis, host:port; leave out to measure Sluice alone.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long)]
    redis_pid: Option<u32>,
    #[arg(long, default_value_t = 1_000_000)]
    lite_topics: usize,
    #[arg(long, default_value_t = 100_000)]
    subscribed: usize,
    /// Messages per second during the delivery phase, spread over the subscribed lite topics.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    #[arg(long, default_value_t = 128)]
    body_bytes: usize,
    #[arg(long, default_value = "results/lite-scale.json")]
    out: PathBuf,
}

/// Distinguishes this run's names from earlier runs' on the same servers.
fn run_nonce() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A lite topic name shaped like a session id (36 characters).
fn session(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i, i)
}

/// One message to lite topic `name` of `topic`.
fn lite_entry<'a>(topic: &str, name: &str, message_id: String, body: &'a [u8]) -> AppendEntry<'a> {
    AppendEntry {
        queues: vec![lite_queue(topic, QUEUES, name)],
        message_id,
        tag: String::new(),
        keys: Vec::new(),
        attributes: EntryAttributes {
            message_type: message_type::LITE,
            lite_topic: name.to_string(),
            ..Default::default()
        },
        properties: &[],
        body,
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of files under `dir` whose path contains `part` (e.g. the index directories).
fn dir_bytes(dir: &Path, part: &str) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += dir_bytes(&path, part),
            Ok(m) if path.to_string_lossy().contains(part) => total += m.len(),
            _ => {}
        }
    }
    total
}

#[derive(Debug, Default, serde::Serialize)]
struct Phase {
    lite_topics: usize,
    create_secs: f64,
    created_per_sec: f64,
    rss_per_topic_bytes: f64,
    /// The same less what the broker's bounded caches grew by (RocksDB's memtables, flushed to
    /// disk when full, its block cache, and the log's tail cache), which any workload fills
    /// alike: what each idle lite topic itself keeps in memory.
    rss_per_topic_outside_caches_bytes: f64,
    /// After the broker evicted the idle lite topics (Sluice only): the per idle lite topic cost.
    rss_per_idle_topic_bytes: f64,
    rss_per_idle_topic_outside_caches_bytes: f64,
    /// Lite topics still held in memory when the idle figures were taken, and the wait for it.
    resident_when_idle: u64,
    idle_wait_secs: f64,
    disk_per_topic_bytes: f64,
    disk_what: String,
    subscribe_secs: f64,
    sent: u64,
    received: u64,
    /// Acked sends the consumer had not received 5 s after the last send.
    not_received: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    /// Send→ack (the durable append) of the same messages: the floor under delivery latency.
    ack_p50_us: u64,
    ack_p99_us: u64,
    note: String,
}

fn percentiles(h: &Histogram<u64>, phase: &mut Phase) {
    phase.p50_us = h.value_at_quantile(0.5);
    phase.p99_us = h.value_at_quantile(0.99);
    phase.p999_us = h.value_at_quantile(0.999);
    phase.max_us = h.max();
}

async fn sluice(args: &Args) -> Result<Phase, String> {
    let pool = BrokerPool::connect(
        vec![BrokerAddress::Base(args.broker.clone())],
        "tcp",
        TransportConfig::default(),
        "lite-scale",
    )
    .await
    .map_err(|e| e.to_string())?;
    let pool = Arc::new(pool);
    let topic = format!("litescale{}", run_nonce());
    for index in 0..QUEUES {
        let queue = topic_queue(&topic, index);
        let attributes = vec![
            ("topic".to_string(), topic.clone()),
            ("queue_count".to_string(), QUEUES.to_string()),
            (LITE_TTL_ATTRIBUTE.to_string(), "1440".to_string()),
        ];
        let create =
            CreateQueueRequest { queue: queue.clone(), message_type: message_type::LITE, attributes, update: false };
        pool.call_for(&queue, &create).await.map_err(|e| e.to_string())?;
    }
    let (rss0, index0) = (rss_bytes(args.broker_pid), dir_bytes(&args.broker_data, "index"));
    let (log0, caches0) = (broker_counter(&pool, "log_end").await, bounded_caches_bytes(&pool).await);
    let body = Bytes::from(vec![b'c'; args.body_bytes]);
    let started = Instant::now();
    let mut by_owner: std::collections::HashMap<Owner, Vec<String>> = std::collections::HashMap::new();
    for i in 0..args.lite_topics {
        let name = session(i);
        by_owner.entry(pool.owner(&lite_queue(&topic, QUEUES, &name))).or_default().push(name);
    }
    let batches: Vec<(Owner, Vec<String>)> = by_owner
        .into_iter()
        .flat_map(|(owner, names)| names.chunks(CREATE_BATCH).map(|c| (owner, c.to_vec())).collect::<Vec<_>>())
        .collect();
    let results: Vec<Result<(), String>> = stream::iter(batches)
        .map(|(owner, names)| {
            let (pool, topic, body) = (pool.clone(), topic.clone(), body.clone());
            async move {
                let entries = names.iter().map(|name| lite_entry(&topic, name, name.clone(), &body)).collect();
                pool.call(owner, &AppendRequest { entries }).await.map(|_| ()).map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(CREATE_INFLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    let create_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = args.lite_topics as f64;
    let (rss1, index1) = (rss_bytes(args.broker_pid), dir_bytes(&args.broker_data, "index"));
    let (log1, caches1) = (broker_counter(&pool, "log_end").await, bounded_caches_bytes(&pool).await);
    let mut phase = Phase {
        lite_topics: args.lite_topics,
        create_secs,
        created_per_sec: n / create_secs,
        rss_per_topic_bytes: rss1.saturating_sub(rss0) as f64 / n,
        rss_per_topic_outside_caches_bytes: rss1.saturating_sub(rss0).saturating_sub(caches1.saturating_sub(caches0))
            as f64
            / n,
        disk_per_topic_bytes: (index1.saturating_sub(index0) + log1.saturating_sub(log0)) as f64 / n,
        disk_what: format!(
            "index {:.0} B + log {:.0} B per lite topic",
            index1.saturating_sub(index0) as f64 / n,
            log1.saturating_sub(log0) as f64 / n
        ),
        ..Default::default()
    };
    let idle_started = Instant::now();
    phase.resident_when_idle = wait_for_eviction(&pool).await;
    phase.idle_wait_secs = idle_started.elapsed().as_secs_f64();
    let (rss2, caches2) = (rss_bytes(args.broker_pid), bounded_caches_bytes(&pool).await);
    phase.rss_per_idle_topic_bytes = rss2.saturating_sub(rss0) as f64 / n;
    phase.rss_per_idle_topic_outside_caches_bytes =
        rss2.saturating_sub(rss0).saturating_sub(caches2.saturating_sub(caches0)) as f64 / n;
    sluice_delivery(args, &pool, &topic, &mut phase).await?;
    Ok(phase)
}

/// A broker counter summed over its shards (0 where a shard does not answer).
async fn broker_counter(pool: &BrokerPool, name: &str) -> u64 {
    let mut total = 0;
    for owner in pool.all_shards() {
        if let Ok(frame) = pool.call(owner, &StatsRequest {}).await {
            if let Ok(stats) = frame.access::<StatsResponse>() {
                total += stats.counters.iter().find(|c| c.0.as_str() == name).map_or(0, |c| c.1.to_native());
            }
        }
    }
    total
}

/// Longest wait for the broker to evict the idle lite topics.
const IDLE_WAIT_MAX: Duration = Duration::from_secs(60);

/// Waits until the broker's resident queues stop shrinking down to its topic queues (or
/// `IDLE_WAIT_MAX`); returns how many are still resident.
async fn wait_for_eviction(pool: &BrokerPool) -> u64 {
    let started = Instant::now();
    loop {
        let resident = broker_counter(pool, "engine_queues_resident").await;
        if resident <= QUEUES as u64 || started.elapsed() >= IDLE_WAIT_MAX {
            return resident;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Bytes held by the broker's bounded caches: RocksDB memtables and block cache, and the log's
/// tail cache.
async fn bounded_caches_bytes(pool: &BrokerPool) -> u64 {
    let mut total = 0;
    for counter in ["index_memtable_bytes", "index_block_cache_bytes", "tail_cache_bytes"] {
        total += broker_counter(pool, counter).await;
    }
    total
}

async fn sluice_delivery(args: &Args, pool: &Arc<BrokerPool>, topic: &str, phase: &mut Phase) -> Result<(), String> {
    let subscribed: Vec<String> = (0..args.subscribed.min(args.lite_topics)).map(session).collect();
    let started = Instant::now();
    let mut by_owner: std::collections::HashMap<Owner, Vec<String>> = std::collections::HashMap::new();
    for name in &subscribed {
        let queue = lite_queue(topic, QUEUES, name);
        by_owner.entry(pool.owner(&queue)).or_default().push(queue);
    }
    for owner in pool.all_shards() {
        let queues = by_owner.remove(&owner).unwrap_or_default();
        for chunk in queues.chunks(SUBSCRIBE_BATCH).chain(std::iter::once(&[][..])) {
            let request = LiteSubscriptionRequest {
                group: GROUP.into(),
                client_id: CLIENT.into(),
                topic: topic.into(),
                action: LITE_ADD,
                queues: chunk.to_vec(),
                // Only what is sent from now on: the creation message is not part of this phase.
                start: LITE_START_MAX,
                start_value: 0,
            };
            pool.call(owner, &request).await.map_err(|e| e.to_string())?;
        }
    }
    phase.subscribe_secs = started.elapsed().as_secs_f64();
    let epoch = Instant::now();
    let histogram =
        Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("bounds")));
    let received = Arc::new(AtomicU64::new(0));
    let warmup_ns = args.warmup_secs * 1_000_000_000;
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut consumers = Vec::new();
    for owner in pool.all_shards() {
        let (pool, topic, histogram, received, stop) =
            (pool.clone(), topic.to_string(), histogram.clone(), received.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                let pop = PopRequest {
                    group: GROUP.into(),
                    topic: topic.clone(),
                    queue: String::new(),
                    max_count: POP_BATCH,
                    max_bytes: 16 << 20,
                    invisible_ms: 30_000,
                    long_poll_ms: LONG_POLL_MS,
                    poll_id: 0,
                    filter: FilterSpec::default(),
                    policy: GroupPolicy::default(),
                    client_id: CLIENT.into(),
                };
                let call = pool.call(owner, &pop);
                let frame = tokio::select! {
                    frame = call => frame,
                    () = stop.notified() => return,
                };
                let Ok(frame) = frame else { continue };
                let Ok(popped) = frame.access::<PopResponse>() else { continue };
                let now_ns = epoch.elapsed().as_nanos() as u64;
                for m in popped.messages.iter() {
                    let Ok(view) = RecordView::parse(&m.record) else { continue };
                    let Some(d) = Delivered::parse(view.body) else { continue };
                    received.fetch_add(1, Ordering::Relaxed);
                    if d.due_ns >= warmup_ns {
                        let us = (now_ns.saturating_sub(d.due_ns) / 1000).clamp(1, LATENCY_MAX_US);
                        histogram.lock().expect("histogram").record(us).expect("bounded value");
                    }
                    let ack = AckRequest {
                        queue: m.queue.as_str().to_string(),
                        group: GROUP.into(),
                        receipts: vec![m.receipt.as_str().to_string()],
                    };
                    let pool = pool.clone();
                    tokio::spawn(async move { pool.call(owner, &ack).await });
                }
            }
        }));
    }
    let total = args.rate * (args.warmup_secs + args.duration_secs);
    let acks = Arc::new(std::sync::Mutex::new(latency_histogram()));
    let sent = send_open_loop(args, pool, topic, &subscribed, epoch, total, acks.clone()).await?;
    // What is still in flight has a few seconds to arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.notify_waiters();
    for c in consumers {
        let _ = c.await;
    }
    phase.sent = sent;
    phase.received = received.load(Ordering::Relaxed);
    phase.not_received = sent.saturating_sub(phase.received);
    percentiles(&histogram.lock().expect("histogram"), phase);
    ack_percentiles(&acks.lock().expect("histogram"), phase);
    Ok(())
}

/// When message `g` is due, from the start of sending.
fn due_ns(g: u64, rate: u64) -> u64 {
    (g as u128 * 1_000_000_000 / rate as u128) as u64
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("bounds")
}

fn ack_percentiles(h: &Histogram<u64>, phase: &mut Phase) {
    phase.ack_p50_us = h.value_at_quantile(0.5);
    phase.ack_p99_us = h.value_at_quantile(0.99);
}

/// Records `done_ns - due_ns` in µs for each measured (past warm-up) due time.
fn record_since_due(h: &mut Histogram<u64>, due: &[u64], done_ns: u64, warmup_ns: u64) {
    for &due_ns in due.iter().filter(|&&d| d >= warmup_ns) {
        h.record((done_ns.saturating_sub(due_ns) / 1000).clamp(1, LATENCY_MAX_US)).expect("bounded value");
    }
}

/// Sends `total` messages at `rate`, message g due at g / rate s after `epoch`, each to the
/// next subscribed lite topic in turn; returns how many were acked.
async fn send_open_loop(
    args: &Args,
    pool: &Arc<BrokerPool>,
    topic: &str,
    subscribed: &[String],
    epoch: Instant,
    total: u64,
    acks: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> Result<u64, String> {
    let warmup_ns = args.warmup_secs * 1_000_000_000;
    let acked = Arc::new(AtomicU64::new(0));
    let mut next = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    while next < total {
        sluice_bench::timer::sleep_until(epoch + Duration::from_nanos(due_ns(next, args.rate))).await;
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let due_until = ((now_ns as u128 * args.rate as u128) / 1_000_000_000) as u64;
        let mut by_owner: std::collections::HashMap<Owner, Vec<(String, Bytes, u64)>> =
            std::collections::HashMap::new();
        while next < total && next <= due_until {
            let due_ns = due_ns(next, args.rate);
            let name = &subscribed[next as usize % subscribed.len()];
            let queue = lite_queue(topic, QUEUES, name);
            let body = message_body(args.body_bytes, due_ns, next);
            by_owner.entry(pool.owner(&queue)).or_default().push((name.clone(), body, due_ns));
            next += 1;
        }
        for (owner, messages) in by_owner {
            let (pool, topic, acked, acks) = (pool.clone(), topic.to_string(), acked.clone(), acks.clone());
            inflight.spawn(async move {
                let entries =
                    messages.iter().map(|(name, body, _)| lite_entry(&topic, name, String::new(), body)).collect();
                if pool.call(owner, &AppendRequest { entries }).await.is_ok() {
                    let done_ns = epoch.elapsed().as_nanos() as u64;
                    let due: Vec<u64> = messages.iter().map(|m| m.2).collect();
                    record_since_due(&mut acks.lock().expect("histogram"), &due, done_ns, warmup_ns);
                    acked.fetch_add(messages.len() as u64, Ordering::Relaxed);
                }
            });
        }
        while let Some(done) = inflight.try_join_next() {
            done.map_err(|e| e.to_string())?;
        }
    }
    while let Some(done) = inflight.join_next().await {
        done.map_err(|e| e.to_string())?;
    }
    Ok(acked.load(Ordering::Relaxed))
}

async fn redis_run(args: &Args, address: &str, pid: u32) -> Result<Phase, String> {
    let client = redis::Client::open(format!("redis://{address}/")).map_err(|e| e.to_string())?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let prefix = format!("litescale{}:", run_nonce());
    let aof = |info: String| {
        info.lines()
            .find_map(|l| l.strip_prefix("aof_current_size:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let info0: String =
        redis::cmd("INFO").arg("persistence").query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let rss0 = rss_bytes(pid);
    let body = vec![b'c'; args.body_bytes];
    let started = Instant::now();
    let chunks: Vec<Vec<usize>> =
        (0..args.lite_topics).collect::<Vec<_>>().chunks(CREATE_BATCH).map(<[usize]>::to_vec).collect();
    let results: Vec<Result<(), String>> = stream::iter(chunks)
        .map(|chunk| {
            let (mut conn, prefix, body) = (conn.clone(), prefix.clone(), body.clone());
            async move {
                let mut pipe = redis::pipe();
                for i in chunk {
                    pipe.cmd("XADD").arg(format!("{prefix}{}", session(i))).arg("*").arg("b").arg(&body[..]).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(CREATE_INFLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    let create_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info1: String =
        redis::cmd("INFO").arg("persistence").query_async(&mut conn).await.map_err(|e| e.to_string())?;
    let n = args.lite_topics as f64;
    let mut phase = Phase {
        lite_topics: args.lite_topics,
        create_secs,
        created_per_sec: n / create_secs,
        rss_per_topic_bytes: rss_bytes(pid).saturating_sub(rss0) as f64 / n,
        disk_per_topic_bytes: aof(info1).saturating_sub(aof(info0)) as f64 / n,
        disk_what: "AOF growth per stream".into(),
        note: "the consumer reads with XREAD over every subscribed stream (Redis keeps no subscription sets)".into(),
        ..Default::default()
    };
    redis_delivery(args, &client, &prefix, &mut phase).await?;
    Ok(phase)
}

async fn redis_delivery(args: &Args, client: &redis::Client, prefix: &str, phase: &mut Phase) -> Result<(), String> {
    let keys: Vec<String> =
        (0..args.subscribed.min(args.lite_topics)).map(|i| format!("{prefix}{}", session(i))).collect();
    let mut reader = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let mut writer = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let epoch = Instant::now();
    let warmup_ns = args.warmup_secs * 1_000_000_000;
    let total = args.rate * (args.warmup_secs + args.duration_secs);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut histogram = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("bounds");
    // Only what is sent from now on: every stream is read from its current end.
    let mut last: Vec<String> = vec!["$".to_string(); keys.len()];
    let index_of: std::collections::HashMap<String, usize> =
        keys.iter().cloned().enumerate().map(|(i, k)| (k, i)).collect();
    let consumer = {
        let (received, stop) = (received.clone(), stop.clone());
        let keys = keys.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT").arg(POP_BATCH).arg("BLOCK").arg(LONG_POLL_MS).arg("STREAMS").arg(&keys).arg(&last);
                let reply: Option<redis::streams::StreamReadReply> = match cmd.query_async(&mut reader).await {
                    Ok(reply) => reply,
                    Err(_) => continue,
                };
                let now_ns = epoch.elapsed().as_nanos() as u64;
                for stream in reply.map(|r| r.keys).unwrap_or_default() {
                    let Some(&i) = index_of.get(&stream.key) else { continue };
                    for id in stream.ids {
                        last[i] = id.id.clone();
                        let Some(redis::Value::BulkString(body)) = id.map.get("b") else { continue };
                        let Some(d) = Delivered::parse(body) else { continue };
                        received.fetch_add(1, Ordering::Relaxed);
                        if d.due_ns >= warmup_ns {
                            let us = (now_ns.saturating_sub(d.due_ns) / 1000).clamp(1, LATENCY_MAX_US);
                            histogram.record(us).expect("bounded value");
                        }
                    }
                }
            }
            histogram
        }
    };
    let consumer = tokio::spawn(consumer);
    // Let the first XREAD (with `$`) reach the server before anything is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let epoch_send = epoch + Duration::from_millis(500);
    let mut next = 0u64;
    let mut sent = 0u64;
    let mut acks = latency_histogram();
    while next < total {
        sluice_bench::timer::sleep_until(epoch_send + Duration::from_nanos(due_ns(next, args.rate))).await;
        let now_ns = epoch_send.elapsed().as_nanos() as u64;
        let due_until = ((now_ns as u128 * args.rate as u128) / 1_000_000_000) as u64;
        let mut pipe = redis::pipe();
        let mut due = Vec::new();
        while next < total && next <= due_until {
            let due_ns = due_ns(next, args.rate) + 500_000_000;
            let key = &keys[next as usize % keys.len()];
            pipe.cmd("XADD").arg(key).arg("*").arg("b").arg(&message_body(args.body_bytes, due_ns, next)[..]).ignore();
            next += 1;
            due.push(due_ns);
        }
        if !due.is_empty() && pipe.query_async::<()>(&mut writer).await.is_ok() {
            record_since_due(&mut acks, &due, epoch.elapsed().as_nanos() as u64, warmup_ns + 500_000_000);
            sent += due.len() as u64;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let histogram = consumer.await.map_err(|e| e.to_string())?;
    phase.sent = sent;
    phase.received = received.load(Ordering::Relaxed);
    phase.not_received = sent.saturating_sub(phase.received);
    percentiles(&histogram, phase);
    ack_percentiles(&acks, phase);
    Ok(())
}

fn print(name: &str, p: &Phase) {
    println!(
        "{name:>7}: {} lite topics created in {:.1} s ({:.0}/s); RSS {:.0} B and disk {:.0} B per lite topic ({})",
        p.lite_topics, p.create_secs, p.created_per_sec, p.rss_per_topic_bytes, p.disk_per_topic_bytes, p.disk_what
    );
    if p.rss_per_topic_outside_caches_bytes > 0.0 {
        println!(
            "{name:>7}: RSS per lite topic outside the bounded caches (RocksDB memtables and block cache, log tail cache): {:.0} B",
            p.rss_per_topic_outside_caches_bytes
        );
    }
    if p.idle_wait_secs > 0.0 {
        println!(
            "{name:>7}: once idle ({:.0} s later, {} queues still in memory): RSS {:.0} B per lite topic, {:.0} B outside the bounded caches",
            p.idle_wait_secs, p.resident_when_idle, p.rss_per_idle_topic_bytes, p.rss_per_idle_topic_outside_caches_bytes
        );
    }
    println!(
        "{name:>7}: delivery: {} sent, {} received, {} not received by the end; p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs (send→ack p50 {} µs, p99 {} µs){}",
        p.sent,
        p.received,
        p.not_received,
        p.p50_us,
        p.p99_us,
        p.p999_us,
        p.max_us,
        p.ack_p50_us,
        p.ack_p99_us,
        if p.subscribe_secs > 0.0 { format!("; subscribing took {:.2} s", p.subscribe_secs) } else { String::new() }
    );
}

/// Writes of the disk floor.
const FLOOR_WRITES: usize = 2000;
const FLOOR_WRITE_BYTES: usize = 4096;

/// The floor under a durable append: 4 KiB written then fdatasync'd, one at a time, in `dir`
/// (the broker's data directory, so the same device), while nothing else runs. (p50, p99) µs.
fn disk_floor(dir: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("lite-scale-floor.tmp");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let block = vec![7u8; FLOOR_WRITE_BYTES];
    let mut histogram = latency_histogram();
    for i in 0..FLOOR_WRITES {
        let started = Instant::now();
        file.write_all_at(&block, (i * FLOOR_WRITE_BYTES) as u64).map_err(|e| e.to_string())?;
        file.sync_data().map_err(|e| e.to_string())?;
        histogram.record((started.elapsed().as_micros() as u64).clamp(1, LATENCY_MAX_US)).expect("bounded value");
    }
    let _ = std::fs::remove_file(&path);
    Ok((histogram.value_at_quantile(0.5), histogram.value_at_quantile(0.99)))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.lite_topics == 0 || args.subscribed == 0 || args.rate == 0 || args.body_bytes < 16 {
        eprintln!("lite-scale: --lite-topics, --subscribed and --rate must be positive, --body-bytes at least 16");
        return std::process::ExitCode::FAILURE;
    }
    let floor = match disk_floor(&args.broker_data) {
        Ok(floor) => floor,
        Err(e) => {
            eprintln!("lite-scale: measuring the disk floor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "  floor: {FLOOR_WRITE_BYTES} B write + fdatasync in the broker's data directory: p50 {} µs, p99 {} µs",
        floor.0, floor.1
    );
    let sluice = match sluice(&args).await {
        Ok(phase) => phase,
        Err(e) => {
            eprintln!("lite-scale: sluice: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    print("sluice", &sluice);
    println!(
        "  ratio: sluice delivery p50 {:.2}×, p99 {:.2}× the disk floor's (write + fdatasync)",
        sluice.p50_us as f64 / floor.0.max(1) as f64,
        sluice.p99_us as f64 / floor.1.max(1) as f64
    );
    let redis = match (&args.redis, args.redis_pid) {
        (Some(address), Some(pid)) => match redis_run(&args, address, pid).await {
            Ok(phase) => {
                print("redis", &phase);
                Some(phase)
            }
            Err(e) => {
                eprintln!("lite-scale: redis: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    if let Some(r) = &redis {
        println!(
            "  ratio: creation {:.2}× Redis's rate, RSS per lite topic {:.2}× Redis's (once idle {:.2}×)",
            sluice.created_per_sec / r.created_per_sec,
            sluice.rss_per_topic_bytes / r.rss_per_topic_bytes.max(1.0),
            sluice.rss_per_idle_topic_bytes / r.rss_per_topic_bytes.max(1.0)
        );
        // A side that delivered only part of what was sent has latencies of the part it managed.
        let delivered_most = |p: &Phase| p.sent > 0 && p.received * 100 >= p.sent * 99;
        if delivered_most(&sluice) && delivered_most(r) {
            println!(
                "  ratio: delivery p50 {:.2}×, p99 {:.2}× Redis's (below 1 is faster)",
                sluice.p50_us as f64 / r.p50_us.max(1) as f64,
                sluice.p99_us as f64 / r.p99_us.max(1) as f64
            );
        } else {
            println!("  ratio: delivery latency has no ratio: a side delivered under 99% of what it sent");
        }
    }
    let json = serde_json::json!({
        "args": format!("{args:?}"),
        "disk_floor": { "write_bytes": FLOOR_WRITE_BYTES, "p50_us": floor.0, "p99_us": floor.1 },
        "sluice": sluice,
        "redis": redis,
    });
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&args.out, serde_json::to_string_pretty(&json).unwrap_or_default()) {
        eprintln!("lite-scale: cannot write {}: {e}", args.out.display());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
