//! Trace spans of the broker hop. Every span Sluice exports has target `TARGET`: the OTLP layer
//! takes exactly that target and the log layer never does, so with no OTLP endpoint configured
//! these spans are disabled at their call sites and cost a branch.

use tracing::field::Empty;
use tracing::Span;

use crate::messages::FrameKind;

/// The `tracing` target of exported spans.
pub const TARGET: &str = "sluice_otel";

/// True when spans are exported (an OTLP endpoint is configured): the layer that exports them
/// is the only one that enables `TARGET`.
pub fn exported() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// One proxy→broker call, as a CLIENT span under the RPC span that made it. Calls made outside
/// a traced RPC (heartbeats, renewals, route refreshes) get no span: they would each be a trace
/// of their own.
pub fn broker_hop(kind: FrameKind, endpoint: &str) -> Span {
    // Also skips the work below when spans are off: then every span is `none`.
    if Span::current().is_none() {
        return Span::none();
    }
    let (address, port) = match endpoint.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().ok()),
        None => (endpoint, None),
    };
    let method = kind.name().trim_end_matches("Request");
    let span = tracing::info_span!(
        target: TARGET,
        "broker",
        otel.name = format!("broker {method}").as_str(),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        "rpc.system" = "sluice",
        "rpc.method" = method,
        "server.address" = address,
        "server.port" = Empty,
        "network.transport" = Empty,
        "sluice.transport" = Empty,
        "error.type" = Empty,
    );
    if let Some(port) = port {
        span.record("server.port", port);
    }
    span
}

/// Marks a hop span with its transport, once the connection is known (`network.transport`
/// has a value for TCP only; RDMA has none in the conventions).
pub fn record_transport(span: &Span, transport: &'static str) {
    span.record("sluice.transport", transport);
    if transport == "tcp" {
        span.record("network.transport", "tcp");
    }
}

/// Marks a span failed with a stable error code and its message.
pub fn record_error(span: &Span, code: u32, message: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("otel.status_code", "error");
    span.record("otel.status_description", message);
    span.record("error.type", code.to_string());
}
