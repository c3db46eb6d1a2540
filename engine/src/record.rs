//! On-disk framing of CommitLog records and of the group-commit batches that hold them.
//!
//! Batch header (48 bytes, little-endian):
//! `magic u32 | header_crc u32 | batch_len u32 | record_count u32 | position u64 |
//!  synced_before u64 | version u16 | reserved [u8; 14]`
//! `header_crc` is CRC32C over bytes 8..48. `position` is the log position of the header itself,
//! so a batch found at the wrong place is recognised as garbage. `synced_before` is the log's
//! durable end when the batch was sealed: a later batch whose `synced_before` lies past an earlier
//! one proves the earlier one had been fdatasync'd, so its damage cannot be a torn write.
//!
//! Record (32-byte fixed part, then variable fields in this order):
//! `record_len u32 | crc u32 | flags u16 | queue_count u8 | key_count u8 | store_ms u64 |
//!  properties_len u32 | body_len u32 | message_id_len u8 | tag_len u8 | reserved u16`
//! then `queue_count × (name_len u8, name, offset u64)`, message id, tag,
//! `key_count × (len u8, key)`, properties, body. `crc` is CRC32C over bytes 8..record_len.
//!
//! Nothing here trusts a length read from disk: every field is bounds-checked before use and a
//! bad one is an error, never a panic.

use crate::config::{RECORD_ID_MAX_BYTES, RECORD_KEYS_MAX, RECORD_QUEUES_MAX};
use crate::queue::QUEUE_NAME_MAX_BYTES;

pub const BATCH_MAGIC: u32 = 0x534C_4243; // "SLBC"
pub const BATCH_VERSION: u16 = 2;
pub const BATCH_HEADER_BYTES: usize = 48;
pub const RECORD_HEADER_BYTES: usize = 32;

/// Record flag: the body is an engine control operation, not a message.
pub const FLAG_CONTROL: u16 = 1 << 0;

/// A record as an appender hands it in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// Queues the record is indexed into; the first decides the shard. One stored copy.
    pub queues: Vec<String>,
    /// Message id chosen by the client (may be empty).
    pub message_id: String,
    pub tag: String,
    pub keys: Vec<String>,
    /// Message properties, already encoded by the caller; opaque to the engine.
    pub properties: bytes::Bytes,
    pub body: bytes::Bytes,
}

impl NewRecord {
    pub fn new(queue: impl Into<String>, body: impl Into<bytes::Bytes>) -> Self {
        NewRecord { queues: vec![queue.into()], body: body.into(), ..Default::default() }
    }
}

/// Why bytes could not be read as a record or batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("length field {len} out of bounds ({min}..={max})")]
    BadLength { len: u64, min: u64, max: u64 },
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("bad batch magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported batch version {0}")]
    BadVersion(u16),
    #[error("batch header says position {stored}, found at {actual}")]
    WrongPosition { stored: u64, actual: u64 },
    #[error("field {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("inner lengths disagree with record length")]
    Inconsistent,
}

/// Size the record will take in the log, or why it cannot be stored.
pub fn encoded_len(record: &NewRecord) -> Result<usize, String> {
    if record.queues.len() > RECORD_QUEUES_MAX {
        return Err(format!("a record goes to at most {RECORD_QUEUES_MAX} queues, got {}", record.queues.len()));
    }
    if record.keys.len() > RECORD_KEYS_MAX {
        return Err(format!("at most {RECORD_KEYS_MAX} keys per record, got {}", record.keys.len()));
    }
    let short_fields = [("message id", &record.message_id), ("tag", &record.tag)];
    for (what, value) in short_fields.into_iter().chain(record.keys.iter().map(|k| ("key", k))) {
        if value.len() > RECORD_ID_MAX_BYTES {
            return Err(format!("{what} longer than {RECORD_ID_MAX_BYTES} bytes"));
        }
    }
    let mut len = RECORD_HEADER_BYTES;
    for queue in &record.queues {
        if queue.len() > QUEUE_NAME_MAX_BYTES {
            return Err(format!("queue name longer than {QUEUE_NAME_MAX_BYTES} bytes"));
        }
        len += 1 + queue.len() + 8;
    }
    len += record.message_id.len() + record.tag.len();
    len += record.keys.iter().map(|k| 1 + k.len()).sum::<usize>();
    len += record.properties.len() + record.body.len();
    if len > u32::MAX as usize / 2 {
        return Err("record larger than 2 GiB".into());
    }
    Ok(len)
}

