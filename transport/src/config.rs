//! Transport limits. Every one is named, has a default, and is validated.

use crate::error::TransportError;
use crate::frame::FRAME_BODY_CEILING_BYTES;

#[derive(Debug, Clone, PartialEq)]
pub struct TransportConfig {
    /// Largest frame body either side accepts. Larger frames are refused with `Oversize`.
    pub max_frame_bytes: u64,
    /// Requests in flight per connection. A client waits for a credit before sending.
    pub credits: u32,
    /// Bytes of requests and queued replies a server holds per connection before it stops
    /// reading (at least one frame always fits). Read buffers that in-flight small frames
    /// still share are not counted; they are bounded by `credits` × `read_buffer_bytes`.
    pub max_inflight_bytes: u64,
    pub connect_timeout_ms: u64,
    /// A call fails with `Timeout` if no reply arrives in this time.
    pub request_timeout_ms: u64,
    /// A frame that has started arriving must finish within this time.
    pub frame_timeout_ms: u64,
    /// A write that makes no progress for this long (the peer stopped reading) closes the
    /// connection.
    pub write_timeout_ms: u64,
    /// The server closes a connection that has nothing in flight and sends nothing for this long.
    pub idle_timeout_ms: u64,
    /// The client sends a heartbeat once it has sent nothing for this long (checked at least
    /// this often), so it must be well below the server's idle timeout.
    pub heartbeat_interval_ms: u64,
    /// With requests outstanding and nothing received for this long, the client sends a
    /// heartbeat to find out whether the link still carries anything.
    pub silence_probe_ms: u64,
    /// A heartbeat probe unanswered for this long, with nothing else received meanwhile, marks
    /// the link dead: its calls fail at once and the connection is dropped. A cut network is
    /// then noticed within about silence_probe_ms + dead_link_timeout_ms, not after the
    /// request timeout or the kernel's retransmission back-off.
    pub dead_link_timeout_ms: u64,
    /// On shutdown, how long a server waits for in-flight requests before it closes.
    pub drain_timeout_ms: u64,
    /// Most bytes gathered into one vectored write.
    pub write_batch_bytes: usize,
    /// Size of each TCP read buffer; frames that fit are received without a copy.
    pub read_buffer_bytes: usize,
    pub rdma: RdmaConfig,
    /// The cluster's transport secret. A server with one refuses every connection whose first
    /// frame does not prove it; a client with one proves it and checks the server's answer.
    pub secret: Option<crate::peer_auth::PeerSecret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RdmaConfig {
    /// Size of each registered SEND/RECV slot; larger frames go through the remote ring.
    pub slot_bytes: u32,
    /// Receives posted in advance per connection: `credits` for data frames plus at least
    /// `RDMA_CONTROL_RECV_SLOTS` for flow-control messages (one credit request and one reply).
    pub recv_slots: u32,
    /// Registered ring each side exposes for RDMA WRITE WITH IMMEDIATE; at least max_frame_bytes + header,
    /// rounded up to `RDMA_RING_ALIGN_BYTES`, and a multiple of it.
    pub ring_bytes: u64,
    /// How long an idle poller busy-polls before it parks on the completion channel, at least
    /// (µs). Every spinning poller holds a CPU.
    pub busy_poll_us: u32,
    /// The most it busy-polls: the budget adapts up to this to cover the gaps between a link's
    /// events when they are shorter (`rdma/spin.rs`). Equal to `busy_poll_us`: a fixed budget.
    pub busy_poll_max_us: u32,
    /// Where each link's poller runs: on the runtime that serves the link (default), or on a
    /// thread of its own.
    pub poll_mode: RdmaPollMode,
    /// RDMA device to use (e.g. "rxe0", "mlx5_0"). `None`: the environment variable
    /// `SLUICE_RDMA_DEVICE` if set, else the first device with an ACTIVE port.
    pub device: Option<String>,
    /// GID table index when no GID matches the bootstrap socket's local IP (RoCE). `None`: 0.
    pub gid_index: Option<u8>,
    /// Registered SEND slots (each `slot_bytes`): small frames posted but not yet completed.
    pub send_slots: u32,
    /// Large frames are copied into registered staging chunks of this size and written with
    /// RDMA WRITE (the last chunk WITH IMMEDIATE) into the peer's ring.
    pub write_chunk_bytes: u32,
    /// Staging chunks per connection (writes in flight at once).
    pub write_chunks: u32,
    /// When nothing has completed for this long and nothing is in flight, the poller posts a
    /// zero-length RDMA WRITE (no receive consumed, nothing delivered at the peer): a peer whose
    /// queue pair is gone without its socket closing (a vanished host) fails it after the RC
    /// retries. Bounds how long an idle or flow-control-stalled link takes to notice.
    pub liveness_probe_ms: u64,
    /// RDMA links a server keeps at once; each pins its registered memory (about ring_bytes +
    /// (recv_slots + send_slots) × slot_bytes + write_chunks × write_chunk_bytes). Further
    /// connections are refused.
    pub max_links: u32,
}

/// Where an RDMA link's poller (completion queue, sends, flow control) runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RdmaPollMode {
    /// A task on the runtime whose tasks use the link: the broker shard's glommio executor,
    /// the client's tokio runtime. A received frame reaches its handler, and a reply the wire,
    /// without crossing threads. A parked link is woken through the runtime's reactor (tokio)
    /// or a waiter thread that sleeps in poll(2) (glommio).
    #[default]
    Runtime,
    /// A thread per link, pinned to the server's core (broker side), handing frames to the
    /// runtime through channels: two thread hand-offs per side per round trip.
    Thread,
}

