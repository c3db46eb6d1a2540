//! Every metric the proxy publishes, described in one place (RocketMQ 5.1's names where one
//! exists), and the gRPC layer that times each call into `rocketmq_rpc_latency`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::{describe_counter, describe_histogram, Unit};
use sluice_transport::metrics::{group_label, labels, topic_label};

pub const RPC_LATENCY: &str = "rocketmq_rpc_latency";
pub const MESSAGES_OUT: &str = "rocketmq_messages_out_total";
pub const THROUGHPUT_OUT: &str = "rocketmq_throughput_out_total";
pub const SEND_TO_DLQ: &str = "rocketmq_send_to_dlq_messages_total";
pub const RECEIVES_THROTTLED: &str = "sluice_receives_throttled_total";
pub const SENDS_THROTTLED: &str = "sluice_sends_throttled_total";

/// Every metric name this crate publishes (the dashboard test checks against it).
pub const NAMES: &[&str] =
    &[RPC_LATENCY, MESSAGES_OUT, THROUGHPUT_OUT, SEND_TO_DLQ, RECEIVES_THROTTLED, SENDS_THROTTLED];

/// Renders the process's metrics in the Prometheus text format (set by whoever installed the
/// recorder; the proxy serves it at `/metrics` on its HTTP port).
#[derive(Clone)]
pub struct RenderMetrics(pub Arc<dyn Fn() -> futures::future::BoxFuture<'static, String> + Send + Sync>);

impl std::fmt::Debug for RenderMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RenderMetrics")
    }
}

/// The `node_type` label of every proxy metric.
pub const NODE_TYPE: (&str, &str) = ("node_type", "proxy");

/// Histogram buckets, by metric name: RocketMQ's latency unit is the millisecond.
pub const BUCKETS: &[(&str, &[f64])] = &[(
    RPC_LATENCY,
    &[0.5, 1.0, 3.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 3_000.0, 10_000.0, 30_000.0],
)];

/// The gRPC methods timed by name; any other path is labelled `unknown`, so a client cannot
/// make new series by calling made-up methods.
const METHODS: &[&str] = &[
    "QueryRoute",
    "Heartbeat",
    "SendMessage",
    "QueryAssignment",
    "ReceiveMessage",
    "AckMessage",
    "ForwardMessageToDeadLetterQueue",
    "PullMessage",
    "UpdateOffset",
    "GetOffset",
    "QueryOffset",
    "EndTransaction",
    "NotifyClientTermination",
    "ChangeInvisibleDuration",
    "RecallMessage",
    "SyncLiteSubscription",
    "CreateTopic",
    "UpdateTopic",
    "ListTopics",
    "DeleteTopic",
    "CreateGroup",
    "UpdateGroup",
    "ListGroups",
    "DeleteGroup",
    "GetStats",
    "GetMessage",
    "FindMessages",
    "ResetGroup",
];

/// A stream that lives as long as the client (Telemetry): its duration is no latency.
const UNTIMED_METHODS: &[&str] = &["Telemetry"];

/// Registers the help text of every proxy metric.
pub fn describe() {
    describe_histogram!(
        RPC_LATENCY,
        Unit::Milliseconds,
        "gRPC call duration in milliseconds, from request to the end of the response stream, by method and gRPC status"
    );
    describe_counter!(MESSAGES_OUT, "Messages handed to consumers (redeliveries included), by topic and group");
    describe_counter!(THROUGHPUT_OUT, Unit::Bytes, "Bytes of message bodies handed to consumers, by topic and group");
    describe_counter!(SEND_TO_DLQ, "Messages moved to their group's dead-letter topic, by topic and group");
    describe_counter!(RECEIVES_THROTTLED, "Receives that found their group's receive quota empty, by group");
    describe_counter!(SENDS_THROTTLED, "Sends that found their topic's send quota empty, by topic");
}

/// (topic, group) pairs whose delivery counters the proxy keeps handles for; past it the
/// cache starts over (the series stay in the recorder).
const DELIVERY_HANDLES_MAX: usize = 10_000;

type DeliveryHandles = HashMap<(String, String), (metrics::Counter, metrics::Counter)>;

/// `count` messages with `bytes` of bodies handed to a consumer of `group`.
pub fn messages_out(topic: &str, group: &str, count: u64, bytes: u64) {
    static HANDLES: OnceLock<Mutex<DeliveryHandles>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
    let key = (topic.to_string(), group.to_string());
    if !handles.contains_key(&key) {
        if handles.len() >= DELIVERY_HANDLES_MAX {
            handles.clear();
        }
        let labels = labels([NODE_TYPE, ("topic", &topic_label(topic)), ("consumer_group", &group_label(group))]);
        let counters =
            (metrics::counter!(MESSAGES_OUT, labels.iter()), metrics::counter!(THROUGHPUT_OUT, labels.iter()));
        handles.insert(key.clone(), counters);
    }
    let (messages, body_bytes) = &handles[&key];
    messages.increment(count);
    body_bytes.increment(bytes);
}

