//! One shard's CommitLog: the only log. Records are staged into an aligned DMA buffer (the open
//! group-commit batch), written with O_DIRECT at increasing positions, and made durable with one
//! fdatasync per round. Nothing already written is ever changed: a write that starts inside a
//! partly filled block carries that block's existing bytes forward unchanged.
//!
//! Log positions are global: segment `n+1` starts where segment `n` ends. A batch never spans
//! two segments; the unused end of a segment stays zero, which reads as "end of data".

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use glommio::io::{DmaBuffer, ReadResult};

use crate::error::{EngineError, Result};
use crate::record::{self, BatchHeader, BATCH_HEADER_BYTES};
use crate::segment::{SegmentFile, SegmentStore};

/// Sector size used to recognise a torn write: a sector the device never wrote reads as zeros.
const SECTOR_BYTES: usize = 512;
/// First capacity of a batch buffer; it doubles up to `group_commit_max_bytes`.
const BATCH_INITIAL_CAPACITY_BYTES: usize = 64 << 10;
/// Read-ahead window used while scanning during recovery.
const SCAN_WINDOW_BYTES: usize = 4 << 20;

/// Sizing of the log; copied from `EngineConfig`.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub segment_size_bytes: u64,
    pub group_commit_max_bytes: usize,
    pub group_commit_records_max: usize,
    pub record_size_max_bytes: u64,
}

impl LogLimits {
    /// Largest batch that can exist on disk: a full group commit or one maximal record.
    pub fn batch_max_bytes(&self) -> u64 {
        (self.group_commit_max_bytes as u64).max(self.record_size_max_bytes + BATCH_HEADER_BYTES as u64)
    }
}

/// A batch closed for appends, ready to be written.
pub struct SealedBatch {
    pub position: u64,
    pub len: usize,
    pub records: u32,
    segment_base: u64,
    prefix_len: usize,
    buf: Rc<DmaBuffer>,
}

impl SealedBatch {
    /// The batch bytes (header and records), as they will be on disk.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_bytes()[self.prefix_len..self.prefix_len + self.len]
    }

    pub fn end(&self) -> u64 {
        self.position + self.len as u64
    }
}

struct OpenBatch {
    position: u64,
    segment_base: u64,
    prefix_len: usize,
    buf: DmaBuffer,
    len: usize,
    records: u32,
}

struct Segment {
    size_bytes: u64,
    file: Option<Rc<dyn SegmentFile>>,
}

struct LogState {
    segments: BTreeMap<u64, Segment>,
    /// Base of the segment new batches go to.
    active_base: u64,
    staged_end: u64,
    written_end: u64,
    durable_end: u64,
    /// Bytes of the block holding `staged_end` that precede it; carried into the next write.
    tail: Vec<u8>,
    open: Option<OpenBatch>,
    sealed: Vec<SealedBatch>,
    dirty: BTreeSet<u64>,
}

pub struct CommitLog {
    store: Rc<dyn SegmentStore>,
    limits: LogLimits,
    alignment: usize,
    state: RefCell<LogState>,
}

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub replayed_from: u64,
    pub end: u64,
    pub batches_replayed: u64,
    /// Set when a torn tail was cut off: `(position, bytes dropped)`.
    pub truncated_tail: Option<(u64, u64)>,
}

