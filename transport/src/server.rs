//! The broker side: accepts connections on a glommio executor and answers requests with a
//! `Handler`. Hello, heartbeat and echo are answered here; everything else goes to the handler.
//!
//! Per connection the server holds at most `credits` requests and `max_inflight_bytes` of
//! requests plus queued replies. When either runs out it stops reading, so a fast writer or a
//! slow reader is pushed back through TCP instead of growing memory.

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::sync::{Semaphore, StaticPermit};

use crate::config::TransportConfig;
use crate::error::{remote_code, FrameError, TransportError};
use crate::frame::{Frame, OutFrame};
use crate::link::ChannelSource;
use crate::messages::{Echo, EchoReply, ErrorReply, FrameKind, Heartbeat, HeartbeatAck, Hello, HelloAck};
use crate::peer_auth::{PeerAuthError, Purpose, MAC_BYTES};
use crate::reader::FrameReader;
use crate::tcp::{glommio_read, glommio_write_loop};

/// Answers one request. A returned `ErrorReply` is sent back as an error frame.
pub trait Handler: 'static {
    fn handle(&self, request: Frame) -> impl Future<Output = Result<OutFrame, ErrorReply>>;
}

impl From<FrameError> for ErrorReply {
    fn from(e: FrameError) -> ErrorReply {
        ErrorReply { code: e.code(), message: e.to_string() }
    }
}

/// What the server tells clients about itself in `HelloAck`.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    pub name: String,
    pub shard: u32,
    pub shard_count: u32,
    pub rdma_port: u16,
}

/// Counters shared with other threads (tests, stats endpoints).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    /// Connections cut off for a malformed frame (bad magic, version, CRC, length).
    pub protocol_errors: AtomicU64,
    /// Highest bytes of requests plus queued replies held by one connection.
    pub held_bytes_peak: AtomicU64,
    /// Connections closed because their first frame did not prove the transport secret.
    pub peers_refused: AtomicU64,
}

pub struct Server<H: Handler> {
    /// Never has permits; closing it wakes every task waiting on it (shutdown).
    stopping: Rc<Semaphore>,
    handler: H,
    config: TransportConfig,
    info: ServerInfo,
    stats: Arc<ServerStats>,
}

/// A reply on its way out, holding the credit and byte budget it uses until written.
struct Outgoing {
    frame: OutFrame,
    _credit: Option<StaticPermit>,
    _bytes: Option<StaticPermit>,
}

impl AsRef<OutFrame> for Outgoing {
    fn as_ref(&self) -> &OutFrame {
        &self.frame
    }
}

/// Per-connection budgets and state.
struct Budget {
    credits: Rc<Semaphore>,
    bytes: Rc<Semaphore>,
    max_bytes: u64,
    held_bytes: std::cell::Cell<u64>,
    /// Last frame received or reply queued, for the idle timeout.
    last_activity: std::cell::Cell<Instant>,
    /// Largest reply body the peer accepts (agreed in Hello).
    max_reply_bytes: std::cell::Cell<u64>,
}

impl Budget {
    fn new(config: &TransportConfig) -> Budget {
        Budget {
            credits: Rc::new(Semaphore::new(config.credits.into())),
            bytes: Rc::new(Semaphore::new(config.max_inflight_bytes)),
            max_bytes: config.max_inflight_bytes,
            held_bytes: std::cell::Cell::new(0),
            last_activity: std::cell::Cell::new(Instant::now()),
            max_reply_bytes: std::cell::Cell::new(config.max_frame_bytes),
        }
    }

    /// The read loop holds one credit while it reads the next frame, so "nothing in flight"
    /// is every other credit being free.
    fn nothing_in_flight(&self, credits: u32) -> bool {
        self.credits.available() + 1 >= u64::from(credits)
    }

    /// Capped so one frame larger than the whole budget still gets through, alone.
    async fn bytes_permit(&self, len: usize, stats: &ServerStats) -> Option<StaticPermit> {
        let units = (len as u64).min(self.max_bytes);
        let permit = self.bytes.acquire_static_permit(units).await.ok()?;
        let held = self.max_bytes - self.bytes.available();
        self.held_bytes.set(held);
        stats.held_bytes_peak.fetch_max(held, Ordering::Relaxed);
        Some(permit)
    }
}

