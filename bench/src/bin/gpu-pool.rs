//! The `gpu-pool` scenario: bursty AI front ends in front of a fixed pool of inference
//! capacity, with Sluice as the reservoir between them (through the proxy, as SDKs use it).
//!
//! - `--producers` producers send at `--base-rate` msg/s each, with bursts of
//!   `--burst-factor`× that rate for `--burst-ms` every `--period-ms`, all at once (the worst
//!   case for the pool). Every other message goes to a PRIORITY topic (priorities 0..P in turn)
//!   and the rest to a fair topic (tenants in turn, each sending as much; `--tenants` gives
//!   their weights).
//! - One consumer group, `--consumers` consumers (half on each topic), with a receive quota
//!   (`max_receive_tps`) equal to the pool's `--capacity`: the GPUs never see more.
//! - Reported, for what is received after `--warmup-s`: the consumer rate per second (mean and standard deviation:
//!   how steady the pool is fed), the wait from send to receive per priority class (p50, p99),
//!   and each tenant's share of the fair topic's deliveries beside its weight's share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use sluice_proto::apache::rocketmq::v2;
use sluice_proto::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::sluice::admin::v1 as admin;
use sluice_proto::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

/// Producer pacing tick.
const TICK: Duration = Duration::from_millis(10);
const RECEIVE_BATCH: i32 = 16;
const LONG_POLL: Duration = Duration::from_secs(1);
const INVISIBLE: Duration = Duration::from_secs(30);
/// Wait histogram bound: 10 minutes in µs.
const WAIT_MAX_US: u64 = 600_000_000;
/// Seconds the per-second consumer counts cover at most.
const SECONDS_MAX: usize = 3_600;
const SENT_US: &str = "sent_us";
const TENANT: &str = "tenant";
const GROUP: &str = "gpu-pool";

