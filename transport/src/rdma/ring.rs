//! The ring each side exposes for large frames (RDMA WRITE WITH IMMEDIATE), as both ends see it.
//!
//! Positions are virtual: a u64 that only grows, the ring offset being `position % ring_bytes`.
//! A frame starts at a multiple of `RDMA_RING_ALIGN_BYTES` and never wraps the ring's end: when
//! it does not fit before the end, it starts at the next lap (offset 0) and the bytes skipped
//! belong to it. Both ends compute placement the same way from the same tail, so the receiver
//! checks that the writer put each frame exactly where it had to.
//!
//! The receiver releases frames in any order (the application drops them when it likes); the
//! head only advances over a contiguous run of released frames. The writer learns the head from
//! control messages and never writes over a byte between the head and its tail.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use crate::config::RDMA_RING_ALIGN_BYTES;
use crate::frame::FRAME_HEADER_BYTES;

pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(RDMA_RING_ALIGN_BYTES) * RDMA_RING_ALIGN_BYTES
}

/// Where one frame goes, in virtual positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The tail before this frame: the frame owns `start..end`, skipped bytes included.
    pub start: u64,
    /// The frame's first byte.
    pub pos: u64,
    /// The tail after this frame (aligned).
    pub end: u64,
}

impl Placement {
    pub fn offset(&self, ring_bytes: u64) -> u64 {
        self.pos % ring_bytes
    }
}

/// The placement of a `frame_len`-byte frame written at `tail`.
pub fn place(tail: u64, frame_len: u64, ring_bytes: u64) -> Placement {
    let aligned = align_up(frame_len);
    let offset = tail % ring_bytes;
    let pos = if offset + aligned > ring_bytes { tail - offset + ring_bytes } else { tail };
    Placement { start: tail, pos, end: pos + aligned }
}

/// Whether `placement` leaves the live bytes `head..tail` alone. An empty ring takes any frame
/// that fits at all; otherwise the frame must end within one ring of the head.
fn fits(head: u64, tail: u64, placement: &Placement, ring_bytes: u64) -> bool {
    head == tail || placement.end - head <= ring_bytes
}

/// A peer that broke the ring protocol (input from outside: a typed error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingError(pub String);

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sender's view of the peer's ring.
#[derive(Debug)]
pub struct RingWriter {
    ring_bytes: u64,
    head: u64,
    tail: u64,
}

impl RingWriter {
    pub fn new(ring_bytes: u64) -> RingWriter {
        assert!(ring_bytes > 0 && ring_bytes.is_multiple_of(RDMA_RING_ALIGN_BYTES), "ring of {ring_bytes} bytes");
        RingWriter { ring_bytes, head: 0, tail: 0 }
    }

    pub fn ring_bytes(&self) -> u64 {
        self.ring_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.tail - self.head
    }

    /// Whether a frame of this size fits the ring at all (checked before `reserve`).
    pub fn can_ever_fit(&self, frame_len: u64) -> bool {
        frame_len > 0 && align_up(frame_len) <= self.ring_bytes
    }

    /// Space for one frame, or `None` until the peer releases more.
    pub fn reserve(&mut self, frame_len: u64) -> Option<Placement> {
        assert!(self.can_ever_fit(frame_len), "frame of {frame_len} bytes can never fit the ring");
        let placement = place(self.tail, frame_len, self.ring_bytes);
        if !fits(self.head, self.tail, &placement, self.ring_bytes) {
            return None;
        }
        self.tail = placement.end;
        Some(placement)
    }

    /// The peer freed everything before `head`.
    pub fn release_to(&mut self, head: u64) -> Result<(), RingError> {
        if head < self.head || head > self.tail {
            return Err(RingError(format!(
                "peer reported ring head {head}, outside the known head {} .. tail {}",
                self.head, self.tail
            )));
        }
        self.head = head;
        Ok(())
    }
}

#[derive(Debug)]
struct Accepted {
    start: u64,
    end: u64,
    released: bool,
}

/// The receiver's view of its own ring.
#[derive(Debug)]
pub struct RingReader {
    ring_bytes: u64,
    head: u64,
    tail: u64,
    /// Frames accepted and not yet passed by the head, in ring order.
    live: VecDeque<Accepted>,
}

