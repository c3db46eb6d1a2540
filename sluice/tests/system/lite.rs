//! Lite topics through the RocketMQ v2 API of a real `sluice local`: a consumer subscribed to
//! 10,000 lite topics gets only its own messages, order within a lite topic while others are
//! written, a group's position outliving its consumers, quotas and bad names, reclaiming after
//! the TTL (never while a client subscribes), and a shard at its queue limit. Two of them run
//! with lite topics evicted from the broker's memory a millisecond after each append.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;

const OK: i32 = v2::Code::Ok as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;
const INVISIBLE: Duration = Duration::from_secs(30);

/// Quick upkeep: clients silent for a second are forgotten, so reclaiming starts a second
/// after start-up (the sweep runs with the offset writer, every second).
const QUICK: &str = r#"
[broker]
lite_client_idle_ms = 1000
"#;

/// Lite topics leave the broker's memory a millisecond after their last append, so every
/// later use reads them back from the index.
const EVICTING: &str = r#"
[broker]
queue_idle_evict_ms = 1
"#;

/// The broker evicted idle queues during the test (so it ran the read-back path).
async fn assert_queues_were_evicted(addr: std::net::SocketAddr) {
    let stats = broker_counters(addr).await;
    assert!(stats.get("engine_queues_evicted").is_some_and(|n| *n > 0), "no queue was evicted: {stats:?}");
}

async fn lite_topic(addr: std::net::SocketAddr, name: &str, queues: u32, ttl_minutes: u32) {
    let request = admin::CreateTopicRequest {
        name: name.into(),
        message_type: v2::MessageType::Lite as i32,
        queue_count: queues,
        lite_ttl_minutes: ttl_minutes,
        ..Default::default()
    };
    create_topic_with(addr, request).await;
}

fn lite_message(topic: &str, lite: &str, body: String) -> v2::Message {
    let mut m = message(topic, body.into_bytes());
    let system = m.system_properties.as_mut().expect("system");
    system.message_type = v2::MessageType::Lite as i32;
    system.lite_topic = Some(lite.into());
    m
}

fn with_client<T>(client_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-mq-client-id", client_id.parse().expect("ascii client id"));
    request
}

fn body_text(m: &v2::Message) -> String {
    String::from_utf8(m.body.clone()).expect("utf-8 body")
}

fn lite_of(m: &v2::Message) -> String {
    m.system_properties.as_ref().and_then(|s| s.lite_topic.clone()).unwrap_or_default()
}

async fn sync(
    client: &mut Messaging,
    client_id: &str,
    action: v2::LiteSubscriptionAction,
    topic: &str,
    group: &str,
    names: &[String],
) -> v2::Status {
    let request = v2::SyncLiteSubscriptionRequest {
        action: action as i32,
        topic: Some(resource(topic)),
        group: Some(resource(group)),
        lite_topic_set: names.to_vec(),
        version: None,
        offset_option: None,
    };
    let reply = bounded("SyncLiteSubscription", client.sync_lite_subscription(with_client(client_id, request)))
        .await
        .expect("SyncLiteSubscription transport")
        .into_inner();
    reply.status.unwrap_or(v2::Status { code: -1, message: "no status".into() })
}

async fn sync_ok(
    client: &mut Messaging,
    client_id: &str,
    action: v2::LiteSubscriptionAction,
    topic: &str,
    group: &str,
    names: &[String],
) {
    let status = sync(client, client_id, action, topic, group, names).await;
    assert_eq!(status.code, OK, "SyncLiteSubscription {action:?}: {status:?}");
}

async fn lite_receive(client: &mut Messaging, client_id: &str, topic: &str, group: &str, wait: Duration) -> Received {
    let request = receive_request(topic, group, 0, 32, INVISIBLE, wait);
    receive_with(client, with_client(client_id, request))
        .await
        .unwrap_or_else(|e| panic!("ReceiveMessage transport error: {e}"))
}

