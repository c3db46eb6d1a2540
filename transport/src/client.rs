//! The proxy side: a pipelined request–response client on tokio. Many requests are in flight
//! at once, matched to replies by request id; a caller waits for a credit before sending, so
//! at most `credits` requests are outstanding per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::config::TransportConfig;
use crate::endpoint::{Endpoint, Scheme};
use crate::error::{FrameError, TransportError};
use crate::frame::{Frame, Message, OutFrame, Request};
use crate::link::FrameSink;
use crate::messages::{ErrorReply, FrameKind, Heartbeat, Hello, HelloAck};
use crate::peer_auth::Purpose;

/// Which driver a client ended up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Rdma,
}

/// A connection to one server (one broker shard). Cheap to clone; the connection closes when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    outbound: flume::Sender<OutFrame>,
    pending: Mutex<HashMap<u64, Pending>>,
    closed: Mutex<Option<TransportError>>,
    credits: Arc<Semaphore>,
    next_id: AtomicU64,
    last_send_ms: AtomicU64,
    started: Instant,
    config: TransportConfig,
    max_frame_bytes: AtomicU64,
    kind: TransportKind,
    peer: String,
    server: Mutex<Option<HelloAck>>,
    /// Keeps the RDMA driver (task or thread) running; dropping it stops the driver.
    _rdma: Mutex<Option<crate::rdma::RdmaDriver>>,
    /// Round-trip histogram handles by request kind, made on first use.
    round_trips: [OnceLock<metrics::Histogram>; ROUND_TRIP_KINDS],
    credit_waits: metrics::Counter,
    /// Reads and writes that moved bytes so far (TCP); the liveness monitor watches it move.
    progress: AtomicU64,
    /// Closes the TCP driver from this side (set once the driver runs).
    tcp_close: OnceLock<Arc<crate::tcp::CloseOnce>>,
    /// Turns true when the connection closes, for owners that wait for it (`Client::closed`).
    closed_signal: tokio::sync::watch::Sender<bool>,
}

/// Request kinds below this number get a cached round-trip handle (every kind today).
const ROUND_TRIP_KINDS: usize = 64;

/// A request the server holds. Its credit stays taken until the reply (or the connection's
/// end) arrives, even if the caller gave up, because the server still counts it.
struct Pending {
    waiter: Option<oneshot::Sender<Result<Frame, TransportError>>>,
    _credit: OwnedSemaphorePermit,
}

/// Delivers to the client without keeping it alive, so dropping the last `Client` closes
/// the connection even while the reader task runs.
struct WeakSink(Weak<ClientInner>);

impl FrameSink for WeakSink {
    fn deliver(&self, frame: Frame) {
        let Some(inner) = self.0.upgrade() else { return };
        if frame.request_id() == 0 && frame.header().kind == FrameKind::Error as u16 {
            // Request id 0 is the connection itself: the server is about to disconnect us.
            let error = match frame.access::<ErrorReply>() {
                Ok(e) => TransportError::Remote { code: e.code.into(), message: e.message.to_string() },
                Err(e) => e.into(),
            };
            return inner.fail_all(error);
        }
        let pending = inner.pending.lock().expect("pending lock").remove(&frame.request_id());
        // The credit goes back before the caller wakes, so a caller that looks at the credits
        // right after its reply sees it returned. No waiter: the call timed out or was cancelled.
        if let Some(Pending { waiter, _credit }) = pending {
            drop(_credit);
            if let Some(waiter) = waiter {
                let _ = waiter.send(Ok(frame));
            }
        }
    }

    fn closed(&self, error: TransportError) {
        if let Some(inner) = self.0.upgrade() {
            inner.fail_all(error);
        }
    }

