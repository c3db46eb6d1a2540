//! OpenTelemetry traces: a real `sluice local` exports over OTLP HTTP/protobuf to a receiver in
//! this test process, and one send → receive → ack must come out as spans that are joined to the
//! producer's and the consumer's traces, with the messaging semantic-convention attributes.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tonic::metadata::MetadataValue;

const OK: i32 = v2::Code::Ok as i32;
/// The batch exporter sends every 5 s by default; this leaves room for a slow machine.
const EXPORT_WAIT: Duration = Duration::from_secs(40);

/// The spans an OTLP receiver was sent, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    requests: Arc<Mutex<u32>>,
}

async fn export(State(received): State<Received>, body: Bytes) -> impl axum::response::IntoResponse {
    let request = ExportTraceServiceRequest::decode(body.as_ref()).expect("an OTLP trace export request");
    *received.requests.lock().expect("lock") += 1;
    let mut spans = received.spans.lock().expect("lock");
    for resource in request.resource_spans {
        let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
        let service = attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
        }
    }
    ([(CONTENT_TYPE, "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
}

/// An OTLP/HTTP receiver on a free port: its base URL and what it collects.
async fn otlp_receiver() -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new().route("/v1/traces", post(export)).with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("receiver address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("OTLP receiver") });
    (format!("http://{addr}"), received)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn assert_attributes(span: &Span, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(
            attribute(span, key).as_deref(),
            Some(*value),
            "{key} of span {:?}: {:?}",
            span.name,
            span.attributes
        );
    }
}

fn links_to(span: &Span, trace_id: &[u8], span_id: &[u8]) -> bool {
    span.links.iter().any(|l| l.trace_id == trace_id && l.span_id == span_id)
}

/// A W3C traceparent with random ids, and those ids as bytes.
fn new_traceparent() -> (String, Vec<u8>, Vec<u8>) {
    let trace: [u8; 16] = rand::random();
    let span: [u8; 8] = rand::random();
    let (trace, span) = (trace.map(|b| b | 1), span.map(|b| b | 1));
    (format!("00-{}-{}-01", hex::encode(trace), hex::encode(span)), trace.to_vec(), span.to_vec())
}

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("traceparent", MetadataValue::try_from(traceparent).expect("ascii"));
    request
}

/// Waits until the receiver holds a span matching `find`.
async fn wait_for_span(received: &Received, what: &str, find: impl Fn(&Span) -> bool, local: &Local) -> Span {
    let deadline = Instant::now() + EXPORT_WAIT;
    loop {
        if let Some((_, span)) = received.spans.lock().expect("lock").iter().find(|(_, s)| find(s)) {
            return span.clone();
        }
        if Instant::now() > deadline {
            let names: Vec<String> = received.spans.lock().expect("lock").iter().map(|(_, s)| s.name.clone()).collect();
            panic!("no {what} span within {EXPORT_WAIT:?}; spans seen: {names:?}\n{}", local.process.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn send_receive_and_ack_export_linked_spans_with_messaging_attributes() {
    let (collector, received) = otlp_receiver().await;
    let local = Local::start_with(&["--otlp-endpoint", &collector]).await;
    create_topic(local.grpc, "traced", 2).await;
    let mut client = messaging(local.grpc).await;

    // A producer that sampled its trace out: its sampled flag is off, so no span may join it.
    let (unsampled, unsampled_trace, _) = new_traceparent();
    let unsampled = format!("{}-00", unsampled.strip_suffix("-01").expect("sampled flag"));
    create_topic(local.grpc, "quiet", 1).await;
    let mut quiet = message("quiet", b"not sampled".to_vec());
    quiet.system_properties.as_mut().expect("system properties").trace_context = Some(unsampled);
    let reply = client.send_message(v2::SendMessageRequest { messages: vec![quiet] }).await.expect("send").into_inner();
    assert_eq!(code(reply.status.as_ref()), OK, "{:?}", reply.status);

    // The producer's span, as a RocketMQ client's OpenTelemetry instrumentation records it.
    let (producer, producer_trace, producer_span) = new_traceparent();
    let mut sent = message("traced", b"hello traces".to_vec());
    let system = sent.system_properties.as_mut().expect("system properties");
    system.trace_context = Some(producer.clone());
    system.tag = Some("tag-a".into());
    let id = message_id(&sent);
    let reply = client.send_message(v2::SendMessageRequest { messages: vec![sent] }).await.expect("send").into_inner();
    assert_eq!(code(reply.status.as_ref()), OK, "{:?}", reply.status);

    // The consumer's own trace arrives as gRPC metadata.
    let (consumer, consumer_trace, consumer_span) = new_traceparent();
    let request = receive_request("traced", "g", 0, 8, Duration::from_secs(30), Duration::from_secs(10));
    let got = receive_with(&mut client, with_traceparent(request, &consumer)).await.expect("receive");
    assert_eq!(got.messages.len(), 1, "{:?}", got.statuses);
    let delivered = &got.messages[0];
    let delivered_context = delivered.system_properties.as_ref().and_then(|s| s.trace_context.clone());
    assert_eq!(delivered_context.as_deref(), Some(producer.as_str()), "the client's traceparent must be kept");

    let ack = v2::AckMessageRequest {
        group: Some(resource("g")),
        topic: Some(resource("traced")),
        entries: vec![v2::AckMessageEntry {
            message_id: id.clone(),
            receipt_handle: receipt_handle(delivered),
            lite_topic: None,
        }],
    };
    let acked = client.ack_message(with_traceparent(ack, &consumer)).await.expect("ack").into_inner();
    assert_eq!(code(acked.status.as_ref()), OK, "{:?}", acked.status);

    // Send: a child of the producer's span.
    let send = wait_for_span(&received, "send", |s| s.name == "send traced", &local).await;
    assert_eq!(send.kind, SpanKind::Server as i32);
    assert_eq!(send.trace_id, producer_trace, "the send span joins the producer's trace");
    assert_eq!(send.parent_span_id, producer_span, "the send span's parent is the producer's span");
    assert_attributes(
        &send,
        &[
            ("messaging.system", "rocketmq"),
            ("messaging.operation.type", "send"),
            ("messaging.operation.name", "send"),
            ("messaging.destination.name", "traced"),
            ("messaging.message.id", &id),
            ("messaging.message.body.size", "12"),
            ("messaging.rocketmq.message.type", "normal"),
            ("messaging.rocketmq.message.tag", "tag-a"),
        ],
    );
    // The broker hop under it.
    let append = wait_for_span(
        &received,
        "broker append",
        |s| s.name == "broker Append" && s.parent_span_id == send.span_id,
        &local,
    )
    .await;
    assert_eq!(append.kind, SpanKind::Client as i32);
    assert_eq!(append.trace_id, producer_trace);
    assert_attributes(&append, &[("rpc.system", "sluice"), ("rpc.method", "Append"), ("sluice.transport", "tcp")]);

    // Receive: a child of the consumer's span, linked to the producer's.
    let receive =
        wait_for_span(&received, "receive", |s| s.name == "receive traced" && !s.links.is_empty(), &local).await;
    assert_eq!(receive.trace_id, consumer_trace, "the receive span joins the consumer's trace");
    assert_eq!(receive.parent_span_id, consumer_span);
    assert!(links_to(&receive, &producer_trace, &producer_span), "receive links to the message: {:?}", receive.links);
    assert_attributes(
        &receive,
        &[
            ("messaging.system", "rocketmq"),
            ("messaging.operation.type", "receive"),
            ("messaging.destination.name", "traced"),
            ("messaging.consumer.group.name", "g"),
            ("messaging.rocketmq.consumer_group", "g"),
            ("messaging.batch.message_count", "1"),
            ("messaging.message.id", &id),
        ],
    );
    let pop = wait_for_span(
        &received,
        "broker pop",
        |s| s.name == "broker Pop" && s.parent_span_id == receive.span_id,
        &local,
    )
    .await;
    assert_eq!(pop.trace_id, consumer_trace);

    // Ack: a child of the consumer's span, linked to the producer's through the receipt handle.
    let ack = wait_for_span(&received, "ack", |s| s.name == "ack traced", &local).await;
    assert_eq!(ack.trace_id, consumer_trace);
    assert_eq!(ack.parent_span_id, consumer_span);
    assert!(links_to(&ack, &producer_trace, &producer_span), "ack links to the message: {:?}", ack.links);
    assert_attributes(
        &ack,
        &[
            ("messaging.system", "rocketmq"),
            ("messaging.operation.type", "settle"),
            ("messaging.operation.name", "ack"),
            ("messaging.rocketmq.consumer_group", "g"),
            ("messaging.message.id", &id),
        ],
    );
    wait_for_span(&received, "broker ack", |s| s.name == "broker Ack" && s.parent_span_id == ack.span_id, &local).await;

    // Sent before everything above and exported by now if it had been sampled.
    let joined_unsampled = received.spans.lock().expect("lock").iter().any(|(_, s)| s.trace_id == unsampled_trace);
    assert!(!joined_unsampled, "a span joined a trace whose sampled flag was off");

    let services: Vec<String> =
        received.spans.lock().expect("lock").iter().map(|(service, _)| service.clone()).collect();
    assert!(services.iter().all(|s| s == "sluice-local"), "service.name of every span: {services:?}");
    // Background calls (heartbeats, route refreshes) make no traces of their own.
    let roots: Vec<String> = received
        .spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, s)| s.name.starts_with("broker ") && s.parent_span_id.is_empty())
        .map(|(_, s)| s.name.clone())
        .collect();
    assert!(roots.is_empty(), "broker hops without an RPC span: {roots:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_send_is_an_error_span_in_the_producers_trace() {
    let (collector, received) = otlp_receiver().await;
    let local = Local::start_with(&["--otlp-endpoint", &collector]).await;
    let mut client = messaging(local.grpc).await;
    let (producer, producer_trace, _) = new_traceparent();
    let mut missing = message("no-such-topic", b"x".to_vec());
    missing.system_properties.as_mut().expect("system").trace_context = Some(producer);
    let reply =
        client.send_message(v2::SendMessageRequest { messages: vec![missing] }).await.expect("send").into_inner();
    assert_eq!(code(reply.status.as_ref()), v2::Code::TopicNotFound as i32, "{:?}", reply.status);

    let send = wait_for_span(&received, "failed send", |s| s.name == "send no-such-topic", &local).await;
    assert_eq!(send.trace_id, producer_trace);
    let status = send.status.clone().expect("a span status");
    assert_eq!(status.code, 2, "STATUS_CODE_ERROR: {status:?}");
    assert!(status.message.contains("does not exist"), "the status message says why: {status:?}");
    assert_eq!(attribute(&send, "error.type"), Some((v2::Code::TopicNotFound as i32).to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_otlp_endpoint_that_is_not_plain_http_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (ok, _, stderr) = cli(&[
        "local",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--otlp-endpoint",
        "https://collector.example:4318",
    ])
    .await;
    assert!(!ok, "sluice local started with an https OTLP endpoint");
    assert!(stderr.contains("not an http:// URL") && stderr.contains("4318"), "stderr: {stderr}");
}
