//! Sharing scarce consumers, through the RocketMQ v2 API of a real `sluice local` (2 shards):
//! PRIORITY topics deliver a backlog highest priority first and FIFO within a level, across
//! every queue and shard of the topic; a suspended message comes back without counting an
//! attempt.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn priority_message(topic: &str, priority: i32, body: String) -> v2::Message {
    let mut m = message(topic, body.into_bytes());
    let system = m.system_properties.as_mut().expect("system");
    system.message_type = v2::MessageType::Priority as i32;
    system.priority = Some(priority);
    m
}

fn priority_of(m: &v2::Message) -> i32 {
    m.system_properties.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Waits until the brokers have taken back every message the proxy gave back (a receive
/// releases what it popped from one shard beyond the best across all shards). A release in
/// flight would leave those messages invisible for the next receive.
async fn releases_settled(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + SECS(20);
    loop {
        let mut client = admin_client(addr).await;
        let stats = client.get_stats(admin::GetStatsRequest {}).await.expect("GetStats").into_inner();
        let proxy = stats.proxy.iter().find(|c| c.name == "messages_released").map_or(0, |c| c.value);
        let brokers: u64 = stats
            .brokers
            .iter()
            .flat_map(|b| &b.counters)
            .filter(|c| c.name == "messages_released")
            .map(|c| c.value)
            .sum();
        if brokers >= proxy {
            return;
        }
        assert!(Instant::now() < deadline, "releases never reached the brokers: proxy {proxy}, brokers {brokers}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_delivered_highest_priority_first_and_fifo_within_a_level() {
    const MESSAGES: usize = 600;
    const LEVELS: i32 = 6;
    let local = Local::start().await;
    create_typed_topic(local.grpc, "jobs", v2::MessageType::Priority, 4).await;
    let mut producer = messaging(local.grpc).await;
    // A backlog first, priorities interleaved in a fixed scramble (and some NORMAL messages,
    // which a PRIORITY topic takes at priority 0).
    let mut sent = Vec::new();
    for batch in 0..(MESSAGES / 20) {
        let messages: Vec<v2::Message> = (0..20)
            .map(|i| {
                let seq = batch * 20 + i;
                let priority = ((seq * 7 + seq / 13) % LEVELS as usize) as i32;
                sent.push((seq, priority));
                if priority == 0 && seq % 2 == 0 {
                    message("jobs", format!("{seq}").into_bytes())
                } else {
                    priority_message("jobs", priority, format!("{seq}"))
                }
            })
            .collect();
        send_ok(&mut producer, messages).await;
    }

    let mut consumer = messaging(local.grpc).await;
    let mut got: Vec<(usize, i32, i32)> = Vec::new();
    let deadline = Instant::now() + SECS(60);
    while got.len() < MESSAGES && Instant::now() < deadline {
        let r = receive(&mut consumer, "jobs", "workers", 32, SECS(30), SECS(1)).await;
        assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
        ack_all(&mut consumer, "jobs", "workers", &r.messages).await;
        for m in &r.messages {
            let seq: usize = String::from_utf8_lossy(&m.body).parse().expect("a sequence number");
            let queue = m.system_properties.as_ref().map_or(-1, |s| s.queue_id);
            got.push((seq, priority_of(m), queue));
        }
        releases_settled(local.grpc).await;
    }
    assert_eq!(got.len(), MESSAGES, "every message delivered once");

    // The whole backlog, across 4 queues on 2 shards, in priority order.
    let priorities: Vec<i32> = got.iter().map(|(_, p, _)| *p).collect();
    let mut sorted = priorities.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(priorities, sorted, "highest priority first");
    let want: HashMap<usize, i32> = sent.into_iter().collect();
    assert!(got.iter().all(|(seq, p, _)| want[seq] == *p), "each message kept its priority");

    // Within a level, each queue gives its messages in send order.
    let mut last: HashMap<(i32, i32), usize> = HashMap::new();
    for (seq, priority, queue) in &got {
        if let Some(before) = last.insert((*priority, *queue), *seq) {
            assert!(before < *seq, "queue {queue}, priority {priority}: {seq} after {before}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_higher_priority_sent_later_overtakes_the_backlog() {
    let local = Local::start().await;
    create_typed_topic(local.grpc, "jobs", v2::MessageType::Priority, 2).await;
    let mut client = messaging(local.grpc).await;
    let low: Vec<v2::Message> = (0..200).map(|i| priority_message("jobs", 1, format!("low-{i}"))).collect();
    send_ok(&mut client, low).await;
    // The group starts working on the backlog, then an urgent message arrives.
    let first = receive(&mut client, "jobs", "workers", 4, SECS(30), SECS(1)).await;
    assert_eq!(first.messages.len(), 4, "{:?}", first.statuses);
    ack_all(&mut client, "jobs", "workers", &first.messages).await;
    releases_settled(local.grpc).await;
    send_ok(&mut client, vec![priority_message("jobs", 9, "urgent".into())]).await;
    let next = receive(&mut client, "jobs", "workers", 4, SECS(30), SECS(1)).await;
    assert_eq!(String::from_utf8_lossy(&next.messages[0].body), "urgent", "the urgent message goes before the backlog");
    assert_eq!(priority_of(&next.messages[0]), 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_is_refused_where_it_has_no_meaning() {
    let local = Local::start().await;
    create_topic(local.grpc, "plain", 2).await;
    create_typed_topic(local.grpc, "jobs", v2::MessageType::Priority, 2).await;
    let mut client = messaging(local.grpc).await;

    let reply = send(&mut client, vec![priority_message("plain", 3, "x".into())]).await;
    let code = code(reply.entries.first().and_then(|e| e.status.as_ref()).or(reply.status.as_ref()));
    assert_eq!(code, v2::Code::MessagePropertyConflictWithType as i32, "{reply:?}");

    let mut normal_with_priority = message("plain", b"x".to_vec());
    normal_with_priority.system_properties.as_mut().unwrap().priority = Some(3);
    let reply = send(&mut client, vec![normal_with_priority]).await;
    let code = common::code(reply.entries.first().and_then(|e| e.status.as_ref()).or(reply.status.as_ref()));
    assert_eq!(code, v2::Code::MessagePropertyConflictWithType as i32, "{reply:?}");

    let reply = send(&mut client, vec![priority_message("jobs", -1, "x".into())]).await;
    let code = common::code(reply.entries.first().and_then(|e| e.status.as_ref()).or(reply.status.as_ref()));
    assert_eq!(code, v2::Code::BadRequest as i32, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_message_comes_back_without_counting_an_attempt() {
    let local = Local::start().await;
    create_topic(local.grpc, "work", 1).await;
    let mut client = messaging(local.grpc).await;
    send_ok(&mut client, vec![message("work", b"job".to_vec())]).await;
    let attempt = |m: &v2::Message| m.system_properties.as_ref().and_then(|s| s.delivery_attempt).unwrap_or(0);
    let mut attempts = Vec::new();
    // Suspended twice, then failed once (a plain change of invisible time), then received.
    for suspend in [Some(true), Some(true), None] {
        let r = receive(&mut client, "work", "workers", 1, SECS(30), SECS(5)).await;
        let m = r.messages.first().unwrap_or_else(|| panic!("redelivered: {:?}", r.statuses));
        attempts.push(attempt(m));
        let reply = client
            .change_invisible_duration(v2::ChangeInvisibleDurationRequest {
                group: Some(resource("workers")),
                topic: Some(resource("work")),
                receipt_handle: receipt_handle(m),
                invisible_duration: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
                message_id: message_id(m),
                lite_topic: None,
                suspend,
            })
            .await
            .expect("ChangeInvisibleDuration")
            .into_inner();
        assert_eq!(code(reply.status.as_ref()), OK, "{reply:?}");
    }
    let last = receive(&mut client, "work", "workers", 1, SECS(30), SECS(5)).await;
    attempts.push(attempt(last.messages.first().expect("redelivered after the nack")));
    assert_eq!(attempts, [1, 1, 1, 2], "suspending does not count an attempt; a nack does");
}
