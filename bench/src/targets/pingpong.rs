//! The floors: a raw TCP ping-pong (no framing at all) and the transport's Echo round trip.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt};
use sluice_transport::messages::{Echo, EchoReply};
use sluice_transport::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

use super::{connect_error, DurabilityInfo, Producer, Session, TargetSpec};
use crate::error::BenchError;
use crate::workload::Workload;

/// Connections accept at most this much per message, so a bad size prefix cannot allocate.
const RAW_MESSAGE_MAX_BYTES: usize = 64 << 20;

/// A glommio server that echoes fixed-size messages: the client first sends the size (u32 LE),
/// then each message comes straight back.
pub struct RawEchoServer {
    pub addr: SocketAddr,
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl RawEchoServer {
    /// Starts on its own executor thread, pinned to `core` when given.
    pub fn spawn(bind: SocketAddr, core: Option<usize>) -> Result<RawEchoServer, BenchError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let placement = core.map(glommio::Placement::Fixed).unwrap_or(glommio::Placement::Unbound);
        glommio::LocalExecutorBuilder::new(placement)
            .name("raw-echo")
            .spawn(move || async move {
                let listener = match glommio::net::TcpListener::bind(bind) {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr().map_err(|e| e.to_string()));
                loop {
                    if stop_rx.try_recv().is_ok() {
                        return;
                    }
                    let accept = std::pin::pin!(listener.accept());
                    let tick = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(50)));
                    let futures::future::Either::Left((Ok(stream), _)) = futures::future::select(accept, tick).await
                    else {
                        continue;
                    };
                    glommio::spawn_local(echo(stream)).detach();
                }
            })
            .map_err(|e| BenchError::target("raw-tcp", format!("starting the echo server: {e}")))?;
        let addr = ready_rx
            .recv()
            .map_err(|_| BenchError::target("raw-tcp", "the echo server thread ended"))?
            .map_err(|e| BenchError::target("raw-tcp", format!("binding the echo server: {e}")))?;
        Ok(RawEchoServer { addr, stop: Some(stop_tx) })
    }
}

async fn echo(mut stream: glommio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut size = [0u8; 4];
    if stream.read_exact(&mut size).await.is_err() {
        return;
    }
    let size = u32::from_le_bytes(size) as usize;
    if size == 0 || size > RAW_MESSAGE_MAX_BYTES {
        return;
    }
    let mut buf = vec![0u8; size];
    while stream.read_exact(&mut buf).await.is_ok() {
        if stream.write_all(&buf).await.is_err() {
            return;
        }
    }
}

impl Drop for RawEchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One raw connection; sends may overlap (open loop) and the echoes come back in order.
struct RawTcpProducer {
    writer: tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    waiting: Arc<Mutex<VecDeque<oneshot::Sender<()>>>>,
    _server: Option<Arc<RawEchoServer>>,
}

impl Producer for Arc<RawTcpProducer> {
    fn send(&self, _topic: usize, _sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let this = self.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            {
                let mut writer = this.writer.lock().await;
                this.waiting.lock().map_err(|_| BenchError::target("raw-tcp", "poisoned"))?.push_back(tx);
                writer.write_all(&body).await.map_err(|e| BenchError::target("raw-tcp", e))?;
            }
            rx.await.map_err(|_| BenchError::target("raw-tcp", "the connection closed"))
        })
    }
}

pub async fn open_raw(spec: &TargetSpec, workload: &Workload) -> Result<Session, BenchError> {
    // No endpoint: the echo server runs here, on the last core (clients float on the others).
    let server = if spec.endpoint.is_empty() {
        let core = core_affinity::get_core_ids().and_then(|ids| ids.last().map(|c| c.id));
        Some(Arc::new(RawEchoServer::spawn("127.0.0.1:0".parse().expect("constant address"), core)?))
    } else {
        None
    };
    let addr = match &server {
        Some(server) => server.addr.to_string(),
        None => spec.endpoint.clone(),
    };
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    for _ in 0..workload.producers {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.map_err(|e| connect_error(spec, e))?;
        stream.set_nodelay(true).map_err(|e| connect_error(spec, e))?;
        stream.write_all(&(workload.size_bytes as u32).to_le_bytes()).await.map_err(|e| connect_error(spec, e))?;
        let (mut read, write) = stream.into_split();
        let waiting: Arc<Mutex<VecDeque<oneshot::Sender<()>>>> = Arc::default();
        let size = workload.size_bytes;
        let reader_waiting = waiting.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; size];
            while read.read_exact(&mut buf).await.is_ok() {
                let next = reader_waiting.lock().ok().and_then(|mut w| w.pop_front());
                if let Some(tx) = next {
                    let _ = tx.send(());
                }
            }
        });
        producers.push(Arc::new(Arc::new(RawTcpProducer {
            writer: tokio::sync::Mutex::new(write),
            waiting,
            _server: server.clone(),
        })));
    }
    Ok(Session {
        producers,
        consumers: Vec::new(),
        durability: DurabilityInfo { level: None, detail: "none (ping-pong, no storage)".into() },
        path: "raw TCP, no framing".into(),
        teardown: None,
    })
}

struct TransportProducer {
    client: Client,
}

impl Producer for Arc<TransportProducer> {
    fn send(&self, _topic: usize, _sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>> {
        let this = self.clone();
        Box::pin(async move {
            let reply =
                this.client.call(&Echo { payload: &body }).await.map_err(|e| BenchError::target("transport", e))?;
            let echoed = reply.access::<EchoReply>().map_err(|e| BenchError::target("transport", e))?.payload.len();
            if echoed != body.len() {
                return Err(BenchError::target("transport", format!("echoed {echoed} of {} bytes", body.len())));
            }
            Ok(())
        })
    }
}

/// The endpoint is a transport URL (`tcp://host:port` or `rdma://host:port`); bare
/// `host:port` means TCP.
pub fn transport_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("tcp://{endpoint}")
    }
}

pub async fn open_transport(spec: &TargetSpec, workload: &Workload) -> Result<Session, BenchError> {
    let url = transport_url(&spec.endpoint);
    let mut producers: Vec<Arc<dyn Producer>> = Vec::new();
    let mut kind = None;
    for _ in 0..workload.producers {
        let client = Client::connect(&url, super::client_transport(), "sluice-bench")
            .await
            .map_err(|e| connect_error(spec, e))?;
        kind = Some(client.transport());
        producers.push(Arc::new(Arc::new(TransportProducer { client })));
    }
    let scheme = kind.map_or("?".to_string(), |k| format!("{k:?}").to_uppercase());
    Ok(Session {
        producers,
        consumers: Vec::new(),
        durability: DurabilityInfo { level: None, detail: "none (ping-pong, no storage)".into() },
        path: format!("transport Echo over {scheme}"),
        teardown: None,
    })
}