pub fn dead_lettered(topic: &str, group: &str) {
    let labels = labels([NODE_TYPE, ("topic", &topic_label(topic)), ("consumer_group", &group_label(group))]);
    metrics::counter!(SEND_TO_DLQ, labels.iter()).increment(1);
}

pub fn receive_throttled(group: &str) {
    let labels = labels([NODE_TYPE, ("consumer_group", &group_label(group))]);
    metrics::counter!(RECEIVES_THROTTLED, labels.iter()).increment(1);
}

pub fn send_throttled(topic: &str) {
    let labels = labels([NODE_TYPE, ("topic", &topic_label(topic))]);
    metrics::counter!(SENDS_THROTTLED, labels.iter()).increment(1);
}

/// The method a gRPC path names, as an index into `METHODS` (`METHODS.len()`: any other);
/// `None` for calls not timed.
fn method_index(path: &str) -> Option<usize> {
    let method = path.rsplit('/').next().unwrap_or("");
    if UNTIMED_METHODS.contains(&method) {
        return None;
    }
    Some(METHODS.iter().position(|m| *m == method).unwrap_or(METHODS.len()))
}

fn method_label(index: usize) -> &'static str {
    METHODS.get(index).copied().unwrap_or("unknown")
}

/// gRPC status codes 0..=16 get a label each; `STATUS_SLOTS - 1` is any other.
const STATUS_SLOTS: usize = 18;

/// One histogram handle per (method, status), made on first use, so timing a call does not
/// look its labels up in the registry.
fn latency_histogram(method: usize, status: u16) -> &'static metrics::Histogram {
    static HANDLES: OnceLock<Vec<OnceLock<metrics::Histogram>>> = OnceLock::new();
    let handles = HANDLES.get_or_init(|| (0..(METHODS.len() + 1) * STATUS_SLOTS).map(|_| OnceLock::new()).collect());
    let status = usize::from(status).min(STATUS_SLOTS - 1);
    handles[method * STATUS_SLOTS + status].get_or_init(|| {
        let code = status_label(status as u16);
        let labels =
            [NODE_TYPE, ("protocol_type", "grpc"), ("request_code", method_label(method)), ("response_code", code)];
        metrics::histogram!(RPC_LATENCY, &labels)
    })
}

/// A tower layer for the gRPC server: times every call into `rocketmq_rpc_latency`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcLatencyLayer;

impl<S> tower::Layer<S> for RpcLatencyLayer {
    type Service = RpcLatency<S>;
    fn layer(&self, inner: S) -> RpcLatency<S> {
        RpcLatency { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcLatency<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcLatency<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<TimedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = method_index(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // An error answered in headers only (no body) carries its status there.
            let status = grpc_status(response.headers());
            Ok(response
                .map(|body| TimedBody { body, timer: method.map(|method| CallTimer { method, started, status }) }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

struct CallTimer {
    method: usize,
    started: Instant,
    status: Option<u16>,
}

impl CallTimer {
    fn record(self) {
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1_000.0;
        latency_histogram(self.method, self.status.unwrap_or(0)).record(elapsed_ms);
    }
}

/// gRPC status codes 0..=16 by number; anything else is `unknown`.
fn status_label(code: u16) -> &'static str {
    const CODES: [&str; 17] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    CODES.get(usize::from(code)).copied().unwrap_or("unknown")
}

/// A response body that records its call's duration when it ends (or is dropped unfinished),
/// with the status from its trailers.
pub struct TimedBody<B> {
    body: B,
    timer: Option<CallTimer>,
}

impl<B: Body + Unpin> Body for TimedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    if let Some(timer) = &mut self.timer {
                        timer.status = Some(status);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(timer) = self.timer.take() {
                    timer.record();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for TimedBody<B> {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_get_their_own_label() {
        let label = |path: &str| method_index(path).map(method_label);
        assert_eq!(label("/apache.rocketmq.v2.MessagingService/SendMessage"), Some("SendMessage"));
        assert_eq!(label("/sluice.admin.v1.Admin/GetStats"), Some("GetStats"));
        assert_eq!(label("/x.Y/MadeUp123"), Some("unknown"));
        assert_eq!(label("/apache.rocketmq.v2.MessagingService/Telemetry"), None);
        assert_eq!(status_label(14), "14");
        assert_eq!(status_label(400), "unknown");
    }
}
