//! The RocketMQ v2 gRPC API of a real `sluice local` child process, driven with the generated
//! tonic client: the round trip, redelivery, receipt handles, limits, hostile and vanishing
//! clients, unimplemented RPCs and the graceful drain.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use md5::{Digest as _, Md5};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const INVALID_RECEIPT_HANDLE: i32 = v2::Code::InvalidReceiptHandle as i32;
const TOPIC_NOT_FOUND: i32 = v2::Code::TopicNotFound as i32;
const MESSAGE_BODY_TOO_LARGE: i32 = v2::Code::MessageBodyTooLarge as i32;
const NOT_IMPLEMENTED: i32 = v2::Code::NotImplemented as i32;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn status_codes_are_the_rocketmq_ones() {
    assert_eq!(INVALID_RECEIPT_HANDLE, 40013);
    assert_eq!(TOPIC_NOT_FOUND, 40402);
    assert_eq!(MESSAGE_BODY_TOO_LARGE, 41301);
    assert_eq!(NOT_IMPLEMENTED, 50100);
    assert_eq!(MESSAGE_NOT_FOUND, 40401);
}

fn md5_upper(body: &[u8]) -> String {
    hex::encode_upper(Md5::digest(body))
}

fn system(m: &v2::Message) -> &v2::SystemProperties {
    m.system_properties.as_ref().expect("system_properties")
}

