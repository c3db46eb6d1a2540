//! OpenTelemetry spans of the RPCs that move messages: send, receive and ack (the broker hop
//! under each is `sluice_transport::spans`). Attributes follow OpenTelemetry's messaging
//! semantic conventions.
//!
//! How a trace is joined (the proxy never rewrites a message's trace context):
//! - the send span's parent is the `traceparent` in the `trace_context` of the batch's first
//!   message that has one (where RocketMQ clients' OpenTelemetry instrumentation puts it), else
//!   the caller's gRPC `traceparent` header; other messages' contexts become links;
//! - receive and ack spans are children of the caller's gRPC `traceparent`, if any, and link to
//!   each message's context (an ack finds it in the receipt handle, where delivery put it while
//!   spans are exported).
//!
//! All spans have target `TARGET`: with no OTLP endpoint configured they are disabled at the
//! call site, and nothing here parses or allocates.

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use sluice_transport::model::message_type;
use sluice_transport::spans::TARGET;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::convert::{self, ClientHandle};
use crate::pb::apache::rocketmq::v2::{
    receive_message_response, AckMessageRequest, AckMessageResponse, Code, Message, ReceiveMessageRequest,
    ReceiveMessageResponse, SendMessageRequest, SendMessageResponse, Status,
};

/// Most links one span carries (a batch of 32 messages links all of them).
pub const LINKS_MAX: usize = 32;

/// The value of `messaging.system`.
const SYSTEM: &str = "rocketmq";

/// A carrier holding just one `traceparent`.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// A gRPC request's metadata as a carrier (`traceparent` and `tracestate` headers).
struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The remote span a W3C `traceparent` names, if it is well formed.
pub fn remote_span(traceparent: &str) -> Option<SpanContext> {
    let traceparent = convert::traceparent(traceparent)?;
    let cx = TraceContextPropagator::new().extract(&Traceparent(traceparent));
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

fn message_span(message: &Message) -> Option<SpanContext> {
    remote_span(message.system_properties.as_ref()?.trace_context.as_deref()?)
}

/// Makes the caller's gRPC `traceparent` (if any) the span's parent.
fn join_caller(span: &Span, metadata: &MetadataMap) {
    let cx = TraceContextPropagator::new().extract(&Metadata(metadata));
    if cx.span().span_context().is_valid() {
        // Cannot fail for a span just made and enabled, and a missing parent only shortens the trace.
        let _ = span.set_parent(cx);
    }
}

fn link_all(span: &Span, contexts: impl Iterator<Item = SpanContext>) {
    for context in contexts.take(LINKS_MAX) {
        span.add_link(context);
    }
}

/// The semantic-convention name of a RocketMQ message type (`normal`, `fifo`, `delay`,
/// `transaction`; Sluice's own `lite` and `priority` alike).
fn type_name(kind: i32) -> String {
    message_type::name(u8::try_from(kind).unwrap_or(0)).to_ascii_lowercase()
}

/// Marks the span failed unless `status` is OK (or a benign outcome in `fine`).
fn record_status(span: &Span, status: Option<&Status>, fine: &[Code]) {
    let Some(status) = status else { return };
    if status.code == Code::Ok as i32 || fine.iter().any(|c| *c as i32 == status.code) {
        return;
    }
    span.record("otel.status_code", "error");
    span.record("otel.status_description", status.message.as_str());
    span.record("error.type", status.code.to_string().as_str());
}

/// The span of one SendMessage call.
pub fn send(metadata: &MetadataMap, request: &SendMessageRequest) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "send",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        "error.type" = Empty,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "send",
        "messaging.operation.name" = "send",
        "messaging.destination.name" = Empty,
        "messaging.batch.message_count" = Empty,
        "messaging.message.id" = Empty,
        "messaging.message.body.size" = Empty,
        "messaging.rocketmq.namespace" = Empty,
        "messaging.rocketmq.message.type" = Empty,
        "messaging.rocketmq.message.tag" = Empty,
        "messaging.rocketmq.message.group" = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let first = request.messages.first();
    let topic = first.and_then(|m| m.topic.as_ref());
    let topic_name = topic.map_or("", |t| t.name.as_str());
    span.record("otel.name", format!("send {topic_name}").as_str());
    span.record("messaging.destination.name", topic_name);
    if let Some(namespace) = topic.map(|t| t.resource_namespace.as_str()).filter(|n| !n.is_empty()) {
        span.record("messaging.rocketmq.namespace", namespace);
    }
    if request.messages.len() > 1 {
        span.record("messaging.batch.message_count", request.messages.len() as u64);
    } else if let Some(message) = first {
        span.record("messaging.message.body.size", message.body.len() as u64);
        if let Some(system) = &message.system_properties {
            span.record("messaging.message.id", system.message_id.as_str());
            span.record("messaging.rocketmq.message.type", type_name(system.message_type).as_str());
            if let Some(tag) = &system.tag {
                span.record("messaging.rocketmq.message.tag", tag.as_str());
            }
            if let Some(group) = &system.message_group {
                span.record("messaging.rocketmq.message.group", group.as_str());
            }
        }
    }
    let mut contexts = request.messages.iter().filter_map(message_span);
    match contexts.next() {
        Some(parent) => {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
            link_all(&span, contexts.filter(|c| c != &parent));
        }
        None => join_caller(&span, metadata),
    }
    span
}

