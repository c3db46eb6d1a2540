//! The fault suite: real `sluice` broker and proxy processes, producers and consumers running
//! through the proxy the whole time, and a fault injected while they run. The workload covers
//! every kind of stream the checker can judge: a normal topic; a FIFO topic, whose order is
//! checked per message group; a LITE topic, whose order is checked per lite topic; a DELAY
//! topic, whose messages must not arrive before their time; and a transactional topic, whose producer commits or rolls back each message at random and answers
//! the broker's checks of transactions it did not get to end. Each case prints one line,
//! `faults: <case> sent … PASS|FAIL`, from the history checker (`common/history.rs`), and fails
//! when the history breaks the queue's contract: an acked message lost, a duplicate no crash
//! explains, a corrupt body, an ordered stream out of order, a delay message early, a
//! rolled-back message delivered.
//!
//! The cases are `#[ignore]`d, so `cargo test` leaves them out: `scripts/faults.sh` runs them,
//! fewer rounds and shorter outages with `--short` (CI), which sets `SLUICE_FAULTS_SHORT=1`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::common;
use common::history::{History, Progress, Report, SendOutcome};
use common::*;
use sluice_transport::relay::Relay;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const OK: i32 = v2::Code::Ok as i32;
const TOPIC: &str = "faults";
const FIFO_TOPIC: &str = "faults-fifo";
const LITE_TOPIC: &str = "faults-lite";
const TX_TOPIC: &str = "faults-tx";
const DELAY_TOPIC: &str = "faults-delay";
const GROUP: &str = "faults-readers";
const FIFO_GROUP: &str = "faults-fifo-readers";
const LITE_GROUP: &str = "faults-lite-readers";
const TX_GROUP: &str = "faults-tx-readers";
const DELAY_GROUP: &str = "faults-delay-readers";
/// Producers on the normal topic; one more each sends to the FIFO, LITE, DELAY and
/// transactional topics.
const PRODUCERS: usize = 2;
/// Message groups on the FIFO topic, and lite topics on the LITE topic: their producers send to
/// them round-robin, one send at a time, so each stream's send order is its sequence order.
const MESSAGE_GROUPS: u64 = 4;
const LITE_TOPICS: u64 = 8;
/// The lite consumer's client id: its subscriptions belong to it.
const LITE_CLIENT_ID: &str = "faults-lite-reader";
/// How often the lite consumer syncs its subscriptions (the official clients: every 30 s). A
/// restarted broker has forgotten them (they are soft state), so this bounds its stall.
const LITE_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// A delay message is due this long after its send, at random.
const DELAY_MIN_MS: u64 = 200;
const DELAY_MAX_MS: u64 = 2_000;
/// The transactional producer rolls back one transaction in this many (and commits the rest).
const ROLLBACK_ONE_IN: u32 = 4;
const QUEUES: u32 = 4;
const BODY_BYTES: usize = 200;
/// A message may be delivered this often before the broker dead-letters it (out of the
/// checker's sight): far more than any case causes.
const DELIVERY_ATTEMPTS_MAX: u32 = 1000;
/// The clients' deadline for one call.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// A consumer's lease: what a dead proxy or broker handed out comes back after this.
const INVISIBLE: Duration = Duration::from_secs(3);
const LONG_POLL: Duration = Duration::from_secs(1);
const RECEIVE_BATCH: i32 = 16;
/// How long the consumers get, once the producers stop, to receive every acked message.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// A frozen broker must not make the proxy's memory grow past this.
const PROXY_RSS_MAX_BYTES: u64 = 512 << 20;
/// After a fault, the workload runs this long before the next one (or the drain).
const STEADY: Duration = Duration::from_secs(2);
/// Case 2's file system, its broker's segments, and the free space its broker keeps: the
/// ballast leaves less than the floor, so every append is refused while it is there.
const SMALL_DISK_MIB: u64 = 256;
const SMALL_DISK_SEGMENT_BYTES: u64 = 16 << 20;
const SMALL_DISK_FREE_MIN_BYTES: u64 = 32 << 20;
const SMALL_DISK_LEFT_BYTES: u64 = 16 << 20;
/// How long a condition a case waits for (a refusal, sends resuming) may take to appear.
const CONDITION_TIMEOUT: Duration = Duration::from_secs(15);

fn short() -> bool {
    std::env::var("SLUICE_FAULTS_SHORT").is_ok_and(|v| v == "1")
}

fn scaled(short_value: u32, full_value: u32) -> u32 {
    if short() {
        short_value
    } else {
        full_value
    }
}

fn lazy_client(addr: SocketAddr) -> Messaging {
    let endpoint = Channel::from_shared(format!("http://{addr}")).expect("endpoint url");
    messaging_client(endpoint.connect_timeout(Duration::from_secs(2)).connect_lazy())
}

/// Body of a producer's `seq`th message: recognisable, and long enough to show corruption.
fn body(producer: usize, seq: u64) -> Vec<u8> {
    let head = format!("producer {producer} message {seq} ");
    let mut body = head.into_bytes();
    body.extend((0..BODY_BYTES).map(|i| b'a' + ((i as u64 + seq) % 26) as u8));
    body
}

/// The kinds of stream the workload runs, one topic (and consumer group) each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Normal,
    Fifo,
    Lite,
    Delay,
    Transactional,
}