impl CommitLog {
    /// Opens the log, replaying every intact batch at or after `replay_from` into `on_batch`
    /// (`position`, batch bytes), cutting off a torn tail, and failing on corruption elsewhere.
    pub async fn open(
        store: Rc<dyn SegmentStore>,
        limits: LogLimits,
        replay_from: u64,
        mut on_batch: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<(CommitLog, RecoveryReport)> {
        let listed = store.list().map_err(|e| EngineError::io("listing segments", store.describe(0), e))?;
        let mut segments = BTreeMap::new();
        // An empty log starts past anything the index has seen, so positions are never reused.
        let empty_base = replay_from.div_ceil(4096) * 4096;
        let mut expected_base = listed.first().map_or(empty_base, |s| s.0);
        for &(base, size_bytes) in &listed {
            if base != expected_base || size_bytes == 0 || size_bytes % 4096 != 0 {
                return Err(EngineError::CorruptRecord {
                    segment: store.describe(base),
                    offset_in_segment: 0,
                    position: base,
                    detail: format!(
                        "segment does not follow its predecessor (expected base {expected_base}, size {size_bytes})"
                    ),
                });
            }
            expected_base = base + size_bytes;
            segments.insert(base, Segment { size_bytes, file: None });
        }
        let first_base = listed.first().map_or(empty_base, |s| s.0);
        let active_base = listed.last().map_or(empty_base, |s| s.0);
        let state = LogState {
            segments,
            active_base,
            staged_end: first_base,
            written_end: first_base,
            durable_end: first_base,
            tail: Vec::new(),
            open: None,
            sealed: Vec::new(),
            dirty: BTreeSet::new(),
        };
        let log = CommitLog { store, limits, alignment: 4096, state: RefCell::new(state) };
        let report = log.recover(replay_from.max(first_base), &mut on_batch).await?;
        Ok((log, report))
    }

    async fn recover(&self, from: u64, on_batch: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<RecoveryReport> {
        let bases: Vec<(u64, u64)> = self.state.borrow().segments.iter().map(|(b, s)| (*b, s.size_bytes)).collect();
        let mut report = RecoveryReport { replayed_from: from, end: from, batches_replayed: 0, truncated_tail: None };
        let Some(&(last_base, _)) = bases.last() else {
            return Ok(report);
        };
        // Every segment from the replay point on is scanned, so the log resumes in the last one.
        let mut end = from.max(last_base);
        for &(base, size) in bases.iter().filter(|(b, s)| b + s > from) {
            let file = self.segment_file(base).await?;
            let scan = SegmentScan { log: self, file: &*file, base, size, is_last: base == last_base };
            let data_end = scan.run(from.saturating_sub(base), on_batch, &mut report).await?;
            end = base + data_end;
        }
        self.clean_tail(last_base, end).await?;
        let tail = self.read_tail(last_base, end).await?;
        let mut state = self.state.borrow_mut();
        state.active_base = last_base;
        state.staged_end = end;
        state.written_end = end;
        state.durable_end = end;
        state.tail = tail;
        report.end = end;
        Ok(report)
    }

    /// Zeroes leftovers of a torn write after `end`, so a later recovery never mistakes them for
    /// records. Bytes before `end` are rewritten unchanged.
    async fn clean_tail(&self, base: u64, end: u64) -> Result<()> {
        let size = self.segment_size(base);
        if end >= base + size {
            return Ok(());
        }
        let file = self.segment_file(base).await?;
        let align = self.alignment as u64;
        let start = (end - base) / align * align;
        let stop = ((end - base) + self.limits.batch_max_bytes() + align).min(size) / align * align;
        if stop <= start {
            return Ok(());
        }
        let existing = self.read_segment(&*file, base, start, (stop - start) as usize).await?;
        let keep = (end - base - start) as usize;
        if existing[keep..].iter().all(|&b| b == 0) {
            return Ok(());
        }
        tracing::warn!(segment = %self.store.describe(base), from = end, "zeroing leftovers of a torn write");
        let mut buf = glommio::allocate_dma_buffer((stop - start) as usize);
        buf.as_bytes_mut().fill(0);
        buf.as_bytes_mut()[..keep].copy_from_slice(&existing[..keep]);
        let what = "zeroing a torn tail";
        file.write_at(Rc::new(buf), start).await.map_err(|e| EngineError::io(what, self.store.describe(base), e))?;
        file.sync().await.map_err(|e| EngineError::io(what, self.store.describe(base), e))
    }

    async fn read_tail(&self, base: u64, end: u64) -> Result<Vec<u8>> {
        let align = self.alignment as u64;
        let in_block = (end - base) % align;
        if in_block == 0 || !self.state.borrow().segments.contains_key(&base) {
            return Ok(Vec::new());
        }
        let file = self.segment_file(base).await?;
        let bytes = self.read_segment(&*file, base, end - base - in_block, in_block as usize).await?;
        Ok(bytes.to_vec())
    }

    async fn read_segment(&self, file: &dyn SegmentFile, base: u64, offset: u64, len: usize) -> Result<ReadResult> {
        file.read_at(offset, len).await.map_err(|e| EngineError::io("reading segment", self.store.describe(base), e))
    }

    fn segment_size(&self, base: u64) -> u64 {
        self.state.borrow().segments.get(&base).map_or(self.limits.segment_size_bytes, |s| s.size_bytes)
    }

    /// Opens (or creates, for a batch that rolled into a new segment) the file for `base`.
    async fn segment_file(&self, base: u64) -> Result<Rc<dyn SegmentFile>> {
        let known = self.state.borrow().segments.get(&base).map(|s| s.file.clone());
        match known {
            Some(Some(file)) => Ok(file),
            Some(None) => {
                let file = self
                    .store
                    .open(base)
                    .await
                    .map_err(|e| EngineError::io("opening segment", self.store.describe(base), e))?;
                if let Some(seg) = self.state.borrow_mut().segments.get_mut(&base) {
                    seg.file = Some(file.clone());
                }
                Ok(file)
            }
            None => {
                let size_bytes = self.limits.segment_size_bytes;
                let file = self
                    .store
                    .create(base, size_bytes)
                    .await
                    .map_err(|e| EngineError::io("creating segment", self.store.describe(base), e))?;
                tracing::info!(segment = %self.store.describe(base), size_bytes, "created segment");
                self.state.borrow_mut().segments.insert(base, Segment { size_bytes, file: Some(file.clone()) });
                Ok(file)
            }
        }
    }

    /// Reserves `len` bytes for one record in the open batch, lets `encode` fill them, and returns
    /// the record's log position. The caller has checked `len` against the record limit.
    pub fn stage(&self, len: usize, encode: impl FnOnce(&mut [u8])) -> u64 {
        assert!(len as u64 <= self.limits.record_size_max_bytes + 4096, "record limit not checked by caller");
        let mut state = self.state.borrow_mut();
        let fits = state.open.as_ref().is_some_and(|open| {
            let seg_end = open.segment_base
                + state.segments.get(&open.segment_base).map_or(self.limits.segment_size_bytes, |s| s.size_bytes);
            open.records < self.limits.group_commit_records_max as u32
                && open.len + len <= self.limits.group_commit_max_bytes
                && open.position + (open.len + len) as u64 <= seg_end
        });
        if !fits {
            self.seal_open(&mut state);
            self.open_batch(&mut state, len);
        }
        let open = state.open.as_mut().expect("a batch was just opened");
        let needed = open.prefix_len + open.len + len;
        if needed > open.buf.len() {
            grow(open, needed, self.alignment);
        }
        let at = open.prefix_len + open.len;
        encode(&mut open.buf.as_bytes_mut()[at..at + len]);
        let position = open.position + open.len as u64;
        open.len += len;
        open.records += 1;
        state.staged_end = position + len as u64;
        position
    }

    fn open_batch(&self, state: &mut LogState, record_len: usize) {
        let active_size =
            state.segments.get(&state.active_base).map_or(self.limits.segment_size_bytes, |s| s.size_bytes);
        let mut position = state.staged_end;
        let mut segment_base = state.active_base;
        if position + (BATCH_HEADER_BYTES + record_len) as u64 > segment_base + active_size {
            // Roll: the rest of this segment stays zero.
            segment_base += active_size;
            position = segment_base;
            state.tail.clear();
            state.active_base = segment_base;
        }
        let prefix_len = ((position - segment_base) % self.alignment as u64) as usize;
        assert_eq!(prefix_len, state.tail.len(), "tail bytes must cover the block up to the batch");
        let capacity =
            align_up(prefix_len + BATCH_HEADER_BYTES + record_len.max(BATCH_INITIAL_CAPACITY_BYTES), self.alignment);
        let mut buf = glommio::allocate_dma_buffer(capacity);
        buf.as_bytes_mut()[..prefix_len].copy_from_slice(&state.tail);
        state.open = Some(OpenBatch { position, segment_base, prefix_len, buf, len: BATCH_HEADER_BYTES, records: 0 });
        state.staged_end = position + BATCH_HEADER_BYTES as u64;
    }

    fn seal_open(&self, state: &mut LogState) {
        let Some(mut open) = state.open.take() else { return };
        assert!(open.records > 0, "an open batch always holds a record");
        let header = BatchHeader { batch_len: open.len as u32, record_count: open.records, position: open.position };
        let end = open.prefix_len + open.len;
        let aligned_end = align_up(end, self.alignment);
        let bytes = open.buf.as_bytes_mut();
        record::encode_batch_header(&mut bytes[open.prefix_len..], header);
        // Padding must read as "end of data" to recovery.
        bytes[end..aligned_end].fill(0);
        let block_start = end / self.alignment * self.alignment;
        state.tail.clear();
        state.tail.extend_from_slice(&bytes[block_start..end]);
        open.buf.trim_to_size(aligned_end);
        state.sealed.push(SealedBatch {
            position: open.position,
            len: open.len,
            records: open.records,
            segment_base: open.segment_base,
            prefix_len: open.prefix_len,
            buf: Rc::new(open.buf),
        });
    }

    /// Closes the open batch and hands every sealed batch to the committer, in log order.
    pub fn take_round(&self) -> Vec<SealedBatch> {
        let mut state = self.state.borrow_mut();
        self.seal_open(&mut state);
        std::mem::take(&mut state.sealed)
    }

    pub fn has_staged(&self) -> bool {
        let state = self.state.borrow();
        state.open.is_some() || !state.sealed.is_empty()
    }

    /// Writes a round's batches in order. Batches may share a block, so they are not overlapped.
    pub async fn write_round(&self, round: &[SealedBatch]) -> Result<()> {
        for batch in round {
            let file = self.segment_file(batch.segment_base).await?;
            let write_offset = batch.position - batch.segment_base - batch.prefix_len as u64;
            {
                let state = self.state.borrow();
                assert_eq!(write_offset % self.alignment as u64, 0, "O_DIRECT write must be aligned");
                assert!(batch.position >= state.written_end, "log position went backwards");
                debug_assert!(verify_batch(batch.bytes(), batch.position, self.limits.batch_max_bytes()).is_ok());
            }
            file.write_at(batch.buf.clone(), write_offset)
                .await
                .map_err(|e| EngineError::io("writing batch", self.store.describe(batch.segment_base), e))?;
            let mut state = self.state.borrow_mut();
            state.written_end = batch.end();
            state.dirty.insert(batch.segment_base);
        }
        Ok(())
    }

    /// fdatasyncs every segment written since the last sync; returns the new durable end.
    pub async fn sync(&self) -> Result<u64> {
        let (dirty, target) = {
            let mut state = self.state.borrow_mut();
            (std::mem::take(&mut state.dirty), state.written_end)
        };
        for base in dirty {
            let file = self.segment_file(base).await?;
            file.sync().await.map_err(|e| EngineError::io("fdatasync", self.store.describe(base), e))?;
        }
        let mut state = self.state.borrow_mut();
        assert!(target >= state.durable_end, "durable end went backwards");
        state.durable_end = target;
        Ok(target)
    }

    pub fn written_end(&self) -> u64 {
        self.state.borrow().written_end
    }

    pub fn durable_end(&self) -> u64 {
        self.state.borrow().durable_end
    }

    /// First position still stored.
    pub fn start(&self) -> u64 {
        let state = self.state.borrow();
        state.segments.keys().next().copied().unwrap_or(state.active_base)
    }

    /// Reads `len` bytes of written log at `position`, zero-copy out of the DMA read buffer.
    pub async fn read(&self, position: u64, len: usize) -> Result<ReadResult> {
        let base = {
            let state = self.state.borrow();
            let found = state.segments.range(..=position).next_back().map(|(b, s)| (*b, s.size_bytes));
            match found {
                Some((base, size))
                    if position + len as u64 <= base + size && position + len as u64 <= state.written_end =>
                {
                    base
                }
                _ => return Err(EngineError::PositionNotStored { position }),
            }
        };
        let file = self.segment_file(base).await?;
        self.read_segment(&*file, base, position - base, len).await
    }

    /// Sealed segments (never the active one) with their end positions, oldest first.
    pub fn sealed_segments(&self) -> Vec<(u64, u64)> {
        let state = self.state.borrow();
        state
            .segments
            .iter()
            .filter(|(base, _)| **base < state.active_base)
            .map(|(base, seg)| (*base, base + seg.size_bytes))
            .collect()
    }

    pub fn size_bytes(&self) -> u64 {
        self.state.borrow().segments.values().map(|s| s.size_bytes).sum()
    }

    pub fn segment_modified(&self, base: u64) -> Result<std::time::SystemTime> {
        self.store.modified(base).map_err(|e| EngineError::io("stat segment", self.store.describe(base), e))
    }

    /// Deletes the oldest sealed segment. The caller has made the index cover it first.
    pub async fn remove_oldest(&self, base: u64) -> Result<()> {
        {
            let state = self.state.borrow();
            assert_eq!(state.segments.keys().next(), Some(&base), "only the oldest segment is deleted");
            assert!(base < state.active_base, "the active segment is never deleted");
        }
        self.state.borrow_mut().segments.remove(&base);
        self.store.remove(base).await.map_err(|e| EngineError::io("deleting segment", self.store.describe(base), e))
    }
}

fn grow(open: &mut OpenBatch, needed: usize, alignment: usize) {
    let capacity = align_up(needed.max(open.buf.len() * 2), alignment);
    let mut bigger = glommio::allocate_dma_buffer(capacity);
    let used = open.prefix_len + open.len;
    // One copy per doubling keeps small batches small; amortised O(1) per byte.
    bigger.as_bytes_mut()[..used].copy_from_slice(&open.buf.as_bytes()[..used]);
    open.buf = bigger;
}

fn align_up(value: usize, alignment: usize) -> usize {
    value.div_ceil(alignment) * alignment
}

/// Checks every record of a batch (header already decoded or not) including CRCs.
pub fn verify_batch(bytes: &[u8], position: u64, batch_max_bytes: u64) -> std::result::Result<BatchHeader, String> {
    let header = record::decode_batch_header(bytes, position, batch_max_bytes).map_err(|e| e.to_string())?;
    if header.batch_len as usize != bytes.len() {
        return Err(format!("batch length {} but {} bytes available", header.batch_len, bytes.len()));
    }
    let mut at = BATCH_HEADER_BYTES;
    for i in 0..header.record_count {
        let len = record::peek_record_len(&bytes[at..], (bytes.len() - at) as u64)
            .map_err(|e| format!("record {i} at {}: {e}", position + at as u64))?;
        record::parse_record(&bytes[at..at + len])
            .map_err(|e| format!("record {i} at {}: {e}", position + at as u64))?;
        at += len;
    }
    if at != bytes.len() {
        return Err(format!("records end at {at} but batch is {} bytes", bytes.len()));
    }
    Ok(header)
}

/// Iterates `(position, record bytes)` of a batch that was verified or freshly encoded.
pub fn batch_records(bytes: &[u8], position: u64) -> impl Iterator<Item = (u64, &[u8])> {
    let mut at = BATCH_HEADER_BYTES;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let len = record::peek_record_len(&bytes[at..], (bytes.len() - at) as u64).ok()?;
        let item = (position + at as u64, &bytes[at..at + len]);
        at += len;
        Some(item)
    })
}