impl std::str::FromStr for RdmaPollMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runtime" => Ok(RdmaPollMode::Runtime),
            "thread" => Ok(RdmaPollMode::Thread),
            other => Err(format!("rdma poll mode must be \"runtime\" or \"thread\", not {other:?}")),
        }
    }
}

/// Receives each side keeps beyond its data credits: one for the peer's credit request and
/// one for the peer's reply to ours (at most one of each is ever outstanding).
pub const RDMA_CONTROL_RECV_SLOTS: u32 = 2;
/// Most receives a connection may post (a named bound on the registered receive pool).
pub const RDMA_MAX_RECV_SLOTS: u32 = 1 << 20;
/// Large frames start at multiples of this in the ring; the immediate data carries offset / 64.
pub const RDMA_RING_ALIGN_BYTES: u64 = 64;
/// Largest ring the 30-bit immediate offset (in 64-byte units) can address.
pub const RDMA_RING_MAX_BYTES: u64 = RDMA_RING_ALIGN_BYTES << 30;
/// Ceiling of `rdma.busy_poll_max_us`: past it, a parked poller's wake-up is the cheaper wait.
pub const RDMA_BUSY_POLL_MAX_US: u32 = 100_000;

pub const MIN_FRAME_BYTES: u64 = 4096;
pub const MAX_CREDITS: u32 = 65_536;
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
pub const MAX_BUFFER_BYTES: usize = 64 << 20;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame_bytes: 64 << 20,
            credits: 1024,
            max_inflight_bytes: 256 << 20,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            frame_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            heartbeat_interval_ms: 10_000,
            silence_probe_ms: 1_000,
            dead_link_timeout_ms: 3_000,
            drain_timeout_ms: 5_000,
            write_batch_bytes: 256 << 10,
            read_buffer_bytes: 64 << 10,
            rdma: RdmaConfig::default(),
            secret: None,
        }
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            slot_bytes: 8192,
            recv_slots: 1024 + 64,
            ring_bytes: (64 << 20) + (1 << 20),
            busy_poll_us: 50,
            busy_poll_max_us: 1_000,
            poll_mode: RdmaPollMode::Runtime,
            device: None,
            gid_index: None,
            send_slots: 256,
            write_chunk_bytes: 1 << 20,
            write_chunks: 4,
            liveness_probe_ms: 1_000,
            max_links: 16,
        }
    }
}

