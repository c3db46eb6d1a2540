//! The frame: a fixed 32-byte header followed by an rkyv archive.
//!
//! ```text
//! 0..4   magic "SLCF"        4..6   version      6..8   kind
//! 8..10  flags               10..12 reserved (0) 12..16 body length
//! 16..24 request id          24..28 CRC32C       28..32 reserved (0)
//! ```
//! The CRC covers bytes 0..24, 28..32 and the body. All integers are little-endian.
//! Archives use rkyv's unaligned format, so a frame can sit at any address in a receive
//! buffer and still be read in place.

use bytes::Bytes;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;

use crate::error::FrameError;
use crate::messages::FrameKind;

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"SLCF");
/// 2: records carry broker-visible attributes, pops are per topic (kinds 34+).
/// 3: quotas (kinds 46, 47); CreateQueueRequest.update, ChangeInvisibleRequest.suspend.
pub const FRAME_VERSION: u16 = 4;
pub const FRAME_HEADER_BYTES: usize = 32;
/// Hard ceiling on `max_frame_bytes`: rkyv's 32-bit relative pointers and the u32 length field.
pub const FRAME_BODY_CEILING_BYTES: u64 = 1 << 30;

/// A type that travels as the body of one frame kind.
pub trait Message: for<'a> rkyv::Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, rancor::Error>> {
    const KIND: FrameKind;
    type ArchivedBody: rkyv::Portable + for<'a> rkyv::bytecheck::CheckBytes<HighValidator<'a, rancor::Error>>;
    /// Expected encoded size, so encoding allocates once.
    fn size_hint(&self) -> usize {
        256
    }
}

/// A request kind and the reply kind it expects.
pub trait Request: Message {
    type Reply: Message;
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: u16,
    pub flags: u16,
    pub body_len: u32,
    pub request_id: u64,
    pub crc: u32,
}

impl FrameHeader {
    /// Checks magic, version and length; `Frame::parse` checks the CRC, `Frame::kind` the kind.
    /// The version is checked before the length so an old peer learns why it was refused.
    pub fn decode(header: &[u8], max_frame_bytes: u64) -> Result<FrameHeader, FrameError> {
        if header.len() < FRAME_HEADER_BYTES {
            return Err(FrameError::Truncated { have: header.len() as u64, need: FRAME_HEADER_BYTES as u64 });
        }
        let magic = u32_at(header, 0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16_at(header, 4);
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version, supported: FRAME_VERSION });
        }
        let body_len = u32_at(header, 12);
        if u64::from(body_len) > max_frame_bytes {
            return Err(FrameError::Oversize { body_len: body_len.into(), max_frame_bytes });
        }
        Ok(FrameHeader {
            version,
            kind: u16_at(header, 6),
            flags: u16_at(header, 8),
            body_len,
            request_id: u64::from_le_bytes(header[16..24].try_into().expect("8 bytes")),
            crc: u32_at(header, 24),
        })
    }

    /// Total bytes of the frame this header starts.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.body_len as usize
    }

    fn write_to(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..10].copy_from_slice(&self.flags.to_le_bytes());
        out[10..12].fill(0);
        out[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        out[24..28].copy_from_slice(&self.crc.to_le_bytes());
        out[28..32].fill(0);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn frame_crc(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[0..24]);
    let crc = crc32c::crc32c_append(crc, &frame[28..32]);
    crc32c::crc32c_append(crc, &frame[FRAME_HEADER_BYTES..])
}

/// A received frame whose header and CRC have been checked. The bytes stay in the buffer they
/// were received into (a TCP read buffer or a registered RDMA buffer); nothing is copied.
#[derive(Clone)]
pub struct Frame {
    header: FrameHeader,
    bytes: Bytes,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame").field("header", &self.header).finish()
    }
}

impl Frame {
    /// Parses exactly one frame: header, length and CRC. The kind is not checked here, so a
    /// receiver can answer an unknown kind with an error frame naming its request id.
    pub fn parse(bytes: Bytes, max_frame_bytes: u64) -> Result<Frame, FrameError> {
        let header = FrameHeader::decode(&bytes, max_frame_bytes)?;
        let need = header.frame_len() as u64;
        if (bytes.len() as u64) < need {
            return Err(FrameError::Truncated { have: bytes.len() as u64, need });
        }
        if bytes.len() as u64 > need {
            return Err(FrameError::Malformed {
                kind: header.kind,
                reason: format!("{} trailing bytes after the body", bytes.len() as u64 - need),
            });
        }
        let computed = frame_crc(&bytes);
        if computed != header.crc {
            return Err(FrameError::BadCrc { stored: header.crc, computed });
        }
        Ok(Frame { header, bytes })
    }

    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    pub fn request_id(&self) -> u64 {
        self.header.request_id
    }

