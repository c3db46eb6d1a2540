//! Split deployments as separate processes over TCP: brokers and proxies started from
//! generated TOML files, driven with the generated RocketMQ v2 client.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const TOTAL: usize = 500;

fn numbered(topic: &str, i: usize) -> v2::Message {
    let mut m = message(topic, format!("message {i}").into_bytes());
    m.user_properties.insert("index".into(), i.to_string());
    m
}

/// Everything received by the consumers: message id → times received.
type Tally = Arc<Mutex<HashMap<String, usize>>>;

/// Receives and acks through `client` until `tally` holds `expected` ids or the deadline.
async fn consume(client: &mut Messaging, topic: &str, group: &str, queue_id: i32, tally: Tally, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if tally.lock().unwrap().len() >= expected {
            return;
        }
        assert!(Instant::now() < deadline, "consumed {} of {expected} within 120 s", tally.lock().unwrap().len());
        let request = receive_request(topic, group, queue_id, 32, Duration::from_secs(60), Duration::from_secs(1));
        let got = receive_with(client, request).await.unwrap_or_else(|e| panic!("ReceiveMessage transport: {e}"));
        match got.code() {
            OK => assert!(!got.messages.is_empty(), "OK without messages: {got:?}"),
            MESSAGE_NOT_FOUND => continue,
            other => panic!("ReceiveMessage answered {other}: {:?}", got.statuses),
        }
        {
            let mut seen = tally.lock().unwrap();
            for m in &got.messages {
                *seen.entry(message_id(m)).or_default() += 1;
            }
        }
        ack_all(client, topic, group, &got.messages).await;
    }
}