/// Receives and acks until `want` messages came or `within` passed; in arrival order.
async fn drain(
    client: &mut Messaging,
    client_id: &str,
    topic: &str,
    group: &str,
    want: usize,
    within: Duration,
) -> Vec<v2::Message> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let received = lite_receive(client, client_id, topic, group, SECS(1)).await;
        ack_all(client, topic, group, &received.messages).await;
        got.extend(received.messages);
    }
    got
}

async fn send_lite(client: &mut Messaging, topic: &str, messages: Vec<(String, String)>) {
    for chunk in messages.chunks(64) {
        let batch = chunk.iter().map(|(lite, body)| lite_message(topic, lite, body.clone())).collect();
        send_ok(client, batch).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribed_to_ten_thousand_lite_topics_receives_only_its_own() {
    let local = Local::start_with_config(EVICTING, &[]).await;
    let (topic, group) = ("chat", "agents");
    lite_topic(local.grpc, topic, 4, 0).await;
    let mut client = messaging(local.grpc).await;
    let mine: Vec<String> = (0..10_000).map(|i| format!("session-a-{i:05}")).collect();
    let theirs: Vec<String> = (0..10).map(|i| format!("session-b-{i}")).collect();
    sync_ok(&mut client, "client-a", v2::LiteSubscriptionAction::CompleteAdd, topic, group, &mine).await;
    for name in &theirs {
        sync_ok(
            &mut client,
            "client-b",
            v2::LiteSubscriptionAction::PartialAdd,
            topic,
            group,
            std::slice::from_ref(name),
        )
        .await;
    }
    let written_a: Vec<String> = mine.iter().step_by(50).cloned().collect(); // 200 of A's
    let nobody: Vec<String> = (0..50).map(|i| format!("session-x-{i}")).collect();
    let mut sends = Vec::new();
    for name in written_a.iter().chain(&theirs).chain(&nobody) {
        sends.push((name.clone(), format!("to {name}")));
    }
    send_lite(&mut client, topic, sends).await;
    let got_a = drain(&mut client, "client-a", topic, group, written_a.len(), SECS(60)).await;
    let got_b = drain(&mut client, "client-b", topic, group, theirs.len(), SECS(60)).await;
    let lites_a: BTreeSet<String> = got_a.iter().map(lite_of).collect();
    let lites_b: BTreeSet<String> = got_b.iter().map(lite_of).collect();
    assert_eq!(got_a.len(), written_a.len(), "each of A's written lite topics once");
    assert_eq!(lites_a, written_a.iter().cloned().collect(), "A gets exactly its own lite topics");
    assert_eq!(lites_b, theirs.iter().cloned().collect(), "B gets exactly its own lite topics");
    for m in got_a.iter().chain(&got_b) {
        assert_eq!(body_text(m), format!("to {}", lite_of(m)));
    }
    let extra = lite_receive(&mut client, "client-a", topic, group, SECS(1)).await;
    assert!(extra.messages.is_empty(), "nothing of the unsubscribed lite topics: {:?}", extra.messages.len());
    assert_queues_were_evicted(local.grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_lite_topic_is_delivered_in_send_order_while_others_are_written() {
    let local = Local::start().await;
    let (topic, group) = ("stream", "readers");
    lite_topic(local.grpc, topic, 4, 0).await;
    let mut consumer = messaging(local.grpc).await;
    let sessions: Vec<String> = (0..6).map(|i| format!("answer-{i}")).collect();
    sync_ok(&mut consumer, "reader", v2::LiteSubscriptionAction::CompleteAdd, topic, group, &sessions).await;
    let per_session = 60usize;
    let mut writers = Vec::new();
    for (w, session) in sessions.iter().enumerate() {
        let (addr, session, topic) = (local.grpc, session.clone(), topic.to_string());
        writers.push(tokio::spawn(async move {
            let mut producer = messaging(addr).await;
            for i in 0..per_session {
                // Small batches from six writers at once interleave in the log.
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                send_ok(&mut producer, vec![lite_message(&topic, &session, format!("{w}:{i:03}"))]).await;
            }
        }));
    }
    let total = sessions.len() * per_session;
    let got = drain(&mut consumer, "reader", topic, group, total, SECS(120)).await;
    for writer in writers {
        writer.await.expect("writer");
    }
    let mut by_session: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &got {
        by_session.entry(lite_of(m)).or_default().push(body_text(m));
    }
    assert_eq!(got.len(), total, "every message once");
    for (w, session) in sessions.iter().enumerate() {
        let want: Vec<String> = (0..per_session).map(|i| format!("{w}:{i:03}")).collect();
        assert_eq!(by_session.get(session), Some(&want), "{session} in send order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_at_the_first_unacked_message_with_a_new_client() {
    let local = Local::start_with_config(EVICTING, &[]).await;
    let (topic, group) = ("sessions", "ui");
    lite_topic(local.grpc, topic, 2, 0).await;
    let mut client = messaging(local.grpc).await;
    let session = vec!["session-42".to_string()];
    // Sent before anyone subscribed: a lite topic the group never consumed starts at its first.
    send_lite(&mut client, topic, vec![(session[0].clone(), "m0".into())]).await;
    sync_ok(&mut client, "tab-1", v2::LiteSubscriptionAction::PartialAdd, topic, group, &session).await;
    send_lite(&mut client, topic, (1..3).map(|i| (session[0].clone(), format!("m{i}"))).collect()).await;
    let got = drain(&mut client, "tab-1", topic, group, 3, SECS(30)).await;
    assert_eq!(got.iter().map(body_text).collect::<Vec<_>>(), ["m0", "m1", "m2"]);
    send_lite(&mut client, topic, vec![(session[0].clone(), "m3".into())]).await;
    let unacked = lite_receive(&mut client, "tab-1", topic, group, SECS(10)).await;
    assert_eq!(unacked.messages.iter().map(body_text).collect::<Vec<_>>(), ["m3"], "received, never acked");
    // The tab goes away; its lease is given up with it only when it expires, so the next
    // client sees m3 again after the invisible time (30 s) at the latest, not before m4.
    let request = v2::NotifyClientTerminationRequest { group: Some(resource(group)) };
    let reply = bounded("NotifyClientTermination", client.notify_client_termination(with_client("tab-1", request)))
        .await
        .expect("NotifyClientTermination")
        .into_inner();
    assert_eq!(code(reply.status.as_ref()), OK);
    send_lite(&mut client, topic, (4..6).map(|i| (session[0].clone(), format!("m{i}"))).collect()).await;
    sync_ok(&mut client, "tab-2", v2::LiteSubscriptionAction::PartialAdd, topic, group, &session).await;
    let got = drain(&mut client, "tab-2", topic, group, 3, SECS(90)).await;
    assert_eq!(got.iter().map(body_text).collect::<Vec<_>>(), ["m3", "m4", "m5"], "from the first unacked, in order");
    assert_queues_were_evicted(local.grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_names_and_topic_types_are_checked() {
    let local = Local::start_with_config("[proxy]\nlite_subscription_quota = 3\n", &[]).await;
    let (topic, group) = ("quota", "g");
    lite_topic(local.grpc, topic, 2, 0).await;
    create_topic(local.grpc, "plain", 2).await;
    let mut client = messaging(local.grpc).await;
    let names: Vec<String> = (0..3).map(|i| format!("s{i}")).collect();
    sync_ok(&mut client, "c", v2::LiteSubscriptionAction::CompleteAdd, topic, group, &names).await;
    let over = sync(&mut client, "c", v2::LiteSubscriptionAction::PartialAdd, topic, group, &["s3".into()]).await;
    assert_eq!(over.code, v2::Code::LiteSubscriptionQuotaExceeded as i32, "{over:?}");
    let four: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let over = sync(&mut client, "c", v2::LiteSubscriptionAction::CompleteAdd, topic, group, &four).await;
    assert_eq!(over.code, v2::Code::LiteSubscriptionQuotaExceeded as i32, "{over:?}");
    let long = "x".repeat(97);
    let bad =
        sync(&mut client, "c2", v2::LiteSubscriptionAction::PartialAdd, topic, group, std::slice::from_ref(&long))
            .await;
    assert_eq!(bad.code, v2::Code::IllegalLiteTopic as i32, "{bad:?}");
    let bad =
        sync(&mut client, "c2", v2::LiteSubscriptionAction::PartialAdd, topic, group, &["has space".into()]).await;
    assert_eq!(bad.code, v2::Code::IllegalLiteTopic as i32, "{bad:?}");
    let not_lite = sync(&mut client, "c2", v2::LiteSubscriptionAction::PartialAdd, "plain", group, &["s".into()]).await;
    assert_eq!(not_lite.code, v2::Code::BadRequest as i32, "{not_lite:?}");
    let reply = send(&mut client, vec![lite_message(topic, &long, "x".into())]).await;
    assert_eq!(code(reply.status.as_ref()), v2::Code::IllegalLiteTopic as i32, "{:?}", reply.status);
    let reply = send(&mut client, vec![message(topic, b"no lite topic".to_vec())]).await;
    assert_eq!(code(reply.status.as_ref()), v2::Code::IllegalLiteTopic as i32, "{:?}", reply.status);
    let reply = send(&mut client, vec![lite_message("plain", "s0", "x".into())]).await;
    assert_ne!(code(reply.status.as_ref()), OK, "a normal topic takes no lite topic");
    // Without a client id a lite receive cannot know whose subscriptions to serve.
    let anonymous = receive(&mut client, topic, group, 1, INVISIBLE, SECS(1)).await;
    assert_eq!(anonymous.code(), v2::Code::BadRequest as i32, "{:?}", anonymous.statuses);
}

/// Polls until the brokers report `want` reclaimed lite topics, within `within`.
async fn wait_reclaimed(addr: std::net::SocketAddr, want: u64, within: Duration) -> HashMap<String, u64> {
    let deadline = Instant::now() + within;
    loop {
        let counters = broker_counters(addr).await;
        if counters.get("lite_topics_reclaimed").copied().unwrap_or(0) >= want || Instant::now() > deadline {
            return counters;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lite_topics_are_reclaimed_after_the_ttl_only_once_nobody_subscribes() {
    let local = Local::start_with_config(QUICK, &[]).await;
    let (topic, group) = ("replies", "requester");
    lite_topic(local.grpc, topic, 2, 1).await;
    let mut client = messaging(local.grpc).await;
    let (kept, idle) = ("a2a/task-kept".to_string(), "a2a/task-idle".to_string());
    sync_ok(&mut client, "agent", v2::LiteSubscriptionAction::PartialAdd, topic, group, std::slice::from_ref(&kept))
        .await;
    send_lite(&mut client, topic, vec![(kept.clone(), "reply 1".into()), (idle.clone(), "nobody reads this".into())])
        .await;
    // The subscriber keeps polling (leaving its message unacked), as a live client does.
    let poller = {
        let (addr, topic, group) = (local.grpc, topic.to_string(), group.to_string());
        tokio::spawn(async move {
            let mut client = messaging(addr).await;
            loop {
                lite_receive(&mut client, "agent", &topic, &group, SECS(2)).await;
            }
        })
    };
    let counters = wait_reclaimed(local.grpc, 1, SECS(150)).await;
    assert_eq!(counters.get("lite_topics_reclaimed"), Some(&1), "only the idle one after its TTL: {counters:?}");
    // The idle lite topic is gone: a group that never read it finds nothing there now.
    sync_ok(
        &mut client,
        "late",
        v2::LiteSubscriptionAction::PartialAdd,
        topic,
        "late-group",
        std::slice::from_ref(&idle),
    )
    .await;
    let late = lite_receive(&mut client, "late", topic, "late-group", SECS(2)).await;
    assert!(late.messages.is_empty(), "a reclaimed lite topic has no messages left");
    // The subscribed one is still there for another group.
    sync_ok(
        &mut client,
        "other",
        v2::LiteSubscriptionAction::PartialAdd,
        topic,
        "other-group",
        std::slice::from_ref(&kept),
    )
    .await;
    let other = drain(&mut client, "other", topic, "other-group", 1, SECS(30)).await;
    assert_eq!(other.iter().map(body_text).collect::<Vec<_>>(), ["reply 1"], "kept while subscribed");
    // Once every subscriber is gone (and the TTL has long passed) it goes too.
    poller.abort();
    for (who, g) in [("agent", group), ("other", "other-group"), ("late", "late-group")] {
        sync_ok(&mut client, who, v2::LiteSubscriptionAction::CompleteRemove, topic, g, &[]).await;
    }
    let counters = wait_reclaimed(local.grpc, 2, SECS(60)).await;
    assert_eq!(counters.get("lite_topics_reclaimed"), Some(&2), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_at_its_queue_limit_refuses_new_lite_topics_and_keeps_serving_existing_ones() {
    const LIMIT: usize = 40;
    let local = Local::start_with_config(&format!("[broker]\nqueues_per_shard_max = {LIMIT}\n"), &[]).await;
    let topic = "sessions";
    lite_topic(local.grpc, topic, 2, 0).await;
    let mut client = messaging(local.grpc).await;
    let (mut accepted, mut refused) = (Vec::new(), None);
    // Two shards of LIMIT queues each, some of them taken by the topic's own queues.
    for i in 0..2 * LIMIT + 10 {
        let lite = format!("chat-{i}");
        let reply = send(&mut client, vec![lite_message(topic, &lite, format!("hello {i}"))]).await;
        match code(reply.status.as_ref()) {
            OK => accepted.push(lite),
            c if c == v2::Code::LiteTopicQuotaExceeded as i32 => refused = reply.status,
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    let refused = refused.expect("a shard at its queue limit refuses a new lite topic");
    assert!(refused.message.contains("queues_per_shard_max"), "says which limit: {refused:?}");
    assert!(accepted.len() >= LIMIT, "{} accepted", accepted.len());
    // Lite topics that exist still take messages, and what they hold is delivered.
    let first = accepted[0].clone();
    send_lite(&mut client, topic, vec![(first.clone(), "again".into())]).await;
    let client_id = "queue-limit-client";
    let action = v2::LiteSubscriptionAction::PartialAdd;
    sync_ok(&mut client, client_id, action, topic, "readers", std::slice::from_ref(&first)).await;
    let got = drain(&mut client, client_id, topic, "readers", 2, SECS(30)).await;
    let hello = format!("hello {}", first.trim_start_matches("chat-"));
    assert_eq!(got.iter().map(body_text).collect::<Vec<_>>(), [hello, "again".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_lite_topics_are_one_topic_in_the_metrics() {
    const LITE_TOPICS: usize = 100_000;
    let local = Local::start_with_config(EVICTING, &[]).await;
    lite_topic(local.grpc, "sessions", 4, 0).await;
    let mut client = messaging(local.grpc).await;
    let messages = (0..LITE_TOPICS).map(|i| (format!("s-{i:06}"), format!("turn {i}"))).collect();
    send_lite(&mut client, "sessions", messages).await;
    let (status, text) = http_get(local.http, "/metrics").await;
    assert_eq!(status, 200);
    let series: Vec<&str> = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let stored: Vec<&&str> = series
        .iter()
        .filter(|l| l.starts_with("rocketmq_messages_in_total{") && l.contains("topic=\"sessions\""))
        .collect();
    assert_eq!(stored.len(), 1, "the lite topics count under their parent: {stored:?}");
    assert!(stored[0].ends_with(&format!(" {LITE_TOPICS}")), "every message counted: {}", stored[0]);
    assert!(series.len() < 1_000, "{} series for {LITE_TOPICS} lite topics", series.len());
    assert!(!series.iter().any(|l| l.contains("s-0")), "no series names a lite topic");
}