    /// The frame kind, or `UnknownKind` for a kind this build does not know.
    pub fn kind(&self) -> Result<FrameKind, FrameError> {
        FrameKind::try_from(self.header.kind)
    }

    /// The whole frame, header included.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER_BYTES..]
    }

    /// Validates the archive (rkyv bytecheck) and returns it in place. Call it once at the
    /// boundary and pass the archived reference on.
    pub fn access<M: Message>(&self) -> Result<&M::ArchivedBody, FrameError> {
        if self.header.kind != M::KIND as u16 {
            return Err(FrameError::UnexpectedKind { expected: M::KIND as u16, found: self.header.kind });
        }
        rkyv::access::<M::ArchivedBody, rancor::Error>(self.body())
            .map_err(|e| FrameError::Malformed { kind: self.header.kind, reason: e.to_string() })
    }

    /// A `Bytes` handle on a slice of this frame's body (e.g. a message body inside the
    /// archive), sharing the receive buffer instead of copying it.
    pub fn share(&self, inner: &[u8]) -> Bytes {
        self.bytes.slice_ref(inner)
    }
}

/// An encoded frame, header and body in one contiguous buffer, ready to send.
#[derive(Debug, Clone)]
pub struct OutFrame {
    bytes: Bytes,
}

impl OutFrame {
    /// Encodes `message` as the body of a frame. The body is serialized straight after 32
    /// zeroed bytes that become the header, so the frame is one buffer and one write.
    pub fn encode<M: Message>(request_id: u64, message: &M, max_frame_bytes: u64) -> Result<OutFrame, FrameError> {
        Self::encode_with_flags(request_id, 0, message, max_frame_bytes)
    }

    pub fn encode_with_flags<M: Message>(
        request_id: u64,
        flags: u16,
        message: &M,
        max_frame_bytes: u64,
    ) -> Result<OutFrame, FrameError> {
        let kind = M::KIND as u16;
        let mut buf = Vec::with_capacity(FRAME_HEADER_BYTES + message.size_hint());
        buf.resize(FRAME_HEADER_BYTES, 0);
        let mut buf = rkyv::api::high::to_bytes_in::<_, rancor::Error>(message, buf)
            .map_err(|e| FrameError::Encode { kind, reason: e.to_string() })?;
        let body_len = (buf.len() - FRAME_HEADER_BYTES) as u64;
        if body_len > max_frame_bytes.min(FRAME_BODY_CEILING_BYTES) {
            return Err(FrameError::Oversize { body_len, max_frame_bytes });
        }
        let mut header =
            FrameHeader { version: FRAME_VERSION, kind, flags, body_len: body_len as u32, request_id, crc: 0 };
        header.write_to(&mut buf[..FRAME_HEADER_BYTES]);
        header.crc = frame_crc(&buf);
        header.write_to(&mut buf[..FRAME_HEADER_BYTES]);
        Ok(OutFrame { bytes: Bytes::from(buf) })
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn request_id(&self) -> u64 {
        u64::from_le_bytes(self.bytes[16..24].try_into().expect("8 bytes"))
    }

    pub fn kind(&self) -> u16 {
        u16_at(&self.bytes, 6)
    }

    /// The same frame under another request id (the CRC is recomputed).
    pub fn with_request_id(&self, request_id: u64) -> OutFrame {
        // Copies the frame; only diagnostics and tests re-address frames.
        let mut bytes = self.bytes.to_vec();
        bytes[16..24].copy_from_slice(&request_id.to_le_bytes());
        let crc = frame_crc(&bytes);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        OutFrame { bytes: bytes.into() }
    }

    /// Raw bytes, for tests that need to send something broken on purpose.
    pub fn from_raw(bytes: Bytes) -> OutFrame {
        OutFrame { bytes }
    }
}
