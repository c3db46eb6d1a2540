//! A fuzzing pass over the proxy's client endpoints, through the real service: proptest makes
//! request bodies for every gRPC method (RocketMQ v2 and Sluice admin) from valid requests,
//! truncated, with bytes overwritten or inserted, or replaced by random bytes; fixed cases add a
//! body over the decode limit and deeply nested groups; and the HTTP port gets random methods,
//! paths, headers and bodies. They go to a running `sluice local` over real sockets. Every call
//! must be answered (a gRPC status, or an HTTP status line), the process must stay up with its
//! peak memory bounded and nothing in its log may say it panicked, and normal traffic must work
//! afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use sluice_proxy::pb::apache::rocketmq::v2;
use sluice_proxy::pb::sluice::admin::v1 as admin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::common::*;

/// Cases proptest runs against the gRPC port, and against the HTTP port.
const GRPC_CASES: u32 = 1500;
const HTTP_CASES: u32 = 400;
/// The proxy's decode limit in this test (small, so the oversize case is cheap).
const GRPC_MAX_REQUEST_BYTES: usize = 1 << 20;
/// One call's bound: long enough for any answer, short enough that a hang fails the test.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Peak resident memory the process may reach over the whole pass.
const PEAK_RSS_MAX_BYTES: u64 = 1 << 30;
const TOPIC: &str = "fuzzed";
const LITE_TOPIC: &str = "fuzzed-lite";
const GROUP: &str = "fuzzers";

/// Request bytes as they are: the fuzzer's bodies go on the wire unchanged, and answers are
/// kept as bytes (only whether one came matters).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

fn queue(topic: &str) -> Option<v2::MessageQueue> {
    Some(v2::MessageQueue { topic: Some(resource(topic)), id: 0, ..Default::default() })
}

