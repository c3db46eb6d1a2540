//! What travels on the RDMA link besides frames: the 32-bit immediate data of every message,
//! the body of flow-control messages, and the work-request ids this side gives its own WRs.
//!
//! Immediate data (host order here; network order on the wire):
//! ```text
//! 31..30 kind   00 = SEND: a whole frame in the receive slot
//!               01 = RDMA WRITE WITH IMMEDIATE: a frame in the receiver's ring
//!               10 = SEND: flow control (never delivered to the sink)
//!               11 = invalid
//! SEND frame     29..0  data credits returned to the receiver of this message
//! ring frame     29..0  ring offset of the frame's first byte / 64 (rings up to 64 GiB)
//! control        29     reply: answers the receiver's outstanding credit request
//!                28     request: the sender wants credits / ring space back
//!                27..0  data credits returned
//! ```
//! A control message's body is `CONTROL_BODY_BYTES`: a magic and the sender's ring head (the
//! position up to which the receiver of the message may reuse the sender's ring).
#![forbid(unsafe_code)]

use crate::config::RDMA_RING_ALIGN_BYTES;

const KIND_SHIFT: u32 = 30;
const KIND_SEND: u32 = 0;
const KIND_RING: u32 = 1;
const KIND_CONTROL: u32 = 2;
const PAYLOAD_MASK: u32 = (1 << KIND_SHIFT) - 1;
const CONTROL_REPLY_BIT: u32 = 1 << 29;
const CONTROL_REQUEST_BIT: u32 = 1 << 28;

/// Most credits one SEND frame's immediate data can return.
pub const SEND_CREDITS_MAX: u32 = PAYLOAD_MASK;
/// Most credits one control message can return.
pub const CONTROL_CREDITS_MAX: u32 = CONTROL_REQUEST_BIT - 1;
/// Ring offsets are carried in units of the ring alignment.
pub const RING_OFFSET_MAX: u64 = (PAYLOAD_MASK as u64) * RDMA_RING_ALIGN_BYTES;

pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"SLRC");
pub const CONTROL_BODY_BYTES: usize = 16;

/// The decoded immediate data of one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imm {
    /// A whole frame sent into the receive slot; returns `credits` data credits.
    Send { credits: u32 },
    /// A frame written into the receiver's ring at byte `offset`.
    Ring { offset: u64 },
    /// Flow control: returns `credits`, may answer the receiver's request and/or ask for credits.
    Control { credits: u32, request: bool, reply: bool },
}

/// Immediate data or a control body that breaks the protocol (peer input: never asserted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Imm {
    /// Encodes; the caller keeps credits and offsets within the field limits (a bug otherwise).
    pub fn encode(self) -> u32 {
        match self {
            Imm::Send { credits } => {
                assert!(credits <= SEND_CREDITS_MAX, "SEND credits {credits} exceed the imm field");
                (KIND_SEND << KIND_SHIFT) | credits
            }
            Imm::Ring { offset } => {
                assert!(
                    offset % RDMA_RING_ALIGN_BYTES == 0 && offset <= RING_OFFSET_MAX,
                    "ring offset {offset} not encodable"
                );
                (KIND_RING << KIND_SHIFT) | (offset / RDMA_RING_ALIGN_BYTES) as u32
            }
            Imm::Control { credits, request, reply } => {
                assert!(credits <= CONTROL_CREDITS_MAX, "control credits {credits} exceed the imm field");
                let mut imm = (KIND_CONTROL << KIND_SHIFT) | credits;
                if request {
                    imm |= CONTROL_REQUEST_BIT;
                }
                if reply {
                    imm |= CONTROL_REPLY_BIT;
                }
                imm
            }
        }
    }

    pub fn decode(imm: u32) -> Result<Imm, WireError> {
        let payload = imm & PAYLOAD_MASK;
        match imm >> KIND_SHIFT {
            KIND_SEND => Ok(Imm::Send { credits: payload }),
            KIND_RING => Ok(Imm::Ring { offset: u64::from(payload) * RDMA_RING_ALIGN_BYTES }),
            KIND_CONTROL => Ok(Imm::Control {
                credits: payload & CONTROL_CREDITS_MAX,
                request: payload & CONTROL_REQUEST_BIT != 0,
                reply: payload & CONTROL_REPLY_BIT != 0,
            }),
            kind => Err(WireError(format!("immediate data {imm:#010x} has unknown kind {kind}"))),
        }
    }
}

