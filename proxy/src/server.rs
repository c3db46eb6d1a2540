//! Runs a proxy: the gRPC port (RocketMQ messaging + Sluice admin), the HTTP port (health and
//! stats), the auto-renew task, and a graceful drain: on shutdown, HTTP/2 GOAWAY goes out,
//! long polls answer at once, and in-flight calls get `drain_timeout_ms` to finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_transport::TransportConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::AdminService;
use crate::auth::Auth;
use crate::error::ProxyError;
use crate::pb::apache::rocketmq::v2::messaging_service_server::MessagingServiceServer;
use crate::pb::sluice::admin::v1::admin_server::AdminServer;
use crate::routing::{BrokerAddress, BrokerPool};
use crate::service::Messaging;
use crate::state::{ProxySettings, ProxyState};

/// Concurrent calls (streams) one client connection may have open.
const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Keep-alive pings find clients that vanished without closing their connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub name: String,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    pub brokers: Vec<BrokerAddress>,
    /// tcp, rdma or auto.
    pub transport_scheme: String,
    pub transport: TransportConfig,
    pub settings: ProxySettings,
    /// access key → secret key; empty turns authentication off.
    pub access_keys: HashMap<String, String>,
}

pub struct RunningProxy {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub state: Arc<ProxyState>,
    stop: tokio::sync::watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), ProxyError>>,
    http_task: Option<JoinHandle<()>>,
    renew_task: JoinHandle<()>,
}

/// The transport settings a proxy needs: requests must outlive the longest long poll.
pub fn proxy_transport(mut transport: TransportConfig, settings: &ProxySettings) -> TransportConfig {
    transport.request_timeout_ms = transport.request_timeout_ms.max(settings.long_poll_max_ms + 15_000);
    transport
}

pub async fn start(config: ProxyConfig) -> Result<RunningProxy, ProxyError> {
    config.settings.validate().map_err(ProxyError::Config)?;
    let transport = proxy_transport(config.transport.clone(), &config.settings);
    let brokers =
        BrokerPool::connect(config.brokers.clone(), &config.transport_scheme, transport, &config.name).await?;
    let state = ProxyState::new(Arc::new(brokers), Auth::new(config.access_keys.clone()), config.settings.clone());
    let listener = TcpListener::bind(config.grpc)
        .await
        .map_err(|e| ProxyError::Config(format!("cannot listen for gRPC on {}: {e}", config.grpc)))?;
    let grpc_addr = listener.local_addr().map_err(|e| ProxyError::Config(e.to_string()))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);

    let max_request = config.settings.grpc_max_request_bytes;
    let messaging = MessagingServiceServer::new(Messaging { state: state.clone() })
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(max_request);
    let admin = AdminServer::new(AdminService { state: state.clone() });
    let mut grpc_stop = stopped.clone();
    let grpc_task = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(messaging)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| ProxyError::Config(format!("gRPC server failed: {e}")))
    });

    let (http_addr, http_task) = match config.http {
        Some(addr) => {
            let (addr, task) = start_http(addr, state.clone(), stopped.clone()).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let renew_task = tokio::spawn(crate::renew::run(state.clone()));
    Ok(RunningProxy { grpc_addr, http_addr, state, stop, grpc_task, http_task, renew_task })
}

async fn start_http(
    addr: SocketAddr,
    state: Arc<ProxyState>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), ProxyError> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ProxyError::Config(format!("cannot listen for HTTP on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| ProxyError::Config(e.to_string()))?;
    let stats_state = state.clone();
    let app = axum::Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/v1/stats",
        get(move || {
            let state = stats_state.clone();
            async move {
                let mut counters: serde_json::Map<String, serde_json::Value> =
                    state.counters.snapshot().into_iter().map(|(k, v)| (k, v.into())).collect();
                counters.insert("renewals_tracked".into(), (state.renewals.len() as u64).into());
                axum::Json(serde_json::Value::Object(counters))
            }
        }),
    );
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}

impl RunningProxy {
    /// Graceful drain: GOAWAY, long polls end, in-flight calls finish (bounded), then return.
    pub async fn shutdown(self) -> Result<(), ProxyError> {
        let drain = Duration::from_millis(self.state.settings.drain_timeout_ms);
        self.state.begin_shutdown();
        let _ = self.stop.send(true);
        let grpc = tokio::time::timeout(drain, self.grpc_task).await;
        if let Some(http) = self.http_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), http).await;
        }
        self.renew_task.abort();
        match grpc {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ProxyError::Config(format!("gRPC task failed: {join}"))),
            Err(_) => {
                tracing::warn!(
                    drain_timeout_ms = drain.as_millis() as u64,
                    "in-flight calls did not finish in time; exiting"
                );
                Ok(())
            }
        }
    }

    /// Completes if the gRPC server stops by itself (it should not).
    pub async fn failed(&mut self) -> String {
        match (&mut self.grpc_task).await {
            Ok(Ok(())) => "gRPC server stopped".into(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        }
    }
}