    fn progress(&self) {
        if let Some(inner) = self.0.upgrade() {
            inner.progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ClientInner {
    fn fail_all(&self, error: TransportError) {
        // Mark closed before draining: a call that inserts after the drain then sees it.
        let error = self.closed.lock().expect("closed lock").get_or_insert(error).duplicate();
        self.credits.close();
        let drained: Vec<Pending> = self.pending.lock().expect("pending lock").drain().map(|(_, p)| p).collect();
        for pending in drained {
            if let Some(waiter) = pending.waiter {
                let _ = waiter.send(Err(error.duplicate()));
            }
        }
        self.closed_signal.send_replace(true);
    }

    /// Ends the connection from this side: every call fails with `error` and the driver lets go
    /// of the socket (TCP) or the queue pair (RDMA).
    fn abort(&self, error: TransportError) {
        if let Some(close) = self.tcp_close.get() {
            close.close(error.duplicate());
        }
        self.fail_all(error);
        if let Some(driver) = self._rdma.lock().expect("driver lock").take() {
            // Dropping the driver joins its thread: not on a runtime worker.
            tokio::task::spawn_blocking(move || drop(driver));
        }
    }

    fn closed_error(&self) -> Option<TransportError> {
        self.closed.lock().expect("closed lock").as_ref().map(TransportError::duplicate)
    }
}

/// If the call is cancelled or times out after sending, the entry stays (holding its credit)
/// without a waiter until the late reply or the connection's end removes it.
struct PendingGuard<'a> {
    inner: &'a ClientInner,
    id: u64,
    sent: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self.inner.pending.lock().expect("pending lock");
        if self.sent {
            if let Some(entry) = pending.get_mut(&self.id) {
                entry.waiter = None;
            }
        } else {
            pending.remove(&self.id);
        }
    }
}

impl Client {
    /// Connects and exchanges Hello. Must run inside a tokio runtime.
    pub async fn connect(endpoint: &str, config: TransportConfig, client_name: &str) -> Result<Client, TransportError> {
        config.validate()?;
        let endpoint = Endpoint::parse(endpoint)?;
        let addr = endpoint.socket_addr()?;
        match endpoint.scheme {
            Scheme::Tcp => Self::connect_tcp(addr, config, client_name).await,
            Scheme::Rdma => Self::connect_rdma(addr, config, client_name).await,
            Scheme::Auto => Self::connect_auto(addr, config, client_name).await,
        }
    }