/// The body of a control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlBody {
    /// The sender's ring head: every ring byte before this position is free for reuse.
    pub ring_head: u64,
}

impl ControlBody {
    pub fn encode(&self) -> [u8; CONTROL_BODY_BYTES] {
        let mut out = [0u8; CONTROL_BODY_BYTES];
        out[0..4].copy_from_slice(&CONTROL_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&self.ring_head.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ControlBody, WireError> {
        if bytes.len() != CONTROL_BODY_BYTES {
            return Err(WireError(format!("control message of {} bytes; expected {CONTROL_BODY_BYTES}", bytes.len())));
        }
        let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        if magic != CONTROL_MAGIC || bytes[4..8] != [0; 4] {
            return Err(WireError(format!("control message with bad magic {magic:#010x}")));
        }
        Ok(ControlBody { ring_head: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) })
    }
}

/// What a work request of this side was for; the tag sits in the WR id's upper half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrKind {
    Recv = 1,
    SendFrame = 2,
    SendControl = 3,
    Write = 4,
    /// Zero-length RDMA WRITE that only checks the peer's queue pair answers.
    Probe = 5,
}

pub fn wr_id(kind: WrKind, index: u32) -> u64 {
    ((kind as u64) << 32) | u64::from(index)
}

/// `None` for an id this side never issued (a bug in the verbs layer, or memory corruption).
pub fn decode_wr_id(id: u64) -> Option<(WrKind, u32)> {
    let kind = match id >> 32 {
        1 => WrKind::Recv,
        2 => WrKind::SendFrame,
        3 => WrKind::SendControl,
        4 => WrKind::Write,
        5 => WrKind::Probe,
        _ => return None,
    };
    Some((kind, id as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn imm_kinds_round_trip_at_their_limits() {
        for imm in [
            Imm::Send { credits: 0 },
            Imm::Send { credits: SEND_CREDITS_MAX },
            Imm::Ring { offset: 0 },
            Imm::Ring { offset: RING_OFFSET_MAX },
            Imm::Control { credits: CONTROL_CREDITS_MAX, request: true, reply: false },
            Imm::Control { credits: 0, request: false, reply: true },
            Imm::Control { credits: 7, request: true, reply: true },
        ] {
            assert_eq!(Imm::decode(imm.encode()), Ok(imm));
        }
        assert!(Imm::decode(0xC000_0000).is_err());
    }

    #[test]
    #[should_panic(expected = "not encodable")]
    fn unaligned_ring_offset_is_a_bug() {
        Imm::Ring { offset: 65 }.encode();
    }

    #[test]
    fn control_body_round_trips_and_rejects_garbage() {
        let body = ControlBody { ring_head: 0x0123_4567_89ab_cdef };
        assert_eq!(ControlBody::decode(&body.encode()), Ok(body));
        assert!(ControlBody::decode(&body.encode()[..15]).is_err());
        let mut bad = body.encode();
        bad[0] ^= 1;
        assert!(ControlBody::decode(&bad).is_err());
    }

    #[test]
    fn wr_ids_round_trip() {
        for kind in [WrKind::Recv, WrKind::SendFrame, WrKind::SendControl, WrKind::Write, WrKind::Probe] {
            for index in [0, 1, u32::MAX] {
                assert_eq!(decode_wr_id(wr_id(kind, index)), Some((kind, index)));
            }
        }
        assert_eq!(decode_wr_id(0), None);
        assert_eq!(decode_wr_id(9 << 32), None);
    }

    proptest! {
        #[test]
        fn any_imm_decodes_without_panicking_and_reencodes(imm in any::<u32>()) {
            if let Ok(decoded) = Imm::decode(imm) {
                prop_assert_eq!(decoded.encode(), imm);
            }
        }

        #[test]
        fn any_control_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = ControlBody::decode(&bytes);
        }
    }
}
