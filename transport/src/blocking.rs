//! Blocking frame I/O over any `Read`/`Write`, for bootstrap exchanges (RDMA queue-pair
//! details over TCP) and tests. The async paths live in `tcp`.

use std::io::{Read, Write};

use bytes::BytesMut;

use crate::error::TransportError;
use crate::frame::{Frame, FrameHeader, OutFrame, FRAME_HEADER_BYTES};

/// Reads exactly one frame. The body buffer is sized only after the header's length passed
/// the `max_frame_bytes` check.
pub fn read_frame<R: Read>(reader: &mut R, max_frame_bytes: u64) -> Result<Frame, TransportError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut header).map_err(|e| TransportError::io("reading a frame header", e))?;
    let decoded = FrameHeader::decode(&header, max_frame_bytes)?;
    let mut buf = BytesMut::zeroed(decoded.frame_len());
    buf[..FRAME_HEADER_BYTES].copy_from_slice(&header);
    reader.read_exact(&mut buf[FRAME_HEADER_BYTES..]).map_err(|e| TransportError::io("reading a frame body", e))?;
    Ok(Frame::parse(buf.freeze(), max_frame_bytes)?)
}

pub fn write_frame<W: Write>(writer: &mut W, frame: &OutFrame) -> Result<(), TransportError> {
    writer.write_all(frame.as_bytes()).map_err(|e| TransportError::io("writing a frame", e))?;
    writer.flush().map_err(|e| TransportError::io("flushing a frame", e))
}