    async fn connect_tcp(addr: SocketAddr, config: TransportConfig, name: &str) -> Result<Client, TransportError> {
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                addr: addr.to_string(),
                timeout_ms: config.connect_timeout_ms,
            })?
            .map_err(|e| TransportError::io(format!("connecting to {addr}"), e))?;
        let (client, outbound) = Client::new_inner(config.clone(), TransportKind::Tcp, addr.to_string(), None);
        let close = crate::tcp::spawn_tokio_driver(
            stream,
            outbound,
            Arc::new(WeakSink(Arc::downgrade(&client.inner))),
            &config,
        )?;
        let _ = client.inner.tcp_close.set(close);
        client.hello(name).await?;
        Ok(client)
    }

    async fn connect_rdma(addr: SocketAddr, config: TransportConfig, name: &str) -> Result<Client, TransportError> {
        let rdma_config = config.clone();
        let pending = tokio::task::spawn_blocking(move || crate::rdma::connect(addr, &rdma_config))
            .await
            .map_err(|e| TransportError::Rdma { op: "connect", detail: e.to_string() })??;
        let (client, outbound) = Client::new_inner(config, TransportKind::Rdma, addr.to_string(), None);
        let sink = Arc::new(WeakSink(Arc::downgrade(&client.inner)));
        let driver = match client.inner.config.rdma.poll_mode {
            crate::config::RdmaPollMode::Runtime => pending.spawn_on_tokio(outbound, sink)?,
            crate::config::RdmaPollMode::Thread => pending.start(outbound, sink, None)?,
        };
        *client.inner._rdma.lock().expect("driver lock") = Some(driver);
        client.hello(name).await?;
        Ok(client)
    }

    /// TCP first (it always works); switch to RDMA when this host has a device and the
    /// server offers an RDMA port. The choice and the reason are logged.
    async fn connect_auto(addr: SocketAddr, config: TransportConfig, name: &str) -> Result<Client, TransportError> {
        let tcp = Self::connect_tcp(addr, config.clone(), name).await?;
        let rdma_port = tcp.server().map(|s| s.rdma_port).unwrap_or(0);
        let device = crate::rdma::device_present();
        if !device {
            tracing::info!(%addr, "transport: chose tcp (no RDMA device with an active port on this host)");
            return Ok(tcp);
        }
        if rdma_port == 0 {
            tracing::info!(%addr, "transport: chose tcp (the server offers no RDMA listener)");
            return Ok(tcp);
        }
        let rdma_addr = SocketAddr::new(addr.ip(), rdma_port);
        match Self::connect_rdma(rdma_addr, config, name).await {
            Ok(rdma) => {
                tracing::info!(%rdma_addr, "transport: chose rdma (device present, server offers rdma)");
                Ok(rdma)
            }
            Err(e) => {
                tracing::warn!(%rdma_addr, error = %e, "transport: chose tcp (RDMA connect failed)");
                Ok(tcp)
            }
        }
    }

    fn new_inner(
        config: TransportConfig,
        kind: TransportKind,
        peer: String,
        rdma: Option<crate::rdma::RdmaDriver>,
    ) -> (Client, flume::Receiver<OutFrame>) {
        let (tx, rx) = flume::bounded(config.credits as usize);
        let inner = Arc::new(ClientInner {
            outbound: tx,
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            credits: Arc::new(Semaphore::new(config.credits as usize)),
            next_id: AtomicU64::new(1),
            last_send_ms: AtomicU64::new(0),
            started: Instant::now(),
            max_frame_bytes: AtomicU64::new(config.max_frame_bytes),
            config,
            kind,
            peer,
            server: Mutex::new(None),
            _rdma: Mutex::new(rdma),
            round_trips: std::array::from_fn(|_| OnceLock::new()),
            credit_waits: metrics::counter!(
                crate::metrics::CREDIT_WAITS, "transport" => crate::metrics::transport_label(kind)
            ),
            progress: AtomicU64::new(0),
            tcp_close: OnceLock::new(),
            closed_signal: tokio::sync::watch::Sender::new(false),
        });
        spawn_heartbeat(Arc::downgrade(&inner));
        // An RDMA link's reliable connection reports a peer that stops acknowledging by itself
        // (retries exhausted), and rdma.liveness_probe_ms covers an idle one.
        if kind == TransportKind::Tcp {
            spawn_liveness(Arc::downgrade(&inner));
        }
        (Client { inner }, rx)
    }

    async fn hello(&self, name: &str) -> Result<(), TransportError> {
        let secret = self.inner.config.secret.as_ref();
        let proof = secret.map(|s| s.prove(Purpose::Hello, name)).unwrap_or_default();
        let hello = Hello {
            client_name: name.to_string(),
            max_frame_bytes: self.inner.config.max_frame_bytes,
            credits_wanted: self.inner.config.credits,
            proof: proof.clone(),
        };
        let reply = self.call(&hello).await?;
        let ack = reply.access::<HelloAck>()?;
        if let Some(secret) = secret {
            secret
                .check_answer(&proof, &ack.server_proof)
                .map_err(|e| TransportError::Handshake { reason: e.to_string() })?;
        }
        let ack = HelloAck {
            server_name: ack.server_name.to_string(),
            shard: ack.shard.into(),
            shard_count: ack.shard_count.into(),
            max_frame_bytes: ack.max_frame_bytes.into(),
            credits: ack.credits.into(),
            rdma_port: ack.rdma_port.into(),
            server_proof: ack.server_proof,
        };
        if ack.credits == 0
            || ack.credits > self.inner.config.credits
            || ack.max_frame_bytes > self.inner.config.max_frame_bytes
        {
            return Err(TransportError::Handshake { reason: format!("server offered limits beyond ours: {ack:?}") });
        }
        // Adopt the server's (possibly lower) limits. The Hello's own credit may still be on
        // its way back from the reader task, so forget until the whole difference is gone.
        let mut surplus = (self.inner.config.credits - ack.credits) as usize;
        while surplus > 0 {
            surplus -= self.inner.credits.forget_permits(surplus);
            if surplus > 0 {
                tokio::task::yield_now().await;
            }
        }
        self.inner.max_frame_bytes.store(ack.max_frame_bytes, Ordering::Relaxed);
        *self.inner.server.lock().expect("server lock") = Some(ack);
        Ok(())
    }

    /// Sends `request` and waits for its reply frame, checked to be `R::Reply`'s kind. Read
    /// the reply in place with `frame.access::<R::Reply>()`. An error frame becomes
    /// `TransportError::Remote` with its code.
    pub async fn call<R: Request>(&self, request: &R) -> Result<Frame, TransportError> {
        let frame = self.call_kind(R::KIND, |id, max| OutFrame::encode(id, request, max)).await?;
        let kind = frame.header().kind;
        if kind == FrameKind::Error as u16 {
            let error = frame.access::<ErrorReply>()?;
            return Err(TransportError::Remote { code: error.code.into(), message: error.message.to_string() });
        }
        if kind != <R::Reply as Message>::KIND as u16 {
            return Err(FrameError::UnexpectedKind { expected: <R::Reply as Message>::KIND as u16, found: kind }.into());
        }
        Ok(frame)
    }

    /// Sends a pre-encoded frame (its request id is replaced) and returns whatever comes back.
    pub async fn call_raw(&self, frame: OutFrame) -> Result<Frame, TransportError> {
        let kind = FrameKind::try_from(frame.kind()).unwrap_or(FrameKind::Error);
        self.call_kind(kind, |id, _| Ok(frame.with_request_id(id))).await
    }

    /// One call, timed into the round-trip histogram (by transport and request kind).
    async fn call_kind(
        &self,
        kind: FrameKind,
        encode: impl FnOnce(u64, u64) -> Result<OutFrame, FrameError>,
    ) -> Result<Frame, TransportError> {
        let started = Instant::now();
        let result = self.call_timed(encode).await;
        let elapsed_s = started.elapsed().as_secs_f64();
        let transport = crate::metrics::transport_label(self.inner.kind);
        let histogram =
            || metrics::histogram!(crate::metrics::ROUND_TRIP, "transport" => transport, "request" => kind.name());
        match self.inner.round_trips.get(kind as usize) {
            Some(slot) => slot.get_or_init(histogram).record(elapsed_s),
            None => histogram().record(elapsed_s),
        }
        result
    }

    async fn call_timed(
        &self,
        encode: impl FnOnce(u64, u64) -> Result<OutFrame, FrameError>,
    ) -> Result<Frame, TransportError> {
        let inner = &*self.inner;
        if let Some(error) = inner.closed_error() {
            return Err(error);
        }
        let timeout_ms = inner.config.request_timeout_ms;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        // Wait for a credit: this is the back-pressure callers feel.
        if inner.credits.available_permits() == 0 {
            inner.credit_waits.increment(1);
        }
        let credit = match tokio::time::timeout_at(deadline, inner.credits.clone().acquire_owned()).await {
            Err(_) => return Err(TransportError::Timeout { timeout_ms }),
            Ok(Err(_)) => {
                return Err(inner.closed_error().unwrap_or(TransportError::Closed { reason: "client closed".into() }))
            }
            Ok(Ok(credit)) => credit,
        };
        self.call_with_credit(credit, deadline, encode).await
    }

    /// Sends one request on a credit already taken and waits for its reply until `deadline`.
    async fn call_with_credit(
        &self,
        credit: OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
        encode: impl FnOnce(u64, u64) -> Result<OutFrame, FrameError>,
    ) -> Result<Frame, TransportError> {
        let inner = &*self.inner;
        let timeout_ms = inner.config.request_timeout_ms;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(id, inner.max_frame_bytes.load(Ordering::Relaxed))?;
        let (tx, rx) = oneshot::channel();
        inner.pending.lock().expect("pending lock").insert(id, Pending { waiter: Some(tx), _credit: credit });
        let mut guard = PendingGuard { inner, id, sent: false };
        // A failure that raced the insert above would leave this call waiting for nothing.
        if let Some(error) = inner.closed_error() {
            return Err(error);
        }
        inner.last_send_ms.store(inner.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        // The channel has room for every credit, so this does not wait in practice.
        let sent = tokio::time::timeout_at(deadline, inner.outbound.send_async(frame)).await;
        guard.sent = matches!(sent, Ok(Ok(())));
        sent.map_err(|_| TransportError::Timeout { timeout_ms })?
            .map_err(|_| TransportError::Closed { reason: "connection driver stopped".into() })?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => {
                Err(inner.closed_error().unwrap_or(TransportError::Closed { reason: "connection closed".into() }))
            }
            Err(_) => Err(TransportError::Timeout { timeout_ms }),
        }
    }

    pub fn transport(&self) -> TransportKind {
        self.inner.kind
    }

    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// What the server said in its HelloAck.
    pub fn server(&self) -> Option<HelloAck> {
        self.inner.server.lock().expect("server lock").clone()
    }

    /// Credits not in use right now.
    pub fn available_credits(&self) -> usize {
        self.inner.credits.available_permits()
    }

    /// The error that closed the connection, if it is closed.
    pub fn closed_error(&self) -> Option<TransportError> {
        self.inner.closed_error()
    }

    /// Waits until the connection closes, for any reason (the peer, an I/O error, a dead link).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut signal = self.inner.closed_signal.subscribe();
        async move {
            let _ = signal.wait_for(|closed| *closed).await;
        }
    }
}