fn assert_exactly_once(tally: &Tally, sent: &HashSet<String>) {
    let seen = tally.lock().unwrap();
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "received more than once: {duplicates:?}");
    let unknown: Vec<_> = seen.keys().filter(|id| !sent.contains(*id)).collect();
    assert!(unknown.is_empty(), "received but never sent: {unknown:?}");
    let missing: Vec<_> = sent.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} sent but never received: {missing:?}", missing.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_brokers_behind_one_proxy() {
    let b1 = Broker::start("broker-one", 2).await;
    let b2 = Broker::start("broker-two", 2).await;
    let proxy = Proxy::start("proxy", &[b1.address(), b2.address()]).await;
    create_topic_cli(&proxy.endpoint(), "spread", 8).await;

    let mut producer = messaging(proxy.grpc).await;
    let mut sent = HashSet::new();
    for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(50) {
        let batch: Vec<_> = chunk.iter().map(|i| numbered("spread", *i)).collect();
        sent.extend(batch.iter().map(message_id));
        send_ok(&mut producer, batch).await;
    }
    assert_eq!(sent.len(), TOTAL);

    let tally: Tally = Arc::default();
    let mut consumer = messaging(proxy.grpc).await;
    consume(&mut consumer, "spread", "readers", 0, tally.clone(), TOTAL).await;
    assert_exactly_once(&tally, &sent);
    let rest = receive(&mut consumer, "spread", "readers", 32, Duration::from_secs(60), Duration::from_secs(1)).await;
    assert_eq!(rest.code(), MESSAGE_NOT_FOUND, "everything was acked: {rest:?}");

    let stats = stats_cli(&proxy.endpoint()).await;
    let brokers = stats["brokers"].as_array().unwrap_or_else(|| panic!("no brokers in stats: {stats}"));
    assert_eq!(brokers.len(), 4, "two brokers of two shards each: {stats}");
    let appended = |broker: &Broker| -> u64 {
        brokers
            .iter()
            .filter(|b| b["endpoint"].as_str().is_some_and(|e| broker.owns_endpoint(e)))
            .map(|b| b["counters"]["messages_appended"].as_u64().unwrap_or(0))
            .sum()
    };
    let (one, two) = (appended(&b1), appended(&b2));
    assert!(one > 0 && two > 0, "both brokers must store messages: {one} and {two}\n{stats}");
    assert_eq!(one + two, TOTAL as u64, "{stats}");
    assert_eq!(stats["proxy"]["messages_acked"].as_u64(), Some(TOTAL as u64), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_in_front_of_one_broker() {
    let broker = Broker::start("broker", 2).await;
    let a = Proxy::start("proxy-a", &[broker.address()]).await;
    let b = Proxy::start("proxy-b", &[broker.address()]).await;
    create_topic(a.grpc, "shared", 8).await;

    let mut to_a = messaging(a.grpc).await;
    let mut to_b = messaging(b.grpc).await;
    let mut sent = HashSet::new();
    for i in 0..TOTAL {
        let m = numbered("shared", i);
        sent.insert(message_id(&m));
        let via = if i % 2 == 0 { &mut to_a } else { &mut to_b };
        send_ok(via, vec![m]).await;
    }

    // A receipt handle from proxy A is good at proxy B.
    let tally: Tally = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        assert!(Instant::now() < deadline, "nothing to receive through proxy A");
        let got = receive(&mut to_a, "shared", "team", 1, Duration::from_secs(60), Duration::from_secs(2)).await;
        if got.code() == OK {
            break got.messages.into_iter().next().expect("one message");
        }
        assert_eq!(got.code(), MESSAGE_NOT_FOUND, "{got:?}");
    };
    let status = ack(&mut to_b, "shared", "team", &message_id(&first), &receipt_handle(&first)).await;
    assert_eq!(status.code, OK, "acking through proxy B a handle from proxy A: {status:?}");
    tally.lock().unwrap().insert(message_id(&first), 1);

    // Two consumers of one group, one per proxy, at the same time.
    let consumers = [(a.grpc, 0), (b.grpc, 4)].map(|(addr, queue_id)| {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut client = messaging(addr).await;
            consume(&mut client, "shared", "team", queue_id, tally, TOTAL).await;
        })
    });
    for consumer in consumers {
        tokio::time::timeout(Duration::from_secs(150), consumer)
            .await
            .expect("a consumer hung")
            .expect("consumer task panicked");
    }
    assert_exactly_once(&tally, &sent);
    for client in [&mut to_a, &mut to_b] {
        let rest = receive(client, "shared", "team", 32, Duration::from_secs(60), Duration::from_secs(1)).await;
        assert_eq!(rest.code(), MESSAGE_NOT_FOUND, "everything was acked: {rest:?}");
    }
}

/// A PushConsumer's delivery is kept invisible by the proxy it came through (auto-renew), and
/// the handle the client holds still acks through another proxy: renewals keep the receipt.
#[tokio::test(flavor = "multi_thread")]
async fn auto_renewed_delivery_acks_through_another_proxy() {
    let broker = Broker::start("broker", 2).await;
    let a = Proxy::start("proxy-a", &[broker.address()]).await;
    let b = Proxy::start("proxy-b", &[broker.address()]).await;
    create_topic(a.grpc, "renewed", 1).await;
    let mut to_a = messaging(a.grpc).await;
    let mut to_b = messaging(b.grpc).await;
    send_ok(&mut to_a, vec![numbered("renewed", 0)]).await;

    let mut request = receive_request("renewed", "push", 0, 1, Duration::from_secs(2), Duration::from_secs(5));
    request.auto_renew = true;
    let got = receive_with(&mut to_a, request).await.expect("receive");
    assert_eq!(got.code(), OK, "{got:?}");
    let m = got.messages.into_iter().next().expect("one message");
    // Past the 2 s invisible time: without renewal it would be visible again by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = receive(&mut to_b, "renewed", "push", 1, Duration::from_secs(30), Duration::from_millis(500)).await;
    assert_eq!(again.code(), MESSAGE_NOT_FOUND, "the renewed delivery stayed invisible: {again:?}");
    let status = ack(&mut to_b, "renewed", "push", &message_id(&m), &receipt_handle(&m)).await;
    assert_eq!(status.code, OK, "the original handle acks through proxy B after renewals by proxy A: {status:?}");
}
