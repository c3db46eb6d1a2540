//! Runs a proxy: the gRPC port (RocketMQ messaging + Sluice admin), the HTTP port (health,
//! stats, and lite topics over SSE), both in the clear or under TLS, the auto-renew task, and a
//! graceful drain: on shutdown, HTTP/2 GOAWAY goes out, long polls answer at once, and in-flight
//! calls get `drain_timeout_ms` to finish.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_transport::TransportConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::acl::Acl;
use crate::admin::AdminService;
use crate::auth::Auth;
use crate::error::ProxyError;
use crate::pb::apache::rocketmq::v2::messaging_service_server::MessagingServiceServer;
use crate::pb::sluice::admin::v1::admin_server::AdminServer;
use crate::service::Messaging;
use crate::state::{ProxySettings, ProxyState};
use crate::tls::{TlsAcceptors, TlsFiles, TlsListener};
use sluice_transport::cluster::{BrokerAddress, BrokerPool};

/// Concurrent calls (streams) one client connection may have open.
const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Connections accepted but not yet past the HTTP/2 preface check, at most.
const HANDSHAKES_PENDING_MAX: usize = 1024;
/// The client connection preface every HTTP/2 (gRPC) client sends first.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
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
    /// Per-topic and per-group access control (`acl.rs`); needs access keys and an admin key.
    pub acl: bool,
    /// Keys that skip the ACL and alone may use the admin API while it is on.
    pub admin_keys: HashSet<String>,
    /// Serves `GET /metrics` on the HTTP port when set.
    pub metrics: Option<crate::metrics::RenderMetrics>,
    /// TLS on both client ports (gRPC and HTTP) when set; plaintext otherwise.
    pub tls: Option<TlsFiles>,
}

pub struct RunningProxy {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    /// Both client ports speak TLS.
    pub tls: bool,
    pub state: Arc<ProxyState>,
    stop: tokio::sync::watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), ProxyError>>,
    http_task: Option<JoinHandle<()>>,
    renew_task: JoinHandle<()>,
    check_task: JoinHandle<()>,
}

/// The transport settings a proxy needs: requests must outlive the longest long poll.
pub fn proxy_transport(mut transport: TransportConfig, settings: &ProxySettings) -> TransportConfig {
    transport.request_timeout_ms = transport.request_timeout_ms.max(settings.long_poll_max_ms + 15_000);
    transport
}

/// An ACL without keys would identify nobody, and one without an admin key could not be managed.
fn check_acl_config(config: &ProxyConfig) -> Result<(), ProxyError> {
    if let Some(unknown) = config.admin_keys.iter().find(|k| !config.access_keys.contains_key(*k)) {
        return Err(ProxyError::Config(format!("admin key {unknown:?} is not one of proxy.access_keys")));
    }
    if !config.acl {
        return Ok(());
    }
    if config.access_keys.is_empty() {
        return Err(ProxyError::Config(
            "proxy.acl = true needs proxy.access_keys: the ACL decides per access key, so calls must be signed".into(),
        ));
    }
    if config.admin_keys.is_empty() {
        return Err(ProxyError::Config(
            "proxy.acl = true needs an admin key (admin = true on one of proxy.access_keys) to manage the rules with `sluice acl`".into(),
        ));
    }
    Ok(())
}