impl TransportConfig {
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |reason: String| Err(TransportError::Config { reason });
        if !(MIN_FRAME_BYTES..=FRAME_BODY_CEILING_BYTES).contains(&self.max_frame_bytes) {
            return bad(format!(
                "max_frame_bytes = {} must be within {MIN_FRAME_BYTES}..={FRAME_BODY_CEILING_BYTES}",
                self.max_frame_bytes
            ));
        }
        if self.credits == 0 || self.credits > MAX_CREDITS {
            return bad(format!("credits = {} must be within 1..={MAX_CREDITS}", self.credits));
        }
        if self.max_inflight_bytes < self.max_frame_bytes {
            return bad(format!(
                "max_inflight_bytes = {} must be at least max_frame_bytes = {}",
                self.max_inflight_bytes, self.max_frame_bytes
            ));
        }
        for (name, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("silence_probe_ms", self.silence_probe_ms),
            ("dead_link_timeout_ms", self.dead_link_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if ms == 0 || ms > MAX_TIMEOUT_MS {
                return bad(format!("{name} = {ms} must be within 1..={MAX_TIMEOUT_MS}"));
            }
        }
        if self.heartbeat_interval_ms.saturating_mul(2) >= self.idle_timeout_ms {
            return bad(format!(
                "heartbeat_interval_ms = {} must be below half of idle_timeout_ms = {} or idle clients get cut off",
                self.heartbeat_interval_ms, self.idle_timeout_ms
            ));
        }
        for (name, bytes) in
            [("write_batch_bytes", self.write_batch_bytes), ("read_buffer_bytes", self.read_buffer_bytes)]
        {
            if !(4096..=MAX_BUFFER_BYTES).contains(&bytes) {
                return bad(format!("{name} = {bytes} must be within 4096..={MAX_BUFFER_BYTES}"));
            }
        }
        self.rdma.validate(self)
    }
}

impl RdmaConfig {
    fn validate(&self, transport: &TransportConfig) -> Result<(), TransportError> {
        let bad = |reason: String| Err(TransportError::Config { reason });
        if !(1..=4096).contains(&self.max_links) {
            return bad(format!("rdma.max_links = {} must be within 1..=4096", self.max_links));
        }
        if self.slot_bytes < 1024 || self.slot_bytes > (1 << 20) {
            return bad(format!("rdma.slot_bytes = {} must be within 1024..=1048576", self.slot_bytes));
        }
        let min_recv = transport.credits + RDMA_CONTROL_RECV_SLOTS;
        if self.recv_slots < min_recv || self.recv_slots > RDMA_MAX_RECV_SLOTS {
            return bad(format!(
                "rdma.recv_slots = {} must be within {min_recv}..={RDMA_MAX_RECV_SLOTS}: credits = {} for data \
                 frames plus {RDMA_CONTROL_RECV_SLOTS} for flow-control messages",
                self.recv_slots, transport.credits
            ));
        }
        let need = rdma_ring_need_bytes(transport.max_frame_bytes);
        if self.ring_bytes < need {
            return bad(format!(
                "rdma.ring_bytes = {} must hold one largest frame ({need} bytes = max_frame_bytes + header, \
                 rounded up to {RDMA_RING_ALIGN_BYTES})",
                self.ring_bytes
            ));
        }
        if !self.ring_bytes.is_multiple_of(RDMA_RING_ALIGN_BYTES) || self.ring_bytes > RDMA_RING_MAX_BYTES {
            return bad(format!(
                "rdma.ring_bytes = {} must be a multiple of {RDMA_RING_ALIGN_BYTES} and at most {RDMA_RING_MAX_BYTES}",
                self.ring_bytes
            ));
        }
        if self.send_slots == 0 || self.send_slots > 65_536 {
            return bad(format!("rdma.send_slots = {} must be within 1..=65536", self.send_slots));
        }
        if self.write_chunk_bytes < 4096 || self.write_chunk_bytes > (1 << 30) {
            return bad(format!("rdma.write_chunk_bytes = {} must be within 4096..=2^30", self.write_chunk_bytes));
        }
        if self.write_chunks == 0 || self.write_chunks > 64 {
            return bad(format!("rdma.write_chunks = {} must be within 1..=64", self.write_chunks));
        }
        if self.busy_poll_us > self.busy_poll_max_us || self.busy_poll_max_us > RDMA_BUSY_POLL_MAX_US {
            return bad(format!(
                "rdma.busy_poll_us = {} and rdma.busy_poll_max_us = {} must satisfy busy_poll_us <= \
                 busy_poll_max_us <= {RDMA_BUSY_POLL_MAX_US}",
                self.busy_poll_us, self.busy_poll_max_us
            ));
        }
        if !(10..=600_000).contains(&self.liveness_probe_ms) {
            return bad(format!("rdma.liveness_probe_ms = {} must be within 10..=600000", self.liveness_probe_ms));
        }
        if let Some(device) = &self.device {
            if device.is_empty() || device.len() > 64 {
                return bad(format!("rdma.device = {device:?} must be a device name of 1..=64 bytes"));
            }
        }
        Ok(())
    }
}