/// Sends a heartbeat whenever the connection has been quiet for `heartbeat_interval_ms`,
/// so the server's idle timeout only cuts off clients that are really gone.
fn spawn_heartbeat(inner: Weak<ClientInner>) {
    tokio::spawn(async move {
        let mut wait_ms = match inner.upgrade() {
            Some(inner) => inner.config.heartbeat_interval_ms,
            None => return,
        };
        loop {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let Some(strong) = inner.upgrade() else { return };
            if strong.closed_error().is_some() {
                return;
            }
            let interval_ms = strong.config.heartbeat_interval_ms;
            let now_ms = strong.started.elapsed().as_millis() as u64;
            // A concurrent call may have stored a later time than `now_ms`.
            let quiet_ms = now_ms.saturating_sub(strong.last_send_ms.load(Ordering::Relaxed));
            // Sleep until the connection will have been quiet for a whole interval.
            wait_ms = interval_ms.saturating_sub(quiet_ms).max(1);
            if quiet_ms >= interval_ms {
                wait_ms = interval_ms;
                let client = Client { inner: strong };
                let sent_at_us = client.inner.started.elapsed().as_micros() as u64;
                if let Err(e) = client.call(&Heartbeat { sent_at_us }).await {
                    tracing::debug!(error = %e, "heartbeat failed");
                }
            }
        }
    });
}

