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
    /// On shutdown, how long a server waits for in-flight requests before it closes.
    pub drain_timeout_ms: u64,
    /// Most bytes gathered into one vectored write.
    pub write_batch_bytes: usize,
    /// Size of each TCP read buffer; frames that fit are received without a copy.
    pub read_buffer_bytes: usize,
    pub rdma: RdmaConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RdmaConfig {
    /// Size of each registered SEND/RECV slot; larger frames go through the remote ring.
    pub slot_bytes: u32,
    /// Receives posted in advance per connection (at least `credits` + control slack).
    pub recv_slots: u32,
    /// Registered ring each side exposes for RDMA WRITE WITH IMMEDIATE; at least max_frame_bytes + header.
    pub ring_bytes: u64,
    /// Completion-queue polls before the poller sleeps on the completion channel.
    pub busy_poll_spins: u32,
}

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
            drain_timeout_ms: 5_000,
            write_batch_bytes: 256 << 10,
            read_buffer_bytes: 64 << 10,
            rdma: RdmaConfig::default(),
        }
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            slot_bytes: 8192,
            recv_slots: 1024 + 64,
            ring_bytes: (64 << 20) + (1 << 20),
            busy_poll_spins: 2_000,
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
        if self.slot_bytes < 1024 || self.slot_bytes > (1 << 20) {
            return bad(format!("rdma.slot_bytes = {} must be within 1024..=1048576", self.slot_bytes));
        }
        if self.recv_slots <= transport.credits {
            return bad(format!(
                "rdma.recv_slots = {} must exceed credits = {} (control messages need slots too)",
                self.recv_slots, transport.credits
            ));
        }
        let need = transport.max_frame_bytes + crate::frame::FRAME_HEADER_BYTES as u64;
        if self.ring_bytes < need {
            return bad(format!(
                "rdma.ring_bytes = {} must hold one largest frame ({need} bytes = max_frame_bytes + header)",
                self.ring_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_limit_is_checked() {
        TransportConfig::default().validate().unwrap();
        let cases: [fn(&mut TransportConfig); 9] = [
            |c| c.max_frame_bytes = 10,
            |c| c.credits = 0,
            |c| c.max_inflight_bytes = c.max_frame_bytes - 1,
            |c| c.request_timeout_ms = 0,
            |c| c.heartbeat_interval_ms = c.idle_timeout_ms / 2,
            |c| c.rdma.recv_slots = c.credits,
            |c| c.read_buffer_bytes = usize::MAX,
            |c| c.write_timeout_ms = u64::MAX,
            |c| c.rdma.ring_bytes = c.max_frame_bytes,
        ];
        for case in cases {
            let mut config = TransportConfig::default();
            case(&mut config);
            let err = config.validate().unwrap_err();
            assert_eq!(err.code(), 2109, "{err}");
        }
    }
}