pub async fn start(config: ProxyConfig) -> Result<RunningProxy, ProxyError> {
    config.settings.validate().map_err(ProxyError::Config)?;
    check_acl_config(&config)?;
    // Before anything connects: a bad certificate or key stops startup with the file named.
    let tls: Option<TlsAcceptors> = config.tls.as_ref().map(TlsFiles::load).transpose()?;
    let transport = proxy_transport(config.transport.clone(), &config.settings);
    let brokers =
        BrokerPool::connect(config.brokers.clone(), &config.transport_scheme, transport, &config.name).await?;
    let acl = Acl::new(config.acl, config.admin_keys.clone());
    let state = ProxyState::new(Arc::new(brokers), Auth::new(config.access_keys.clone()), acl, config.settings.clone());
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
    let settings_for_accept = config.settings.clone();
    let grpc_tls = tls.as_ref().map(|t| t.grpc.clone());
    let grpc_task = tokio::spawn(async move {
        let incoming = guarded_incoming(listener, &settings_for_accept, grpc_tls);
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(crate::metrics::RpcLatencyLayer)
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
            let http_tls = tls.as_ref().map(|t| t.http.clone());
            let (addr, task) =
                start_http(addr, state.clone(), config.metrics.clone(), http_tls, stopped.clone()).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let renew_task = tokio::spawn(crate::renew::run(state.clone()));
    let check_task = tokio::spawn(crate::transactions::run_checks(state.clone()));
    let tls = tls.is_some();
    Ok(RunningProxy { grpc_addr, http_addr, tls, state, stop, grpc_task, http_task, renew_task, check_task })
}

async fn start_http(
    addr: SocketAddr,
    state: Arc<ProxyState>,
    metrics: Option<crate::metrics::RenderMetrics>,
    tls: Option<TlsAcceptor>,
    stopped: tokio::sync::watch::Receiver<bool>,
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
    let app = match metrics {
        Some(render) => app.route("/metrics", get(move || metrics_page(render.clone()))),
        None => app,
    };
    let app = app.merge(crate::stream::routes(state.clone()));
    let task = match tls {
        None => tokio::spawn(serve_http(listener, app, stopped)),
        Some(acceptor) => {
            let handshake = Duration::from_millis(state.settings.handshake_timeout_ms);
            let listener = TlsListener::new(listener, acceptor, handshake)
                .map_err(|e| ProxyError::Config(format!("cannot listen for HTTPS on {addr}: {e}")))?;
            tokio::spawn(serve_http(listener, app, stopped))
        }
    };
    Ok((bound, task))
}

async fn serve_http<L>(listener: L, app: axum::Router, mut stopped: tokio::sync::watch::Receiver<bool>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let served = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    if let Err(e) = served.await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The Prometheus text exposition format, version 0.0.4.
async fn metrics_page(render: crate::metrics::RenderMetrics) -> impl axum::response::IntoResponse {
    let text = (render.0)().await;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
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
        self.check_task.abort();
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

/// A client connection that holds one of the proxy's connection slots while it lives.
pub struct GuardedStream {
    stream: ClientStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A client's bytes, in the clear or under TLS.
enum ClientStream {
    Plain(tokio::net::TcpStream),
    /// `preface_replayed`: bytes of the HTTP/2 preface handed to the server so far. The preface
    /// check consumed the preface from the TLS stream, and it is the same 24 bytes on every
    /// connection, so it is replayed from the constant instead of buffered.
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        preface_replayed: usize,
    },
}

impl tonic::transport::server::Connected for GuardedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.stream {
            ClientStream::Plain(tcp) => tcp.connect_info(),
            ClientStream::Tls { stream, .. } => stream.get_ref().0.connect_info(),
        }
    }
}

impl tokio::io::AsyncRead for GuardedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.stream {
            ClientStream::Plain(tcp) => std::pin::Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls { preface_replayed, .. } if *preface_replayed < HTTP2_PREFACE.len() => {
                let rest = &HTTP2_PREFACE[*preface_replayed..];
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                *preface_replayed += n;
                std::task::Poll::Ready(Ok(()))
            }
            ClientStream::Tls { stream, .. } => std::pin::Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.stream {
            ClientStream::Plain(tcp) => std::pin::Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls { stream, .. } => std::pin::Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.stream {
            ClientStream::Plain(tcp) => std::pin::Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls { stream, .. } => std::pin::Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.stream {
            ClientStream::Plain(tcp) => std::pin::Pin::new(tcp).poll_shutdown(cx),
            ClientStream::Tls { stream, .. } => std::pin::Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.stream {
            ClientStream::Plain(tcp) => std::pin::Pin::new(tcp).poll_write_vectored(cx, bufs),
            ClientStream::Tls { stream, .. } => std::pin::Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            ClientStream::Plain(tcp) => tcp.is_write_vectored(),
            ClientStream::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }
}

/// Accepts connections, bounded in number, and hands to the gRPC server only those that finish
/// the TLS handshake (when TLS is on) and send the HTTP/2 preface within `handshake_timeout_ms`;
/// silent, garbage or plaintext-on-TLS peers are closed without costing the server anything.
fn guarded_incoming(
    listener: TcpListener,
    settings: &ProxySettings,
    tls: Option<TlsAcceptor>,
) -> tokio_stream::wrappers::ReceiverStream<Result<GuardedStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(HANDSHAKES_PENDING_MAX);
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.connections_max));
    let pending = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PENDING_MAX));
    let handshake = Duration::from_millis(settings.handshake_timeout_ms);
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let Ok(check) = pending.clone().acquire_owned().await else { return };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _check = check;
                let _ = stream.set_nodelay(true);
                match tokio::time::timeout(handshake, admit(stream, tls.as_ref())).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(GuardedStream { stream, _slot: slot })).await;
                    }
                    Ok(Err(why)) => tracing::debug!(%peer, "closed a gRPC connection: {why}"),
                    Err(_) => tracing::debug!(
                        %peer,
                        "closed a gRPC connection that did not finish its handshake and HTTP/2 preface in time"
                    ),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake if TLS is on, then the HTTP/2 preface check.
async fn admit(stream: tokio::net::TcpStream, tls: Option<&TlsAcceptor>) -> Result<ClientStream, String> {
    let Some(acceptor) = tls else {
        return match saw_preface(&stream).await {
            true => Ok(ClientStream::Plain(stream)),
            false => Err("it did not start with the HTTP/2 preface".into()),
        };
    };
    if starts_with_preface(&stream).await {
        crate::tls::warn_plaintext_client("gRPC");
        return Err("a plaintext HTTP/2 client on the TLS port".into());
    }
    let mut stream = acceptor.accept(stream).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut preface)
        .await
        .map_err(|e| format!("no HTTP/2 preface after the TLS handshake: {e}"))?;
    if preface != HTTP2_PREFACE {
        return Err("it did not start with the HTTP/2 preface after the TLS handshake".into());
    }
    Ok(ClientStream::Tls { stream: Box::new(stream), preface_replayed: 0 })
}

/// Whether the peer's first bytes (without consuming them) begin the HTTP/2 preface: on a TLS
/// port that is a client with TLS off, which the operator should hear about.
async fn starts_with_preface(stream: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 4];
    matches!(stream.peek(&mut first).await, Ok(n) if n > 0 && first[..n] == HTTP2_PREFACE[..n])
}

/// Waits (without consuming) until the peer's first bytes are the HTTP/2 preface.
async fn saw_preface(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if buf[..n] != HTTP2_PREFACE[..n] => return false,
            Ok(n) if n == HTTP2_PREFACE.len() => return true,
            // Part of the preface so far: wait for more bytes to arrive.
            Ok(_) => {
                if stream.readable().await.is_err() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
