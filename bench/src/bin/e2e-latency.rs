//! End-to-end latency through a running proxy and broker(s): a producer sends at a fixed rate
//! (open loop) over the RocketMQ v2 gRPC API, consumers long-poll, and each message's
//! send→ack and send→receive latency is recorded in HdrHistogram from the time it was
//! *scheduled* to be sent, so a stall delays the clock of every message behind it
//! (coordinated omission is not hidden). Beside it, in the same run, the round trip of a
//! unary gRPC call to the same proxy (Heartbeat: no storage) is the floor.
//!
//!   target/release/e2e-latency --endpoint 127.0.0.1:8081 --rate 1000 --duration-secs 10
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use sluice_proxy::pb::apache::rocketmq::v2;
use sluice_proxy::pb::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proxy::pb::sluice::admin::v1 as admin;
use sluice_proxy::pb::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8081")]
    endpoint: String,
    /// Created (normal) if missing.
    #[arg(long, default_value = "e2e-latency")]
    topic: String,
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Messages per second, open loop.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Sent first and not recorded.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Body size in bytes (at least 16: the send time travels in the body).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent receive loops (each starts its sweep at a different queue).
    #[arg(long, default_value_t = 4)]
    consumers: u32,
    /// Sends in flight at most; beyond it the producer waits (and the waiting is measured).
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// Heartbeat round trips for the floor.
    #[arg(long, default_value_t = 2000)]
    floor_iterations: u32,
    /// A label printed with the results (e.g. "local" or "split").
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// Latencies are recorded in microseconds up to a minute.
const HIGHEST_US: u64 = 60_000_000;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds")
}

async fn connect(endpoint: &str) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e} (is `sluice local` running?)"))
}

fn resource(name: &str) -> v2::Resource {
    v2::Resource { resource_namespace: String::new(), name: name.into() }
}

fn message(topic: &str, id: u64, scheduled_ns: u64, size: usize) -> v2::Message {
    let mut body = vec![b'x'; size.max(16)];
    body[..8].copy_from_slice(&scheduled_ns.to_le_bytes());
    body[8..16].copy_from_slice(&id.to_le_bytes());
    v2::Message {
        topic: Some(resource(topic)),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: format!("{:016X}{:016X}", scheduled_ns, id),
            message_type: v2::MessageType::Normal as i32,
            body_encoding: v2::Encoding::Identity as i32,
            ..Default::default()
        }),
        body,
    }
}

struct Shared {
    send_ack: Mutex<Histogram<u64>>,
    end_to_end: Mutex<Histogram<u64>>,
    received: AtomicU64,
    errors: AtomicU64,
    producing: AtomicBool,
}

fn record(h: &Mutex<Histogram<u64>>, from_ns: u64) {
    let us = now_ns().saturating_sub(from_ns) / 1000;
    h.lock().expect("histogram lock").saturating_record(us.clamp(1, HIGHEST_US));
}