/// Ring bytes one frame of `max_frame_bytes` body needs: header and body, rounded up to the
/// ring alignment.
pub fn rdma_ring_need_bytes(max_frame_bytes: u64) -> u64 {
    (max_frame_bytes + crate::frame::FRAME_HEADER_BYTES as u64).div_ceil(RDMA_RING_ALIGN_BYTES) * RDMA_RING_ALIGN_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_limit_is_checked() {
        TransportConfig::default().validate().unwrap();
        let cases: [fn(&mut TransportConfig); 20] = [
            |c| c.max_frame_bytes = 10,
            |c| c.credits = 0,
            |c| c.max_inflight_bytes = c.max_frame_bytes - 1,
            |c| c.request_timeout_ms = 0,
            |c| c.heartbeat_interval_ms = c.idle_timeout_ms / 2,
            |c| c.rdma.recv_slots = c.credits,
            |c| c.read_buffer_bytes = usize::MAX,
            |c| c.write_timeout_ms = u64::MAX,
            |c| c.rdma.ring_bytes = c.max_frame_bytes,
            |c| c.rdma.recv_slots = c.credits + RDMA_CONTROL_RECV_SLOTS - 1,
            |c| c.rdma.ring_bytes += 1,
            |c| c.rdma.send_slots = 0,
            |c| c.rdma.write_chunk_bytes = 100,
            |c| c.rdma.write_chunks = 0,
            |c| c.rdma.device = Some(String::new()),
            |c| c.rdma.liveness_probe_ms = 0,
            |c| c.rdma.busy_poll_us = c.rdma.busy_poll_max_us + 1,
            |c| c.rdma.busy_poll_max_us = RDMA_BUSY_POLL_MAX_US + 1,
            |c| c.silence_probe_ms = 0,
            |c| c.dead_link_timeout_ms = MAX_TIMEOUT_MS + 1,
        ];
        for case in cases {
            let mut config = TransportConfig::default();
            case(&mut config);
            let err = config.validate().unwrap_err();
            assert_eq!(err.code(), 2109, "{err}");
        }
    }

    #[test]
    fn poll_modes_parse_from_their_config_words_only() {
        assert_eq!("runtime".parse::<RdmaPollMode>(), Ok(RdmaPollMode::Runtime));
        assert_eq!("thread".parse::<RdmaPollMode>(), Ok(RdmaPollMode::Thread));
        assert_eq!(RdmaPollMode::default(), RdmaPollMode::Runtime);
        let error = "Thread".parse::<RdmaPollMode>().expect_err("words are lower case");
        assert!(error.contains("\"runtime\" or \"thread\""), "{error}");
    }
}