impl<H: Handler> Server<H> {
    pub fn new(handler: H, config: TransportConfig, info: ServerInfo) -> Result<Rc<Server<H>>, TransportError> {
        config.validate()?;
        let stopping = Rc::new(Semaphore::new(0));
        Ok(Rc::new(Server { stopping, handler, config, info, stats: Arc::new(ServerStats::default()) }))
    }

    /// Stops accepting and reading; in-flight requests get `drain_timeout_ms` to finish.
    pub fn shutdown(&self) {
        self.stopping.close();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.try_acquire(1).is_err()
    }

    /// Resolves once `shutdown` has been called.
    async fn stopped(&self) {
        let _ = self.stopping.acquire(1).await;
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Accepts connections until `shutdown`, then waits (at most `drain_timeout_ms`) for
    /// open connections to finish. Each connection runs as its own task.
    pub async fn serve_tcp(self: Rc<Self>, listener: glommio::net::TcpListener) {
        loop {
            let accepted = {
                let accept = std::pin::pin!(listener.accept());
                let stop = std::pin::pin!(self.stopped());
                match futures::future::select(accept, stop).await {
                    futures::future::Either::Left((accepted, _)) => accepted,
                    futures::future::Either::Right(_) => break,
                }
            };
            match accepted {
                Ok(stream) => {
                    self.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    glommio::spawn_local(self.clone().tcp_connection(stream)).detach();
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        drop(listener);
        let deadline = Instant::now() + Duration::from_millis(self.config.drain_timeout_ms.saturating_add(1_000));
        while self.stats.connections_open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn tcp_connection(self: Rc<Self>, stream: glommio::net::TcpStream) {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(%peer, error = %e, "TCP_NODELAY");
        }
        // A peer that stops reading fails the next write that makes no progress for this
        // long, which closes the connection and frees what it held.
        if let Err(e) = stream.set_write_timeout(Some(Duration::from_millis(self.config.write_timeout_ms))) {
            tracing::warn!(%peer, error = %e, "write timeout");
        }
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let (mut read_half, write_half) = futures::AsyncReadExt::split(stream);
        let (out_tx, out_rx) = flume::unbounded::<Outgoing>();
        let stats = self.stats.clone();
        let writer =
            glommio::spawn_local(glommio_write_loop(write_half, out_rx, self.config.write_batch_bytes, move |n| {
                stats.frames_sent.fetch_add(n as u64, Ordering::Relaxed);
            }));
        let budget = Rc::new(Budget::new(&self.config));
        let mut reader = FrameReader::new(self.config.max_frame_bytes, self.config.read_buffer_bytes);
        let result = self.tcp_read_loop(&mut read_half, &mut reader, &budget, &out_tx).await;
        if let Err(e) = result {
            match &e {
                TransportError::Handshake { reason } => {
                    tracing::warn!(%peer, "refused a connection that did not prove the transport secret: {reason}")
                }
                _ => tracing::debug!(%peer, error = %e, "closing connection"),
            }
            if let TransportError::Frame(frame_error) = &e {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                // Tell the peer why before disconnecting it; its framing can't be trusted now.
                if let Ok(frame) = error_frame(0, ErrorReply::from(frame_error.clone()), self.config.max_frame_bytes) {
                    let _ = out_tx.send(Outgoing { frame, _credit: None, _bytes: None });
                }
            }
        }
        // The writer ends once every in-flight reply has been queued and written. On shutdown
        // it gets drain_timeout_ms; dropping the task then closes the socket.
        drop(out_tx);
        if self.is_stopping() {
            let _ = glommio::timer::timeout(Duration::from_millis(self.config.drain_timeout_ms), async {
                Ok(writer.await)
            })
            .await;
        } else {
            let _ = writer.await;
        }
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    async fn tcp_read_loop(
        self: &Rc<Self>,
        read_half: &mut futures::io::ReadHalf<glommio::net::TcpStream>,
        reader: &mut FrameReader,
        budget: &Rc<Budget>,
        out_tx: &flume::Sender<Outgoing>,
    ) -> Result<(), TransportError> {
        let mut admitted = self.config.secret.is_none();
        loop {
            // Stop reading while the connection has no credit left: back-pressure via TCP.
            let credit = {
                let credit = std::pin::pin!(budget.credits.acquire_static_permit(1));
                let stop = std::pin::pin!(self.stopped());
                match futures::future::select(credit, stop).await {
                    futures::future::Either::Left((credit, _)) => credit.map_err(|_| closed("connection closing"))?,
                    futures::future::Either::Right(_) => return Ok(()),
                }
            };
            let (frame, request_bytes) = {
                let read = std::pin::pin!(self.read_frame(read_half, reader, budget));
                let stop = std::pin::pin!(self.stopped());
                match futures::future::select(read, stop).await {
                    futures::future::Either::Left((Ok(Some(read)), _)) => read,
                    futures::future::Either::Left((Ok(None), _)) | futures::future::Either::Right(_) => return Ok(()),
                    futures::future::Either::Left((Err(e), _)) => return Err(e),
                }
            };
            self.stats.frames_received.fetch_add(1, Ordering::Relaxed);
            if !admitted {
                // Answered here, in order: nothing else is read until the peer is proven.
                self.admit(&frame, budget, out_tx)?;
                admitted = true;
                continue;
            }
            let (server, budget, out_tx) = (self.clone(), budget.clone(), out_tx.clone());
            glommio::spawn_local(async move {
                let reply = server.dispatch(frame, &budget.max_reply_bytes).await;
                // Released before the reply's bytes are taken, so replies can always make progress.
                drop(request_bytes);
                let reply_bytes = budget.bytes_permit(reply.len(), &server.stats).await;
                budget.last_activity.set(Instant::now());
                let _ = out_tx.send(Outgoing { frame: reply, _credit: Some(credit), _bytes: reply_bytes });
            })
            .detach();
        }
    }

    /// With a transport secret, the first frame must be a Hello that proves it. The HelloAck or
    /// the refusal is queued here; a refusal ends the connection (the caller closes it after
    /// the writer has sent what is queued).
    fn admit(&self, frame: &Frame, budget: &Budget, out_tx: &flume::Sender<Outgoing>) -> Result<(), TransportError> {
        let kind = frame.header().kind;
        let reply = if kind == FrameKind::Hello as u16 {
            self.hello(frame, &budget.max_reply_bytes)
        } else {
            let why = PeerAuthError::NotHelloFirst { kind };
            Err(ErrorReply { code: remote_code::UNAUTHENTICATED, message: why.to_string() })
        };
        let max = budget.max_reply_bytes.get();
        let (frame, refusal) = match reply {
            Ok(ack) => (Some(ack), None),
            Err(e) => (error_frame(frame.request_id(), e.clone(), max).ok(), Some(e)),
        };
        if let Some(frame) = frame {
            let _ = out_tx.send(Outgoing { frame, _credit: None, _bytes: None });
        }
        match refusal {
            None => Ok(()),
            Some(e) => {
                self.stats.peers_refused.fetch_add(1, Ordering::Relaxed);
                Err(TransportError::Handshake { reason: format!("error {}: {}", e.code, e.message) })
            }
        }
    }

    /// Reads until one frame is complete, charging its bytes to the budget as soon as its
    /// header shows the length (before a buffer of that size exists). Deadlines: a started
    /// frame must finish within `frame_timeout_ms`; a connection with nothing in flight must
    /// send something within `idle_timeout_ms` of its last activity. A pending read is never
    /// cancelled to check them (that could lose bytes); a timer wakes the check instead.
    async fn read_frame(
        &self,
        read_half: &mut futures::io::ReadHalf<glommio::net::TcpStream>,
        reader: &mut FrameReader,
        budget: &Budget,
    ) -> Result<Option<(Frame, Option<StaticPermit>)>, TransportError> {
        let mut frame_started: Option<Instant> = reader.frame_in_progress().then(Instant::now);
        let mut charged: Option<StaticPermit> = None;
        let check_every =
            Duration::from_millis((self.config.idle_timeout_ms.min(self.config.frame_timeout_ms) / 4).clamp(10, 1_000));
        loop {
            if charged.is_none() {
                if let Some(len) = reader.pending_frame_len()? {
                    charged = budget.bytes_permit(len, &self.stats).await;
                }
            }
            if let Some(frame) = reader.next_frame()? {
                return Ok(Some((frame, charged)));
            }
            let in_progress = frame_started.is_some();
            let spare = reader.spare()?;
            let n = {
                let mut read = std::pin::pin!(glommio_read(read_half, spare));
                loop {
                    let tick = std::pin::pin!(glommio::timer::sleep(check_every));
                    match futures::future::select(read.as_mut(), tick).await {
                        futures::future::Either::Left((result, _)) => break result,
                        futures::future::Either::Right(_) => {
                            let now = Instant::now();
                            if let Some(started) = frame_started {
                                if now.duration_since(started) >= Duration::from_millis(self.config.frame_timeout_ms) {
                                    return Err(closed("a frame did not finish arriving within frame_timeout_ms"));
                                }
                            } else if !in_progress
                                && budget.nothing_in_flight(self.config.credits)
                                && now.duration_since(budget.last_activity.get())
                                    >= Duration::from_millis(self.config.idle_timeout_ms)
                            {
                                return Err(closed("the peer sent nothing within idle_timeout_ms"));
                            }
                        }
                    }
                }
            }
            .map_err(|e| TransportError::io("reading frames", e))?;
            if n == 0 {
                if reader.frame_in_progress() {
                    return Err(closed("peer closed the connection in the middle of a frame"));
                }
                return Ok(None);
            }
            reader.advance(n);
            budget.last_activity.set(Instant::now());
            frame_started.get_or_insert_with(Instant::now);
        }
    }

    /// Serves a connection whose driver runs elsewhere (RDMA): frames arrive through `source`
    /// and replies leave through `outbound`. The driver enforces the credits.
    pub async fn serve_link(self: Rc<Self>, source: ChannelSource, outbound: flume::Sender<OutFrame>) {
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let credits = Rc::new(Semaphore::new(self.config.credits.into()));
        let max_reply_bytes = Rc::new(std::cell::Cell::new(self.config.max_frame_bytes));
        while let Some(item) = source.recv().await {
            let frame = match item {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::debug!(error = %e, "link closed");
                    break;
                }
            };
            self.stats.frames_received.fetch_add(1, Ordering::Relaxed);
            let Ok(credit) = credits.acquire_static_permit(1).await else { break };
            let (server, outbound, max_reply_bytes) = (self.clone(), outbound.clone(), max_reply_bytes.clone());
            glommio::spawn_local(async move {
                let reply = server.dispatch(frame, &max_reply_bytes).await;
                if outbound.send_async(reply).await.is_ok() {
                    server.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                }
                drop(credit);
            })
            .detach();
        }
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The reply to one request; never fails (failures become error frames). A reply larger
    /// than the peer agreed to accept becomes an Oversize error for that request alone.
    async fn dispatch(&self, frame: Frame, max_reply_bytes: &std::cell::Cell<u64>) -> OutFrame {
        let id = frame.request_id();
        let max = max_reply_bytes.get();
        let reply = match frame.kind() {
            Err(e) => Err(ErrorReply::from(e)),
            Ok(FrameKind::Hello) => self.hello(&frame, max_reply_bytes),
            Ok(FrameKind::Heartbeat) => frame
                .access::<Heartbeat>()
                .map_err(ErrorReply::from)
                .and_then(|hb| encode(id, &HeartbeatAck { sent_at_us: hb.sent_at_us.into() }, max)),
            Ok(FrameKind::Echo) => frame
                .access::<Echo>()
                .map_err(ErrorReply::from)
                // Copy the payload into the reply frame: the one copy on the echo path.
                .and_then(|echo| encode(id, &EchoReply { payload: &echo.payload }, max)),
            Ok(kind) if is_reply_kind(kind) => Err(ErrorReply {
                code: remote_code::PROTOCOL_VIOLATION,
                message: format!("{kind:?} is a reply; a server does not accept it as a request"),
            }),
            Ok(_) => self.handler.handle(frame).await.and_then(|reply| {
                let body_len = (reply.len() - crate::frame::FRAME_HEADER_BYTES) as u64;
                if body_len > max {
                    return Err(ErrorReply::from(FrameError::Oversize { body_len, max_frame_bytes: max }));
                }
                Ok(reply)
            }),
        };
        reply.or_else(|e| error_frame(id, e, max)).unwrap_or_else(|e| {
            // Only an error frame too large for max_frame_bytes gets here; send a short one.
            error_frame(id, ErrorReply { code: e.code, message: "error message too long".into() }, max)
                .expect("a short error frame always encodes")
        })
    }

    fn hello(&self, frame: &Frame, max_reply_bytes: &std::cell::Cell<u64>) -> Result<OutFrame, ErrorReply> {
        let hello = frame.access::<Hello>()?;
        let agreed = self.config.max_frame_bytes.min(hello.max_frame_bytes.into());
        if agreed < crate::config::MIN_FRAME_BYTES {
            return Err(ErrorReply::from(FrameError::Oversize {
                body_len: crate::config::MIN_FRAME_BYTES,
                max_frame_bytes: agreed,
            }));
        }
        let server_proof = match &self.config.secret {
            Some(secret) => secret
                .check(Purpose::Hello, hello.client_name.as_str(), &hello.proof.to_native())
                .map_err(|e| ErrorReply { code: remote_code::UNAUTHENTICATED, message: e.to_string() })?,
            None => [0; MAC_BYTES],
        };
        max_reply_bytes.set(agreed);
        let ack = HelloAck {
            server_name: self.info.name.clone(),
            shard: self.info.shard,
            shard_count: self.info.shard_count,
            max_frame_bytes: agreed,
            credits: self.config.credits.min(hello.credits_wanted.into()).max(1),
            rdma_port: self.info.rdma_port,
            server_proof,
        };
        encode(frame.request_id(), &ack, self.config.max_frame_bytes)
    }
}

/// Broker operations come in pairs from kind 10 up: even is the request, odd its reply
/// (`messages.rs` keeps that numbering).
fn is_reply_kind(kind: FrameKind) -> bool {
    matches!(
        kind,
        FrameKind::Error | FrameKind::HelloAck | FrameKind::HeartbeatAck | FrameKind::EchoReply | FrameKind::RdmaAccept
    ) || (kind as u16 >= FrameKind::AppendRequest as u16 && (kind as u16) % 2 == 1)
}

fn encode<M: crate::frame::Message>(id: u64, message: &M, max: u64) -> Result<OutFrame, ErrorReply> {
    OutFrame::encode(id, message, max).map_err(ErrorReply::from)
}

/// An error frame answering request `id`.
pub fn error_frame(id: u64, reply: ErrorReply, max_frame_bytes: u64) -> Result<OutFrame, ErrorReply> {
    OutFrame::encode(id, &reply, max_frame_bytes).map_err(|_| reply)
}

fn closed(reason: &str) -> TransportError {
    TransportError::Closed { reason: reason.to_string() }
}

/// Answers every broker operation with NOT_SUPPORTED; for servers that only need the
/// built-in kinds (hello, heartbeat, echo), such as benchmarks and tests.
#[derive(Debug, Default)]
pub struct BuiltinsOnly;

impl Handler for BuiltinsOnly {
    async fn handle(&self, request: Frame) -> Result<OutFrame, ErrorReply> {
        Err(ErrorReply {
            code: remote_code::NOT_SUPPORTED,
            message: format!("frame kind {} is not served here", request.header().kind),
        })
    }
}

/// A server running on its own glommio executor thread, stopped on drop.
pub struct ServerThread {
    /// The TCP listener's address, or the RDMA bootstrap address for an RDMA-only server.
    pub addr: std::net::SocketAddr,
    pub rdma_addr: Option<std::net::SocketAddr>,
    pub stats: Arc<ServerStats>,
    stop: Option<flume::Sender<()>>,
    join: Option<glommio::ExecutorJoinHandle<()>>,
}

/// Where a `ServerThread` listens.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenOn {
    pub tcp: Option<std::net::SocketAddr>,
    pub rdma: Option<std::net::SocketAddr>,
}

impl ServerThread {
    /// Binds `bind` and serves TCP with the handler `make_handler` builds on the new thread.
    pub fn spawn_tcp<H: Handler, F: FnOnce() -> H + Send + 'static>(
        bind: std::net::SocketAddr,
        config: TransportConfig,
        info: ServerInfo,
        make_handler: F,
        pin_core: Option<usize>,
    ) -> Result<ServerThread, TransportError> {
        Self::spawn(ListenOn { tcp: Some(bind), rdma: None }, config, info, make_handler, pin_core)
    }

    /// Serves TCP, RDMA or both from one executor thread. With both, `HelloAck` tells TCP
    /// clients the RDMA port, so `auto://` clients can move over.
    pub fn spawn<H: Handler, F: FnOnce() -> H + Send + 'static>(
        listen: ListenOn,
        config: TransportConfig,
        info: ServerInfo,
        make_handler: F,
        pin_core: Option<usize>,
    ) -> Result<ServerThread, TransportError> {
        config.validate()?;
        if listen.tcp.is_none() && listen.rdma.is_none() {
            return Err(TransportError::Config { reason: "a server needs a TCP or an RDMA address".into() });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = flume::bounded::<()>(1);
        let placement = match pin_core {
            Some(core) => glommio::Placement::Fixed(core),
            None => glommio::Placement::Unbound,
        };
        let join = glommio::LocalExecutorBuilder::new(placement)
            .name("sluice-transport-server")
            .spawn(move || async move {
                let local = match Server::start_local(listen, config, info, make_handler(), pin_core) {
                    Ok(local) => local,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((local.tcp_addr, local.rdma_addr, local.server.stats())));
                let stopper = local.server.clone();
                glommio::spawn_local(async move {
                    let _ = stop_rx.recv_async().await;
                    stopper.shutdown();
                })
                .detach();
                local.serving.await;
            })
            .map_err(|e| TransportError::Io {
                context: "starting the server executor".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let (addr, rdma_addr, stats) = ready_rx
            .recv()
            .map_err(|_| TransportError::Closed { reason: "server thread exited during start-up".into() })??;
        let addr = addr.or(rdma_addr).expect("a TCP or an RDMA address");
        Ok(ServerThread { addr, rdma_addr, stats, stop: Some(stop_tx), join: Some(join) })
    }
}

/// How often, and how long apart, a listener bind is retried while the address is in use.
const BIND_RETRIES: u32 = 50;
const BIND_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// A server started on the current glommio executor (see `Server::start_local`).
pub struct LocalServer<H: Handler> {
    pub server: Rc<Server<H>>,
    pub tcp_addr: Option<std::net::SocketAddr>,
    pub rdma_addr: Option<std::net::SocketAddr>,
    /// Completes once the server has stopped (`shutdown`) and drained its connections.
    pub serving: glommio::Task<()>,
}

impl<H: Handler> Server<H> {
    /// Binds TCP and/or RDMA and serves them from the *current* glommio executor, so a
    /// handler can share that executor's state (a broker shard) with no hop between threads.
    /// Must be called from inside a glommio executor.
    pub fn start_local(
        listen: ListenOn,
        config: TransportConfig,
        mut info: ServerInfo,
        handler: H,
        pin_core: Option<usize>,
    ) -> Result<LocalServer<H>, TransportError> {
        config.validate()?;
        if listen.tcp.is_none() && listen.rdma.is_none() {
            return Err(TransportError::Config { reason: "a server needs a TCP or an RDMA address".into() });
        }
        if let Some(addr) = listen.tcp.filter(|a| a.port() != 0) {
            // glommio binds with SO_REUSEPORT, which would let a second server share a port
            // already taken and silently split connections between the two. So a listener
            // already on the port is an error. (A probe bind would also trip over connections
            // a killed server left in FIN-WAIT-2, blocking restarts for a minute.) A process
            // killed a moment ago may still hold its listener briefly, hence the retries.
            let mut attempts = 0;
            while crate::endpoint::someone_listens_on(addr) {
                if attempts == BIND_RETRIES {
                    return Err(TransportError::io(
                        format!("binding {addr}: another process already listens there"),
                        std::io::ErrorKind::AddrInUse.into(),
                    ));
                }
                attempts += 1;
                std::thread::sleep(BIND_RETRY_INTERVAL);
            }
        }
        let listener = listen.tcp.map(glommio::net::TcpListener::bind).transpose().map_err(|e| TransportError::Io {
            context: format!("binding {:?}", listen.tcp),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tcp_addr = match &listener {
            Some(l) => Some(l.local_addr().map_err(|e| {
                TransportError::io("reading the listener address", std::io::Error::other(e.to_string()))
            })?),
            None => None,
        };
        let rdma = match listen.rdma {
            Some(bind) => Some(RdmaAcceptor::spawn(bind, &config)?),
            None => None,
        };
        let rdma_addr = rdma.as_ref().map(|r| r.addr);
        if let Some(addr) = rdma_addr {
            info.rdma_port = addr.port();
        }
        let server = Server::new(handler, config, info)?;
        let accepted = rdma.map(|r| r.accepted);
        let serving_server = server.clone();
        let serving = glommio::spawn_local(async move {
            let server = serving_server;
            let rdma_task =
                accepted.map(|accepted| glommio::spawn_local(server.clone().serve_rdma(accepted, pin_core)));
            match listener {
                Some(listener) => server.clone().serve_tcp(listener).await,
                None => server.stopped().await,
            }
            if let Some(task) = rdma_task {
                task.await;
            }
        });
        Ok(LocalServer { server, tcp_addr, rdma_addr, serving })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        if let Some(addr) = self.rdma_addr {
            // Wake the acceptor thread out of its blocking accept so it sees the executor is gone.
            let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200));
        }
    }
}

/// Accepts RDMA connections on a blocking thread (the bootstrap exchange is blocking) and
/// hands each one to the executor.
struct RdmaAcceptor {
    addr: std::net::SocketAddr,
    accepted: flume::Receiver<crate::rdma::PendingRdma>,
}

impl RdmaAcceptor {
    fn spawn(bind: std::net::SocketAddr, config: &TransportConfig) -> Result<RdmaAcceptor, TransportError> {
        let listener = crate::rdma::RdmaListener::bind(bind, config)?;
        let addr = listener.local_addr();
        let (tx, rx) = flume::bounded(16);
        std::thread::Builder::new()
            .name("sluice-rdma-accept".into())
            .spawn(move || loop {
                let accepted = listener.accept();
                if tx.is_disconnected() {
                    return;
                }
                match accepted {
                    Ok(pending) => {
                        if tx.send(pending).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "RDMA accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .map_err(|e| TransportError::io("starting the RDMA acceptor", e))?;
        Ok(RdmaAcceptor { addr, accepted: rx })
    }
}

impl<H: Handler> Server<H> {
    /// Starts a driver for each accepted RDMA connection (a task on this executor, or a thread
    /// pinned to its core: `rdma.poll_mode`) and serves it until it closes or the server stops.
    async fn serve_rdma(self: Rc<Self>, accepted: flume::Receiver<crate::rdma::PendingRdma>, pin_core: Option<usize>) {
        let live_links = Rc::new(std::cell::Cell::new(0u32));
        loop {
            let next = {
                let recv = std::pin::pin!(accepted.recv_async());
                let stop = std::pin::pin!(self.stopped());
                match futures::future::select(recv, stop).await {
                    futures::future::Either::Left((Ok(pending), _)) => pending,
                    _ => return,
                }
            };
            if live_links.get() >= self.config.rdma.max_links {
                // Each link pins its registered memory: refuse rather than pin without bound.
                tracing::warn!(
                    max_links = self.config.rdma.max_links,
                    "refusing an RDMA connection: rdma.max_links reached"
                );
                drop(next);
                continue;
            }
            self.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
            // Credits bound what a well-behaved peer queues; the slack covers control frames.
            let (sink, source) = crate::link::ChannelSink::new(self.config.credits as usize + 64);
            let (out_tx, out_rx) = flume::bounded(self.config.credits as usize);
            let started = match self.config.rdma.poll_mode {
                crate::config::RdmaPollMode::Runtime => next.spawn_on_glommio(out_rx, sink),
                crate::config::RdmaPollMode::Thread => next.start(out_rx, sink, pin_core),
            };
            let driver = match started {
                Ok(driver) => driver,
                Err(e) => {
                    tracing::warn!(error = %e, "starting an RDMA connection failed");
                    continue;
                }
            };
            let (server, live_links) = (self.clone(), live_links.clone());
            live_links.set(live_links.get() + 1);
            glommio::spawn_local(async move {
                server.serve_link(source, out_tx).await;
                drop(driver);
                live_links.set(live_links.get() - 1);
            })
            .detach();
        }
    }
}