impl Flow {
    fn topic(self) -> &'static str {
        match self {
            Flow::Normal => TOPIC,
            Flow::Fifo => FIFO_TOPIC,
            Flow::Lite => LITE_TOPIC,
            Flow::Delay => DELAY_TOPIC,
            Flow::Transactional => TX_TOPIC,
        }
    }

    /// The name the checker's per-kind counts use.
    fn kind(self) -> &'static str {
        match self {
            Flow::Normal => "normal",
            Flow::Fifo => "fifo",
            Flow::Lite => "lite",
            Flow::Delay => "delay",
            Flow::Transactional => "transactional",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Flow::Normal => GROUP,
            Flow::Fifo => FIFO_GROUP,
            Flow::Lite => LITE_GROUP,
            Flow::Delay => DELAY_GROUP,
            Flow::Transactional => TX_GROUP,
        }
    }

    /// The `seq`th message a producer of this flow sends, and its (ordered stream, position).
    fn message(self, producer: usize, seq: u64) -> (v2::Message, Option<(String, u64)>) {
        let mut m = message(self.topic(), body(producer, seq));
        let system = m.system_properties.as_mut().expect("system properties");
        match self {
            Flow::Normal => (m, None),
            Flow::Fifo => {
                let group = format!("g{}", seq % MESSAGE_GROUPS);
                system.message_type = v2::MessageType::Fifo as i32;
                system.message_group = Some(group.clone());
                (m, Some((group, seq / MESSAGE_GROUPS)))
            }
            Flow::Lite => {
                let lite = lite_topic_name(seq % LITE_TOPICS);
                system.message_type = v2::MessageType::Lite as i32;
                system.lite_topic = Some(lite.clone());
                (m, Some((format!("lite {lite}"), seq / LITE_TOPICS)))
            }
            Flow::Delay => {
                let delay = Duration::from_millis(rand::random_range(DELAY_MIN_MS..=DELAY_MAX_MS));
                system.message_type = v2::MessageType::Delay as i32;
                system.delivery_timestamp = Some(prost_types::Timestamp::from(SystemTime::now() + delay));
                (m, None)
            }
            Flow::Transactional => {
                system.message_type = v2::MessageType::Transaction as i32;
                (m, None)
            }
        }
    }
}

fn lite_topic_name(index: u64) -> String {
    format!("session-{index}")
}

/// What the transactional producer decided for one message, by message id: what it answers
/// when the broker checks a transaction it did not end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// The half message's send has not been answered yet: a check gets no answer (asked again).
    Pending,
    Commit,
    Rollback,
}

/// What the producers and consumers share.
struct Shared {
    history: Mutex<History>,
    /// The transactional producer's decisions, by message id.
    decisions: Mutex<HashMap<String, Decision>>,
    /// The proxies' gRPC addresses; a client moves to the next one when a call fails.
    proxies: Mutex<Vec<SocketAddr>>,
    producing: AtomicBool,
    consuming: AtomicBool,
    /// Consumers wait (receive nothing) while set: lets a case build a backlog.
    consumers_paused: AtomicBool,
    /// When not 0, the normal topic's consumers leave every Nth first delivery unacked, so its
    /// lease must expire and bring it back.
    skip_ack_every: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn proxy(&self, index: usize) -> SocketAddr {
        let proxies = self.proxies.lock().unwrap();
        proxies[index % proxies.len()]
    }

    fn decide(&self, id: &str, decision: Decision) {
        self.decisions.lock().unwrap().insert(id.to_string(), decision);
    }
}

/// The producers and consumers of one case.
struct Workload {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn create_topics(proxy: SocketAddr) {
    create_typed_topic(proxy, TOPIC, v2::MessageType::Normal, QUEUES).await;
    create_typed_topic(proxy, FIFO_TOPIC, v2::MessageType::Fifo, QUEUES).await;
    create_typed_topic(proxy, LITE_TOPIC, v2::MessageType::Lite, QUEUES).await;
    create_typed_topic(proxy, DELAY_TOPIC, v2::MessageType::Delay, QUEUES).await;
    create_typed_topic(proxy, TX_TOPIC, v2::MessageType::Transaction, QUEUES).await;
    create_group(proxy, GROUP, DELIVERY_ATTEMPTS_MAX, false).await;
    create_group(proxy, FIFO_GROUP, DELIVERY_ATTEMPTS_MAX, true).await;
    create_group(proxy, LITE_GROUP, DELIVERY_ATTEMPTS_MAX, false).await;
    create_group(proxy, DELAY_GROUP, DELIVERY_ATTEMPTS_MAX, false).await;
    create_group(proxy, TX_GROUP, DELIVERY_ATTEMPTS_MAX, false).await;
}

impl Workload {
    async fn start(proxies: &[SocketAddr]) -> Workload {
        create_topics(proxies[0]).await;
        let shared = Arc::new(Shared {
            history: Mutex::new(History::new()),
            decisions: Mutex::new(HashMap::new()),
            proxies: Mutex::new(proxies.to_vec()),
            producing: AtomicBool::new(true),
            consuming: AtomicBool::new(true),
            consumers_paused: AtomicBool::new(false),
            skip_ack_every: std::sync::atomic::AtomicU64::new(0),
        });
        let mut tasks = Vec::new();
        let mut producers = vec![Flow::Normal; PRODUCERS];
        producers.extend([Flow::Fifo, Flow::Lite, Flow::Delay, Flow::Transactional]);
        for (producer, flow) in producers.into_iter().enumerate() {
            tasks.push(tokio::spawn(produce(shared.clone(), producer, flow)));
        }
        tasks.push(tokio::spawn(answer_transaction_checks(shared.clone())));
        let consumers = [Flow::Normal, Flow::Normal, Flow::Fifo, Flow::Lite, Flow::Delay, Flow::Transactional];
        for (consumer, flow) in consumers.into_iter().enumerate() {
            tasks.push(tokio::spawn(consume(shared.clone(), flow, consumer)));
        }
        Workload { shared, tasks }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.shared.history.lock().unwrap()
    }

    fn progress(&self) -> Progress {
        self.history().progress()
    }

    fn pause_consumers(&self, paused: bool) {
        self.shared.consumers_paused.store(paused, Ordering::Relaxed);
    }

