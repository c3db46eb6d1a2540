//! The poller: it owns the endpoint of one connection. It polls the completion queue, delivers
//! frames, reposts released receives, returns credits and ring space, and takes frames from the
//! outbound channel while it has credits. When nothing has happened for its spin budget
//! (`spin.rs`) it arms the CQ and parks until the completion channel, the doorbell (frame
//! releases, shutdown) or the bootstrap socket (EOF there means the peer is gone) is readable,
//! or a frame arrives on the outbound channel.
//!
//! It runs in one of two places (`RdmaPollMode`): as a task on the runtime whose tasks use the
//! link (`run_async`: the broker shard's glommio executor, the proxy's tokio runtime), so a
//! frame goes from the completion queue to its handler, and a reply back onto the wire, with no
//! thread hand-off; or on a thread of its own (`run_thread`), pinned to its core.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::FutureExt as _;

use super::credit::{ReturnLedger, SendWindow};
use super::doorbell::Doorbell;
use super::peer::LinkLimits;
use super::ring::{RingReader, RingWriter};
use super::spin::SpinBudget;
use super::verbs::{wait_fds, Completion, Endpoint, Release};
use super::wire::{ControlBody, Imm, CONTROL_CREDITS_MAX, SEND_CREDITS_MAX};
use super::RdmaStats;
use crate::error::{FrameError, TransportError};
use crate::frame::{Frame, FrameHeader, OutFrame, FRAME_HEADER_BYTES};
use crate::link::{FrameSink, Outbound};

/// Data frames posted per round before the CQ is polled again.
const SEND_BURST: usize = 64;
/// CQ batches drained per round (each up to 32 completions).
const POLL_BATCHES: usize = 4;
/// Rounds between checks of the bootstrap socket while busy.
const BOOTSTRAP_CHECK_ROUNDS: u64 = 1024;
/// Sleep bound when idle: everything that matters wakes the poller sooner.
const IDLE_WAKE_MS: i32 = 1000;
/// Sleep bound while out of credits: the outbound channel cannot wake us then (we must not take
/// from it), so a disconnect there is noticed within this time.
const STALLED_WAKE_MS: i32 = 50;

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    frames_sent_send: AtomicU64,
    frames_sent_write: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received_send: AtomicU64,
    frames_received_ring: AtomicU64,
    bytes_received: AtomicU64,
    control_sent: AtomicU64,
    control_received: AtomicU64,
    credit_stalls: AtomicU64,
    ring_stalls: AtomicU64,
    liveness_probes: AtomicU64,
}

