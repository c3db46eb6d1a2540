//! On-disk framing of the group-commit batches that hold CommitLog records. The record itself
//! lives in `sluice_transport::model::record` (the same bytes travel in pop replies) and is
//! re-exported here.
//!
//! Batch header (48 bytes, little-endian):
//! `magic u32 | header_crc u32 | batch_len u32 | record_count u32 | position u64 |
//!  synced_before u64 | version u16 | reserved [u8; 14]`
//! `header_crc` is CRC32C over bytes 8..48. `position` is the log position of the header itself,
//! so a batch found at the wrong place is recognised as garbage. `synced_before` is the log's
//! durable end when the batch was sealed: a later batch whose `synced_before` lies past an earlier
//! one proves the earlier one had been fdatasync'd, so its damage cannot be a torn write.
//!
//! Versions: 2 holds records without attributes; 3 (written now) may hold records with an
//! attributes block. Both are read, so logs written before attributes existed still open; a
//! binary that knows only version 2 refuses a version-3 log with a clear error instead of
//! misreading it.

pub use sluice_transport::model::message_type;
pub use sluice_transport::model::record::*;

pub const BATCH_MAGIC: u32 = 0x534C_4243; // "SLBC"
/// The version written.
pub const BATCH_VERSION: u16 = 3;
/// The oldest version still read.
pub const BATCH_VERSION_OLDEST_READ: u16 = 2;
pub const BATCH_HEADER_BYTES: usize = 48;

/// Why bytes could not be read as a batch header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("length field {len} out of bounds ({min}..={max})")]
    BadLength { len: u64, min: u64, max: u64 },
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("bad batch magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported batch version {0} (this build reads {BATCH_VERSION_OLDEST_READ}..={BATCH_VERSION}; a newer Sluice wrote it)")]
    BadVersion(u16),
    #[error("batch header says position {stored}, found at {actual}")]
    WrongPosition { stored: u64, actual: u64 },
    #[error("inner lengths disagree with batch length")]
    Inconsistent,
}

/// The fixed part of a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub batch_len: u32,
    pub record_count: u32,
    pub position: u64,
    pub synced_before: u64,
}

pub fn encode_batch_header(dst: &mut [u8], header: BatchHeader) {
    let dst = &mut dst[..BATCH_HEADER_BYTES];
    dst[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    dst[8..12].copy_from_slice(&header.batch_len.to_le_bytes());
    dst[12..16].copy_from_slice(&header.record_count.to_le_bytes());
    dst[16..24].copy_from_slice(&header.position.to_le_bytes());
    dst[24..32].copy_from_slice(&header.synced_before.to_le_bytes());
    dst[32..34].copy_from_slice(&BATCH_VERSION.to_le_bytes());
    dst[34..BATCH_HEADER_BYTES].fill(0);
    let crc = crc32c::crc32c(&dst[8..BATCH_HEADER_BYTES]);
    dst[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads a batch header found at log position `position`. `max_len` bounds `batch_len`.
pub fn decode_batch_header(src: &[u8], position: u64, max_len: u64) -> Result<BatchHeader, BatchError> {
    if src.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated { need: BATCH_HEADER_BYTES, have: src.len() });
    }
    let magic = le_u32(src, 0);
    if magic != BATCH_MAGIC {
        return Err(BatchError::BadMagic(magic));
    }
    let stored = le_u32(src, 4);
    let computed = crc32c::crc32c(&src[8..BATCH_HEADER_BYTES]);
    if stored != computed {
        return Err(BatchError::BadCrc { stored, computed });
    }
    let version = u16::from_le_bytes([src[32], src[33]]);
    if !(BATCH_VERSION_OLDEST_READ..=BATCH_VERSION).contains(&version) {
        return Err(BatchError::BadVersion(version));
    }
    let header = BatchHeader {
        batch_len: le_u32(src, 8),
        record_count: le_u32(src, 12),
        position: le_u64(src, 16),
        synced_before: le_u64(src, 24),
    };
    let len = u64::from(header.batch_len);
    if len < BATCH_HEADER_BYTES as u64 || len > max_len {
        return Err(BatchError::BadLength { len, min: BATCH_HEADER_BYTES as u64, max: max_len });
    }
    if header.position != position {
        return Err(BatchError::WrongPosition { stored: header.position, actual: position });
    }
    if header.synced_before > position {
        return Err(BatchError::Inconsistent);
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_batch_header(&bytes, 0, 1 << 20);
        }
    }

    #[test]
    fn batch_header_round_trip_and_checks() {
        let mut buf = [0u8; BATCH_HEADER_BYTES];
        let header = BatchHeader { batch_len: 4096, record_count: 3, position: 8192, synced_before: 4096 };
        encode_batch_header(&mut buf, header);
        assert_eq!(decode_batch_header(&buf, 8192, 1 << 20), Ok(header));
        assert!(matches!(decode_batch_header(&buf, 0, 1 << 20), Err(BatchError::WrongPosition { .. })));
        assert!(matches!(decode_batch_header(&buf, 8192, 100), Err(BatchError::BadLength { .. })));
        buf[13] ^= 1;
        assert!(matches!(decode_batch_header(&buf, 8192, 1 << 20), Err(BatchError::BadCrc { .. })));
        assert!(matches!(decode_batch_header(&[0u8; BATCH_HEADER_BYTES], 0, 1 << 20), Err(BatchError::BadMagic(0))));
    }

    #[test]
    fn versions_two_and_three_are_read_and_newer_ones_refused() {
        let header = BatchHeader { batch_len: 4096, record_count: 1, position: 0, synced_before: 0 };
        for (version, readable) in [(2u16, true), (3, true), (4, false), (1, false)] {
            let mut buf = [0u8; BATCH_HEADER_BYTES];
            encode_batch_header(&mut buf, header);
            buf[32..34].copy_from_slice(&version.to_le_bytes());
            let crc = crc32c::crc32c(&buf[8..BATCH_HEADER_BYTES]);
            buf[4..8].copy_from_slice(&crc.to_le_bytes());
            let decoded = decode_batch_header(&buf, 0, 1 << 20);
            assert_eq!(decoded.is_ok(), readable, "version {version}: {decoded:?}");
        }
    }
}
