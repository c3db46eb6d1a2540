//! Sans-I/O frame reassembly for byte streams (TCP on tokio and on glommio).
//!
//! Bytes are read straight into a zeroed buffer; each complete frame is split off the front
//! as a `Bytes` that shares that buffer, so a frame that arrives within one buffer is never
//! copied. A frame that does not fit in what is left of the buffer gets a new buffer (of its
//! own size if it is larger than `read_buffer_bytes`) once its header has passed the length
//! check; only the part of it already received is copied over, so a large body is mostly
//! read straight into its final place.

use bytes::BytesMut;

use crate::error::FrameError;
use crate::frame::{Frame, FrameHeader, FRAME_HEADER_BYTES, FRAME_MAGIC};

#[derive(Debug)]
pub struct FrameReader {
    /// Zero-initialised storage; `buf[..filled]` holds received bytes not yet framed.
    buf: BytesMut,
    filled: usize,
    max_frame_bytes: u64,
    read_buffer_bytes: usize,
}

impl FrameReader {
    pub fn new(max_frame_bytes: u64, read_buffer_bytes: usize) -> FrameReader {
        assert!(read_buffer_bytes >= FRAME_HEADER_BYTES);
        FrameReader { buf: BytesMut::zeroed(read_buffer_bytes), filled: 0, max_frame_bytes, read_buffer_bytes }
    }

    /// True while part of a frame has arrived (the frame deadline applies).
    pub fn frame_in_progress(&self) -> bool {
        self.filled > 0
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.filled < FRAME_HEADER_BYTES {
            // Refuse a wrong magic as soon as it shows, not after a full header's worth.
            if self.filled >= 4 && self.buf[..4] != FRAME_MAGIC.to_le_bytes() {
                return Err(FrameError::BadMagic { found: u32::from_le_bytes(self.buf[..4].try_into().expect("4")) });
            }
            return Ok(None);
        }
        let header = FrameHeader::decode(&self.buf[..FRAME_HEADER_BYTES], self.max_frame_bytes)?;
        let frame_len = header.frame_len();
        if self.filled < frame_len {
            return Ok(None);
        }
        let frame = self.buf.split_to(frame_len).freeze();
        self.filled -= frame_len;
        Frame::parse(frame, self.max_frame_bytes).map(Some)
    }

    /// The length of the frame being received, once its header has arrived and passed the
    /// checks (so the caller can charge it before `spare` sizes a buffer by it).
    pub fn pending_frame_len(&self) -> Result<Option<usize>, FrameError> {
        if self.filled < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        Ok(Some(FrameHeader::decode(&self.buf[..FRAME_HEADER_BYTES], self.max_frame_bytes)?.frame_len()))
    }

    /// Space to read into. Call after `next_frame` returned `None`.
    pub fn spare(&mut self) -> Result<&mut [u8], FrameError> {
        let need = if self.filled >= FRAME_HEADER_BYTES {
            // Checked header: the length below is bounded by max_frame_bytes.
            FrameHeader::decode(&self.buf[..FRAME_HEADER_BYTES], self.max_frame_bytes)?.frame_len()
        } else {
            FRAME_HEADER_BYTES
        };
        if self.buf.len() < need || self.filled == self.buf.len() {
            let mut fresh = BytesMut::zeroed(need.max(self.read_buffer_bytes));
            // Copy only the partial frame's prefix; frames already split off keep the old buffer.
            fresh[..self.filled].copy_from_slice(&self.buf[..self.filled]);
            self.buf = fresh;
        }
        Ok(&mut self.buf[self.filled..])
    }

    /// Records that `n` bytes were read into `spare()`.
    pub fn advance(&mut self, n: usize) {
        assert!(self.filled + n <= self.buf.len(), "read past the spare buffer");
        self.filled += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::OutFrame;
    use crate::messages::Echo;

    fn feed(reader: &mut FrameReader, mut bytes: &[u8], chunk: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let spare = reader.spare().unwrap();
            let n = spare.len().min(chunk).min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            reader.advance(n);
            bytes = &bytes[n..];
            while let Some(frame) = reader.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        frames
    }

    #[test]
    fn reassembles_frames_split_anywhere_and_large_frames() {
        let payloads: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; i * 997]).collect();
        let mut stream = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            stream.extend_from_slice(OutFrame::encode(i as u64, &Echo { payload: p }, 1 << 20).unwrap().as_bytes());
        }
        for chunk in [1, 7, 32, 4096, 1 << 20] {
            let mut reader = FrameReader::new(1 << 20, 4096);
            let frames = feed(&mut reader, &stream, chunk);
            assert_eq!(frames.len(), payloads.len());
            for (i, frame) in frames.iter().enumerate() {
                assert_eq!(frame.request_id(), i as u64);
                assert_eq!(&frame.access::<Echo>().unwrap().payload[..], &payloads[i][..]);
            }
            assert!(!reader.frame_in_progress());
        }
    }

    #[test]
    fn empty_bodies_exact_fits_and_an_early_bad_magic() {
        use crate::messages::CommitOffsetResponse;
        let empty = OutFrame::encode(1, &CommitOffsetResponse {}, 1 << 20).unwrap();
        // A buffer exactly one frame long, then frames that exactly fill each buffer.
        let echo = OutFrame::encode(2, &Echo { payload: &[9u8; 100] }, 1 << 20).unwrap();
        for buffer in [echo.len(), echo.len() * 2, FRAME_HEADER_BYTES.max(empty.len())] {
            let mut reader = FrameReader::new(1 << 20, buffer.max(FRAME_HEADER_BYTES));
            let mut stream = Vec::new();
            for _ in 0..3 {
                stream.extend_from_slice(echo.as_bytes());
                stream.extend_from_slice(empty.as_bytes());
            }
            let frames = feed(&mut reader, &stream, usize::MAX);
            assert_eq!(frames.len(), 6);
            assert!(frames[1].body().len() <= 8 && frames[1].access::<CommitOffsetResponse>().is_ok());
            assert_eq!(&frames[4].access::<Echo>().unwrap().payload[..], &[9u8; 100]);
        }
        let mut reader = FrameReader::new(1 << 20, 4096);
        let spare = reader.spare().unwrap();
        spare[..5].copy_from_slice(b"HTTP/");
        reader.advance(5);
        assert!(matches!(reader.next_frame(), Err(FrameError::BadMagic { .. })));
    }

    #[test]
    fn an_oversize_header_is_refused_before_any_buffer_is_sized_by_it() {
        let frame = OutFrame::encode(1, &Echo { payload: &[0u8; 10_000] }, 1 << 20).unwrap();
        let mut reader = FrameReader::new(4096, 4096);
        let spare = reader.spare().unwrap();
        spare[..FRAME_HEADER_BYTES].copy_from_slice(&frame.as_bytes()[..FRAME_HEADER_BYTES]);
        reader.advance(FRAME_HEADER_BYTES);
        assert!(matches!(reader.next_frame(), Err(FrameError::Oversize { .. })));
        assert!(matches!(reader.spare(), Err(FrameError::Oversize { .. })));
    }
}
