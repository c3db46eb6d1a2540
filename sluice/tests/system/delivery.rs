//! What the broker's scheduler promises, through the RocketMQ v2 API of a real `sluice local`:
//! FIFO order per message group (with failing deliveries and the dead-letter queue), filters
//! applied in the broker, the retry backoff, long polls that answer before the caller's
//! deadline, delay messages and recall, transactions (commit, rollback, check-back), and delay
//! timers and half messages surviving a SIGKILL.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use tokio_stream::wrappers::ReceiverStream;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// Short retry delays (200 ms, then ×5, ×10, … capped at 1 s) and quick transaction checks.
const QUICK: &str = r#"
[proxy]
retry_initial_ms = 200
retry_max_ms = 1000

[broker]
transaction_check_first_ms = 500
transaction_check_interval_max_ms = 1000
transaction_checks_max = 5
"#;

fn system(m: &v2::Message) -> &v2::SystemProperties {
    m.system_properties.as_ref().expect("system_properties")
}

fn body_text(m: &v2::Message) -> String {
    String::from_utf8(m.body.clone()).expect("utf-8 body")
}

fn typed(topic: &str, body: String, kind: v2::MessageType) -> v2::Message {
    let mut m = message(topic, body.into_bytes());
    m.system_properties.as_mut().expect("system").message_type = kind as i32;
    m
}

fn fifo_message(topic: &str, group: &str, body: String) -> v2::Message {
    let mut m = typed(topic, body, v2::MessageType::Fifo);
    m.system_properties.as_mut().expect("system").message_group = Some(group.into());
    m
}

fn delay_message(topic: &str, body: String, due: SystemTime) -> v2::Message {
    let mut m = typed(topic, body, v2::MessageType::Delay);
    m.system_properties.as_mut().expect("system").delivery_timestamp = Some(prost_types::Timestamp::from(due));
    m
}