async fn consume(
    channel: Channel,
    topic: String,
    group: String,
    queue: i32,
    measure_from_ns: u64,
    shared: Arc<Shared>,
    stop_after: Instant,
) {
    let mut client = MessagingServiceClient::new(channel).max_decoding_message_size(64 << 20);
    while Instant::now() < stop_after {
        let request = v2::ReceiveMessageRequest {
            group: Some(resource(&group)),
            message_queue: Some(v2::MessageQueue { topic: Some(resource(&topic)), id: queue, ..Default::default() }),
            filter_expression: None,
            batch_size: 32,
            invisible_duration: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            attempt_id: None,
        };
        let mut stream = match client.receive_message(request).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut entries = Vec::new();
        while let Ok(Some(item)) = stream.message().await {
            if let Some(v2::receive_message_response::Content::Message(m)) = item.content {
                let sent_ns = m.body.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
                if sent_ns >= measure_from_ns {
                    record(&shared.end_to_end, sent_ns);
                }
                shared.received.fetch_add(1, Ordering::Relaxed);
                let system = m.system_properties.unwrap_or_default();
                entries.push(v2::AckMessageEntry {
                    message_id: system.message_id,
                    receipt_handle: system.receipt_handle.unwrap_or_default(),
                    lite_topic: None,
                });
            }
        }
        if !entries.is_empty() {
            let ack = v2::AckMessageRequest { group: Some(resource(&group)), topic: Some(resource(&topic)), entries };
            if client.ack_message(ack).await.is_err() {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !shared.producing.load(Ordering::Relaxed) && Instant::now() >= stop_after {
            break;
        }
    }
}

async fn floor(channel: Channel, iterations: u32) -> Histogram<u64> {
    let mut client = MessagingServiceClient::new(channel);
    let mut h = histogram();
    for i in 0..iterations {
        let start = Instant::now();
        let ok = client
            .heartbeat(v2::HeartbeatRequest { group: None, client_type: v2::ClientType::Producer as i32 })
            .await
            .is_ok();
        if ok && i >= iterations / 10 {
            h.saturating_record((start.elapsed().as_micros() as u64).clamp(1, HIGHEST_US));
        }
    }
    h
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

async fn run(args: Args) -> Result<(), String> {
    let channel = connect(&args.endpoint).await?;
    let mut admin_client = AdminClient::new(channel.clone());
    let created = admin_client
        .create_topic(admin::CreateTopicRequest {
            name: args.topic.clone(),
            message_type: v2::MessageType::Normal as i32,
            queue_count: args.queues,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    if created.status.as_ref().map(|s| s.code) != Some(v2::Code::Ok as i32) {
        return Err(format!("creating topic {}: {:?}", args.topic, created.status));
    }
    let queue_count = created.topic.map_or(args.queues, |t| t.queue_count);
    let floor_histogram = floor(channel.clone(), args.floor_iterations).await;

    let group = format!("e2e-{}", now_ns());
    let shared = Arc::new(Shared {
        send_ack: Mutex::new(histogram()),
        end_to_end: Mutex::new(histogram()),
        received: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        producing: AtomicBool::new(true),
    });
    let start = Instant::now();
    let measure_from_ns = now_ns() + args.warmup_secs * 1_000_000_000;
    let total = (args.warmup_secs + args.duration_secs) * args.rate;
    let drain = Duration::from_secs(10);
    let stop_after = start + Duration::from_secs(args.warmup_secs + args.duration_secs) + drain;
    let consumers: Vec<_> = (0..args.consumers)
        .map(|i| {
            let queue = (i % queue_count.max(1)) as i32;
            tokio::spawn(consume(
                channel.clone(),
                args.topic.clone(),
                group.clone(),
                queue,
                measure_from_ns,
                shared.clone(),
                stop_after,
            ))
        })
        .collect();
    // Open loop: message i is due at start + i/rate whether or not earlier sends finished.
    let inflight = Arc::new(tokio::sync::Semaphore::new(args.max_inflight));
    let interval_ns = 1_000_000_000 / args.rate.max(1);
    let start_ns = now_ns();
    let mut sends = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_nanos(i * interval_ns);
        tokio::time::sleep_until(due.into()).await;
        let scheduled_ns = start_ns + i * interval_ns;
        let permit = inflight.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let mut client = MessagingServiceClient::new(channel.clone()).max_encoding_message_size(64 << 20);
        let (topic, size, shared) = (args.topic.clone(), args.size, shared.clone());
        sends.push(tokio::spawn(async move {
            let reply = client
                .send_message(v2::SendMessageRequest { messages: vec![message(&topic, i, scheduled_ns, size)] })
                .await;
            let ok =
                matches!(&reply, Ok(r) if r.get_ref().status.as_ref().map(|s| s.code) == Some(v2::Code::Ok as i32));
            if ok && scheduled_ns >= measure_from_ns {
                record(&shared.send_ack, scheduled_ns);
            } else if !ok {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for send in sends {
        let _ = send.await;
    }
    shared.producing.store(false, Ordering::Relaxed);
    let wait_until = Instant::now() + drain;
    while shared.received.load(Ordering::Relaxed) < total && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in consumers {
        c.abort();
    }
    let received = shared.received.load(Ordering::Relaxed);
    let send_ack = shared.send_ack.lock().expect("lock").clone();
    let e2e = shared.end_to_end.lock().expect("lock").clone();
    let label = if args.label.is_empty() { String::new() } else { format!(" [{}]", args.label) };
    println!(
        "e2e latency{label}: {} msg/s x {} s, {} B bodies, {} consumers, {} queues",
        args.rate, args.duration_secs, args.size, args.consumers, queue_count
    );
    println!("{:<28} {:>9} {:>9} {:>9} {:>9} {:>9}", "path", "count", "p50 µs", "p99 µs", "p99.9 µs", "max µs");
    for (name, h) in
        [("grpc heartbeat (floor)", &floor_histogram), ("send -> ack", &send_ack), ("send -> receive", &e2e)]
    {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    let ratio =
        |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / floor_histogram.value_at_quantile(0.5).max(1) as f64;
    println!("p50 ratio to the floor: send->ack {:.1}x, send->receive {:.1}x", ratio(&send_ack), ratio(&e2e));
    println!("sent {total}, received {received}, errors {}", shared.errors.load(Ordering::Relaxed));
    if let Some(path) = args.json {
        let value = serde_json::json!({
            "label": args.label, "rate": args.rate, "duration_secs": args.duration_secs, "size": args.size,
            "sent": total, "received": received, "errors": shared.errors.load(Ordering::Relaxed),
            "floor_heartbeat": summary(&floor_histogram), "send_ack": summary(&send_ack), "send_receive": summary(&e2e),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if received < total {
        return Err(format!("only {received} of {total} messages were received"));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