/// Writes `record` into `dst`, which must be exactly `encoded_len(record)` bytes.
/// `offsets[i]` is the record's offset in `record.queues[i]`.
pub fn encode_record(dst: &mut [u8], record: &NewRecord, offsets: &[u64], flags: u16, store_ms: u64) {
    assert_eq!(offsets.len(), record.queues.len());
    let mut w = Writer { dst, at: 8 };
    w.put(&flags.to_le_bytes());
    w.put(&[record.queues.len() as u8, record.keys.len() as u8]);
    w.put(&store_ms.to_le_bytes());
    w.put(&(record.properties.len() as u32).to_le_bytes());
    w.put(&(record.body.len() as u32).to_le_bytes());
    w.put(&[record.message_id.len() as u8, record.tag.len() as u8, 0, 0]);
    for (queue, offset) in record.queues.iter().zip(offsets) {
        w.put(&[queue.len() as u8]);
        w.put(queue.as_bytes());
        w.put(&offset.to_le_bytes());
    }
    w.put(record.message_id.as_bytes());
    w.put(record.tag.as_bytes());
    for key in &record.keys {
        w.put(&[key.len() as u8]);
        w.put(key.as_bytes());
    }
    w.put(&record.properties);
    w.put(&record.body);
    let len = w.at;
    assert_eq!(len, w.dst.len(), "encoded_len disagrees with encode_record");
    let crc = crc32c::crc32c(&w.dst[8..len]);
    w.dst[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    w.dst[4..8].copy_from_slice(&crc.to_le_bytes());
}

struct Writer<'a> {
    dst: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.dst[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
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
pub fn decode_batch_header(src: &[u8], position: u64, max_len: u64) -> Result<BatchHeader, FrameError> {
    if src.len() < BATCH_HEADER_BYTES {
        return Err(FrameError::Truncated { need: BATCH_HEADER_BYTES, have: src.len() });
    }
    let magic = le_u32(src, 0);
    if magic != BATCH_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let stored = le_u32(src, 4);
    let computed = crc32c::crc32c(&src[8..BATCH_HEADER_BYTES]);
    if stored != computed {
        return Err(FrameError::BadCrc { stored, computed });
    }
    let version = u16::from_le_bytes([src[32], src[33]]);
    if version != BATCH_VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let header = BatchHeader {
        batch_len: le_u32(src, 8),
        record_count: le_u32(src, 12),
        position: le_u64(src, 16),
        synced_before: le_u64(src, 24),
    };
    let len = u64::from(header.batch_len);
    if len < BATCH_HEADER_BYTES as u64 || len > max_len {
        return Err(FrameError::BadLength { len, min: BATCH_HEADER_BYTES as u64, max: max_len });
    }
    if header.position != position {
        return Err(FrameError::WrongPosition { stored: header.position, actual: position });
    }
    if header.synced_before > position {
        return Err(FrameError::Inconsistent);
    }
    Ok(header)
}

/// Length of the record starting at `src`, checked against `max_len`, without reading the rest.
pub fn peek_record_len(src: &[u8], max_len: u64) -> Result<usize, FrameError> {
    if src.len() < RECORD_HEADER_BYTES {
        return Err(FrameError::Truncated { need: RECORD_HEADER_BYTES, have: src.len() });
    }
    let len = u64::from(le_u32(src, 0));
    if len < RECORD_HEADER_BYTES as u64 || len > max_len {
        return Err(FrameError::BadLength { len, min: RECORD_HEADER_BYTES as u64, max: max_len });
    }
    Ok(len as usize)
}

/// A record read in place: every field borrows from the bytes it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub flags: u16,
    pub store_ms: u64,
    queue_refs: &'a [u8],
    queue_count: u8,
    pub message_id: &'a str,
    pub tag: &'a str,
    keys: &'a [u8],
    key_count: u8,
    pub properties: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// Parses and CRC-checks one record occupying exactly `src`.
    pub fn parse(src: &'a [u8]) -> Result<Self, FrameError> {
        let len = peek_record_len(src, src.len() as u64)?;
        if len != src.len() {
            return Err(FrameError::Inconsistent);
        }
        let stored = le_u32(src, 4);
        let computed = crc32c::crc32c(&src[8..]);
        if stored != computed {
            return Err(FrameError::BadCrc { stored, computed });
        }
        Self::parse_fields(src)
    }

    /// Parses a record this process encoded itself (no CRC check; bounds are still checked).
    pub(crate) fn parse_unverified(src: &'a [u8]) -> Result<Self, FrameError> {
        let len = peek_record_len(src, src.len() as u64)?;
        if len != src.len() {
            return Err(FrameError::Inconsistent);
        }
        Self::parse_fields(src)
    }

    fn parse_fields(src: &'a [u8]) -> Result<Self, FrameError> {
        let flags = u16::from_le_bytes([src[8], src[9]]);
        let (queue_count, key_count) = (src[10], src[11]);
        let store_ms = le_u64(src, 12);
        let properties_len = le_u32(src, 20) as usize;
        let body_len = le_u32(src, 24) as usize;
        let (id_len, tag_len) = (src[28] as usize, src[29] as usize);
        let mut r = Reader { src, at: RECORD_HEADER_BYTES };
        let refs_start = r.at;
        for _ in 0..queue_count {
            let name_len = r.take(1)?[0] as usize;
            r.take(name_len + 8)?;
        }
        let queue_refs = &src[refs_start..r.at];
        let message_id = utf8(r.take(id_len)?, "message id")?;
        let tag = utf8(r.take(tag_len)?, "tag")?;
        let keys_start = r.at;
        for _ in 0..key_count {
            let key_len = r.take(1)?[0] as usize;
            r.take(key_len)?;
        }
        let keys = &src[keys_start..r.at];
        let properties = r.take(properties_len)?;
        let body = r.take(body_len)?;
        if r.at != src.len() {
            return Err(FrameError::Inconsistent);
        }
        Ok(RecordView { flags, store_ms, queue_refs, queue_count, message_id, tag, keys, key_count, properties, body })
    }

    /// `(queue, offset)` for every queue the record was dispatched into.
    pub fn queue_refs(&self) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        let mut at = 0;
        let refs = self.queue_refs;
        (0..self.queue_count).map(move |_| {
            // Bounds and UTF-8 were checked by parse; a failure here is a bug.
            let len = refs[at] as usize;
            let name = std::str::from_utf8(&refs[at + 1..at + 1 + len]).unwrap_or("");
            let offset = le_u64(refs, at + 1 + len);
            at += 1 + len + 8;
            (name, offset)
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut at = 0;
        let keys = self.keys;
        (0..self.key_count).map(move |_| {
            let len = keys[at] as usize;
            let key = std::str::from_utf8(&keys[at + 1..at + 1 + len]).unwrap_or("");
            at += 1 + len;
            key
        })
    }

    pub fn is_control(&self) -> bool {
        self.flags & FLAG_CONTROL != 0
    }

    /// Checks the UTF-8 of queue names and keys, which `queue_refs`/`keys` rely on.
    fn check_names(&self) -> Result<(), FrameError> {
        let mut at = 0;
        for _ in 0..self.queue_count {
            let len = self.queue_refs[at] as usize;
            utf8(&self.queue_refs[at + 1..at + 1 + len], "queue name")?;
            at += 1 + len + 8;
        }
        let mut at = 0;
        for _ in 0..self.key_count {
            let len = self.keys[at] as usize;
            utf8(&self.keys[at + 1..at + 1 + len], "key")?;
            at += 1 + len;
        }
        Ok(())
    }
}

/// Parses, CRC-checks and name-checks a record. Use this on bytes from disk.
pub fn parse_record(src: &[u8]) -> Result<RecordView<'_>, FrameError> {
    let view = RecordView::parse(src)?;
    view.check_names()?;
    Ok(view)
}

/// Hash of a tag stored in the queue index, for server-side tag filtering.
pub fn tag_hash(tag: &str) -> u32 {
    crc32c::crc32c(tag.as_bytes())
}

struct Reader<'a> {
    src: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.src.len());
        let end = end.ok_or(FrameError::Inconsistent)?;
        let out = &self.src[self.at..end];
        self.at = end;
        Ok(out)
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, FrameError> {
    std::str::from_utf8(bytes).map_err(|_| FrameError::NotUtf8(what))
}

