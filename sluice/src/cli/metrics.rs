//! The process's metrics registry: one Prometheus recorder for every crate's metrics
//! (`sluice_engine::metrics`, `sluice_proxy::metrics`, `sluice_transport::metrics`), and the
//! `/metrics` page. A broker serves it on `metrics_listen` (default port 5557, as
//! rocketmq-exporter uses); a proxy and `sluice local` serve it on their HTTP port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use sluice_engine::broker::GaugeProbe;
use sluice_proxy::metrics::RenderMetrics;

/// A gauge not set for this long (a deleted group's lag, say) leaves the output.
const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often histogram samples are folded into their buckets; bounds the samples held.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A scrape waits at most this long for the shards' gauges, then renders without new ones.
const GAUGES_WAIT: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder, labelled with the cluster and this node's name. Call
/// before starting a broker or proxy: they take their metric handles at start.
pub fn install(cluster: &str, node_id: &str) -> Result<PrometheusHandle, String> {
    let mut builder = PrometheusBuilder::new()
        .add_global_label("cluster", cluster)
        .add_global_label("node_id", node_id)
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
    let buckets = sluice_engine::metrics::BUCKETS
        .iter()
        .chain(sluice_proxy::metrics::BUCKETS)
        .chain(sluice_transport::metrics::BUCKETS);
    for (name, values) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), values)
            .map_err(|e| format!("metric buckets of {name}: {e}"))?;
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    sluice_engine::metrics::describe();
    sluice_proxy::metrics::describe();
    sluice_transport::metrics::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The `/metrics` page: the broker's gauges read from its shards (when this process runs a
/// broker), then everything rendered.
pub fn page(handle: PrometheusHandle, probe: Option<GaugeProbe>) -> RenderMetrics {
    RenderMetrics(Arc::new(move || {
        let (handle, probe) = (handle.clone(), probe.clone());
        Box::pin(async move {
            if let Some(probe) = probe {
                match tokio::time::timeout(GAUGES_WAIT, probe.collect()).await {
                    Ok(shards) => sluice_engine::metrics::publish_gauges(&shards, now_ms()),
                    Err(_) => tracing::warn!("broker shards did not report their gauges in time; served the last ones"),
                }
            }
            handle.render()
        })
    }))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Serves `GET /metrics` on `addr` (a broker on its own). Returns the bound address.
pub async fn serve(addr: SocketAddr, page: RenderMetrics) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e} (set [broker] metrics_listen)"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let page = page.clone();
            async move {
                let text = (page.0)().await;
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}
