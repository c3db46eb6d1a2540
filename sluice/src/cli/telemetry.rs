//! Where the process's diagnostics go: log lines to stderr (filtered by `SLUICE_LOG`), and, when
//! an OTLP endpoint is configured, the proxy's spans (target `sluice_otel`) to an OpenTelemetry
//! collector over OTLP HTTP/protobuf. Spans never reach the log, and with no endpoint they are
//! disabled where they are made.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use sluice_transport::spans::TARGET;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The standard variables that name a collector (the traces one is used as given; the generic
/// one gets `/v1/traces` appended).
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// What exports spans: `None` when no endpoint is configured.
pub struct Otlp {
    /// From `--otlp-endpoint` (a collector's base URL; a trailing `/v1/traces` is allowed);
    /// `None` leaves the standard variables to the SDK.
    pub endpoint: Option<String>,
    /// `service.name` unless `OTEL_SERVICE_NAME` sets one.
    pub service_name: &'static str,
}

impl Otlp {
    /// Export is on when `--otlp-endpoint` or one of the standard variables names a collector,
    /// unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    pub fn configured(flag: Option<String>, service_name: &'static str) -> Option<Otlp> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let endpoint = flag.filter(|f| !f.trim().is_empty());
        if disabled || (endpoint.is_none() && ENDPOINT_VARS.iter().all(|v| var(v).is_none())) {
            return None;
        }
        Some(Otlp { endpoint, service_name })
    }
}

/// Keeps the span exporter alive; dropping it flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: flushing spans to the OTLP collector at exit failed: {e}");
            }
        }
    }
}

fn log_filter() -> EnvFilter {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    filter.add_directive(format!("{TARGET}=off").parse().expect("a constant directive"))
}

/// Installs the global subscriber. Call once, before any runtime starts (the OTLP client blocks
/// on its own thread).
pub fn init(otlp: Option<Otlp>) -> Result<Telemetry, String> {
    let Some(otlp) = otlp else {
        // A global filter: the span call sites are disabled outright.
        let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        tracing_subscriber::registry().with(log_filter()).with(log).init();
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(&otlp)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sluice"))
        .with_filter(Targets::new().with_target(TARGET, LevelFilter::INFO));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(log_filter());
    tracing_subscriber::registry().with(spans).with(log).init();
    Ok(Telemetry { provider: Some(provider) })
}

fn provider(otlp: &Otlp) -> Result<SdkTracerProvider, String> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    if !protocol.is_empty() && protocol != "http/protobuf" {
        return Err(format!(
            "OTLP protocol {protocol:?} is not supported: Sluice exports over http/protobuf (a collector's port 4318)"
        ));
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    let endpoint = match &otlp.endpoint {
        Some(base) => {
            let base = base.trim_end_matches('/');
            Some(format!("{}/v1/traces", base.strip_suffix("/v1/traces").unwrap_or(base)))
        }
        None => ENDPOINT_VARS.iter().find_map(|v| std::env::var(v).ok().filter(|url| !url.trim().is_empty())),
    };
    if let Some(url) = &endpoint {
        if !url.starts_with("http://") {
            return Err(format!(
                "OTLP endpoint {url:?} is not an http:// URL: Sluice exports over plain HTTP, so point it at a \
                 collector on this host or network (OpenTelemetry Collector, Jaeger or Tempo on port 4318)"
            ));
        }
    }
    if let Some(full) = otlp.endpoint.as_ref().and(endpoint) {
        builder = builder.with_endpoint(full);
    }
    let exporter = builder.build().map_err(|e| format!("cannot set up the OTLP span exporter: {e}"))?;
    // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the default name only
    // fills in when neither names the service.
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|n| !n.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|a| a.split(',').any(|kv| kv.trim_start().starts_with("service.name=")));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(otlp.service_name);
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}