/// Every gRPC method with a valid request to mutate.
fn methods() -> Vec<(&'static str, Vec<u8>)> {
    let group = Some(resource(GROUP));
    let topic = Some(resource(TOPIC));
    let handle = "not-a-handle".to_string();
    let m = "/apache.rocketmq.v2.MessagingService/";
    let a = "/sluice.admin.v1.Admin/";
    let settings = v2::Settings {
        client_type: Some(v2::ClientType::Producer as i32),
        pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
            topics: vec![resource(TOPIC)],
            ..Default::default()
        })),
        ..Default::default()
    };
    let seeds: Vec<(String, Vec<u8>)> = vec![
        (format!("{m}QueryRoute"), v2::QueryRouteRequest { topic: topic.clone(), endpoints: None }.encode_to_vec()),
        (format!("{m}Heartbeat"), v2::HeartbeatRequest { group: group.clone(), client_type: 3 }.encode_to_vec()),
        (
            format!("{m}SendMessage"),
            v2::SendMessageRequest { messages: vec![message(TOPIC, b"x".to_vec())] }.encode_to_vec(),
        ),
        (
            format!("{m}QueryAssignment"),
            v2::QueryAssignmentRequest { topic: topic.clone(), group: group.clone(), endpoints: None }.encode_to_vec(),
        ),
        (
            format!("{m}ReceiveMessage"),
            v2::ReceiveMessageRequest {
                group: group.clone(),
                message_queue: queue(TOPIC),
                batch_size: 4,
                long_polling_timeout: Some(prost_types::Duration { seconds: 0, nanos: 100_000_000 }),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            format!("{m}AckMessage"),
            v2::AckMessageRequest {
                group: group.clone(),
                topic: topic.clone(),
                entries: vec![v2::AckMessageEntry {
                    message_id: "id".into(),
                    receipt_handle: handle.clone(),
                    lite_topic: None,
                }],
            }
            .encode_to_vec(),
        ),
        (
            format!("{m}ForwardMessageToDeadLetterQueue"),
            v2::ForwardMessageToDeadLetterQueueRequest {
                group: group.clone(),
                topic: topic.clone(),
                receipt_handle: handle.clone(),
                message_id: "id".into(),
                delivery_attempt: 2,
                max_delivery_attempts: 3,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            format!("{m}PullMessage"),
            v2::PullMessageRequest { group: group.clone(), ..Default::default() }.encode_to_vec(),
        ),
        (
            format!("{m}UpdateOffset"),
            v2::UpdateOffsetRequest { group: group.clone(), message_queue: queue(TOPIC), offset: 3 }.encode_to_vec(),
        ),
        (
            format!("{m}GetOffset"),
            v2::GetOffsetRequest { group: group.clone(), message_queue: queue(TOPIC) }.encode_to_vec(),
        ),
        (
            format!("{m}QueryOffset"),
            v2::QueryOffsetRequest { message_queue: queue(TOPIC), ..Default::default() }.encode_to_vec(),
        ),
        (
            format!("{m}EndTransaction"),
            v2::EndTransactionRequest {
                topic: topic.clone(),
                message_id: "id".into(),
                transaction_id: "tx".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            format!("{m}Telemetry"),
            v2::TelemetryCommand { status: None, command: Some(v2::telemetry_command::Command::Settings(settings)) }
                .encode_to_vec(),
        ),
        (
            format!("{m}NotifyClientTermination"),
            v2::NotifyClientTerminationRequest { group: group.clone() }.encode_to_vec(),
        ),
        (
            format!("{m}ChangeInvisibleDuration"),
            v2::ChangeInvisibleDurationRequest {
                group: group.clone(),
                topic: topic.clone(),
                receipt_handle: handle.clone(),
                invisible_duration: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
                message_id: "id".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            format!("{m}RecallMessage"),
            v2::RecallMessageRequest { topic: topic.clone(), recall_handle: handle.clone() }.encode_to_vec(),
        ),
        (
            format!("{m}SyncLiteSubscription"),
            v2::SyncLiteSubscriptionRequest {
                topic: Some(resource(LITE_TOPIC)),
                group: group.clone(),
                lite_topic_set: vec!["session-1".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            format!("{a}CreateTopic"),
            admin::CreateTopicRequest {
                name: "fuzz-created".into(),
                message_type: 1,
                queue_count: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (format!("{a}ListTopics"), admin::ListTopicsRequest {}.encode_to_vec()),
        (format!("{a}DeleteTopic"), admin::DeleteTopicRequest { name: "fuzz-created".into() }.encode_to_vec()),
        (format!("{a}GetStats"), admin::GetStatsRequest {}.encode_to_vec()),
        (
            format!("{a}CreateGroup"),
            admin::CreateGroupRequest { name: "fuzz-group".into(), max_delivery_attempts: 3, ..Default::default() }
                .encode_to_vec(),
        ),
        (format!("{a}ListGroups"), admin::ListGroupsRequest {}.encode_to_vec()),
        (format!("{a}DeleteGroup"), admin::DeleteGroupRequest { name: "fuzz-group".into() }.encode_to_vec()),
        (
            format!("{a}UpdateGroup"),
            admin::UpdateGroupRequest { name: GROUP.into(), max_receive_tps: Some(5), ..Default::default() }
                .encode_to_vec(),
        ),
        (
            format!("{a}UpdateTopic"),
            admin::UpdateTopicRequest { name: TOPIC.into(), max_send_tps: Some(100_000), ..Default::default() }
                .encode_to_vec(),
        ),
        (
            format!("{a}GetMessage"),
            admin::GetMessageRequest { topic: TOPIC.into(), message_id: "id".into() }.encode_to_vec(),
        ),
        (
            format!("{a}FindMessages"),
            admin::FindMessagesRequest { topic: TOPIC.into(), key: "k".into(), limit: 8 }.encode_to_vec(),
        ),
        (
            format!("{a}ResetGroup"),
            admin::ResetGroupRequest {
                group: GROUP.into(),
                topic: TOPIC.into(),
                to: Some(admin::reset_group_request::To::Offset(0)),
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            format!("{a}SetAclRule"),
            admin::SetAclRuleRequest {
                access_key: "k".into(),
                resource: "topic:t*".into(),
                allow: vec!["pub".into()],
                deny: vec![],
            }
            .encode_to_vec(),
        ),
        (format!("{a}ListAclRules"), admin::ListAclRulesRequest { access_key: String::new() }.encode_to_vec()),
        (
            format!("{a}RemoveAclRules"),
            admin::RemoveAclRulesRequest { access_key: "k".into(), resource: String::new() }.encode_to_vec(),
        ),
    ];
    seeds.into_iter().map(|(path, body)| (&*Box::leak(path.into_boxed_str()), body)).collect()
}

/// How a case changes its method's valid request.
#[derive(Debug, Clone)]
enum Mutation {
    /// The request unchanged (the service's own answer to a valid call).
    Valid,
    /// Cut at this fraction of its length (protobuf fields end mid-way).
    Truncate(f64),
    /// Bytes overwritten at fractions of its length.
    Overwrite(Vec<(f64, u8)>),
    /// Bytes inserted at a fraction of its length (lengths and tags stop matching).
    Insert(f64, Vec<u8>),
    /// Replaced by random bytes.
    Random(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => Just(Mutation::Valid),
        2 => (0.0..1.0f64).prop_map(Mutation::Truncate),
        5 => prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..4).prop_map(Mutation::Overwrite),
        2 => (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        2 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Mutation::Random),
    ]
}

fn at(fraction: f64, len: usize) -> usize {
    ((fraction * len as f64) as usize).min(len.saturating_sub(1))
}

fn apply(seed: &[u8], mutation: &Mutation) -> Vec<u8> {
    let mut body = seed.to_vec();
    match mutation {
        Mutation::Valid => {}
        Mutation::Truncate(f) => body.truncate(at(*f, body.len())),
        Mutation::Overwrite(edits) => {
            for (f, byte) in edits {
                if !body.is_empty() {
                    let i = at(*f, body.len());
                    body[i] = *byte;
                }
            }
        }
        Mutation::Insert(f, bytes) => {
            let i = at(*f, body.len() + 1);
            body.splice(i..i, bytes.iter().copied());
        }
        Mutation::Random(bytes) => body = bytes.clone(),
    }
    body
}

/// What one call came to.
#[derive(Debug)]
enum Outcome {
    /// Every response message and the trailers arrived.
    Answered,
    /// A gRPC status other than OK (tonic's decode errors included).
    Refused(tonic::Code),
}

/// Sends `body` to `path` as a one-message stream (the same bytes on the wire as a unary call)
/// and reads the whole answer.
async fn call(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<Outcome, String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let exchange = async {
        grpc.ready().await.map_err(|e| format!("channel not ready: {e}"))?;
        let request = tonic::Request::new(futures::stream::iter([body]));
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let mut stream = match grpc.streaming(request, path, RawCodec).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Ok(Outcome::Refused(status.code())),
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(Outcome::Answered),
                Err(status) => return Ok(Outcome::Refused(status.code())),
            }
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{path}: no answer within {CALL_TIMEOUT:?}"))?
}

/// A status that means the server did not answer the call itself: its connection or handler died.
fn lost(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Refused(tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled))
}

/// Unknown-field groups nested `depth` deep: prost must refuse them, not recurse until the stack ends.
fn nested_groups(depth: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(depth * 4);
    // Field 2047, wire type 3 (start group) and 4 (end group), as varints.
    let start = [0xfb, 0x7f];
    let end = [0xfc, 0x7f];
    (0..depth).for_each(|_| body.extend_from_slice(&start));
    (0..depth).for_each(|_| body.extend_from_slice(&end));
    body
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value");
    kib * 1024
}

#[derive(Debug, Clone)]
struct HttpCase {
    method: &'static str,
    path: String,
    last_event_id: Option<String>,
    body: Vec<u8>,
}

fn http_case() -> impl Strategy<Value = HttpCase> {
    let segment = prop_oneof![
        Just(LITE_TOPIC.to_string()),
        Just(TOPIC.to_string()),
        "[a-zA-Z0-9_%.-]{0,40}",
        "[ -~]{0,300}".prop_map(|s| s.replace([' ', '#', '?'], "%20")),
    ];
    let path = prop_oneof![
        (segment.clone(), segment.clone()).prop_map(|(t, l)| format!("/v1/lite/{t}/{l}/events")),
        (segment.clone(), segment.clone(), "[a-z=&0-9]{0,30}")
            .prop_map(|(t, l, q)| format!("/v1/lite/{t}/{l}/messages?{q}")),
        (segment.clone(), "[a-z_=&0-9]{0,40}").prop_map(|(t, q)| format!("/v1/request/{t}?{q}")),
        Just("/healthz".to_string()),
        Just("/metrics".to_string()),
        "/[ -~]{0,200}".prop_map(|s| s.replace([' ', '#'], "%20")),
    ];
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "OPTIONS", "BREW"]),
        path,
        prop::option::of("[ -~]{0,30}"),
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(method, path, last_event_id, body)| HttpCase { method, path, last_event_id, body })
}

/// Sends one HTTP/1.1 request and returns the status code of the answer (streams are cut after it).
async fn http_call(addr: SocketAddr, case: &HttpCase) -> Result<u16, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n", case.method, case.path);
        if let Some(id) = &case.last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", case.body.len()));
        stream.write_all(head.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        stream.write_all(&case.body).await.map_err(|e| format!("write body: {e}"))?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed without an answer after {} bytes", answer.len()));
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&answer);
        line.strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {line:?}"))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange).await.map_err(|_| "no answer in time".to_string())?
}

#[test]
fn fuzzed_grpc_and_http_requests_never_take_the_proxy_down() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Short long polls: a mutated receive may ask for any wait, and the proxy caps it here.
    let config = format!(
        "[proxy]\ngrpc_max_request_bytes = {GRPC_MAX_REQUEST_BYTES}\nmax_body_bytes = 262144\n\
         long_poll_default_ms = 500\nlong_poll_max_ms = 2000\n"
    );
    let mut local = runtime.block_on(Local::start_with_config(&config, &[]));
    let (grpc_addr, http_addr) = (local.grpc, local.http);
    let channel = runtime.block_on(async {
        create_topic(grpc_addr, TOPIC, 2).await;
        create_typed_topic(grpc_addr, LITE_TOPIC, v2::MessageType::Lite, 2).await;
        channel(grpc_addr).await
    });
    let methods = methods();

    // Fixed cases first: over the decode limit, and nesting deeper than prost allows.
    runtime.block_on(async {
        let oversize = vec![0x0a; GRPC_MAX_REQUEST_BYTES + 1];
        let outcome = call(&channel, methods[2].0, oversize).await.expect("oversize SendMessage");
        assert!(
            matches!(outcome, Outcome::Refused(tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)),
            "{outcome:?}"
        );
        for (path, _) in &methods {
            let outcome = call(&channel, path, nested_groups(100_000)).await.expect("nested groups");
            assert!(!lost(&outcome), "{path} with nested groups: {outcome:?}");
        }
    });

    // How the calls ended: answered by the service, or refused (by tonic's decoder or a status).
    let tally = std::cell::RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    let mut runner = TestRunner::new(Config { cases: GRPC_CASES, failure_persistence: None, ..Config::default() });
    let strategy = (0..methods.len(), mutation());
    runner
        .run(&strategy, |(index, mutation)| {
            let (path, seed) = &methods[index];
            let body = apply(seed, &mutation);
            let outcome = runtime.block_on(call(&channel, path, body)).map_err(TestCaseError::fail)?;
            prop_assert!(!lost(&outcome), "{} with {:?}: {:?}", path, mutation, outcome);
            let key = match outcome {
                Outcome::Answered => "answered".to_string(),
                Outcome::Refused(code) => format!("{code:?}"),
            };
            *tally.borrow_mut().entry(key).or_default() += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("gRPC fuzzing: {e}\n{}", local.process.logs()));

    let http_tally = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    let mut runner = TestRunner::new(Config { cases: HTTP_CASES, failure_persistence: None, ..Config::default() });
    runner
        .run(&http_case(), |case| {
            let status = runtime.block_on(http_call(http_addr, &case)).map_err(TestCaseError::fail)?;
            prop_assert!((200..600).contains(&status), "{:?} answered {}", case, status);
            *http_tally.borrow_mut().entry(status).or_default() += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("HTTP fuzzing: {e}\n{}", local.process.logs()));

    // Still up, memory bounded, nothing panicked, and ordinary traffic still works.
    assert!(local.process.is_alive(), "sluice exited during fuzzing:\n{}", local.process.logs());
    let peak = peak_rss_bytes(local.process.pid());
    assert!(peak < PEAK_RSS_MAX_BYTES, "peak RSS {peak} bytes over the {PEAK_RSS_MAX_BYTES}-byte bound");
    assert!(!local.process.logs().contains("panicked"), "a panic was logged:\n{}", local.process.logs());
    runtime.block_on(async {
        // A topic of its own: the fuzzed admin calls may have changed the others' quotas.
        create_topic(grpc_addr, "after-fuzzing", 2).await;
        let mut client = messaging(grpc_addr).await;
        let request = v2::SendMessageRequest { messages: vec![message("after-fuzzing", b"after fuzzing".to_vec())] };
        let reply =
            bounded("SendMessage", client.send_message(request)).await.expect("send after fuzzing").into_inner();
        assert_eq!(code(reply.status.as_ref()), v2::Code::Ok as i32, "send after fuzzing: {:?}", reply.status);
    });
    println!(
        "fuzzing pass: {GRPC_CASES} gRPC cases {:?}; {HTTP_CASES} HTTP cases by status {:?}; peak RSS {} MiB",
        tally.borrow(),
        http_tally.borrow(),
        peak >> 20
    );
    let answered = tally.borrow().get("answered").copied().unwrap_or(0);
    assert!(answered > GRPC_CASES / 5, "only {answered} gRPC cases reached a handler: the seeds do not decode");
}