impl StatsCounters {
    pub(crate) fn snapshot(&self) -> RdmaStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RdmaStats {
            frames_sent_send: get(&self.frames_sent_send),
            frames_sent_write: get(&self.frames_sent_write),
            bytes_sent: get(&self.bytes_sent),
            frames_received_send: get(&self.frames_received_send),
            frames_received_ring: get(&self.frames_received_ring),
            bytes_received: get(&self.bytes_received),
            control_sent: get(&self.control_sent),
            control_received: get(&self.control_received),
            credit_stalls: get(&self.credit_stalls),
            ring_stalls: get(&self.ring_stalls),
            liveness_probes: get(&self.liveness_probes),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

fn protocol(detail: impl std::fmt::Display) -> TransportError {
    TransportError::Rdma { op: "link protocol", detail: format!("the peer broke the RDMA link protocol: {detail}") }
}

/// A large frame being written into the peer's ring chunk by chunk.
struct LargeSend {
    frame: OutFrame,
    offset: u64,
    sent: usize,
}

/// Everything the handshake produced, handed to the poller thread.
pub(crate) struct DriverParts {
    pub endpoint: Endpoint,
    pub tcp: TcpStream,
    pub limits: LinkLimits,
    pub own_credits: u32,
    pub spin: SpinBudget,
    pub liveness_probe: Duration,
    pub releases: flume::Receiver<Release>,
    pub doorbell: Arc<Doorbell>,
}

pub(crate) struct Driver {
    endpoint: Endpoint,
    tcp: TcpStream,
    limits: LinkLimits,
    spin: SpinBudget,
    liveness_probe: Duration,
    /// Last time a completion arrived or a probe went out, as of the last park.
    last_activity: Instant,
    /// A completion arrived since the last park. The clock is read only when parking: a busy
    /// link would otherwise read it on every round.
    active_since_park: bool,
    releases: flume::Receiver<Release>,
    doorbell: Arc<Doorbell>,
    outbound: Outbound,
    sink: Arc<dyn FrameSink>,
    stop: Arc<AtomicBool>,
    stats: Arc<StatsCounters>,
    window: SendWindow,
    ledger: ReturnLedger,
    ring_out: RingWriter,
    ring_in: RingReader,
    /// The ring head last sent to the peer.
    ring_reported: u64,
    ring_blocked: bool,
    credit_stalled: bool,
    pending: Option<OutFrame>,
    large: Option<LargeSend>,
    outbound_closed: bool,
    completions: Vec<Completion>,
    released: Vec<Release>,
    /// Rounds so far; the bootstrap socket is looked at every `BOOTSTRAP_CHECK_ROUNDS`.
    rounds: u64,
}

/// How many fds a parked poller waits on (`Driver::park_fds`).
pub(crate) const PARK_FDS: usize = 3;

/// Whether the poller may park.
enum Park {
    /// Something happened while arming: run another round.
    Resume,
    /// Park until a park fd is readable, a frame arrives on the outbound channel (only if
    /// `take_outbound`: out of credits, frames must stay there), or `timeout_ms` passes.
    Wait { timeout_ms: i32, take_outbound: bool },
}

/// What the async poller needs from its runtime (`runtimes.rs`).
pub(crate) trait ParkRuntime {
    /// Lets the runtime's other tasks run, and its I/O be polled, before the next round.
    /// `progress`: the round moved something, so the link's callers or handlers likely have
    /// work now.
    fn pause(&mut self, progress: bool) -> impl Future<Output = ()>;
    /// Resolves when one of `fds` is readable (or hung up) or `timeout` has passed; says which.
    fn wait(
        &mut self,
        fds: [RawFd; PARK_FDS],
        timeout: Duration,
    ) -> impl Future<Output = std::io::Result<[bool; PARK_FDS]>>;
}

impl Driver {
    pub(crate) fn new(
        parts: DriverParts,
        outbound: Outbound,
        sink: Arc<dyn FrameSink>,
        stop: Arc<AtomicBool>,
        stats: Arc<StatsCounters>,
    ) -> Driver {
        let ring_in = RingReader::new(parts.endpoint.ring_bytes());
        Driver {
            window: SendWindow::new(parts.limits.send_window),
            ledger: ReturnLedger::new(parts.own_credits),
            ring_out: RingWriter::new(parts.limits.peer_ring_bytes),
            ring_in,
            endpoint: parts.endpoint,
            tcp: parts.tcp,
            limits: parts.limits,
            spin: parts.spin,
            liveness_probe: parts.liveness_probe,
            last_activity: Instant::now(),
            active_since_park: false,
            releases: parts.releases,
            doorbell: parts.doorbell,
            outbound,
            sink,
            stop,
            stats,
            ring_reported: 0,
            ring_blocked: false,
            credit_stalled: false,
            pending: None,
            large: None,
            outbound_closed: false,
            completions: Vec::new(),
            released: Vec::new(),
            rounds: 0,
        }
    }

    /// Runs on the calling thread until the link ends, then `finish`es.
    pub(crate) fn run_thread(mut self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.thread_loop()));
        self.finish(outcome);
    }

    /// Runs as a task of `runtime` until the link ends, then `finish`es. Between rounds it lets
    /// the runtime's other tasks (the link's callers and handlers) run.
    pub(crate) async fn run_async<R: ParkRuntime>(mut self, mut runtime: R) {
        let outcome = std::panic::AssertUnwindSafe(self.async_loop(&mut runtime)).catch_unwind().await;
        // The runtime may have the endpoint's fds registered: let go of them before they close.
        drop(runtime);
        self.finish(outcome);
    }