    /// Waits until `done` holds for the history's progress; panics after CONDITION_TIMEOUT.
    async fn wait_for(&self, what: &str, done: impl Fn(Progress) -> bool, logs: impl FnOnce() -> String) {
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        while !done(self.progress()) {
            assert!(Instant::now() < deadline, "{what}: not within {CONDITION_TIMEOUT:?}\n{}", logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn set_proxy(&self, index: usize, addr: SocketAddr) {
        self.shared.proxies.lock().unwrap()[index] = addr;
    }

    /// Stops the producers, lets the consumers receive every acked message (or time out), and
    /// returns the checker's report.
    async fn finish(self) -> Report {
        self.finish_until(|h| h.drained()).await
    }

    /// `finish`, waiting until every acked message is acked by a consumer: the messages left
    /// unacked (`skip_ack_every`) must come back when their leases expire.
    async fn finish_acked(self) -> (Report, usize) {
        let shared = self.shared.clone();
        let report = self.finish_until(|h| h.unacked() == 0).await;
        let unacked = shared.history.lock().unwrap().unacked();
        (report, unacked)
    }

    async fn finish_until(self, done: impl Fn(&History) -> bool) -> Report {
        self.finish_within(DRAIN_TIMEOUT, done).await
    }

    async fn finish_within(self, drain_timeout: Duration, done: impl Fn(&History) -> bool) -> Report {
        self.shared.producing.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + drain_timeout;
        while Instant::now() < deadline {
            if done(&self.history()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A last moment for redeliveries that should not happen to show up.
        tokio::time::sleep(INVISIBLE + LONG_POLL).await;
        self.shared.consuming.store(false, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("workload task");
        }
        let report = self.shared.history.lock().unwrap().report();
        report
    }
}

/// A send's outcome from the proxy's reply, and the transaction id of a half message.
fn send_outcome(
    reply: Result<Result<tonic::Response<v2::SendMessageResponse>, tonic::Status>, impl Sized>,
) -> (SendOutcome, String) {
    let Ok(Ok(reply)) = reply else {
        // A transport error or the deadline: it may have been stored.
        return (SendOutcome::Unknown, String::new());
    };
    let reply = reply.into_inner();
    let overall = code(reply.status.as_ref());
    let entry = reply.entries.first();
    let entry_code = entry.map(|e| code(e.status.as_ref()));
    let refused = v2::Code::TooManyRequests as i32;
    let outcome = if overall == OK && entry_code == Some(OK) {
        SendOutcome::Acked
    } else if overall == refused || entry_code == Some(refused) {
        // A full disk or a busy shard: refused before anything was stored. The checker holds
        // this to it: such a message must never be delivered.
        SendOutcome::Failed
    } else {
        SendOutcome::Unknown
    };
    (outcome, entry.map(|e| e.transaction_id.clone()).unwrap_or_default())
}

async fn produce(shared: Arc<Shared>, producer: usize, flow: Flow) {
    let mut at = producer;
    let mut client = lazy_client(shared.proxy(at));
    let mut seq = 0u64;
    while shared.producing.load(Ordering::Relaxed) {
        let (m, stream_seq) = flow.message(producer, seq);
        let id = message_id(&m);
        let due = m.system_properties.as_ref().and_then(|s| s.delivery_timestamp);
        {
            let mut history = shared.history.lock().unwrap();
            history.send_started(flow.kind(), &id, stream_seq, &m.body);
            if let Some(due) = due.and_then(|t| SystemTime::try_from(t).ok()) {
                history.not_before(&id, due);
            }
        }
        if flow == Flow::Transactional {
            shared.decide(&id, Decision::Pending);
        }
        let started = Instant::now();
        let call = client.send_message(v2::SendMessageRequest { messages: vec![m] });
        let (outcome, transaction_id) = send_outcome(tokio::time::timeout(CALL_DEADLINE, call).await);
        shared.history.lock().unwrap().waited(started.elapsed());
        let healthy = if flow == Flow::Transactional {
            end_transaction(&shared, &mut client, &id, outcome, &transaction_id).await
        } else {
            shared.history.lock().unwrap().send_finished(&id, outcome);
            outcome == SendOutcome::Acked
        };
        if !healthy {
            at += 1;
            client = lazy_client(shared.proxy(at));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seq += 1;
    }
}

/// What a transactional producer does once its half message's send is answered: a stored half
/// is committed, or one in ROLLBACK_ONE_IN rolled back, with EndTransaction; an unstored or
/// unanswered one is rolled back (the producer's local transaction never ran), which is also
/// what it answers when the broker checks it. Returns whether every call succeeded.
async fn end_transaction(
    shared: &Shared,
    client: &mut Messaging,
    id: &str,
    outcome: SendOutcome,
    transaction_id: &str,
) -> bool {
    if outcome != SendOutcome::Acked {
        shared.decide(id, Decision::Rollback);
        let mut history = shared.history.lock().unwrap();
        match outcome {
            SendOutcome::Failed => history.send_finished(id, SendOutcome::Failed),
            _ => history.transaction_ended(id, false),
        }
        return false;
    }
    let commit = rand::random_range(0..ROLLBACK_ONE_IN) != 0;
    shared.decide(id, if commit { Decision::Commit } else { Decision::Rollback });
    {
        let mut history = shared.history.lock().unwrap();
        history.half_stored(id);
        if !commit {
            // Decided: from now on no delivery of it is allowed, whatever the call's fate.
            history.transaction_ended(id, false);
        }
    }
    let started = Instant::now();
    let ended = end_transaction_call(client, id, transaction_id, commit, v2::TransactionSource::SourceClient).await;
    let mut history = shared.history.lock().unwrap();
    history.waited(started.elapsed());
    if ended && commit {
        history.transaction_ended(id, true);
    }
    ended
}

/// One EndTransaction with the client's deadline; whether the proxy answered OK.
async fn end_transaction_call(
    client: &mut Messaging,
    id: &str,
    transaction_id: &str,
    commit: bool,
    source: v2::TransactionSource,
) -> bool {
    let resolution = if commit { v2::TransactionResolution::Commit } else { v2::TransactionResolution::Rollback };
    let request = v2::EndTransactionRequest {
        topic: Some(resource(TX_TOPIC)),
        message_id: id.into(),
        transaction_id: transaction_id.into(),
        resolution: resolution as i32,
        source: source as i32,
        trace_context: String::new(),
    };
    let reply = tokio::time::timeout(CALL_DEADLINE, client.end_transaction(request)).await;
    matches!(reply, Ok(Ok(reply)) if code(reply.get_ref().status.as_ref()) == OK)
}

/// The transactional producer's Telemetry stream, as the official clients keep one: it
/// announces the topic, and answers each check of a transaction the producer did not end
/// (its EndTransaction failed, or the half's send went unanswered) from its decisions. On any
/// error it opens a new stream, on the next proxy.
async fn answer_transaction_checks(shared: Arc<Shared>) {
    let mut at = 0;
    while shared.consuming.load(Ordering::Relaxed) {
        let mut client = lazy_client(shared.proxy(at));
        // A stream that fails (its proxy died, a broker restarted) is simply opened again.
        let _ = answer_checks_on_one_stream(&shared, &mut client).await;
        at += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn answer_checks_on_one_stream(shared: &Shared, client: &mut Messaging) -> Result<(), String> {
    let (outbound, rx) = tokio::sync::mpsc::channel(4);
    let settings = v2::Settings {
        client_type: Some(v2::ClientType::Producer as i32),
        pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
            topics: vec![resource(TX_TOPIC)],
            max_body_size: 0,
            validate_message_type: true,
        })),
        ..Default::default()
    };
    let command = v2::telemetry_command::Command::Settings(settings);
    outbound.send(v2::TelemetryCommand { status: None, command: Some(command) }).await.map_err(|e| e.to_string())?;
    let opened = tokio::time::timeout(CALL_DEADLINE, client.telemetry(ReceiverStream::new(rx))).await;
    let mut commands = opened.map_err(|_| "no answer".to_string())?.map_err(|e| e.to_string())?.into_inner();
    while shared.consuming.load(Ordering::Relaxed) {
        // Bounded, to notice the end of the workload; `message` keeps a partial read.
        let Ok(next) = tokio::time::timeout(LONG_POLL, commands.message()).await else { continue };
        let command = next.map_err(|e| e.to_string())?.ok_or("stream ended")?;
        let Some(v2::telemetry_command::Command::RecoverOrphanedTransactionCommand(check)) = command.command else {
            continue;
        };
        let id = check.message.as_ref().map(message_id).unwrap_or_default();
        let decision = shared.decisions.lock().unwrap().get(&id).copied().unwrap_or(Decision::Rollback);
        let commit = match decision {
            Decision::Pending => continue,
            Decision::Commit => true,
            Decision::Rollback => false,
        };
        let source = v2::TransactionSource::SourceServerCheck;
        let ended = end_transaction_call(client, &id, &check.transaction_id, commit, source).await;
        let mut history = shared.history.lock().unwrap();
        history.check_answered();
        if ended && commit {
            history.transaction_ended(&id, true);
        }
    }
    Ok(())
}

/// `message` as a lite consumer sends it: with its client id, which its subscriptions belong to.
fn as_client<T>(flow: Flow, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if flow == Flow::Lite {
        request.metadata_mut().insert("x-mq-client-id", LITE_CLIENT_ID.parse().expect("ascii client id"));
    }
    request
}

/// One ReceiveMessage stream to its end; Err on a transport error or the client's deadline.
async fn receive_once(client: &mut Messaging, flow: Flow) -> Result<Received, ()> {
    let request = receive_request(flow.topic(), flow.group(), 0, RECEIVE_BATCH, INVISIBLE, LONG_POLL);
    let run = receive_stream(client, as_client(flow, request));
    match tokio::time::timeout(LONG_POLL + CALL_DEADLINE, run).await {
        Ok(Ok(received)) => Ok(received),
        _ => Err(()),
    }
}

/// The lite consumer's whole subscription (COMPLETE_ADD: the set replaces what the broker has).
async fn sync_lite_subscriptions(client: &mut Messaging) -> bool {
    let request = v2::SyncLiteSubscriptionRequest {
        action: v2::LiteSubscriptionAction::CompleteAdd as i32,
        topic: Some(resource(LITE_TOPIC)),
        group: Some(resource(LITE_GROUP)),
        lite_topic_set: (0..LITE_TOPICS).map(lite_topic_name).collect(),
        version: None,
        offset_option: None,
    };
    let reply =
        tokio::time::timeout(CALL_DEADLINE, client.sync_lite_subscription(as_client(Flow::Lite, request))).await;
    matches!(reply, Ok(Ok(reply)) if code(reply.get_ref().status.as_ref()) == OK)
}

async fn consume(shared: Arc<Shared>, flow: Flow, consumer: usize) {
    let mut skipped = std::collections::HashSet::new();
    let mut first_deliveries = 0u64;
    let mut at = consumer;
    let mut client = lazy_client(shared.proxy(at));
    let mut synced_at: Option<Instant> = None;
    while shared.consuming.load(Ordering::Relaxed) {
        if shared.consumers_paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if flow == Flow::Lite && synced_at.is_none_or(|t| t.elapsed() >= LITE_SYNC_INTERVAL) {
            let synced = sync_lite_subscriptions(&mut client).await;
            synced_at = synced.then(Instant::now);
        }
        let started = Instant::now();
        let received = receive_once(&mut client, flow).await;
        shared.history.lock().unwrap().waited(started.elapsed().saturating_sub(LONG_POLL));
        let messages = match received {
            Ok(r) if r.code() == OK => r.messages,
            Ok(r) if r.code() == v2::Code::MessageNotFound as i32 => continue,
            _ => {
                at += 1;
                client = lazy_client(shared.proxy(at));
                synced_at = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        for m in &messages {
            shared.history.lock().unwrap().deliver(&message_id(m), &m.body);
        }
        // Only on the normal topic: an unacked message holds up its whole ordered stream.
        let skip_every = if flow == Flow::Normal { shared.skip_ack_every.load(Ordering::Relaxed) } else { 0 };
        let mut to_ack = messages.iter().collect::<Vec<_>>();
        if skip_every > 0 {
            to_ack.retain(|m| {
                let id = message_id(m);
                if skipped.contains(&id) {
                    return true;
                }
                first_deliveries += 1;
                !(first_deliveries.is_multiple_of(skip_every) && skipped.insert(id))
            });
        }
        if to_ack.is_empty() {
            continue;
        }
        let entries = to_ack
            .iter()
            .map(|m| v2::AckMessageEntry {
                message_id: message_id(m),
                receipt_handle: receipt_handle(m),
                lite_topic: m.system_properties.as_ref().and_then(|s| s.lite_topic.clone()),
            })
            .collect();
        let (topic, group) = (Some(resource(flow.topic())), Some(resource(flow.group())));
        let request = as_client(flow, v2::AckMessageRequest { group, topic, entries });
        let started = Instant::now();
        let reply = tokio::time::timeout(CALL_DEADLINE, client.ack_message(request)).await;
        let mut history = shared.history.lock().unwrap();
        history.waited(started.elapsed());
        if let Ok(Ok(reply)) = reply {
            for entry in reply.into_inner().entries {
                if code(entry.status.as_ref()) == OK {
                    history.ack_confirmed(&entry.message_id, started);
                }
            }
        }
    }
}

/// Prints the case's line and fails the test when the history breaks the contract.
/// Each kind of stream's acked messages and how many of those arrived (`delivered/acked`)
/// follow the case's own figures, so a kind the fault stopped altogether shows.
fn verdict(case: &str, report: &Report, extra: &str, logs: impl FnOnce() -> String) {
    let kinds: Vec<String> =
        report.by_kind.iter().map(|(kind, c)| format!("{kind} {}/{}", c.delivered, c.acked)).collect();
    println!(
        "faults: {case:<14} {report} {extra} kinds {} transaction-checks-answered {}",
        kinds.join(" "),
        report.checks_answered
    );
    for flow in [Flow::Normal, Flow::Fifo, Flow::Lite, Flow::Delay, Flow::Transactional] {
        let acked = report.by_kind.get(flow.kind()).map_or(0, |c| c.acked);
        assert!(acked > 0, "{case}: no {} send was acknowledged at all\n{}", flow.kind(), logs());
    }
    assert!(report.passed(), "{case}: {report}\n{}", logs());
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill").args([name, &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill {name} {pid}");
}

/// Case 1: the broker SIGKILLed while producers and consumers run, and restarted on the same
/// data directory, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn broker_sigkill() {
    let rounds = scaled(3, 100);
    let mut broker = Broker::start("faults-broker", 2).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    let mut restart_max = Duration::ZERO;
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rand::random_range(300..1500))).await;
        broker.process.kill();
        workload.history().broker_restarted();
        restart_max = restart_max.max(broker.restart().await);
    }
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    let extra = format!("rounds {rounds} restart-max {}ms", restart_max.as_millis());
    verdict("broker-sigkill", &report, &extra, || format!("{}\n{}", broker.process.logs(), proxy.process.logs()));
}

/// A small ext4 file system on a loop device (`mount -o loop`, so root) in a temporary
/// directory: a disk a case can fill.
struct SmallDisk {
    mount: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        run("truncate", &["-s", &format!("{size_mib}M"), path_str(&image)]);
        // -m 0: no blocks reserved for root, so the free space the broker sees is all there is.
        run("mkfs.ext4", &["-q", "-F", "-m", "0", path_str(&image)]);
        run("mount", &["-o", "loop", path_str(&image), path_str(&mount)]);
        SmallDisk { mount, _dir: dir }
    }

    fn available_bytes(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1", path_str(&self.mount)])
            .output()
            .expect("df");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df's available bytes")
    }

    /// Takes all but `left_bytes` of the free space with one file, as another program would;
    /// returns its path.
    fn fill_leaving(&self, left_bytes: u64) -> std::path::PathBuf {
        let ballast = self.mount.join("ballast");
        let size = self.available_bytes().saturating_sub(left_bytes);
        run("fallocate", &["-l", &size.to_string(), path_str(&ballast)]);
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a broker killed just before may still be closing its files.
        let _ = std::process::Command::new("umount").args(["-l", path_str(&self.mount)]).status();
    }
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}; case 2 (disk full) mounts a loop device and needs root\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Case 2: the data directory's file system fills up (another file takes the space), then the
/// space comes back. Meanwhile sends are refused with TOO_MANY_REQUESTS (retryable, never
/// stored), while consumers go on receiving and acking the backlog; then sends resume by
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn disk_full() {
    let full_for = Duration::from_secs(scaled(4, 20).into());
    let disk = SmallDisk::mount(SMALL_DISK_MIB);
    let extra_config = format!("disk_free_min_bytes = {SMALL_DISK_FREE_MIN_BYTES}\n");
    let setup = BrokerSetup {
        data_dir: Some(&disk.mount),
        segment_size_bytes: SMALL_DISK_SEGMENT_BYTES,
        extra_config: &extra_config,
        ..BrokerSetup::default()
    };
    let broker = Broker::start_with("faults-broker", 2, setup).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let logs = || format!("{}\n{}", broker.process.logs(), proxy.process.logs());
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    // A backlog for the consumers to read while the disk is full.
    workload.pause_consumers(true);
    tokio::time::sleep(STEADY).await;

    let ballast = disk.fill_leaving(SMALL_DISK_LEFT_BYTES);
    let filled = workload.progress();
    workload.wait_for("a send refused after the disk filled", |p| p.sends_failed > filled.sends_failed, logs).await;
    // Each shard re-reads the free space within 100 ms; from then on none may store anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    workload.pause_consumers(false);
    let full = workload.progress();
    tokio::time::sleep(full_for).await;
    let still_full = workload.progress();
    assert!(disk.available_bytes() < SMALL_DISK_FREE_MIN_BYTES, "the disk stayed below the broker's floor");
    assert_eq!(still_full.sends_acked, full.sends_acked, "a send was acked while the disk was full\n{}", logs());
    assert!(still_full.sends_failed > full.sends_failed, "sends kept being refused while full\n{}", logs());
    assert!(
        still_full.deliveries > full.deliveries && still_full.acks_confirmed > full.acks_confirmed,
        "consumers made no progress while the disk was full: {full:?} -> {still_full:?}\n{}",
        logs()
    );

    std::fs::remove_file(&ballast).expect("remove the ballast");
    let freed = Instant::now();
    workload
        .wait_for("sends acked again after the space came back", |p| p.sends_acked > still_full.sends_acked, logs)
        .await;
    let resumed = freed.elapsed();
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    let extra = format!(
        "full {}s refused {} delivered-while-full {} resumed-after {}ms",
        full_for.as_secs(),
        still_full.sends_failed - filled.sends_failed,
        still_full.deliveries - full.deliveries,
        resumed.as_millis()
    );
    verdict("disk-full", &report, &extra, logs);
}

/// Case 4: one of two proxies SIGKILLed mid-request, round after round, and started again.
/// Clients move to the other proxy when a call fails; the leases the dead proxy's consumers
/// held expire and their messages come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn proxy_sigkill() {
    let rounds = scaled(2, 20);
    let broker = Broker::start("faults-broker", 2).await;
    let mut proxies = [
        Proxy::start("faults-proxy-a", &[broker.address()]).await,
        Proxy::start("faults-proxy-b", &[broker.address()]).await,
    ];
    let workload = Workload::start(&[proxies[0].grpc, proxies[1].grpc]).await;
    for round in 0..rounds as usize {
        tokio::time::sleep(Duration::from_millis(rand::random_range(500..1500))).await;
        let victim = round % 2;
        proxies[victim].process.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let name = format!("faults-proxy-{}{}", ["a", "b"][victim], round);
        proxies[victim] = Proxy::start(&name, &[broker.address()]).await;
        workload.set_proxy(victim, proxies[victim].grpc);
    }
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    verdict("proxy-sigkill", &report, &format!("rounds {rounds}"), || {
        format!("{}\n{}\n{}", broker.process.logs(), proxies[0].process.logs(), proxies[1].process.logs())
    });
}

/// Case 5: the proxy↔broker link cut (every byte held, nothing closed, as a blackhole route
/// does) and healed, by a relay between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn network_cut() {
    let outage = Duration::from_secs(scaled(5, 30).into());
    let broker = Broker::start("faults-broker", 1).await;
    let relay = Relay::start(broker.address().parse().unwrap()).await.unwrap();
    let proxy = Proxy::start("faults-proxy", &[relay.addr().to_string()]).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    relay.cut();
    tokio::time::sleep(outage).await;
    relay.heal();
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    verdict("network-cut", &report, &format!("outage {}s", outage.as_secs()), || {
        format!("{}\n{}", broker.process.logs(), proxy.process.logs())
    });
}