/// Notices a dead TCP link while requests wait on it. A link that moves no bytes either way for
/// `silence_probe_ms` with requests outstanding gets a heartbeat; if no byte moves for
/// `dead_link_timeout_ms` after that, the link is dead (a cut network, a frozen peer) and is
/// closed from this side, so its calls fail now rather than at their request timeout. A large
/// frame still crossing a slow link is progress, not silence. A link whose every credit is
/// taken cannot be probed; its calls are bounded by `request_timeout_ms` as before.
fn spawn_liveness(inner: Weak<ClientInner>) {
    tokio::spawn(async move {
        let (probe_after, dead_after) = match inner.upgrade() {
            Some(inner) => (
                Duration::from_millis(inner.config.silence_probe_ms),
                Duration::from_millis(inner.config.dead_link_timeout_ms),
            ),
            None => return,
        };
        let tick = (probe_after.min(dead_after) / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        let mut seen = 0u64;
        let mut last_progress_at = Instant::now();
        let mut probe: Option<(Instant, tokio::task::JoinHandle<()>)> = None;
        loop {
            tokio::time::sleep(tick).await;
            let Some(strong) = inner.upgrade() else { return };
            if strong.closed_error().is_some() {
                return;
            }
            let now = Instant::now();
            let moved = strong.progress.load(Ordering::Relaxed);
            if moved != seen {
                (seen, last_progress_at) = (moved, now);
            }
            if probe.as_ref().is_some_and(|(_, task)| task.is_finished()) {
                probe = None;
            }
            if strong.pending.lock().expect("pending lock").is_empty() {
                continue;
            }
            match &probe {
                Some((sent_at, _)) => {
                    let silent_since_probe = now.duration_since((*sent_at).max(last_progress_at));
                    if silent_since_probe >= dead_after {
                        let error = TransportError::LinkDead {
                            peer: strong.peer.clone(),
                            silent_ms: now.duration_since(last_progress_at).as_millis() as u64,
                            dead_link_timeout_ms: dead_after.as_millis() as u64,
                        };
                        tracing::debug!(error = %error, "closing a dead link");
                        strong.abort(error);
                        return;
                    }
                }
                None if now.duration_since(last_progress_at) >= probe_after => {
                    let Ok(credit) = strong.credits.clone().try_acquire_owned() else { continue };
                    let client = Client { inner: strong };
                    let deadline =
                        tokio::time::Instant::now() + Duration::from_millis(client.inner.config.request_timeout_ms);
                    let task = tokio::spawn(async move {
                        let sent_at_us = client.inner.started.elapsed().as_micros() as u64;
                        let heartbeat = |id, max| OutFrame::encode(id, &Heartbeat { sent_at_us }, max);
                        if let Err(e) = client.call_with_credit(credit, deadline, heartbeat).await {
                            tracing::debug!(error = %e, "liveness probe failed");
                        }
                    });
                    probe = Some((now, task));
                }
                None => {}
            }
        }
    });
}