/// Receives exactly one message (bounded), skipping empty polls.
async fn receive_one(client: &mut Messaging, topic: &str, group: &str, invisible: Duration) -> v2::Message {
    let deadline = Instant::now() + SECS(30);
    loop {
        let got = receive(client, topic, group, 1, invisible, SECS(3)).await;
        match got.code() {
            OK => {
                assert_eq!(got.messages.len(), 1, "asked for one message: {got:?}");
                return got.messages.into_iter().next().expect("one message");
            }
            MESSAGE_NOT_FOUND => assert!(got.messages.is_empty()),
            other => panic!("ReceiveMessage answered {other}: {:?}", got.statuses),
        }
        assert!(Instant::now() < deadline, "no message on {topic} within 30 s");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn send_receive_ack_round_trip() {
    let local = Local::start().await;
    create_topic(local.grpc, "orders", 8).await;
    let mut client = messaging(local.grpc).await;

    const COUNT: usize = 40;
    let mut sent: HashMap<String, v2::Message> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..COUNT {
        let mut m = message("orders", format!("order {i}: {}", "x".repeat(i * 37)).into_bytes());
        let s = m.system_properties.as_mut().expect("system properties");
        s.tag = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
        s.keys = vec![format!("key-{i}"), format!("pair-{}", i / 2)];
        m.user_properties.insert("index".into(), i.to_string());
        m.user_properties.insert("origin".into(), "round-trip".into());
        sent.insert(message_id(&m), m.clone());
        batch.push(m);
    }
    let reply = send(&mut client, batch.clone()).await;
    assert_eq!(code(reply.status.as_ref()), OK, "{:?}", reply.status);
    assert_eq!(reply.entries.len(), COUNT);
    for (entry, m) in reply.entries.iter().zip(&batch) {
        assert_eq!(code(entry.status.as_ref()), OK, "{:?}", entry.status);
        assert_eq!(entry.message_id, message_id(m), "entries answer in request order");
    }

    let group = "round-trip";
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + SECS(60);
    while seen.len() < COUNT {
        assert!(Instant::now() < deadline, "received {} of {COUNT} within 60 s", seen.len());
        let got = receive(&mut client, "orders", group, 16, SECS(30), SECS(2)).await;
        match got.code() {
            OK => assert!(!got.messages.is_empty(), "OK without messages: {got:?}"),
            MESSAGE_NOT_FOUND => {
                assert!(got.messages.is_empty());
                continue;
            }
            other => panic!("ReceiveMessage answered {other}: {:?}", got.statuses),
        }
        for m in &got.messages {
            let id = message_id(m);
            let original = sent.get(&id).unwrap_or_else(|| panic!("received a message never sent: {id}"));
            let (s, o) = (system(m), system(original));
            assert_eq!(m.topic.as_ref().map(|t| t.name.as_str()), Some("orders"));
            assert_eq!(m.body, original.body, "body of {id}");
            assert_eq!(s.tag, o.tag, "tag of {id}");
            assert_eq!(s.keys, o.keys, "keys of {id}");
            assert_eq!(m.user_properties, original.user_properties, "properties of {id}");
            let digest = s.body_digest.as_ref().expect("body digest");
            assert_eq!(digest.r#type, v2::DigestType::Md5 as i32);
            assert_eq!(digest.checksum, md5_upper(&m.body), "MD5 of {id} (uppercase hex)");
            assert!(!digest.checksum.bytes().any(|b| b.is_ascii_lowercase()), "digest must be uppercase");
            assert_eq!(s.delivery_attempt, Some(1), "first delivery of {id}");
            assert!(!receipt_handle(m).is_empty(), "receipt handle of {id}");
            let n = seen.entry(id.clone()).or_default();
            *n += 1;
            assert_eq!(*n, 1, "{id} was received twice");
        }
        ack_all(&mut client, "orders", group, &got.messages).await;
    }
    assert_eq!(seen.len(), COUNT);
    let rest = receive(&mut client, "orders", group, 16, SECS(30), SECS(1)).await;
    assert_eq!(rest.code(), MESSAGE_NOT_FOUND, "every message was acked: {rest:?}");
    assert!(rest.messages.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unacked_message_comes_back_after_its_invisible_duration() {
    let local = Local::start().await;
    create_topic(local.grpc, "retry", 4).await;
    let mut client = messaging(local.grpc).await;
    let m = message("retry", b"try me twice".to_vec());
    let id = message_id(&m);
    send_ok(&mut client, vec![m]).await;

    let first = receive_one(&mut client, "retry", "g", SECS(1)).await;
    assert_eq!(message_id(&first), id);
    assert_eq!(system(&first).delivery_attempt, Some(1));
    let old = receipt_handle(&first);

    // Not acked: it must come back once its second of invisibility is over.
    let deadline = Instant::now() + SECS(20);
    let second = loop {
        assert!(Instant::now() < deadline, "the un-acked message did not come back within 20 s");
        let got = receive(&mut client, "retry", "g", 1, SECS(30), SECS(3)).await;
        match got.code() {
            OK => break got.messages.into_iter().next().expect("one message"),
            MESSAGE_NOT_FOUND => continue,
            other => panic!("ReceiveMessage answered {other}: {:?}", got.statuses),
        }
    };
    assert_eq!(message_id(&second), id);
    assert_eq!(second.body, b"try me twice");
    assert_eq!(system(&second).delivery_attempt, Some(2));
    let new = receipt_handle(&second);
    assert_ne!(old, new, "a redelivery gets a new receipt handle");

    let refused = ack(&mut client, "retry", "g", &id, &old).await;
    assert_eq!(refused.code, INVALID_RECEIPT_HANDLE, "ack with the old handle: {refused:?}");
    let accepted = ack(&mut client, "retry", "g", &id, &new).await;
    assert_eq!(accepted.code, OK, "ack with the new handle: {accepted:?}");
    let rest = receive(&mut client, "retry", "g", 1, SECS(30), SECS(2)).await;
    assert_eq!(rest.code(), MESSAGE_NOT_FOUND, "acked: {rest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn change_invisible_duration_extends_and_rotates_the_handle() {
    let local = Local::start().await;
    create_topic(local.grpc, "extend", 2).await;
    let mut client = messaging(local.grpc).await;
    let m = message("extend", b"hold me".to_vec());
    let id = message_id(&m);
    send_ok(&mut client, vec![m]).await;

    let got = receive_one(&mut client, "extend", "g", SECS(2)).await;
    let old = receipt_handle(&got);
    let changed = change_invisible(&mut client, "extend", "g", &id, &old, SECS(30)).await;
    assert_eq!(code(changed.status.as_ref()), OK, "{:?}", changed.status);
    let new = changed.receipt_handle.clone();
    assert!(!new.is_empty());
    assert_ne!(new, old, "a changed deadline comes with a new handle");

    // Past the original two seconds: still invisible, because the deadline moved.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let early = receive(&mut client, "extend", "g", 1, SECS(30), SECS(1)).await;
    assert_eq!(early.code(), MESSAGE_NOT_FOUND, "the extended message was delivered again: {early:?}");

    let refused = ack(&mut client, "extend", "g", &id, &old).await;
    assert_eq!(refused.code, INVALID_RECEIPT_HANDLE, "ack with the handle before the change: {refused:?}");
    let refused = change_invisible(&mut client, "extend", "g", &id, &old, SECS(30)).await;
    assert_eq!(code(refused.status.as_ref()), INVALID_RECEIPT_HANDLE, "change with the old handle: {refused:?}");
    let accepted = ack(&mut client, "extend", "g", &id, &new).await;
    assert_eq!(accepted.code, OK, "ack with the new handle: {accepted:?}");
}

/// One AckMessage for a batch from several queues: the proxy acks per queue, and still answers
/// each entry on its own, in request order (a forged handle or a second ack fails alone).
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_ack_answers_every_entry_in_order() {
    let local = Local::start().await;
    create_topic(local.grpc, "batched", 4).await;
    let mut client = messaging(local.grpc).await;
    let batch: Vec<v2::Message> = (0..12).map(|i| message("batched", format!("m{i}").into_bytes())).collect();
    send_ok(&mut client, batch).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + SECS(30);
    while got.len() < 12 {
        assert!(Instant::now() < deadline, "received {} of 12 within 30 s", got.len());
        got.extend(receive(&mut client, "batched", "acks", 16, SECS(30), SECS(1)).await.messages);
    }
    let queues: std::collections::HashSet<i32> = got.iter().map(|m| system(m).queue_id).collect();
    assert!(queues.len() > 1, "the batch spans several queues: {queues:?}");

    let entry = |m: &v2::Message| v2::AckMessageEntry {
        message_id: message_id(m),
        receipt_handle: receipt_handle(m),
        lite_topic: None,
    };
    let mut entries: Vec<v2::AckMessageEntry> = got.iter().map(entry).collect();
    entries.insert(3, v2::AckMessageEntry { receipt_handle: random_text(40), ..entry(&got[0]) });
    entries.push(entry(&got[5]));
    let reply = client
        .ack_message(v2::AckMessageRequest {
            group: Some(resource("acks")),
            topic: Some(resource("batched")),
            entries: entries.clone(),
        })
        .await
        .expect("AckMessage")
        .into_inner();
    assert_eq!(code(reply.status.as_ref()), v2::Code::MultipleResults as i32, "{:?}", reply.status);
    assert_eq!(reply.entries.len(), entries.len());
    for (i, (answer, asked)) in reply.entries.iter().zip(&entries).enumerate() {
        assert_eq!(answer.receipt_handle, asked.receipt_handle, "entry {i} answers in request order");
        let expected = if i == 3 || i == entries.len() - 1 { INVALID_RECEIPT_HANDLE } else { OK };
        assert_eq!(code(answer.status.as_ref()), expected, "entry {i}: {:?}", answer.status);
    }
    let rest = receive(&mut client, "batched", "acks", 16, SECS(30), SECS(1)).await;
    assert_eq!(rest.code(), MESSAGE_NOT_FOUND, "all twelve were acked: {rest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_topic_is_topic_not_found() {
    let local = Local::start().await;
    let mut client = messaging(local.grpc).await;

    let route = query_route(&mut client, "no-such-topic").await;
    assert_eq!(code(route.status.as_ref()), TOPIC_NOT_FOUND, "QueryRoute: {:?}", route.status);
    assert!(route.message_queues.is_empty());

    let sent = send(&mut client, vec![message("no-such-topic", b"lost".to_vec())]).await;
    assert_eq!(code(sent.status.as_ref()), TOPIC_NOT_FOUND, "SendMessage: {:?}", sent.status);
    assert_eq!(sent.entries.len(), 1);
    assert_eq!(code(sent.entries[0].status.as_ref()), TOPIC_NOT_FOUND, "{:?}", sent.entries[0].status);

    let got = receive(&mut client, "no-such-topic", "g", 1, SECS(30), SECS(1)).await;
    assert_eq!(got.code(), TOPIC_NOT_FOUND, "ReceiveMessage: {got:?}");
    assert!(got.messages.is_empty());
}

fn random_text(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..len).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_receipt_handles_are_refused() {
    let local = Local::start().await;
    create_topic(local.grpc, "forgery", 2).await;
    let mut client = messaging(local.grpc).await;
    let m = message("forgery", b"genuine".to_vec());
    let id = message_id(&m);
    send_ok(&mut client, vec![m]).await;
    let got = receive_one(&mut client, "forgery", "g", SECS(30)).await;
    let real = receipt_handle(&got);

    let random = random_text(48);
    let dotted = format!("{}.{}.{}", random_text(12), rand::random::<u32>(), random_text(60));
    // A real handle with one character of its last part (the broker's receipt) changed.
    let (head, receipt) = real.rsplit_once('.').expect("handle has parts");
    let last = receipt.chars().last().expect("non-empty receipt");
    let swapped = if last == 'A' { 'B' } else { 'A' };
    let tampered = format!("{head}.{}{swapped}", &receipt[..receipt.len() - last.len_utf8()]);
    assert_ne!(tampered, real);
    let mut middle = receipt.chars().collect::<Vec<_>>();
    let i = middle.len() / 2;
    middle[i] = if middle[i] == 'x' { 'y' } else { 'x' };
    let tampered_middle = format!("{head}.{}", middle.into_iter().collect::<String>());

    for forged in [&random, &dotted, &tampered, &tampered_middle] {
        let status = ack(&mut client, "forgery", "g", &id, forged).await;
        assert_eq!(status.code, INVALID_RECEIPT_HANDLE, "ack with forged handle {forged:?}: {status:?}");
        let changed = change_invisible(&mut client, "forgery", "g", &id, forged, SECS(30)).await;
        assert_eq!(
            code(changed.status.as_ref()),
            INVALID_RECEIPT_HANDLE,
            "change with forged handle {forged:?}: {:?}",
            changed.status
        );
    }
    // The genuine handle is unaffected.
    let status = ack(&mut client, "forgery", "g", &id, &real).await;
    assert_eq!(status.code, OK, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn body_size_limit_is_four_mib() {
    let local = Local::start().await;
    create_topic(local.grpc, "big", 1).await;
    let mut client = messaging(local.grpc).await;
    const MAX: usize = 4 << 20;

    let too_big = send(&mut client, vec![message("big", vec![b'x'; MAX + 1])]).await;
    assert_eq!(code(too_big.status.as_ref()), MESSAGE_BODY_TOO_LARGE, "{:?}", too_big.status);
    assert_eq!(code(too_big.entries.first().and_then(|e| e.status.as_ref())), MESSAGE_BODY_TOO_LARGE);

    let body: Vec<u8> = (0..MAX).map(|i| (i % 251) as u8).collect();
    let m = message("big", body.clone());
    let id = message_id(&m);
    send_ok(&mut client, vec![m]).await;
    let got = receive_one(&mut client, "big", "g", SECS(30)).await;
    assert_eq!(message_id(&got), id, "only the accepted message is stored");
    assert_eq!(got.body.len(), MAX);
    assert!(got.body == body, "the 4 MiB body came back changed");
    assert_eq!(system(&got).body_digest.as_ref().map(|d| d.checksum.clone()), Some(md5_upper(&body)));
    let status = ack(&mut client, "big", "g", &id, &receipt_handle(&got)).await;
    assert_eq!(status.code, OK, "{status:?}");
}

/// Writes `payload` on a fresh connection and requires the server to close it (bounded).
async fn server_closes_after(addr: SocketAddr, what: &str, payload: &[u8]) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close before reading everything: a failed write is fine.
    let _ = tokio::time::timeout(SECS(10), stream.write_all(payload)).await;
    let closed = tokio::time::timeout(SECS(15), async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open after {what}");
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_grpc_port_is_dropped() {
    let mut local = Local::start().await;
    create_topic(local.grpc, "still-there", 1).await;
    let mut probe = messaging(local.grpc).await;

    let noise: Vec<u8> = (0..64 << 10).map(|_| rand::random::<u8>()).collect();
    server_closes_after(local.grpc, "64 KiB of random bytes", &noise).await;
    let http1 = format!("GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: tests\r\n\r\n", local.grpc);
    server_closes_after(local.grpc, "an HTTP/1.1 GET", http1.as_bytes()).await;
    let post = format!(
        "POST /apache.rocketmq.v2.MessagingService/QueryRoute HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0",
        local.grpc
    );
    server_closes_after(local.grpc, "an HTTP/1.1 gRPC POST", post.as_bytes()).await;
    let mut bad_frames = PREFACE.to_vec();
    bad_frames.extend_from_slice(&noise);
    server_closes_after(local.grpc, "the HTTP/2 preface then random frames", &bad_frames).await;

    assert!(local.process.is_alive(), "the server died\n{}", local.process.logs());
    let route = query_route(&mut probe, "still-there").await;
    assert_eq!(code(route.status.as_ref()), OK, "{:?}", route.status);
    let mut fresh = messaging(local.grpc).await;
    send_ok(&mut fresh, vec![message("still-there", b"after the noise".to_vec())]).await;
    assert!(local.process.is_alive());
}

/// A client that opens a 20 s long poll on its own connection and vanishes after 200 ms.
async fn vanishing_long_poll(addr: SocketAddr) {
    let mut client = messaging(addr).await;
    let request = receive_request("idle", "vanishers", 0, 1, SECS(30), SECS(20));
    let outcome = tokio::time::timeout(Duration::from_millis(200), receive_with(&mut client, request)).await;
    assert!(outcome.is_err(), "the long poll on an empty topic ended early: {outcome:?}");
    drop(client);
}

/// A raw connection that sends the HTTP/2 preface and partial frames, then vanishes.
async fn vanishing_raw_h2(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = PREFACE.to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    bytes.extend_from_slice(&[0, 0, 100, 0x1, 0x4, 0, 0, 0, 1]); // HEADERS, 100 bytes promised
    bytes.extend_from_slice(&[0x83, 0x86, 0x44, 0x10]); // ... of which 4 arrive
    let _ = stream.write_all(&bytes).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread")]
async fn vanished_clients_leak_no_connections() {
    let mut local = Local::start().await;
    create_topic(local.grpc, "idle", 8).await;
    let mut probe = messaging(local.grpc).await;
    // Touch every queue (so both shards) once, so the proxy's broker links are all open.
    let warm = receive(&mut probe, "idle", "warm", 1, SECS(30), Duration::from_millis(500)).await;
    assert_eq!(warm.code(), MESSAGE_NOT_FOUND, "{warm:?}");
    tokio::time::sleep(SECS(1)).await;
    let baseline = local.process.socket_count();
    let port = local.grpc.port();
    assert!(baseline > 0, "cannot read /proc/{}/fd", local.process.pid());

    // The count must see connections at all: hold ten open, then let them go.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(local.grpc).await.expect("connect");
        stream.write_all(PREFACE).await.expect("write preface");
        held.push(stream);
    }
    let deadline = Instant::now() + SECS(10);
    let mut peak = local.process.socket_count();
    while peak < baseline + 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = local.process.socket_count();
    }
    assert!(peak >= baseline + 10, "ten open connections did not show: {baseline} then {peak}");
    drop(held);

    for _round in 0..5 {
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(tokio::spawn(vanishing_long_poll(local.grpc)));
            clients.push(tokio::spawn(vanishing_raw_h2(local.grpc)));
        }
        for client in clients {
            tokio::time::timeout(SECS(30), client).await.expect("a vanishing client hung").expect("client task");
        }
    }

    assert!(local.process.is_alive(), "the server died\n{}", local.process.logs());
    let route = query_route(&mut probe, "idle").await;
    assert_eq!(code(route.status.as_ref()), OK, "{:?}", route.status);

    let deadline = Instant::now() + SECS(10);
    let mut now = local.process.socket_count();
    while now > baseline + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = local.process.socket_count();
    }
    assert!(
        now <= baseline + 2,
        "open sockets: {baseline} before 50 vanished clients, {now} 10 s after; \
         TCP states on the gRPC port: {:?}",
        local.process.tcp_states_on_port(port)
    );
    eprintln!("sockets: baseline {baseline}, with ten held {peak}, after 50 vanished clients {now}");
    // And it still serves new clients.
    let mut fresh = messaging(local.grpc).await;
    let route = query_route(&mut fresh, "idle").await;
    assert_eq!(code(route.status.as_ref()), OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_transaction_ids_and_recall_handles_get_typed_errors() {
    let local = Local::start().await;
    create_topic(local.grpc, "plain", 1).await;
    let mut client = messaging(local.grpc).await;

    let end = bounded(
        "EndTransaction",
        client.end_transaction(v2::EndTransactionRequest {
            topic: Some(resource("plain")),
            message_id: new_message_id(),
            transaction_id: "tx-1".into(),
            resolution: v2::TransactionResolution::Commit as i32,
            source: v2::TransactionSource::SourceClient as i32,
            trace_context: String::new(),
        }),
    )
    .await
    .expect("EndTransaction transport")
    .into_inner();
    assert_eq!(code(end.status.as_ref()), v2::Code::InvalidTransactionId as i32, "{:?}", end.status);

    let recall = bounded(
        "RecallMessage",
        client.recall_message(v2::RecallMessageRequest {
            topic: Some(resource("plain")),
            recall_handle: "some-handle".into(),
        }),
    )
    .await
    .expect("RecallMessage transport")
    .into_inner();
    assert_eq!(code(recall.status.as_ref()), v2::Code::BadRequest as i32, "{:?}", recall.status);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_long_poll_and_exits_zero() {
    let mut local = Local::start().await;
    create_topic(local.grpc, "drain", 2).await;
    let mut client = messaging(local.grpc).await;
    let poll = tokio::spawn(async move {
        receive_with(&mut client, receive_request("drain", "g", 0, 1, SECS(30), SECS(20))).await
    });
    tokio::time::sleep(SECS(1)).await;
    assert!(!poll.is_finished(), "the long poll on an empty topic ended early");

    let stopped_at = Instant::now();
    local.process.terminate();
    let outcome = tokio::time::timeout(SECS(15), poll)
        .await
        .unwrap_or_else(|_| panic!("the long poll did not end within 15 s of SIGTERM\n{}", local.process.logs()))
        .expect("poll task");
    let received = outcome.unwrap_or_else(|e| {
        panic!("the long poll ended with a transport error, not a status: {e:?}\n{}", local.process.logs())
    });
    assert!(
        [OK, MESSAGE_NOT_FOUND].contains(&received.code()),
        "the drained long poll answered {:?}",
        received.statuses
    );
    let status = local
        .process
        .wait_exit(SECS(15))
        .await
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM\n{}", local.process.logs()));
    assert!(status.success(), "exit status {status} after SIGTERM\n{}", local.process.logs());
    eprintln!("drained and exited in {:?}", stopped_at.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connection_is_closed_eventually() {
    let mut local = Local::start().await;
    let baseline = local.process.socket_count();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(local.grpc).await.expect("connect"));
    }
    // The proxy closes a connection that sends no HTTP/2 preface within handshake_timeout_ms
    // (10 s by default); 60 s leaves room for a loaded machine.
    let closed = tokio::time::timeout(SECS(60), async {
        let mut buf = [0u8; 64];
        for stream in &mut silent {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "20 connections that never sent a byte were still open after 60 s: {} sockets, {baseline} before",
        local.process.socket_count()
    );
    assert!(local.process.is_alive());
}

/// Receives and acks until `count` messages arrived; returns their bodies.
async fn drain(client: &mut Messaging, topic: &str, group: &str, count: usize) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    let deadline = Instant::now() + SECS(30);
    while bodies.len() < count {
        assert!(Instant::now() < deadline, "received {} of {count} within 30 s", bodies.len());
        let got = receive(client, topic, group, 16, SECS(30), SECS(1)).await;
        bodies.extend(got.messages.iter().map(|m| m.body.clone()));
        ack_all(client, topic, group, &got.messages).await;
    }
    bodies
}

#[tokio::test(flavor = "multi_thread")]
async fn recreated_topic_is_read_from_its_start_by_an_old_group() {
    let local = Local::start().await;
    let mut client = messaging(local.grpc).await;
    create_topic(local.grpc, "cycle", 1).await;
    let first: Vec<v2::Message> = (0..5).map(|i| message("cycle", format!("old {i}").into_bytes())).collect();
    assert_eq!(code(send(&mut client, first).await.status.as_ref()), OK);
    assert_eq!(drain(&mut client, "cycle", "g", 5).await.len(), 5);
    // Let the broker write the group's offset (it does so every second).
    tokio::time::sleep(SECS(2)).await;

    let mut admin = admin_client(local.grpc).await;
    let deleted = admin.delete_topic(admin::DeleteTopicRequest { name: "cycle".into() }).await.expect("delete");
    assert_eq!(code(deleted.get_ref().status.as_ref()), OK);
    create_topic(local.grpc, "cycle", 1).await;
    let second: Vec<v2::Message> = (0..3).map(|i| message("cycle", format!("new {i}").into_bytes())).collect();
    assert_eq!(code(send(&mut client, second).await.status.as_ref()), OK);
    let mut bodies = drain(&mut client, "cycle", "g", 3).await;
    bodies.sort();
    assert_eq!(
        bodies,
        vec![b"new 0".to_vec(), b"new 1".to_vec(), b"new 2".to_vec()],
        "the old group's offset must not carry over"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_groups_are_recorded_and_enforced() {
    const GROUP_NOT_FOUND: i32 = v2::Code::ConsumerGroupNotFound as i32;
    let local = Local::start_with(&["--require-groups"]).await;
    let endpoint = local.endpoint();
    let mut client = messaging(local.grpc).await;
    create_topic(local.grpc, "jobs", 1).await;
    assert_eq!(code(send(&mut client, vec![message("jobs", b"work".to_vec())]).await.status.as_ref()), OK);

    let unknown = receive(&mut client, "jobs", "workers", 1, SECS(1), SECS(0)).await;
    assert_eq!(unknown.code(), GROUP_NOT_FOUND, "a group that was never created: {unknown:?}");

    let (ok, out, err) =
        cli(&["group", "create", "workers", "--max-delivery-attempts", "2", "--endpoint", &endpoint]).await;
    assert!(ok, "group create: {out} {err}");
    let (ok, out, err) = cli(&["--json", "group", "list", "--endpoint", &endpoint]).await;
    assert!(ok, "group list: {err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("group list --json");
    assert_eq!(
        listed,
        serde_json::json!([{
            "name": "workers", "max_delivery_attempts": 2, "fifo": false, "max_receive_tps": 0, "throttle": "wait"
        }])
    );

    // Two deliveries left un-acked; the third would exceed the group's limit: dead-lettered.
    for attempt in 1..=2 {
        let m = receive_one(&mut client, "jobs", "workers", SECS(1)).await;
        assert_eq!(system(&m).delivery_attempt, Some(attempt));
    }
    // The third delivery comes after the retry delays (1 s after the first expiry, 5 s after
    // the second); the long poll wakes for it, and the proxy dead-letters it instead.
    let after = receive(&mut client, "jobs", "workers", 1, SECS(1), SECS(15)).await;
    assert_eq!(after.code(), MESSAGE_NOT_FOUND, "moved to the dead-letter topic after 2 attempts: {after:?}");
    let (ok, _, err) = cli(&["group", "create", "inspect", "--endpoint", &endpoint]).await;
    assert!(ok, "{err}");
    let dead = receive_one(&mut client, "%DLQ%workers", "inspect", SECS(30)).await;
    assert_eq!(dead.body, b"work");

    let (ok, _, err) = cli(&["group", "delete", "workers", "--endpoint", &endpoint]).await;
    assert!(ok, "group delete: {err}");
    let gone = receive(&mut client, "jobs", "workers", 1, SECS(1), SECS(0)).await;
    assert_eq!(gone.code(), GROUP_NOT_FOUND, "a deleted group: {gone:?}");
}