/// Recovery scan of one segment.
struct SegmentScan<'a> {
    log: &'a CommitLog,
    file: &'a dyn SegmentFile,
    base: u64,
    size: u64,
    is_last: bool,
}

enum Found {
    Batch(ReadResult),
    EndOfData,
    Bad { extent: Option<u64>, detail: String },
}

impl SegmentScan<'_> {
    /// Replays intact batches from `start`; returns the in-segment offset where data ends.
    async fn run(
        &self,
        start: u64,
        on_batch: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
        report: &mut RecoveryReport,
    ) -> Result<u64> {
        let mut window = Window::default();
        let mut offset = start;
        loop {
            match self.next_batch(&mut window, offset).await? {
                Found::EndOfData => return Ok(offset),
                Found::Batch(bytes) => {
                    on_batch(self.base + offset, &bytes)?;
                    report.batches_replayed += 1;
                    offset += bytes.len() as u64;
                }
                Found::Bad { extent, detail } => {
                    if self.is_last && self.is_torn_tail(offset, extent).await? {
                        let dropped = extent.unwrap_or(0);
                        tracing::warn!(segment = %self.log.store.describe(self.base), offset, %detail, "cutting off a torn tail");
                        report.truncated_tail = Some((self.base + offset, dropped));
                        return Ok(offset);
                    }
                    return Err(EngineError::CorruptRecord {
                        segment: self.log.store.describe(self.base),
                        offset_in_segment: offset,
                        position: self.base + offset,
                        detail,
                    });
                }
            }
        }
    }

    async fn next_batch(&self, window: &mut Window, offset: u64) -> Result<Found> {
        if offset + BATCH_HEADER_BYTES as u64 > self.size {
            return Ok(Found::EndOfData);
        }
        let head = window.get(self, offset, BATCH_HEADER_BYTES).await?;
        if head.iter().all(|&b| b == 0) {
            return Ok(Found::EndOfData);
        }
        let max = self.log.limits.batch_max_bytes().min(self.size - offset);
        let header = match record::decode_batch_header(&head, self.base + offset, max) {
            Ok(header) => header,
            Err(e) => return Ok(Found::Bad { extent: None, detail: format!("batch header: {e}") }),
        };
        let bytes = window.get(self, offset, header.batch_len as usize).await?;
        match verify_batch(&bytes, self.base + offset, max) {
            Ok(_) => Ok(Found::Batch(bytes)),
            Err(detail) => Ok(Found::Bad { extent: Some(u64::from(header.batch_len)), detail }),
        }
    }

    /// A bad batch is a torn tail only if nothing valid follows it and, when its length is
    /// known, it contains a sector the device never wrote. Anything else is corruption.
    async fn is_torn_tail(&self, offset: u64, extent: Option<u64>) -> Result<bool> {
        let search_end = (offset + self.log.limits.batch_max_bytes()).min(self.size);
        let region = self.log.read_segment(self.file, self.base, offset, (search_end - offset) as usize).await?;
        let later_batch = (1..region.len().saturating_sub(BATCH_HEADER_BYTES)).any(|i| {
            record::le_u32(&region, i) == record::BATCH_MAGIC
                && record::decode_batch_header(&region[i..], self.base + offset + i as u64, u64::MAX).is_ok()
        });
        if later_batch {
            return Ok(false);
        }
        if let Some(len) = extent {
            let extent_bytes = &region[..(len as usize).min(region.len())];
            let first_sector = (SECTOR_BYTES - (offset as usize % SECTOR_BYTES)) % SECTOR_BYTES;
            let zero_sector = extent_bytes
                .get(first_sector..)
                .unwrap_or(&[])
                .chunks_exact(SECTOR_BYTES)
                .any(|s| s.iter().all(|&b| b == 0));
            if !zero_sector {
                return Ok(false);
            }
        }
        let mut at = search_end;
        while at < self.size {
            let len = (self.size - at).min(SCAN_WINDOW_BYTES as u64) as usize;
            let chunk = self.log.read_segment(self.file, self.base, at, len).await?;
            if chunk.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += len as u64;
        }
        Ok(true)
    }
}

/// Read-ahead window over a segment, so replay issues few large reads.
#[derive(Default)]
struct Window {
    offset: u64,
    bytes: Option<ReadResult>,
}

impl Window {
    async fn get(&mut self, scan: &SegmentScan<'_>, offset: u64, len: usize) -> Result<ReadResult> {
        if let Some(bytes) = &self.bytes {
            if offset >= self.offset && offset + len as u64 <= self.offset + bytes.len() as u64 {
                let slice = ReadResult::slice(bytes, (offset - self.offset) as usize, len);
                return slice.ok_or(EngineError::PositionNotStored { position: scan.base + offset });
            }
        }
        let read_len = (len.max(SCAN_WINDOW_BYTES) as u64).min(scan.size - offset) as usize;
        let bytes = scan.log.read_segment(scan.file, scan.base, offset, read_len).await?;
        self.offset = offset;
        let slice = ReadResult::slice(&bytes, 0, len);
        self.bytes = Some(bytes);
        slice.ok_or(EngineError::PositionNotStored { position: scan.base + offset })
    }
}