pub fn record_send(span: &Span, response: &SendMessageResponse) {
    if !span.is_disabled() {
        record_status(span, response.status.as_ref(), &[]);
    }
}

/// The span of one ReceiveMessage call (a long poll: it lasts until messages come or time runs out).
pub fn receive(metadata: &MetadataMap, request: &ReceiveMessageRequest) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "receive",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        "error.type" = Empty,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "receive",
        "messaging.operation.name" = "receive",
        "messaging.destination.name" = Empty,
        "messaging.consumer.group.name" = Empty,
        "messaging.rocketmq.consumer_group" = Empty,
        "messaging.batch.message_count" = Empty,
        "messaging.message.id" = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let topic = request.message_queue.as_ref().and_then(|q| q.topic.as_ref()).map_or("", |t| t.name.as_str());
    let group = request.group.as_ref().map_or("", |g| g.name.as_str());
    span.record("otel.name", format!("receive {topic}").as_str());
    span.record("messaging.destination.name", topic);
    span.record("messaging.consumer.group.name", group);
    span.record("messaging.rocketmq.consumer_group", group);
    join_caller(&span, metadata);
    span
}

pub fn record_receive(span: &Span, responses: &[ReceiveMessageResponse]) {
    if span.is_disabled() {
        return;
    }
    use receive_message_response::Content;
    let messages: Vec<&Message> = responses
        .iter()
        .filter_map(|r| match &r.content {
            Some(Content::Message(m)) => Some(m),
            _ => None,
        })
        .collect();
    span.record("messaging.batch.message_count", messages.len() as u64);
    if let [only] = messages.as_slice() {
        if let Some(system) = &only.system_properties {
            span.record("messaging.message.id", system.message_id.as_str());
        }
    }
    link_all(span, messages.iter().filter_map(|m| message_span(m)));
    let status = responses.iter().find_map(|r| match &r.content {
        Some(Content::Status(s)) => Some(s),
        _ => None,
    });
    record_status(span, status, &[Code::MessageNotFound]);
}

/// The span of one AckMessage call.
pub fn ack(metadata: &MetadataMap, request: &AckMessageRequest) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "ack",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        "error.type" = Empty,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "settle",
        "messaging.operation.name" = "ack",
        "messaging.destination.name" = Empty,
        "messaging.consumer.group.name" = Empty,
        "messaging.rocketmq.consumer_group" = Empty,
        "messaging.batch.message_count" = Empty,
        "messaging.message.id" = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let topic = request.topic.as_ref().map_or("", |t| t.name.as_str());
    let group = request.group.as_ref().map_or("", |g| g.name.as_str());
    span.record("otel.name", format!("ack {topic}").as_str());
    span.record("messaging.destination.name", topic);
    span.record("messaging.consumer.group.name", group);
    span.record("messaging.rocketmq.consumer_group", group);
    match request.entries.as_slice() {
        [only] => {
            span.record("messaging.message.id", only.message_id.as_str());
        }
        entries => {
            span.record("messaging.batch.message_count", entries.len() as u64);
        }
    }
    join_caller(&span, metadata);
    let contexts = request.entries.iter().filter_map(|e| {
        let handle = ClientHandle::decode(&e.receipt_handle).ok()?;
        remote_span(handle.traceparent.as_deref()?)
    });
    link_all(&span, contexts);
    span
}

pub fn record_ack(span: &Span, response: &AckMessageResponse) {
    if !span.is_disabled() {
        record_status(span, response.status.as_ref(), &[]);
    }
}