/// Case 6: the broker frozen (SIGSTOP), then thawed (SIGCONT). The proxy's memory stays bounded
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn broker_freeze() {
    let outage = Duration::from_secs(scaled(5, 10).into());
    let broker = Broker::start("faults-broker", 2).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    let rss_before = rss_bytes(proxy.process.pid());
    signal(broker.process.pid(), "-STOP");
    let frozen = Instant::now();
    let mut rss_peak = rss_before;
    while frozen.elapsed() < outage {
        rss_peak = rss_peak.max(rss_bytes(proxy.process.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(broker.process.pid(), "-CONT");
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    let extra =
        format!("outage {}s proxy-rss {} MiB -> peak {} MiB", outage.as_secs(), rss_before >> 20, rss_peak >> 20);
    verdict("broker-freeze", &report, &extra, || format!("{}\n{}", broker.process.logs(), proxy.process.logs()));
    assert!(rss_peak <= PROXY_RSS_MAX_BYTES, "the proxy grew to {} MiB while the broker was frozen", rss_peak >> 20);
}

/// Case 9: the broker stopped (SIGTERM) and started again, over and over without a pause,
/// under load. Startup time is reported per restart as the log grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn restart_storm() {
    let restarts = scaled(5, 20);
    let mut broker = Broker::start("faults-broker", 2).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    let mut starts = Vec::new();
    for _ in 0..restarts {
        broker.process.terminate();
        let exit = broker.process.wait_exit(STOP_TIMEOUT).await;
        assert!(exit.is_some_and(|e| e.success()), "graceful stop: {exit:?}\n{}", broker.process.logs());
        workload.history().broker_restarted();
        starts.push(broker.restart().await);
    }
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    let ms = |d: &Duration| d.as_millis();
    let extra = format!(
        "restarts {restarts} start first {}ms last {}ms max {}ms",
        starts.first().map_or(0, ms),
        starts.last().map_or(0, ms),
        starts.iter().map(ms).max().unwrap_or(0)
    );
    verdict("restart-storm", &report, &extra, || format!("{}\n{}", broker.process.logs(), proxy.process.logs()));
}

/// libfaketime (`scripts/setup.sh` installs it): preloaded into a process, it shifts the wall
/// clock by the offset in a file, re-read at every call (its cache, timed by the shifted clock,
/// would miss a step back), and leaves the monotonic clock alone,
/// as when NTP steps a machine's clock.
const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
const CLOCK_PROBE_TOPIC: &str = "faults-clock-probe";
const CLOCK_PROBE_GROUP: &str = "faults-clock-probe";
/// The clock case's consumers leave one first delivery in this many unacked.
const SKIP_ACK_EVERY: u64 = 50;

/// The wall clock of the processes started with `env()`, stepped by `step_to`.
struct SteppedClock {
    dir: tempfile::TempDir,
}

impl SteppedClock {
    fn new() -> SteppedClock {
        assert!(
            std::path::Path::new(FAKETIME_LIBRARY).exists(),
            "{FAKETIME_LIBRARY} is missing: install libfaketime (scripts/setup.sh does)"
        );
        let clock = SteppedClock { dir: tempfile::tempdir().expect("tempdir") };
        clock.step_to(0);
        clock
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.path().join("faketime")
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", FAKETIME_LIBRARY.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file().display().to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
            ("FAKETIME_NO_CACHE", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Sets the wall clock `offset_secs` from the real one (libfaketime's relative format).
    fn step_to(&self, offset_secs: i64) {
        std::fs::write(self.file(), format!("{offset_secs:+}\n")).expect("write the faketime file");
    }

    /// How far the wall clock of a process started with `env()` is from the real one now, in
    /// seconds (`date +%s` under the same environment).
    fn offset_secs(&self) -> i64 {
        let out = std::process::Command::new("date").arg("+%s").envs(self.env()).output().expect("run date");
        let faked: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("date +%s");
        let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        faked - real
    }
}

/// Whether libfaketime is loaded into the process.
fn runs_faketime(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.contains("libfaketime"))
}

/// The store time the broker gives a message sent now, minus the real time (ms): its clock's
/// offset. The probe is received and acked, so the next call reads the next one.
async fn broker_clock_offset_ms(proxy: SocketAddr) -> i64 {
    let group = CLOCK_PROBE_GROUP;
    let mut client = messaging(proxy).await;
    let request = v2::SendMessageRequest { messages: vec![message(CLOCK_PROBE_TOPIC, b"what time is it".to_vec())] };
    let reply = bounded("probe send", client.send_message(request)).await.expect("probe send").into_inner();
    assert_eq!(code(reply.status.as_ref()), OK, "probe send: {:?}", reply.status);
    let request = receive_request(CLOCK_PROBE_TOPIC, group, 0, 1, INVISIBLE, Duration::from_secs(5));
    let received = bounded("probe receive", receive_stream(&mut client, tonic::Request::new(request))).await;
    let received = received.expect("probe receive");
    let probe = received.messages.first().expect("the probe came back");
    let stored = probe.system_properties.as_ref().and_then(|p| p.store_timestamp).expect("a store timestamp");
    let entry =
        v2::AckMessageEntry { message_id: message_id(probe), receipt_handle: receipt_handle(probe), lite_topic: None };
    let ack = v2::AckMessageRequest {
        group: Some(resource(group)),
        topic: Some(resource(CLOCK_PROBE_TOPIC)),
        entries: vec![entry],
    };
    let reply = bounded("probe ack", client.ack_message(ack)).await.expect("probe ack").into_inner();
    assert_eq!(code(reply.status.as_ref()), OK, "probe ack: {:?}", reply.status);
    let real_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    stored.seconds * 1000 + i64::from(stored.nanos / 1_000_000) - real_ms
}

/// Case 8: the wall clock of the broker and the proxy steps an hour forward, back, then an hour
/// back for good, while producers and consumers run and the consumers leave one message in
/// `SKIP_ACK_EVERY` unacked. Leases must keep their lengths: every message left unacked comes
/// back after its invisible time, including those leased just before the step back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn clock_step() {
    let hold = Duration::from_secs(scaled(4, 15).into());
    let clock = SteppedClock::new();
    let setup = BrokerSetup { env: clock.env(), ..BrokerSetup::default() };
    let broker = Broker::start_with("faults-broker", 2, setup).await;
    let proxy = Proxy::start_with_env("faults-proxy", &[broker.address()], "", &clock.env()).await;
    let logs = || format!("{}\n{}", broker.process.logs(), proxy.process.logs());
    assert!(runs_faketime(broker.process.pid()) && runs_faketime(proxy.process.pid()), "libfaketime is not loaded");
    create_typed_topic(proxy.grpc, CLOCK_PROBE_TOPIC, v2::MessageType::Normal, 1).await;
    create_group(proxy.grpc, CLOCK_PROBE_GROUP, DELIVERY_ATTEMPTS_MAX, false).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    workload.shared.skip_ack_every.store(SKIP_ACK_EVERY, Ordering::Relaxed);
    tokio::time::sleep(STEADY).await;
    let mut offsets = Vec::new();
    for offset_secs in [3600i64, 0, -3600] {
        clock.step_to(offset_secs);
        // libfaketime re-reads the file within a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let wall_offset = clock.offset_secs();
        assert!((wall_offset - offset_secs).abs() < 60, "libfaketime shows {wall_offset} s, not {offset_secs} s");
        // The broker's store times (and so its leases and timers) keep to its own timeline.
        let store_offset_ms = broker_clock_offset_ms(proxy.grpc).await;
        assert!(store_offset_ms.abs() < 60_000, "the broker's clock stepped with the wall clock: {store_offset_ms} ms");
        offsets.push(store_offset_ms);
        tokio::time::sleep(hold).await;
    }
    let (report, unacked) = workload.finish_acked().await;
    let extra =
        format!("steps +1h,0,-1h (store-time offset {offsets:?} ms) hold {}s unacked {unacked}", hold.as_secs());
    verdict("clock-step", &report, &extra, logs);
    assert_eq!(
        unacked,
        0,
        "{unacked} messages left unacked never came back: their leases outlived the clock step\n{}",
        logs()
    );
}

/// The slow-consumer case's backlog: messages sent while the consumers are paused.
fn backlog_messages() -> u64 {
    u64::from(scaled(100_000, 1_000_000))
}
/// Concurrent batched senders that build the backlog, and messages per SendMessage.
const BACKLOG_SENDERS: usize = 4;
const BACKLOG_BATCH: u64 = 128;
/// How long the consumers get to drain the whole backlog.
const BACKLOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// Peak resident memory the broker may reach while it holds and drains the backlog.
const BROKER_RSS_MAX_BYTES: u64 = 1 << 30;

/// Sends `count` messages to the normal topic in batches from one task, recording each.
async fn fill_backlog(shared: Arc<Shared>, sender: usize, count: u64) {
    let producer = 100 + sender;
    let mut client = lazy_client(shared.proxy(0));
    let mut seq = 0u64;
    while seq < count {
        let batch: Vec<(v2::Message, Vec<u8>)> = (seq..count.min(seq + BACKLOG_BATCH))
            .map(|s| {
                let body = body(producer, s);
                (message(TOPIC, body.clone()), body)
            })
            .collect();
        {
            let mut history = shared.history.lock().unwrap();
            for (m, body) in &batch {
                history.send_started(Flow::Normal.kind(), &message_id(m), None, body);
            }
        }
        let ids: Vec<String> = batch.iter().map(|(m, _)| message_id(m)).collect();
        let request = v2::SendMessageRequest { messages: batch.into_iter().map(|(m, _)| m).collect() };
        let started = Instant::now();
        let reply = tokio::time::timeout(CALL_DEADLINE, client.send_message(request)).await;
        let mut history = shared.history.lock().unwrap();
        history.waited(started.elapsed());
        let entries = match reply {
            Ok(Ok(reply)) => reply.into_inner().entries,
            _ => Vec::new(),
        };
        for (i, id) in ids.iter().enumerate() {
            let acked = entries.get(i).is_some_and(|e| e.message_id == *id && code(e.status.as_ref()) == OK);
            history.send_finished(id, if acked { SendOutcome::Acked } else { SendOutcome::Unknown });
        }
        seq += ids.len() as u64;
    }
}

/// Case 7: a slow consumer. The consumers stop while batched senders pile up a backlog (1M
/// messages; 100k in the short run) beside the usual producers, then drain it. The broker's
/// memory must stay bounded throughout, and every acked message must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn slow_consumer() {
    let broker = Broker::start("faults-broker", 2).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let logs = || format!("{}\n{}", broker.process.logs(), proxy.process.logs());
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    workload.pause_consumers(true);
    let pid = broker.process.pid();
    let rss_before = rss_bytes(pid);
    let per_sender = backlog_messages() / BACKLOG_SENDERS as u64;
    let filling = Instant::now();
    let senders: Vec<_> = (0..BACKLOG_SENDERS)
        .map(|sender| tokio::spawn(fill_backlog(workload.shared.clone(), sender, per_sender)))
        .collect();
    let mut rss_peak = rss_before;
    while senders.iter().any(|s| !s.is_finished()) {
        rss_peak = rss_peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sender in senders {
        sender.await.expect("backlog sender");
    }
    let filled_in = filling.elapsed();
    let rss_full = rss_bytes(pid);
    workload.pause_consumers(false);
    let draining = Instant::now();
    let watch = {
        let shared = workload.shared.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while shared.consuming.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        })
    };
    let report = workload.finish_within(BACKLOG_DRAIN_TIMEOUT, |h| h.drained()).await;
    let drained_in = draining.elapsed();
    rss_peak = rss_peak.max(watch.await.expect("rss watch"));
    let extra = format!(
        "backlog {} in {:.0}s drained in {:.0}s broker-rss {} MiB -> {} MiB full, peak {} MiB",
        per_sender * BACKLOG_SENDERS as u64,
        filled_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        rss_before >> 20,
        rss_full >> 20,
        rss_peak >> 20
    );
    verdict("slow-consumer", &report, &extra, logs);
    assert!(rss_peak <= BROKER_RSS_MAX_BYTES, "the broker grew to {} MiB with the backlog", rss_peak >> 20);
}

/// Case 3: fdatasync fails. The broker's real segment store is told to fail every sync while a
/// file exists (`SLUICE_FAULT_SYNC_FAILS_WHILE`); the case creates it under load, checks that
/// nothing is acked meanwhile (an append is acked only after its sync), removes it, and restarts
/// the broker, whose shards stopped writing as designed. Every acked message must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the fault suite: scripts/faults.sh"]
async fn sync_failure() {
    let failing_for = Duration::from_secs(scaled(3, 10).into());
    let trigger_dir = tempfile::tempdir().expect("tempdir");
    let trigger = trigger_dir.path().join("fail-syncs");
    let env = vec![(sluice_engine::segment::SYNC_FAULT_ENV.to_string(), trigger.display().to_string())];
    let mut broker = Broker::start_with("faults-broker", 2, BrokerSetup { env, ..BrokerSetup::default() }).await;
    let proxy = Proxy::start("faults-proxy", &[broker.address()]).await;
    let workload = Workload::start(&[proxy.grpc]).await;
    tokio::time::sleep(STEADY).await;
    std::fs::write(&trigger, b"").expect("create the trigger file");
    // Appends already synced may still be answered in the first moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked_at_start = workload.progress().sends_acked;
    tokio::time::sleep(failing_for).await;
    let acked_while_failing = workload.progress().sends_acked - acked_at_start;
    let failure_logged = broker.process.logs().contains("injected fdatasync failure");
    std::fs::remove_file(&trigger).expect("remove the trigger file");
    broker.process.kill();
    workload.history().broker_restarted();
    let restart = broker.restart().await;
    tokio::time::sleep(STEADY).await;
    let report = workload.finish().await;
    let extra = format!(
        "failing {}s acked-while-failing {acked_while_failing} restart {}ms",
        failing_for.as_secs(),
        restart.as_millis()
    );
    let logs = || format!("{}\n{}", broker.process.logs(), proxy.process.logs());
    verdict("sync-failure", &report, &extra, logs);
    assert!(failure_logged, "the broker did not log the injected fdatasync failure\n{}", logs());
    assert_eq!(acked_while_failing, 0, "sends were acked while every fdatasync failed\n{}", logs());
}