    /// Tears the endpoint down, then tells the sink (exactly once, even if the loop or a sink
    /// callback panicked: that is a bug, but the layer above must not wait forever for a link
    /// that is gone).
    fn finish(self, outcome: std::thread::Result<Result<Infallible, TransportError>>) {
        let error = match outcome {
            Ok(Err(error)) => error,
            Ok(Ok(never)) => match never {},
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(%what, "the RDMA poller panicked");
                TransportError::Closed { reason: format!("the RDMA poller stopped on a bug: {what}") }
            }
        };
        let Driver { endpoint, sink, tcp, .. } = self;
        // QP, CQ, channel, MRs, PD, context, in that order (Endpoint's field order). Frames
        // still held by the application keep their memory alive; nothing is reposted.
        drop(endpoint);
        drop(tcp);
        tracing::debug!(%error, "RDMA link closed");
        sink.closed(error);
    }

    fn thread_loop(&mut self) -> Result<Infallible, TransportError> {
        loop {
            if self.turn()? {
                self.spin.on_progress();
                continue;
            }
            if self.spin.keep_spinning() {
                std::hint::spin_loop();
                continue;
            }
            self.sleep_thread()?;
        }
    }

    async fn async_loop<R: ParkRuntime>(&mut self, runtime: &mut R) -> Result<Infallible, TransportError> {
        loop {
            if self.turn()? {
                self.spin.on_progress();
                runtime.pause(true).await;
                continue;
            }
            if self.spin.keep_spinning() {
                runtime.pause(false).await;
                continue;
            }
            let Park::Wait { timeout_ms, take_outbound } = self.prepare_park()? else { continue };
            let outbound = self.outbound.clone();
            let next = async move {
                match take_outbound {
                    true => outbound.recv_async().await,
                    false => std::future::pending().await,
                }
            };
            let timeout = Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(1));
            let wait = runtime.wait(self.park_fds(), timeout);
            match futures::future::select(std::pin::pin!(next), std::pin::pin!(wait)).await {
                futures::future::Either::Left((frame, _)) => {
                    self.on_outbound_poll(Poll::Ready(frame));
                }
                futures::future::Either::Right((ready, _)) => {
                    let ready = ready.map_err(|e| TransportError::io("waiting for the RDMA completion channel", e))?;
                    self.on_woken(ready)?;
                }
            }
        }
    }

    /// One round: completions, releases, control, data. True if anything moved.
    fn turn(&mut self) -> Result<bool, TransportError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                reason: "RDMA link shut down locally (RdmaDriver::shutdown or drop)".into(),
            });
        }
        let mut progress = self.poll_completions()?;
        progress |= self.apply_releases()?;
        progress |= self.send_control()?;
        progress |= self.send_data()?;
        if self.finished() {
            return Err(TransportError::Closed {
                reason: "the outbound channel was closed (every sender dropped); RDMA link shut down".into(),
            });
        }
        self.rounds += 1;
        if self.rounds.is_multiple_of(BOOTSTRAP_CHECK_ROUNDS) {
            self.check_bootstrap()?;
        }
        Ok(progress)
    }

    fn finished(&self) -> bool {
        self.outbound_closed && self.pending.is_none() && self.large.is_none() && self.endpoint.sends_outstanding() == 0
    }

    // ---- receive side ----

    fn poll_completions(&mut self) -> Result<bool, TransportError> {
        let mut any = false;
        for _ in 0..POLL_BATCHES {
            let mut completions = std::mem::take(&mut self.completions);
            completions.clear();
            let polled = self.endpoint.poll(&mut completions);
            let result = polled.and_then(|n| {
                for &completion in &completions {
                    self.on_completion(completion)?;
                }
                Ok(n)
            });
            self.completions = completions;
            let n = result?;
            if n == 0 {
                break;
            }
            metrics::counter!(crate::metrics::RDMA_COMPLETIONS).increment(n as u64);
            self.active_since_park = true;
            any = true;
        }
        Ok(any)
    }

    fn on_completion(&mut self, completion: Completion) -> Result<(), TransportError> {
        let Completion::Recv { slot, byte_len, imm, via_write } = completion;
        let imm = imm.ok_or_else(|| protocol("a message arrived without immediate data"))?;
        let imm = Imm::decode(imm).map_err(protocol)?;
        if byte_len > self.endpoint.slot_bytes() && !via_write {
            return Err(protocol(format!("a {byte_len}-byte SEND into a {}-byte slot", self.endpoint.slot_bytes())));
        }
        match (imm, via_write) {
            (Imm::Send { credits }, false) => {
                self.window.grant(credits).map_err(protocol)?;
                self.ledger.frame_received().map_err(protocol)?;
                let bytes = self.endpoint.lend_slot(slot, byte_len);
                let frame = Frame::parse(bytes, self.limits.recv_max_frame_bytes)?;
                bump(&self.stats.frames_received_send, 1);
                bump(&self.stats.bytes_received, u64::from(byte_len));
                self.sink.deliver(frame);
            }
            (Imm::Ring { offset }, true) => {
                self.ledger.frame_received().map_err(protocol)?;
                self.ring_in.check_offset(offset).map_err(protocol)?;
                let header = self.endpoint.copy_ring(offset, FRAME_HEADER_BYTES as u64);
                let header = FrameHeader::decode(&header, self.limits.recv_max_frame_bytes)?;
                let len = header.frame_len() as u64;
                let placement = self.ring_in.accept(offset, len).map_err(protocol)?;
                let bytes = self.endpoint.take_ring_frame(slot, offset, len);
                // The frame was copied out, so its ring range is free now; its credit is not.
                self.ring_in.release(placement.start);
                let frame = Frame::parse(bytes, self.limits.recv_max_frame_bytes)?;
                bump(&self.stats.frames_received_ring, 1);
                bump(&self.stats.bytes_received, len);
                self.sink.deliver(frame);
            }
            (Imm::Control { credits, request, reply }, false) => {
                let body = ControlBody::decode(self.endpoint.read_slot(slot, byte_len)).map_err(protocol)?;
                // Repost before anything is sent: our reply proves the receive is back.
                self.endpoint.repost_completed(slot)?;
                self.window.grant(credits).map_err(protocol)?;
                if reply {
                    self.window.reply_received().map_err(protocol)?;
                }
                self.ring_out.release_to(body.ring_head).map_err(protocol)?;
                if request {
                    self.ledger.request_received().map_err(protocol)?;
                }
                bump(&self.stats.control_received, 1);
            }
            (imm, via_write) => {
                let how = if via_write { "RDMA WRITE WITH IMMEDIATE" } else { "SEND" };
                return Err(protocol(format!("{imm:?} arrived by {how}")));
            }
        }
        Ok(())
    }

    /// Reposts the receives of frames the application dropped; their credits become owed.
    fn apply_releases(&mut self) -> Result<bool, TransportError> {
        self.released.clear();
        self.released.extend(self.releases.try_iter());
        if self.released.is_empty() {
            return Ok(false);
        }
        self.endpoint.repost_released(&self.released)?;
        for _ in &self.released {
            self.ledger.frame_released();
        }
        self.released.clear();
        Ok(true)
    }

    // ---- send side ----

    fn ring_short(&self) -> bool {
        self.ring_blocked || self.ring_out.used_bytes() > self.ring_out.ring_bytes() / 2
    }

    /// Sends our reply (once there is something to give back) and/or our credit request.
    fn send_control(&mut self) -> Result<bool, TransportError> {
        let ring_news = self.ring_in.head() > self.ring_reported;
        let reply = self.ledger.reply_due(ring_news);
        let request = self.window.wants_request(self.ring_short());
        if !(reply || request) || !self.endpoint.can_send_control() {
            return Ok(false);
        }
        let credits = self.ledger.take_owed(CONTROL_CREDITS_MAX);
        let head = self.ring_in.head();
        let body = ControlBody { ring_head: head }.encode();
        let sent = self.endpoint.send_control(&body, Imm::Control { credits, request, reply }.encode())?;
        assert!(sent, "a control slot was free");
        self.ring_reported = head;
        if reply {
            self.ledger.reply_sent();
        }
        if request {
            self.window.request_sent();
        }
        bump(&self.stats.control_sent, 1);
        Ok(true)
    }

    fn send_data(&mut self) -> Result<bool, TransportError> {
        let mut progress = false;
        for _ in 0..SEND_BURST {
            if self.large.is_some() {
                progress |= self.continue_large()?;
                if self.large.is_some() {
                    break;
                }
                continue;
            }
            if self.pending.is_none() && !self.take_outbound() {
                break;
            }
            let len = self.pending.as_ref().map(OutFrame::len).expect("pending frame");
            if let Err(detail) = self.limits.check_outbound(len) {
                tracing::warn!(%detail, "refusing an outbound frame");
                return Err(TransportError::Frame(FrameError::Oversize {
                    body_len: len.saturating_sub(FRAME_HEADER_BYTES) as u64,
                    max_frame_bytes: self.limits.send_max_frame_bytes,
                }));
            }
            if len <= self.limits.send_small_frame_bytes as usize {
                if !self.endpoint.can_send_frame() {
                    break;
                }
                let frame = self.pending.take().expect("pending frame");
                assert!(self.window.try_take(), "a frame is taken from outbound only with a credit");
                let credits = self.ledger.take_owed(SEND_CREDITS_MAX);
                let sent = self.endpoint.send_frame(frame.as_bytes(), Imm::Send { credits }.encode())?;
                assert!(sent, "a send slot was free");
                bump(&self.stats.frames_sent_send, 1);
                bump(&self.stats.bytes_sent, len as u64);
            } else {
                let Some(placement) = self.ring_out.reserve(len as u64) else {
                    if !self.ring_blocked {
                        bump(&self.stats.ring_stalls, 1);
                    }
                    self.ring_blocked = true;
                    break;
                };
                self.ring_blocked = false;
                let frame = self.pending.take().expect("pending frame");
                assert!(self.window.try_take(), "a frame is taken from outbound only with a credit");
                let offset = placement.offset(self.ring_out.ring_bytes());
                self.large = Some(LargeSend { frame, offset, sent: 0 });
            }
            progress = true;
        }
        Ok(progress)
    }

    /// Takes the next outbound frame if a credit is free for it. The credit is taken when the
    /// frame is posted; until then it waits in `pending`. Without a credit the frame stays in the
    /// bounded channel, which is what pushes back on the callers.
    fn take_outbound(&mut self) -> bool {
        if self.window.available() == 0 {
            if !self.credit_stalled {
                bump(&self.stats.credit_stalls, 1);
                self.credit_stalled = true;
            }
            return false;
        }
        self.credit_stalled = false;
        match self.outbound.try_recv() {
            Ok(frame) => {
                self.pending = Some(frame);
                true
            }
            Err(flume::TryRecvError::Empty) => false,
            Err(flume::TryRecvError::Disconnected) => {
                self.outbound_closed = true;
                false
            }
        }
    }

    /// Copies the current large frame into free staging chunks and writes them into the peer's
    /// ring; the last chunk goes WITH IMMEDIATE, which the peer sees after every earlier write
    /// (RC work requests execute in order).
    fn continue_large(&mut self) -> Result<bool, TransportError> {
        let Some(mut large) = self.large.take() else { return Ok(false) };
        let chunk = self.endpoint.chunk_bytes() as usize;
        let bytes = large.frame.as_bytes().clone();
        let total = bytes.len();
        let mut progress = false;
        while large.sent < total && self.endpoint.can_write_chunk() {
            let n = chunk.min(total - large.sent);
            let last = large.sent + n == total;
            let imm = last.then(|| Imm::Ring { offset: large.offset }.encode());
            let remote = large.offset + large.sent as u64;
            let written = self.endpoint.write_chunk(&bytes[large.sent..large.sent + n], remote, imm)?;
            assert!(written, "a staging chunk was free");
            large.sent += n;
            progress = true;
        }
        if large.sent < total {
            self.large = Some(large);
        } else {
            bump(&self.stats.frames_sent_write, 1);
            bump(&self.stats.bytes_sent, total as u64);
        }
        Ok(progress)
    }

    // ---- sleeping and the bootstrap socket ----

    /// Arms the CQ and decides whether the poller may park, and for how long.
    fn prepare_park(&mut self) -> Result<Park, TransportError> {
        self.endpoint.arm()?;
        // A completion that landed before the arm raises no event: look once more.
        if self.poll_completions()? {
            return Ok(Park::Resume);
        }
        self.doorbell.clear();
        if !self.releases.is_empty() || self.stop.load(Ordering::Acquire) {
            return Ok(Park::Resume);
        }
        let take_outbound =
            self.pending.is_none() && self.large.is_none() && self.window.available() > 0 && !self.outbound_closed;
        if !take_outbound && self.outbound.is_disconnected() && self.outbound.is_empty() {
            self.outbound_closed = true;
            return Ok(Park::Resume);
        }
        let timeout_ms = if take_outbound || self.outbound_closed { IDLE_WAKE_MS } else { STALLED_WAKE_MS };
        let timeout_ms = timeout_ms.min(self.probe_if_quiet()?);
        Ok(Park::Wait { timeout_ms, take_outbound })
    }

    /// What a parked poller waits on: the completion channel, the doorbell, the bootstrap socket.
    fn park_fds(&self) -> [RawFd; PARK_FDS] {
        [self.endpoint.event_fd(), self.doorbell.fd(), self.tcp.as_raw_fd()]
    }

    /// After a park: takes the completion events and looks at the bootstrap socket if they woke it.
    fn on_woken(&mut self, [event, _bell, bootstrap]: [bool; PARK_FDS]) -> Result<(), TransportError> {
        if event {
            self.endpoint.take_events();
        }
        if bootstrap {
            self.check_bootstrap()?;
        }
        Ok(())
    }

    /// Parks the poller thread in poll(2); the outbound channel wakes it through the doorbell.
    fn sleep_thread(&mut self) -> Result<(), TransportError> {
        let Park::Wait { timeout_ms, take_outbound } = self.prepare_park()? else { return Ok(()) };
        let waker = Waker::from(self.doorbell.clone());
        let mut cx = Context::from_waker(&waker);
        let outbound = self.outbound.clone();
        let mut next = take_outbound.then(|| outbound.recv_async());
        if let Some(fut) = next.as_mut() {
            if self.on_outbound_poll(Pin::new(fut).poll(&mut cx)) {
                return Ok(());
            }
        }
        let ready =
            wait_fds(self.park_fds(), timeout_ms).map_err(|e| TransportError::io("poll(2) in the RDMA poller", e))?;
        self.on_woken(ready)?;
        if let Some(fut) = next.as_mut() {
            self.on_outbound_poll(Pin::new(fut).poll(&mut cx));
        }
        Ok(())
    }

    /// Nothing completed for `liveness_probe` and nothing is in flight (in flight, the RC
    /// retries already watch the peer): post a probe. Returns how long the poller may sleep
    /// before the next check.
    fn probe_if_quiet(&mut self) -> Result<i32, TransportError> {
        let now = Instant::now();
        if std::mem::take(&mut self.active_since_park) {
            self.last_activity = now;
        }
        let quiet = now.saturating_duration_since(self.last_activity);
        if quiet < self.liveness_probe {
            return Ok((self.liveness_probe - quiet).as_millis().clamp(1, i32::MAX as u128) as i32);
        }
        if self.endpoint.sends_outstanding() == 0 && self.endpoint.post_probe()? {
            bump(&self.stats.liveness_probes, 1);
        }
        self.last_activity = now;
        Ok(self.liveness_probe.as_millis().clamp(1, i32::MAX as u128) as i32)
    }

    fn on_outbound_poll(&mut self, poll: Poll<Result<OutFrame, flume::RecvError>>) -> bool {
        match poll {
            Poll::Ready(Ok(frame)) => {
                self.pending = Some(frame);
                true
            }
            Poll::Ready(Err(flume::RecvError::Disconnected)) => {
                self.outbound_closed = true;
                true
            }
            Poll::Pending => false,
        }
    }

    /// Nothing is sent on the bootstrap socket after the handshake: EOF or an error there means
    /// the peer shut down or died.
    fn check_bootstrap(&mut self) -> Result<(), TransportError> {
        let mut buf = [0u8; 16];
        match (&self.tcp).read(&mut buf) {
            Ok(0) => {
                // Frames the peer finished sending are already in the CQ (the responder
                // completes before it acknowledges): deliver them before closing.
                while let Ok(true) = self.poll_completions() {}
                Err(TransportError::Closed {
                    reason: "the RDMA peer closed the bootstrap TCP connection: it shut down or its process died"
                        .into(),
                })
            }
            Ok(n) => Err(protocol(format!("{n} unexpected bytes on the bootstrap socket"))),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => Ok(()),
            Err(e) => Err(TransportError::io("the RDMA bootstrap TCP connection (the peer is gone)", e)),
        }
    }
}