pub(crate) fn le_u32(src: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]])
}

pub(crate) fn le_u64(src: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&src[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(record: &NewRecord, offsets: &[u64]) -> Vec<u8> {
        let mut buf = vec![0u8; encoded_len(record).unwrap()];
        encode_record(&mut buf, record, offsets, 0, 1234);
        buf
    }

    fn arb_record() -> impl Strategy<Value = NewRecord> {
        (
            prop::collection::vec("[a-z#/]{1,40}", 1..4),
            "[a-zA-Z0-9]{0,40}",
            "[a-z]{0,10}",
            prop::collection::vec("[a-z0-9]{1,20}", 0..4),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(queues, message_id, tag, keys, props, body)| NewRecord {
                queues,
                message_id,
                tag,
                keys,
                properties: props.into(),
                body: body.into(),
            })
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(record in arb_record(), base in any::<u32>()) {
            let offsets: Vec<u64> = (0..record.queues.len() as u64).map(|i| u64::from(base) + i).collect();
            let bytes = encode(&record, &offsets);
            let view = parse_record(&bytes).unwrap();
            let refs: Vec<(String, u64)> = view.queue_refs().map(|(q, o)| (q.to_string(), o)).collect();
            let expected: Vec<(String, u64)> = record.queues.iter().cloned().zip(offsets).collect();
            prop_assert_eq!(refs, expected);
            prop_assert_eq!(view.message_id, record.message_id.as_str());
            prop_assert_eq!(view.tag, record.tag.as_str());
            prop_assert_eq!(view.keys().collect::<Vec<_>>(), record.keys.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(view.properties, &record.properties[..]);
            prop_assert_eq!(view.body, &record.body[..]);
            prop_assert_eq!(view.store_ms, 1234);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_record(&bytes);
            let _ = decode_batch_header(&bytes, 0, 1 << 20);
            let _ = peek_record_len(&bytes, 1 << 20);
        }

        #[test]
        fn any_flipped_byte_is_detected(record in arb_record(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = encode(&record, &vec![7; record.queues.len()]);
            let at = pick.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(parse_record(&bytes).is_err());
        }

        #[test]
        fn corrupted_fields_with_fixed_crc_never_panic(record in arb_record(), pick in any::<prop::sample::Index>(), value in any::<u8>()) {
            // Recompute the CRC after corrupting, so the field parser itself is exercised.
            let mut bytes = encode(&record, &vec![1; record.queues.len()]);
            let at = 8 + pick.index(bytes.len() - 8);
            bytes[at] = value;
            let crc = crc32c::crc32c(&bytes[8..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
            let _ = parse_record(&bytes);
        }
    }

    #[test]
    fn batch_header_round_trip_and_checks() {
        let mut buf = [0u8; BATCH_HEADER_BYTES];
        let header = BatchHeader { batch_len: 4096, record_count: 3, position: 8192, synced_before: 4096 };
        encode_batch_header(&mut buf, header);
        assert_eq!(decode_batch_header(&buf, 8192, 1 << 20), Ok(header));
        assert!(matches!(decode_batch_header(&buf, 0, 1 << 20), Err(FrameError::WrongPosition { .. })));
        assert!(matches!(decode_batch_header(&buf, 8192, 100), Err(FrameError::BadLength { .. })));
        buf[13] ^= 1;
        assert!(matches!(decode_batch_header(&buf, 8192, 1 << 20), Err(FrameError::BadCrc { .. })));
        assert!(matches!(decode_batch_header(&[0u8; BATCH_HEADER_BYTES], 0, 1 << 20), Err(FrameError::BadMagic(0))));
    }

    #[test]
    fn oversized_fields_are_refused_before_encoding() {
        let mut record = NewRecord::new("q", vec![1u8; 10]);
        record.keys = vec!["k".into(); RECORD_KEYS_MAX + 1];
        assert!(encoded_len(&record).is_err());
        let record = NewRecord { queues: vec!["q".into(); RECORD_QUEUES_MAX + 1], ..Default::default() };
        assert!(encoded_len(&record).is_err());
        let record = NewRecord { message_id: "x".repeat(256), ..NewRecord::new("q", vec![]) };
        assert!(encoded_len(&record).is_err());
    }
}