#[derive(Parser, Debug, Clone)]
struct Args {
    /// The proxy's gRPC address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    endpoint: String,
    #[arg(long, default_value_t = 4)]
    producers: usize,
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// The GPU pool's capacity in messages/s: the consumer group's receive quota.
    #[arg(long, default_value_t = 400)]
    capacity: u32,
    /// Each producer's rate between bursts, msg/s (default: capacity / producers / 2).
    #[arg(long)]
    base_rate: Option<f64>,
    #[arg(long, default_value_t = 10.0)]
    burst_factor: f64,
    #[arg(long, default_value_t = 1_000)]
    burst_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    period_ms: u64,
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
    /// Priority classes of the PRIORITY topic's messages (0 = lowest).
    #[arg(long, default_value_t = 3)]
    priorities: i32,
    /// Tenants of the fair topic and their weights.
    #[arg(long, default_value = "a=1,b=2,c=4")]
    tenants: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Tally {
    /// Deliveries per second since the start.
    per_second: Vec<AtomicU64>,
    /// Per priority class: send → receive wait in µs.
    waits: Mutex<Vec<Histogram<u64>>>,
    /// Fair topic deliveries per tenant.
    tenants: Mutex<BTreeMap<String, u64>>,
    sent: AtomicU64,
    send_failures: AtomicU64,
    throttled: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn resource(name: &str) -> v2::Resource {
    v2::Resource { resource_namespace: String::new(), name: name.into() }
}

fn ok(status: Option<&v2::Status>, what: &str) -> Result<(), String> {
    match status {
        Some(s) if s.code == v2::Code::Ok as i32 => Ok(()),
        Some(s) => Err(format!("{what}: {} {}", s.code, s.message)),
        None => Err(format!("{what}: no status")),
    }
}

async fn channel(endpoint: &str) -> Result<Channel, String> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let channel = Channel::from_shared(url).map_err(|e| e.to_string())?;
    channel.connect().await.map_err(|e| format!("cannot reach the proxy at {endpoint}: {e}"))
}

/// The two topics and the quota group, named after this run.
async fn setup(args: &Args, run: &str) -> Result<(String, String), String> {
    let mut admin = AdminClient::new(channel(&args.endpoint).await?);
    let jobs = format!("gpu-jobs-{run}");
    let tenants = format!("gpu-tenants-{run}");
    for (name, kind, fair_key, fair_weights) in
        [(&jobs, v2::MessageType::Priority, "", ""), (&tenants, v2::MessageType::Normal, TENANT, args.tenants.as_str())]
    {
        let request = admin::CreateTopicRequest {
            name: name.clone(),
            message_type: kind as i32,
            queue_count: 4,
            fair_key: fair_key.into(),
            fair_weights: fair_weights.into(),
            ..Default::default()
        };
        let reply = admin.create_topic(request).await.map_err(|e| e.to_string())?.into_inner();
        ok(reply.status.as_ref(), "CreateTopic")?;
    }
    let group = admin::CreateGroupRequest {
        name: format!("{GROUP}-{run}"),
        max_receive_tps: args.capacity,
        throttle: "wait".into(),
        ..Default::default()
    };
    let reply = admin.create_group(group).await.map_err(|e| e.to_string())?.into_inner();
    ok(reply.status.as_ref(), "CreateGroup")?;
    Ok((jobs, tenants))
}

fn message(topic: &str, priority: Option<i32>, tenant: Option<&str>) -> v2::Message {
    let mut user_properties = std::collections::HashMap::new();
    user_properties.insert(SENT_US.to_string(), now_us().to_string());
    if let Some(t) = tenant {
        user_properties.insert(TENANT.to_string(), t.to_string());
    }
    let message_type = if priority.is_some() { v2::MessageType::Priority } else { v2::MessageType::Normal };
    v2::Message {
        topic: Some(resource(topic)),
        user_properties,
        system_properties: Some(v2::SystemProperties {
            message_id: format!("{:032X}", rand_id()),
            message_type: message_type as i32,
            priority,
            body_encoding: v2::Encoding::Identity as i32,
            born_timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
            born_host: "gpu-pool".into(),
            ..Default::default()
        }),
        body: vec![b'x'; 256],
    }
}

fn rand_id() -> u128 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (u128::from(now_us()) << 64) | u128::from(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The producer's rate at `elapsed` since the start: bursts at the start of every period.
fn rate_at(args: &Args, base: f64, elapsed: Duration) -> f64 {
    let in_period_ms = elapsed.as_millis() as u64 % args.period_ms;
    if in_period_ms < args.burst_ms {
        base * args.burst_factor
    } else {
        base
    }
}

async fn produce(
    args: Args,
    base: f64,
    topics: (String, String),
    tenants: Vec<String>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let Ok(channel) = channel(&args.endpoint).await else { return };
    let mut client = MessagingServiceClient::new(channel);
    let start = Instant::now();
    let mut owed = 0.0;
    let mut seq = 0u64;
    let mut ticker = tokio::time::interval(TICK);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        owed += rate_at(&args, base, start.elapsed()) * TICK.as_secs_f64();
        let due = owed.floor() as u64;
        owed -= due as f64;
        let (mut jobs, mut fair) = (Vec::new(), Vec::new());
        for _ in 0..due {
            let i = seq / 2;
            if seq.is_multiple_of(2) {
                jobs.push(message(&topics.0, Some((i % args.priorities as u64) as i32), None));
            } else {
                fair.push(message(&topics.1, None, Some(&tenants[(i % tenants.len() as u64) as usize])));
            }
            seq += 1;
        }
        for batch in [jobs, fair].into_iter().filter(|b| !b.is_empty()) {
            let n = batch.len() as u64;
            match client.send_message(v2::SendMessageRequest { messages: batch }).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let good = reply.entries.iter().filter(|e| ok(e.status.as_ref(), "send").is_ok()).count() as u64;
                    tally.sent.fetch_add(good, Ordering::Relaxed);
                    tally.send_failures.fetch_add(n - good, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.send_failures.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn consume(
    endpoint: String,
    topic: String,
    group: String,
    (start, warmup): (Instant, Duration),
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let Ok(channel) = channel(&endpoint).await else { return };
    let mut client = MessagingServiceClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let request = v2::ReceiveMessageRequest {
            group: Some(resource(&group)),
            message_queue: Some(v2::MessageQueue { topic: Some(resource(&topic)), ..Default::default() }),
            filter_expression: Some(v2::FilterExpression {
                r#type: v2::FilterType::Tag as i32,
                expression: "*".into(),
            }),
            batch_size: RECEIVE_BATCH,
            invisible_duration: Some(prost_types::Duration { seconds: INVISIBLE.as_secs() as i64, nanos: 0 }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration { seconds: LONG_POLL.as_secs() as i64, nanos: 0 }),
            attempt_id: None,
        };
        let Ok(stream) = client.receive_message(request).await else { continue };
        let mut stream = stream.into_inner();
        let mut entries = Vec::new();
        while let Ok(Some(item)) = stream.message().await {
            match item.content {
                Some(v2::receive_message_response::Content::Message(m)) => {
                    record(&m, start, warmup, &tally);
                    let system = m.system_properties.unwrap_or_default();
                    entries.push(v2::AckMessageEntry {
                        message_id: system.message_id,
                        receipt_handle: system.receipt_handle.unwrap_or_default(),
                        lite_topic: None,
                    });
                }
                Some(v2::receive_message_response::Content::Status(s))
                    if s.code == v2::Code::TooManyRequests as i32 =>
                {
                    tally.throttled.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if !entries.is_empty() {
            let ack = v2::AckMessageRequest { group: Some(resource(&group)), topic: Some(resource(&topic)), entries };
            let _ = client.ack_message(ack).await;
        }
    }
}

fn record(m: &v2::Message, start: Instant, warmup: Duration, tally: &Tally) {
    let second = start.elapsed().as_secs() as usize;
    if start.elapsed() < warmup {
        if let Some(slot) = tally.per_second.get(second) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    if let Some(slot) = tally.per_second.get(second) {
        slot.fetch_add(1, Ordering::Relaxed);
    }
    let sent_us: u64 = m.user_properties.get(SENT_US).and_then(|v| v.parse().ok()).unwrap_or(0);
    let wait_us = now_us().saturating_sub(sent_us).clamp(1, WAIT_MAX_US);
    let system = m.system_properties.as_ref();
    if let Some(tenant) = m.user_properties.get(TENANT) {
        *tally.tenants.lock().expect("tenants").entry(tenant.clone()).or_default() += 1;
    } else {
        // Priority 0 may come back without the field (it is the default).
        let priority = system.and_then(|s| s.priority).unwrap_or(0);
        if let Some(h) = tally.waits.lock().expect("waits").get_mut(priority.max(0) as usize) {
            let _ = h.record(wait_us);
        }
    }
}

fn mean_and_stddev(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    (mean, variance.sqrt())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("gpu-pool: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.warmup_s >= args.duration_s || args.duration_s as usize > SECONDS_MAX {
        return Err(format!("--warmup-s must be below --duration-s, which is at most {SECONDS_MAX}"));
    }
    if args.priorities < 1 || args.period_ms == 0 || args.burst_ms > args.period_ms {
        return Err("--priorities must be at least 1, and --burst-ms at most --period-ms (not 0)".into());
    }
    let pairs = sluice_proto_weights(&args.tenants)?;
    let tenants: Vec<String> = pairs.iter().map(|(t, _)| t.clone()).collect();
    let run = format!("{}", std::process::id());
    let (jobs, fair) = setup(&args, &run).await?;
    let group = format!("{GROUP}-{run}");
    let base = args.base_rate.unwrap_or(f64::from(args.capacity) / args.producers.max(1) as f64 / 2.0);
    let tally = Arc::new(Tally {
        per_second: (0..SECONDS_MAX).map(|_| AtomicU64::new(0)).collect(),
        waits: Mutex::new(
            (0..args.priorities.max(1))
                .map(|_| Histogram::new_with_bounds(1, WAIT_MAX_US, 3).expect("bounds"))
                .collect(),
        ),
        ..Default::default()
    });
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.producers {
        let task = produce(
            args.clone(),
            base,
            (jobs.clone(), fair.clone()),
            tenants.clone(),
            stop_producers.clone(),
            tally.clone(),
        );
        tasks.push(tokio::spawn(task));
    }
    let mut consumers = Vec::new();
    for c in 0..args.consumers.max(2) {
        let topic = if c % 2 == 0 { jobs.clone() } else { fair.clone() };
        let clock = (start, Duration::from_secs(args.warmup_s));
        let task = consume(args.endpoint.clone(), topic, group.clone(), clock, stop_consumers.clone(), tally.clone());
        consumers.push(tokio::spawn(task));
    }
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    stop_producers.store(true, Ordering::Relaxed);
    stop_consumers.store(true, Ordering::Relaxed);
    for t in tasks.into_iter().chain(consumers) {
        let _ = tokio::time::timeout(LONG_POLL * 5, t).await;
    }
    report(&args, base, &pairs, &tally);
    Ok(())
}

/// The tenant list with weights, as the topic is given it.
fn sluice_proto_weights(list: &str) -> Result<Vec<(String, u32)>, String> {
    let pairs = sluice_transport::model::fairness::parse_list(list)?;
    if pairs.is_empty() {
        return Err("--tenants names no tenant".into());
    }
    Ok(pairs)
}

fn report(args: &Args, base: f64, pairs: &[(String, u32)], tally: &Tally) {
    let seconds: Vec<f64> = tally.per_second[args.warmup_s as usize..args.duration_s as usize]
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as f64)
        .collect();
    let (mean, stddev) = mean_and_stddev(&seconds);
    let offered_mean =
        base * args.producers as f64 * (1.0 + (args.burst_factor - 1.0) * args.burst_ms as f64 / args.period_ms as f64);
    let waits = tally.waits.lock().expect("waits");
    let classes: Vec<serde_json::Value> = waits
        .iter()
        .enumerate()
        .map(|(p, h)| {
            serde_json::json!({
                "priority": p, "delivered": h.len(),
                "wait_p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
                "wait_p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
            })
        })
        .collect();
    let counts = tally.tenants.lock().expect("tenants");
    let delivered: u64 = counts.values().sum();
    let weight_sum: u32 = pairs.iter().map(|(_, w)| w).sum();
    let shares: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(t, w)| {
            let n = counts.get(t).copied().unwrap_or(0);
            serde_json::json!({
                "tenant": t, "weight": w, "delivered": n,
                "share": if delivered == 0 { 0.0 } else { n as f64 / delivered as f64 },
                "weight_share": f64::from(*w) / f64::from(weight_sum),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "capacity_per_s": args.capacity,
        "offered_mean_per_s": offered_mean,
        "offered_burst_per_s": base * args.producers as f64 * args.burst_factor,
        "sent": tally.sent.load(Ordering::Relaxed),
        "send_failures": tally.send_failures.load(Ordering::Relaxed),
        "receives_throttled": tally.throttled.load(Ordering::Relaxed),
        "consumer_rate_mean_per_s": mean,
        "consumer_rate_stddev_per_s": stddev,
        "per_second": seconds,
        "priority_classes": classes,
        "tenants": shares,
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!(
        "gpu-pool: capacity {} msg/s; offered {:.0} msg/s on average, {:.0} in bursts ({}x for {} ms every {} ms)",
        args.capacity,
        offered_mean,
        base * args.producers as f64 * args.burst_factor,
        args.burst_factor,
        args.burst_ms,
        args.period_ms
    );
    println!(
        "consumer rate after {} s warm-up: mean {mean:.1} msg/s, stddev {stddev:.1} msg/s ({:.1}% of the mean)",
        args.warmup_s,
        if mean > 0.0 { 100.0 * stddev / mean } else { 0.0 }
    );
    println!("sent {} (failed {})", tally.sent.load(Ordering::Relaxed), tally.send_failures.load(Ordering::Relaxed));
    println!("{:<10} {:>10} {:>14} {:>14}", "PRIORITY", "DELIVERED", "WAIT p50 ms", "WAIT p99 ms");
    for c in &classes {
        println!(
            "{:<10} {:>10} {:>14.1} {:>14.1}",
            c["priority"],
            c["delivered"],
            c["wait_p50_ms"].as_f64().unwrap_or(0.0),
            c["wait_p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{:<10} {:>7} {:>10} {:>8} {:>13}", "TENANT", "WEIGHT", "DELIVERED", "SHARE", "WEIGHT SHARE");
    for s in &shares {
        println!(
            "{:<10} {:>7} {:>10} {:>7.1}% {:>12.1}%",
            s["tenant"].as_str().unwrap_or(""),
            s["weight"],
            s["delivered"],
            100.0 * s["share"].as_f64().unwrap_or(0.0),
            100.0 * s["weight_share"].as_f64().unwrap_or(0.0)
        );
    }
}
