//! The long-running commands: `local`, `broker`, `proxy`. Each prints where it listens, then
//! serves until SIGINT or SIGTERM, then shuts down gracefully (proxy drain, then broker).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use sluice_engine::broker::{Broker, BrokerConfig};
use sluice_proxy::server::{self, ProxyConfig, RunningProxy};

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn start_broker(config: BrokerConfig) -> Result<Broker, String> {
    let data_dir = config.engine.data_dir.display().to_string();
    Broker::start(config).map_err(|e| format!("broker failed to start (data directory {data_dir}): {e}"))
}

fn print_broker(broker: &Broker, metrics: Option<SocketAddr>, json: bool) {
    let endpoints: Vec<String> = broker.endpoints().iter().map(|e| e.tcp.to_string()).collect();
    if json {
        let metrics = metrics.map(|a| a.to_string());
        println!("{}", serde_json::json!({ "role": "broker", "shards": endpoints, "metrics": metrics }));
    } else {
        for (i, endpoint) in endpoints.iter().enumerate() {
            println!("broker shard {i}: tcp://{endpoint}");
        }
        if let Some(metrics) = metrics {
            println!("metrics: http://{metrics}/metrics");
        }
    }
}

fn print_proxy(proxy: &RunningProxy, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "role": "proxy",
                "grpc": proxy.grpc_addr.to_string(),
                "http": proxy.http_addr.map(|a| a.to_string()),
                "tls": proxy.tls,
            })
        );
    } else {
        let (tls, scheme) = if proxy.tls { (" (TLS)", "https") } else { ("", "http") };
        println!("gRPC (RocketMQ 5 clients, sluice CLI): {}{tls}", proxy.grpc_addr);
        if let Some(http) = proxy.http_addr {
            println!("HTTP (health, stats, metrics): {scheme}://{http}/healthz, {scheme}://{http}/metrics");
        }
    }
}

async fn serve_until_stopped(mut proxy: RunningProxy) -> Result<(), String> {
    tokio::select! {
        _ = stop_signal() => {}
        why = proxy.failed() => return Err(format!("proxy stopped: {why}")),
    }
    eprintln!("stopping: draining in-flight calls");
    proxy.shutdown().await.map_err(|e| e.to_string())
}

pub async fn local(
    broker_config: BrokerConfig,
    mut proxy_config: ProxyConfig,
    metrics: Option<PrometheusHandle>,
    json: bool,
) -> Result<(), String> {
    let data_dir = broker_config.engine.data_dir.display().to_string();
    let shards = broker_config.engine.shard_count;
    let broker =
        tokio::task::spawn_blocking(move || start_broker(broker_config)).await.map_err(|e| e.to_string())??;
    proxy_config.brokers = vec![sluice_transport::cluster::BrokerAddress::Shards(
        broker.endpoints().iter().map(|e| e.tcp.to_string()).collect(),
    )];
    // One page for both roles, on the proxy's HTTP port.
    proxy_config.metrics = metrics.map(|handle| crate::cli::metrics::page(handle, Some(broker.gauge_probe())));
    let proxy = match server::start(proxy_config).await {
        Ok(proxy) => proxy,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || broker.shutdown()).await;
            return Err(format!("proxy failed to start: {e}"));
        }
    };
    if !json {
        println!("sluice local: broker + proxy in one process, data in {data_dir} ({shards} shards)");
    }
    print_proxy(&proxy, json);
    if !json {
        println!("Ctrl-C stops.");
    }
    let served = serve_until_stopped(proxy).await;
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("broker shutdown: {e}"))?;
    served
}

pub async fn broker(
    config: BrokerConfig,
    metrics_addr: Option<SocketAddr>,
    metrics: Option<PrometheusHandle>,
    json: bool,
) -> Result<(), String> {
    let broker = tokio::task::spawn_blocking(move || start_broker(config)).await.map_err(|e| e.to_string())??;
    let page = metrics.map(|handle| crate::cli::metrics::page(handle, Some(broker.gauge_probe())));
    let metrics_at = match (metrics_addr, page) {
        (Some(addr), Some(page)) => match crate::cli::metrics::serve(addr, page).await {
            Ok(bound) => Some(bound),
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || broker.shutdown()).await;
                return Err(e);
            }
        },
        _ => None,
    };
    print_broker(&broker, metrics_at, json);
    stop_signal().await;
    eprintln!("stopping: finishing in-flight requests, syncing the log");
    tokio::task::spawn_blocking(move || broker.shutdown())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("broker shutdown: {e}"))
}

pub async fn proxy(config: ProxyConfig, json: bool) -> Result<(), String> {
    // Brokers may still be starting (a cluster started all at once): retry for a while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let proxy = loop {
        match server::start(config.clone()).await {
            Ok(proxy) => break proxy,
            Err(e) if tokio::time::Instant::now() < deadline && e.to_string().contains("unavailable") => {
                tracing::warn!(error = %e, "brokers not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("proxy failed to start: {e}")),
        }
    };
    print_proxy(&proxy, json);
    serve_until_stopped(proxy).await
}