fn with_filter(
    mut request: v2::ReceiveMessageRequest,
    kind: v2::FilterType,
    expression: &str,
) -> v2::ReceiveMessageRequest {
    request.filter_expression = Some(v2::FilterExpression { r#type: kind as i32, expression: expression.into() });
    request
}

/// Receives until `want` messages came (acking each) or `within` passed.
async fn drain_all(
    client: &mut Messaging,
    topic: &str,
    group: &str,
    want: usize,
    within: Duration,
) -> Vec<v2::Message> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let r = receive(client, topic, group, 32, SECS(30), SECS(2)).await;
        assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
        ack_all(client, topic, group, &r.messages).await;
        got.extend(r.messages);
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn fifo_groups_are_delivered_in_order_while_deliveries_fail() {
    const GROUPS: usize = 8;
    const PER_GROUP: usize = 20;
    const CONSUMERS: usize = 3;
    let local = Local::start_with_config(QUICK, &[]).await;
    create_typed_topic(local.grpc, "orders", v2::MessageType::Fifo, 4).await;
    create_group(local.grpc, "ordered", 50, true).await;
    let mut producer = messaging(local.grpc).await;
    // Interleaved: g0:0, g1:0, …, g7:0, g0:1, …
    for i in 0..PER_GROUP {
        let batch = (0..GROUPS).map(|g| fifo_message("orders", &format!("g{g}"), format!("g{g}:{i}"))).collect();
        send_ok(&mut producer, batch).await;
    }
    // Per group, the index of the last message a consumer committed to acking. A delivery of
    // message i is only allowed once i - 1 is marked (the mark comes before the ack is sent).
    let marked: Arc<Mutex<HashMap<String, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    let violations: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..CONSUMERS {
        let (marked, violations) = (marked.clone(), violations.clone());
        let mut client = messaging(local.grpc).await;
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + SECS(90);
            let mut failed_once = HashSet::new();
            while Instant::now() < deadline {
                let done = marked.lock().unwrap().values().filter(|i| **i == PER_GROUP as i64 - 1).count();
                if done == GROUPS {
                    return;
                }
                let r = receive(&mut client, "orders", "ordered", 8, SECS(1), SECS(1)).await;
                for m in &r.messages {
                    let text = body_text(m);
                    let (group, index) = text.split_once(':').expect("g:i");
                    let index: i64 = index.parse().expect("index");
                    let last = *marked.lock().unwrap().get(group).unwrap_or(&-1);
                    if index != last + 1 {
                        violations.lock().unwrap().push(format!("consumer {c} got {text} after {group}:{last}"));
                    }
                    // Fail every fifth message once (no ack: it expires and comes back).
                    if index % 5 == (c as i64 % 5) && failed_once.insert(text.clone()) {
                        continue;
                    }
                    marked.lock().unwrap().insert(group.to_string(), index);
                    let status = ack(&mut client, "orders", "ordered", &message_id(m), &receipt_handle(m)).await;
                    assert_eq!(status.code, OK, "ack {text}: {status:?}");
                }
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            panic!("consumer task: {e:?}\n{}", local.process.logs());
        }
    }
    let marked = marked.lock().unwrap().clone();
    assert_eq!(marked.len(), GROUPS, "every group consumed: {marked:?}");
    assert!(marked.values().all(|i| *i == PER_GROUP as i64 - 1), "every message acked: {marked:?}");
    let violations = violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "out of order or two in flight at once: {violations:?}");
    let stats = broker_counters(local.grpc).await;
    assert!(stats["messages_redelivered"] > 0, "the test must exercise failed deliveries: {stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_message_that_keeps_failing_is_dead_lettered_and_its_group_moves_on() {
    let local = Local::start_with_config(QUICK, &[]).await;
    create_typed_topic(local.grpc, "jobs", v2::MessageType::Fifo, 1).await;
    create_group(local.grpc, "picky", 2, true).await;
    let mut client = messaging(local.grpc).await;
    send_ok(&mut client, (0..3).map(|i| fifo_message("jobs", "only", format!("job {i}"))).collect()).await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + SECS(30);
    while seen.last().map(String::as_str) != Some("job 2") && Instant::now() < deadline {
        let r = receive(&mut client, "jobs", "picky", 8, SECS(1), SECS(3)).await;
        for m in &r.messages {
            let text = body_text(m);
            seen.push(text.clone());
            // "job 0" is never acked: after 2 attempts it goes to the dead-letter queue.
            if text != "job 0" {
                ack_all(&mut client, "jobs", "picky", std::slice::from_ref(m)).await;
            }
        }
    }
    assert_eq!(seen, vec!["job 0", "job 0", "job 1", "job 2"], "twice, then the group moves on");
    create_group(local.grpc, "inspect", 16, false).await;
    let dead = drain_all(&mut client, "%DLQ%picky", "inspect", 1, SECS(10)).await;
    assert_eq!(dead.iter().map(body_text).collect::<Vec<_>>(), vec!["job 0"]);
    assert_eq!(system(&dead[0]).message_group.as_deref(), Some("only"), "the copy keeps its group");
}

#[tokio::test(flavor = "multi_thread")]
async fn sql92_and_tag_filters_run_in_the_broker() {
    let local = Local::start().await;
    create_topic(local.grpc, "events", 4).await;
    let mut client = messaging(local.grpc).await;
    let messages: Vec<v2::Message> = (0..40)
        .map(|i| {
            let mut m = message("events", format!("e{i}").into_bytes());
            m.user_properties.insert("region".into(), if i % 2 == 0 { "eu" } else { "us" }.into());
            m.user_properties.insert("amount".into(), i.to_string());
            m.system_properties.as_mut().unwrap().tag = Some(if i % 3 == 0 { "paid" } else { "new" }.into());
            m
        })
        .collect();
    send_ok(&mut client, messages).await;

    let sql = "region = 'eu' AND amount > 10";
    let mut got_sql = Vec::new();
    for _ in 0..10 {
        let request = with_filter(receive_request("events", "sql", 0, 32, SECS(30), SECS(1)), v2::FilterType::Sql, sql);
        let r = receive_with(&mut client, request).await.expect("receive");
        if r.messages.is_empty() {
            break;
        }
        ack_all(&mut client, "events", "sql", &r.messages).await;
        got_sql.extend(r.messages.iter().map(body_text));
    }
    got_sql.sort();
    let mut want: Vec<String> = (0..40).filter(|i| i % 2 == 0 && *i > 10).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(got_sql, want, "exactly the messages the SQL92 filter selects");

    let mut got_tag = Vec::new();
    for _ in 0..10 {
        let request =
            with_filter(receive_request("events", "tags", 0, 32, SECS(30), SECS(1)), v2::FilterType::Tag, "paid");
        let r = receive_with(&mut client, request).await.expect("receive");
        if r.messages.is_empty() {
            break;
        }
        ack_all(&mut client, "events", "tags", &r.messages).await;
        got_tag.extend(r.messages.iter().map(body_text));
    }
    got_tag.sort();
    let mut want: Vec<String> = (0..40).filter(|i| i % 3 == 0).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(got_tag, want, "exactly the tagged messages");

    // Filtered messages were never leased: the broker counted them as filtered, and a group
    // without a filter still gets all 40.
    let stats = broker_counters(local.grpc).await;
    let filtered = (40 - got_sql.len()) + (40 - got_tag.len());
    assert_eq!(stats["messages_filtered"], filtered as u64, "{stats:?}");
    assert_eq!(drain_all(&mut client, "events", "all", 40, SECS(20)).await.len(), 40);

    let bad = with_filter(receive_request("events", "sql", 0, 1, SECS(30), SECS(1)), v2::FilterType::Sql, "amount >");
    let r = receive_with(&mut client, bad).await.expect("receive");
    assert_eq!(r.code(), v2::Code::IllegalFilterExpression as i32, "{:?}", r.statuses);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_delivery_comes_back_after_the_groups_retry_delay() {
    let local = Local::start_with_config(QUICK, &[]).await;
    create_topic(local.grpc, "retry", 1).await;
    let mut client = messaging(local.grpc).await;
    send_ok(&mut client, vec![message("retry", b"again".to_vec())]).await;
    // The settings announce delays of 200 ms, then 1 s (5 × 200 capped at 1000): attempt n
    // expires at its deadline and comes back that much later.
    let invisible = SECS(1);
    let mut deliveries = Vec::new();
    let deadline = Instant::now() + SECS(30);
    while deliveries.len() < 3 && Instant::now() < deadline {
        let r = receive(&mut client, "retry", "g", 1, invisible, SECS(5)).await;
        for m in &r.messages {
            deliveries.push((Instant::now(), system(m).delivery_attempt.unwrap_or(0)));
        }
    }
    assert_eq!(deliveries.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    for (i, delay) in [(1, MS(200)), (2, MS(1000))] {
        let gap = deliveries[i].0 - deliveries[i - 1].0;
        // A lower bound, which is behaviour (never earlier than promised), with 50 ms for clocks.
        assert!(gap + MS(50) >= invisible + delay, "attempt {} came {gap:?} after the previous one", i + 1);
        eprintln!("attempt {} came {gap:?} after attempt {i} (invisible {invisible:?} + delay {delay:?})", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_long_poll_answers_before_the_callers_grpc_deadline() {
    let local = Local::start().await;
    create_topic(local.grpc, "quiet", 8).await;
    let mut client = messaging(local.grpc).await;
    for wait in [SECS(2), SECS(5)] {
        // As the official Rust client does: the gRPC deadline equals the long-polling timeout.
        let mut request = tonic::Request::new(receive_request("quiet", "g", 0, 1, SECS(30), wait));
        request.set_timeout(wait);
        let started = Instant::now();
        let answer = async {
            let mut stream = client.receive_message(request).await?.into_inner();
            let mut statuses = Vec::new();
            while let Some(item) = stream.message().await? {
                if let Some(v2::receive_message_response::Content::Status(s)) = item.content {
                    statuses.push(s.code);
                }
            }
            Ok::<_, tonic::Status>(statuses)
        }
        .await;
        let statuses = answer.unwrap_or_else(|e| panic!("a deadline error instead of an empty answer: {e:?}"));
        assert_eq!(statuses, vec![MESSAGE_NOT_FOUND]);
        eprintln!("empty answer after {:?} for a {wait:?} deadline", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delay_messages_wait_for_their_time_and_can_be_recalled() {
    let local = Local::start().await;
    create_typed_topic(local.grpc, "later", v2::MessageType::Delay, 2).await;
    let mut client = messaging(local.grpc).await;
    let start = SystemTime::now();
    let dues: Vec<SystemTime> = (0..6).map(|i| start + MS(1500 + 200 * i)).collect();
    let reply =
        send(&mut client, dues.iter().enumerate().map(|(i, d)| delay_message("later", format!("d{i}"), *d)).collect())
            .await;
    assert_eq!(code(reply.status.as_ref()), OK, "{:?}", reply.status);
    let handles: Vec<String> = reply.entries.iter().map(|e| e.recall_handle.clone()).collect();
    assert!(handles.iter().all(|h| !h.is_empty()), "a delay message due later gets a recall handle");
    // Recall d5 before its time; it is never delivered.
    let recalled = bounded(
        "RecallMessage",
        client.recall_message(v2::RecallMessageRequest {
            topic: Some(resource("later")),
            recall_handle: handles[5].clone(),
        }),
    )
    .await
    .expect("recall")
    .into_inner();
    assert_eq!(code(recalled.status.as_ref()), OK, "{:?}", recalled.status);
    assert_eq!(recalled.message_id, reply.entries[5].message_id);

    let mut lateness = BTreeMap::new();
    let deadline = Instant::now() + SECS(20);
    while lateness.len() < 5 && Instant::now() < deadline {
        let r = receive(&mut client, "later", "g", 8, SECS(30), SECS(1)).await;
        let now = SystemTime::now();
        for m in &r.messages {
            let i: usize = body_text(m)[1..].parse().expect("index");
            let late = now
                .duration_since(dues[i])
                .unwrap_or_else(|early| panic!("d{i} delivered {:?} before its time", early.duration()));
            lateness.insert(i, late);
        }
        ack_all(&mut client, "later", "g", &r.messages).await;
    }
    assert_eq!(lateness.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4], "d5 was recalled");
    eprintln!("delay lateness per message (includes the receive round trip): {lateness:?}");
    let r = receive(&mut client, "later", "g", 8, SECS(30), SECS(2)).await;
    assert!(r.messages.is_empty(), "the recalled message never comes: {:?}", r.messages);

    // A recall after delivery is refused with a reason; so is a forged handle.
    let again = bounded(
        "RecallMessage",
        client.recall_message(v2::RecallMessageRequest {
            topic: Some(resource("later")),
            recall_handle: handles[0].clone(),
        }),
    )
    .await
    .expect("recall")
    .into_inner();
    assert_eq!(code(again.status.as_ref()), v2::Code::NotFound as i32, "{:?}", again.status);

    // Too far ahead (RocketMQ's limit is 40 days): a clear error.
    let far = send(&mut client, vec![delay_message("later", "far".into(), start + SECS(41 * 24 * 3600))]).await;
    assert_eq!(code(far.entries[0].status.as_ref()), v2::Code::IllegalDeliveryTime as i32, "{:?}", far.entries);
}

/// A producer's Telemetry stream, as the official clients open it: settings first, then
/// whatever the server sends (transaction checks).
struct ProducerStream {
    commands: tonic::Streaming<v2::TelemetryCommand>,
    _outbound: tokio::sync::mpsc::Sender<v2::TelemetryCommand>,
}

async fn producer_stream(client: &mut Messaging, topic: &str) -> ProducerStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let settings = v2::Settings {
        client_type: Some(v2::ClientType::Producer as i32),
        pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
            topics: vec![resource(topic)],
            max_body_size: 0,
            validate_message_type: true,
        })),
        ..Default::default()
    };
    tx.send(v2::TelemetryCommand { status: None, command: Some(v2::telemetry_command::Command::Settings(settings)) })
        .await
        .expect("queue settings");
    let mut commands =
        bounded("Telemetry", client.telemetry(ReceiverStream::new(rx))).await.expect("Telemetry").into_inner();
    let first = bounded("settings reply", commands.message()).await.expect("settings reply").expect("a reply");
    assert!(matches!(first.command, Some(v2::telemetry_command::Command::Settings(_))), "{first:?}");
    ProducerStream { commands, _outbound: tx }
}

async fn end_transaction(
    client: &mut Messaging,
    topic: &str,
    message_id: &str,
    transaction_id: &str,
    resolution: v2::TransactionResolution,
    source: v2::TransactionSource,
) -> i32 {
    let reply = bounded(
        "EndTransaction",
        client.end_transaction(v2::EndTransactionRequest {
            topic: Some(resource(topic)),
            message_id: message_id.into(),
            transaction_id: transaction_id.into(),
            resolution: resolution as i32,
            source: source as i32,
            trace_context: String::new(),
        }),
    )
    .await
    .expect("EndTransaction")
    .into_inner();
    code(reply.status.as_ref())
}

#[tokio::test(flavor = "multi_thread")]
async fn transactions_commit_roll_back_and_are_checked_back() {
    let local = Local::start_with_config(QUICK, &[]).await;
    create_typed_topic(local.grpc, "payments", v2::MessageType::Transaction, 2).await;
    let mut client = messaging(local.grpc).await;
    let mut producer = producer_stream(&mut client, "payments").await;
    let half = |body: &str| typed("payments", body.into(), v2::MessageType::Transaction);
    let reply = send(&mut client, vec![half("commit me"), half("roll me back"), half("ask me")]).await;
    assert_eq!(code(reply.status.as_ref()), OK, "{:?}", reply.status);
    let ids: Vec<(String, String)> =
        reply.entries.iter().map(|e| (e.message_id.clone(), e.transaction_id.clone())).collect();
    assert!(ids.iter().all(|(_, t)| !t.is_empty()), "each half message has a transaction id");

    // Half messages are invisible until committed.
    let r = receive(&mut client, "payments", "g", 8, SECS(30), SECS(1)).await;
    assert!(r.messages.is_empty(), "a half message was delivered: {:?}", r.messages);

    use v2::{TransactionResolution as R, TransactionSource as S};
    assert_eq!(end_transaction(&mut client, "payments", &ids[0].0, &ids[0].1, R::Commit, S::SourceClient).await, OK);
    assert_eq!(end_transaction(&mut client, "payments", &ids[1].0, &ids[1].1, R::Rollback, S::SourceClient).await, OK);
    let twice = end_transaction(&mut client, "payments", &ids[0].0, &ids[0].1, R::Commit, S::SourceClient).await;
    assert_eq!(twice, v2::Code::InvalidTransactionId as i32, "a transaction ends once");

    // The third is checked back over the producer's stream; the producer answers COMMIT.
    // (Checks of the other two may come first, if their first check was due before they ended.)
    let check = loop {
        let command = tokio::time::timeout(SECS(20), producer.commands.message())
            .await
            .expect("a transaction check within 20 s")
            .expect("Telemetry stream")
            .expect("a command");
        if let Some(v2::telemetry_command::Command::RecoverOrphanedTransactionCommand(check)) = command.command {
            if check.message.as_ref().is_some_and(|m| system(m).message_id == ids[2].0) {
                break check;
            }
        }
    };
    let checked = check.message.as_ref().expect("the half message");
    assert_eq!(system(checked).message_id, ids[2].0);
    assert_eq!(body_text(checked), "ask me");
    assert_eq!(check.transaction_id, ids[2].1);
    let answer =
        end_transaction(&mut client, "payments", &ids[2].0, &check.transaction_id, R::Commit, S::SourceServerCheck)
            .await;
    assert_eq!(answer, OK);

    let mut bodies: Vec<String> =
        drain_all(&mut client, "payments", "g", 2, SECS(10)).await.iter().map(body_text).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["ask me", "commit me"], "committed ones only; the rolled-back one never");
    let r = receive(&mut client, "payments", "g", 8, SECS(30), SECS(2)).await;
    assert!(r.messages.is_empty(), "{:?}", r.messages);
    let stats = broker_counters(local.grpc).await;
    assert_eq!((stats["transactions_committed"], stats["transactions_rolled_back"]), (2, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unanswered_transactions_are_given_up_after_the_last_check() {
    let local = Local::start_with_config(QUICK, &[]).await;
    create_typed_topic(local.grpc, "silent", v2::MessageType::Transaction, 1).await;
    let mut client = messaging(local.grpc).await;
    // A producer that never answers its checks.
    let mut producer = producer_stream(&mut client, "silent").await;
    send_ok(&mut client, vec![typed("silent", "never ends".into(), v2::MessageType::Transaction)]).await;
    let mut checks = 0;
    let deadline = Instant::now() + SECS(30);
    while Instant::now() < deadline {
        let stats = broker_counters(local.grpc).await;
        if stats["transactions_discarded"] == 1 {
            break;
        }
        if let Ok(Ok(Some(_))) = tokio::time::timeout(MS(200), producer.commands.message()).await {
            checks += 1;
        }
    }
    let stats = broker_counters(local.grpc).await;
    assert_eq!(stats["transactions_discarded"], 1, "{stats:?}");
    assert!(checks >= 1, "the producer was asked before the message was given up");
    let r = receive(&mut client, "silent", "g", 8, SECS(30), SECS(1)).await;
    assert!(r.messages.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn delay_timers_and_half_messages_survive_a_broker_sigkill() {
    let local = Local::start_with_config(QUICK, &[]).await;
    create_typed_topic(local.grpc, "timed", v2::MessageType::Delay, 2).await;
    create_typed_topic(local.grpc, "tx", v2::MessageType::Transaction, 2).await;
    let mut client = messaging(local.grpc).await;
    let due = SystemTime::now() + SECS(6);
    send_ok(&mut client, vec![delay_message("timed", "after the crash".into(), due)]).await;
    let reply =
        send(&mut client, vec![typed("tx", "half before the crash".into(), v2::MessageType::Transaction)]).await;
    let (message_id, transaction_id) = (reply.entries[0].message_id.clone(), reply.entries[0].transaction_id.clone());
    assert!(!transaction_id.is_empty(), "{reply:?}");

    let local = local.crash_and_restart().await;
    let mut client = messaging(local.grpc).await;
    // The half message is still held, still invisible, and its transaction id still works.
    let r = receive(&mut client, "tx", "g", 8, SECS(30), SECS(1)).await;
    assert!(r.messages.is_empty(), "{:?}", r.messages);
    use v2::{TransactionResolution as R, TransactionSource as S};
    assert_eq!(end_transaction(&mut client, "tx", &message_id, &transaction_id, R::Commit, S::SourceClient).await, OK);
    let committed = drain_all(&mut client, "tx", "g", 1, SECS(10)).await;
    assert_eq!(committed.iter().map(body_text).collect::<Vec<_>>(), vec!["half before the crash"]);
    // The timer fires at its time, not before.
    let delayed = drain_all(&mut client, "timed", "g", 1, SECS(20)).await;
    assert!(SystemTime::now() >= due, "delivered before its time");
    assert_eq!(delayed.iter().map(body_text).collect::<Vec<_>>(), vec!["after the crash"]);
}

/// Every CommitLog segment file under `dir` (named by its 20-digit base position; RocksDB's
/// files are not).
fn segment_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read data dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            segment_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "log")
            && path.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.len() == 20)
        {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_record_is_skipped_and_its_queue_still_delivers() {
    let local = Local::start().await;
    create_topic(local.grpc, "hurt", 2).await;
    let mut client = messaging(local.grpc).await;
    let marker = "damage-me-0123456789abcdef";
    let mut bodies: Vec<String> = (0..30).map(|i| format!("fine-{i:02}")).collect();
    bodies.insert(10, marker.to_string());
    for body in &bodies {
        send_ok(&mut client, vec![message("hurt", body.clone().into_bytes())]).await;
    }
    let local = local
        .stop_and_restart(|data| {
            let mut files = Vec::new();
            segment_files(data, &mut files);
            let mut flipped = 0;
            for file in files {
                let mut bytes = std::fs::read(&file).expect("read segment");
                if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker.as_bytes()) {
                    bytes[at + 3] ^= 0x20;
                    std::fs::write(&file, bytes).expect("write segment");
                    flipped += 1;
                }
            }
            assert_eq!(flipped, 1, "the marked record is stored once");
        })
        .await;
    let mut client = messaging(local.grpc).await;
    // A group that starts now gets every other message, from both queues, in spite of it.
    let got = drain_all(&mut client, "hurt", "g", bodies.len() - 1, SECS(20)).await;
    let mut got: Vec<String> = got.iter().map(body_text).collect();
    got.sort();
    let want: Vec<String> = bodies.iter().filter(|b| *b != marker).cloned().collect();
    assert_eq!(got, want);
    let r = receive(&mut client, "hurt", "g", 8, SECS(30), SECS(1)).await;
    assert_eq!(r.code(), MESSAGE_NOT_FOUND, "the damaged record is never delivered: {:?}", r.messages);
    assert_eq!(broker_counters(local.grpc).await.get("damaged_records_skipped"), Some(&1));
}