impl RingReader {
    pub fn new(ring_bytes: u64) -> RingReader {
        assert!(ring_bytes > 0 && ring_bytes.is_multiple_of(RDMA_RING_ALIGN_BYTES), "ring of {ring_bytes} bytes");
        RingReader { ring_bytes, head: 0, tail: 0, live: VecDeque::new() }
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    #[cfg(test)]
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Checks an offset from immediate data before the header there is read.
    pub fn check_offset(&self, offset: u64) -> Result<(), RingError> {
        if !offset.is_multiple_of(RDMA_RING_ALIGN_BYTES) || offset + FRAME_HEADER_BYTES as u64 > self.ring_bytes {
            return Err(RingError(format!(
                "peer signalled a frame at ring offset {offset}, outside the {}-byte ring",
                self.ring_bytes
            )));
        }
        Ok(())
    }

    /// A frame of `frame_len` bytes (from its checked header) arrived at `offset`.
    pub fn accept(&mut self, offset: u64, frame_len: u64) -> Result<Placement, RingError> {
        if frame_len == 0 || align_up(frame_len) > self.ring_bytes {
            return Err(RingError(format!("frame of {frame_len} bytes cannot fit the {}-byte ring", self.ring_bytes)));
        }
        let placement = place(self.tail, frame_len, self.ring_bytes);
        let expected = placement.offset(self.ring_bytes);
        if offset != expected {
            return Err(RingError(format!(
                "peer wrote a {frame_len}-byte frame at ring offset {offset}; the protocol puts it at {expected}"
            )));
        }
        if !fits(self.head, self.tail, &placement, self.ring_bytes) {
            return Err(RingError(format!(
                "peer wrote a {frame_len}-byte frame over unreleased ring bytes (head {}, tail {})",
                self.head, self.tail
            )));
        }
        self.tail = placement.end;
        self.live.push_back(Accepted { start: placement.start, end: placement.end, released: false });
        Ok(placement)
    }

    /// The frame whose placement started at `start` was dropped. Returns whether the head moved.
    pub fn release(&mut self, start: u64) -> bool {
        let index = self.live.partition_point(|a| a.start < start);
        let frame = self.live.get_mut(index).filter(|a| a.start == start && !a.released);
        let frame = frame.unwrap_or_else(|| panic!("ring release of {start}, which is not a live frame"));
        frame.released = true;
        let before = self.head;
        while self.live.front().is_some_and(|a| a.released) {
            let done = self.live.pop_front().expect("front exists");
            assert_eq!(done.start, self.head, "ring ranges are contiguous");
            self.head = done.end;
        }
        self.head != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RING: u64 = 64 * 64;

    #[test]
    fn a_frame_that_does_not_fit_before_the_end_skips_to_offset_zero() {
        let mut writer = RingWriter::new(RING);
        let a = writer.reserve(3000).unwrap();
        assert_eq!((a.pos, a.end), (0, 3008));
        assert!(writer.reserve(2000).is_none(), "would overwrite the first frame");
        writer.release_to(a.end).unwrap();
        let b = writer.reserve(2000).unwrap();
        assert_eq!((b.start, b.pos, b.offset(RING)), (3008, RING, 0));
    }

    #[test]
    fn an_empty_ring_takes_a_full_ring_frame_from_any_tail() {
        let mut writer = RingWriter::new(RING);
        let a = writer.reserve(100).unwrap();
        writer.release_to(a.end).unwrap();
        let b = writer.reserve(RING).unwrap();
        assert_eq!(b.offset(RING), 0);
        assert!(writer.reserve(1).is_none());
    }

    #[test]
    fn reader_rejects_misplaced_and_oversized_frames() {
        let mut reader = RingReader::new(RING);
        assert!(reader.check_offset(RING - 16).is_err());
        assert!(reader.check_offset(65).is_err());
        assert!(reader.accept(64, 100).is_err(), "first frame belongs at 0");
        assert!(reader.accept(0, RING + 1).is_err());
        reader.accept(0, 4000).unwrap();
        assert!(reader.accept(0, 4000).is_err(), "would overwrite the live frame");
    }

    #[test]
    fn head_advances_only_over_contiguous_releases() {
        let mut reader = RingReader::new(RING);
        let a = reader.accept(0, 100).unwrap();
        let b = reader.accept(128, 100).unwrap();
        let c = reader.accept(256, 100).unwrap();
        assert!(!reader.release(b.start));
        assert_eq!(reader.head(), 0);
        assert!(reader.release(a.start));
        assert_eq!(reader.head(), b.end);
        assert!(reader.release(c.start));
        assert_eq!(reader.head(), reader.tail());
    }

    #[test]
    fn writer_rejects_a_head_outside_what_it_wrote() {
        let mut writer = RingWriter::new(RING);
        let a = writer.reserve(100).unwrap();
        assert!(writer.release_to(a.end + 64).is_err());
        writer.release_to(a.end).unwrap();
        assert!(writer.release_to(0).is_err(), "heads never go back");
    }

    proptest! {
        /// Writer and reader in lockstep, frames of any size, releases in any order, head
        /// reports at random times: every frame is placed where the reader expects it, never
        /// wraps the end, never overlaps a live frame, and the head never passes a live frame.
        #[test]
        fn ring_never_overwrites_live_frames(
            ring_units in 1u64..64,
            ops in proptest::collection::vec((1u64..5000, any::<u8>(), any::<bool>()), 1..300),
        ) {
            let ring = ring_units * 64;
            let mut writer = RingWriter::new(ring);
            let mut reader = RingReader::new(ring);
            let mut live: Vec<(Placement, u64)> = Vec::new();
            for (len, pick, report) in ops {
                let len = 1 + len % ring;
                if let Some(p) = writer.reserve(len) {
                    let offset = p.offset(ring);
                    prop_assert!(offset + len <= ring, "frame wraps the ring end");
                    for (other, other_len) in &live {
                        let (a0, a1) = (offset, offset + len);
                        let (b0, b1) = (other.offset(ring), other.offset(ring) + other_len);
                        prop_assert!(a1 <= b0 || b1 <= a0, "overlaps a live frame");
                    }
                    prop_assert_eq!(reader.accept(offset, len), Ok(p));
                    live.push((p, len));
                } else if !live.is_empty() {
                    let (p, _) = live.remove(pick as usize % live.len());
                    reader.release(p.start);
                    let first_live = live.iter().map(|(p, _)| p.start).min().unwrap_or(reader.tail());
                    prop_assert!(reader.head() <= first_live);
                } else {
                    // Nothing live: once the writer hears the head, the empty ring takes it.
                    writer.release_to(reader.head()).unwrap();
                    let p = writer.reserve(len);
                    prop_assert!(p.is_some(), "empty ring refused a frame");
                    let p = p.unwrap();
                    prop_assert_eq!(reader.accept(p.offset(ring), len), Ok(p));
                    live.push((p, len));
                }
                if report {
                    writer.release_to(reader.head()).unwrap();
                }
            }
            for (p, _) in live.drain(..) {
                reader.release(p.start);
            }
            prop_assert_eq!(reader.head(), reader.tail());
        }
    }
}
