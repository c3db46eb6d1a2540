//! One shard's CommitLog: the only log. Records are staged into an aligned DMA buffer (the open
//! group-commit batch), written with O_DIRECT at increasing positions, and made durable with one
//! fdatasync per round. Nothing already written is ever changed: a write that starts inside a
//! partly filled block carries that block's existing bytes forward unchanged.
//!
//! Log positions are global: segment `n+1` starts where segment `n` ends. A batch never spans
//! two segments; the unused end of a segment stays zero, which reads as "end of data".

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{DmaBuffer, ReadResult};

pub use crate::tail_cache::LogBytes;
use crate::tail_cache::TailCache;

use crate::error::{EngineError, Result};
use crate::record::{self, BatchHeader, BATCH_HEADER_BYTES};
use crate::segment::{SegmentFile, SegmentStore};

/// Sector size used to recognise a torn write: a sector the device never wrote reads as zeros.
const SECTOR_BYTES: usize = 512;
/// Smallest all-zero piece of a sector taken as evidence that the sector was never written.
const UNWRITTEN_PIECE_MIN_BYTES: usize = 64;
/// Smallest batch buffer. Buffers are otherwise sized from the append call or the last two
/// batches, whichever is bigger (`batch_capacity`), and grow by doubling, never past
/// `group_commit_max_bytes` unless one record needs more.
const BATCH_INITIAL_CAPACITY_BYTES: usize = 64 << 10;
/// Read-ahead window used while scanning during recovery.
const SCAN_WINDOW_BYTES: usize = 4 << 20;
/// `read_ranges` merges ranges whose gap is at most this into one read: a few KiB read for
/// nothing cost less than an I/O of their own.
const READ_GAP_MAX_BYTES: u64 = 32 << 10;
/// Longest merged read of `read_ranges`.
const READ_SPAN_MAX_BYTES: u64 = 256 << 10;
/// Most ranges one `read_ranges` call takes (its reads run at once).
pub const READ_RANGES_MAX: usize = 1024;
/// How often a segment creation that found the disk full is tried again.
const SPACE_RETRY_INTERVAL_MS: u64 = 200;

/// Sizing of the log; copied from `EngineConfig`.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub segment_size_bytes: u64,
    pub group_commit_max_bytes: usize,
    pub group_commit_records_max: usize,
    pub record_size_max_bytes: u64,
    /// Written batch buffers kept in memory for reads of the log's tail (0: none).
    pub tail_cache_bytes: usize,
    /// How far past the staged end the idle committer keeps the active segment written with
    /// zeros and synced (0: never). A preallocated segment's blocks are unwritten extents, so
    /// the first write into each costs its fdatasync a journal commit (ext4, XFS); a block
    /// zeroed ahead of time costs only the device flush.
    pub zero_ahead_bytes: u64,
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
    capacity_bytes: usize,
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
    /// The buffer's allocation (it is trimmed to the written length when sealed).
    capacity_bytes: usize,
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
    /// Segment of the last batch written.
    last_written_base: Option<u64>,
    /// Set by a failed write or fdatasync. After one, the kernel may have dropped dirty data and
    /// a retried fdatasync can falsely succeed, so the log refuses all further I/O.
    poisoned: Option<String>,
    /// Blocks of the active segment below this position are written (data or zeros) and synced.
    zeroed_end: u64,
    /// Bytes the last two sealed batches' buffers used (`batch_capacity`).
    recent_batch_bytes: [usize; 2],
}

pub struct CommitLog {
    store: Rc<dyn SegmentStore>,
    limits: LogLimits,
    alignment: usize,
    state: RefCell<LogState>,
    /// One fdatasync at a time: a caller must not see its data as durable while another
    /// caller's fdatasync of the same segment is still running.
    sync_lock: futures::lock::Mutex<()>,
    tail_cache: RefCell<TailCache>,
    /// Segments created since open; a change tells the shard its free-space figure is stale.
    segments_created: Cell<u64>,
    /// A segment creation found the disk full and is waiting for space.
    waiting_for_space: Cell<bool>,
    /// Set at close: a creation waiting for space gives up instead.
    space_waits_abandoned: Cell<bool>,
    fdatasync_seconds: metrics::Histogram,
    /// Bytes written with zeros ahead of the log (`zero_ahead`), since open.
    zeroed_bytes: Cell<u64>,
    /// One `zero_ahead` at a time; held while its chunk is written and synced.
    zero_lock: futures::lock::Mutex<()>,
    /// The chunk `zero_ahead` is writing, while it is.
    zero_range: Cell<Option<(u64, u64)>>,
}

/// One read of `read_ranges`: `[start, end)` in the segment at `base`, covering `members`.
struct Span {
    base: u64,
    start: u64,
    end: u64,
    members: Vec<usize>,
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
    /// `clean` says the previous run closed the log cleanly (nothing can be torn).
    pub async fn open(
        store: Rc<dyn SegmentStore>,
        limits: LogLimits,
        replay_from: u64,
        clean: bool,
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
            last_written_base: None,
            poisoned: None,
            zeroed_end: 0,
            recent_batch_bytes: [0; 2],
        };
        let log = CommitLog {
            store,
            limits,
            alignment: 4096,
            state: RefCell::new(state),
            sync_lock: futures::lock::Mutex::new(()),
            tail_cache: RefCell::new(TailCache::new(limits.tail_cache_bytes)),
            segments_created: Cell::new(0),
            waiting_for_space: Cell::new(false),
            space_waits_abandoned: Cell::new(false),
            fdatasync_seconds: metrics::histogram!(crate::metrics::FDATASYNC, &[crate::metrics::NODE_TYPE]),
            zeroed_bytes: Cell::new(0),
            zero_lock: futures::lock::Mutex::new(()),
            zero_range: Cell::new(None),
        };
        let report = log.recover(replay_from.max(first_base), clean, &mut on_batch).await?;
        Ok((log, report))
    }

    /// Whether the log really holds what an index checkpoint claims: the batch at `last_batch`
    /// ends at `end`, and every batch from the point the log was known durable when that batch
    /// was sealed (its `synced_before`) up to `end` is intact. An index flushed before the log
    /// (possible under `async`) fails this after a power loss.
    pub async fn checkpoint_holds(
        store: &dyn SegmentStore,
        limits: LogLimits,
        last_batch: u64,
        end: u64,
    ) -> Result<bool> {
        let listed = store.list().map_err(|e| EngineError::io("listing segments", store.describe(0), e))?;
        let Some(last) = read_stored_batch(store, &listed, limits, last_batch).await? else {
            return Ok(false);
        };
        if last.0.position + u64::from(last.0.batch_len) != end {
            return Ok(false);
        }
        let mut position = last.0.synced_before.max(listed.first().map_or(0, |s| s.0));
        while position < end {
            match read_stored_batch(store, &listed, limits, position).await? {
                Some((header, _)) => position += u64::from(header.batch_len),
                // End of data in a segment: the next batch starts the next segment.
                None => match listed.iter().find(|(b, s)| *b <= position && position < b + s) {
                    Some((base, size)) if base + size < end => position = base + size,
                    _ => return Ok(false),
                },
            }
        }
        Ok(position == end)
    }

    async fn recover(
        &self,
        from: u64,
        clean: bool,
        on_batch: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<RecoveryReport> {
        let bases: Vec<(u64, u64)> = self.state.borrow().segments.iter().map(|(b, s)| (*b, s.size_bytes)).collect();
        let mut report = RecoveryReport { replayed_from: from, end: from, batches_replayed: 0, truncated_tail: None };
        let Some(&(last_base, last_size)) = bases.last() else {
            return Ok(report);
        };
        // Every segment from the replay point on is scanned, so the log resumes in the last one.
        let mut end = from.max(last_base);
        for &(base, size) in bases.iter().filter(|(b, s)| b + s > from) {
            let file = self.segment_file(base).await?;
            let scan = SegmentScan { log: self, file: &*file, base, size, is_last: base == last_base, clean };
            let data_end = scan.run(from.saturating_sub(base), on_batch, &mut report).await?;
            end = base + data_end;
        }
        if !clean {
            let file = self.segment_file(last_base).await?;
            if end < last_base + last_size {
                let scan =
                    SegmentScan { log: self, file: &*file, base: last_base, size: last_size, is_last: true, clean };
                scan.clear_after(end - last_base).await?;
            }
            // Writes that completed before the crash may sit only in the device's cache; the
            // replayed records become durable before anything relies on them.
            file.sync().await.map_err(|e| EngineError::io("fdatasync", self.store.describe(last_base), e))?;
        }
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
                let file = self.create_segment(base, size_bytes).await?;
                tracing::info!(segment = %self.store.describe(base), size_bytes, "created segment");
                self.state.borrow_mut().segments.insert(base, Segment { size_bytes, file: Some(file.clone()) });
                self.segments_created.set(self.segments_created.get() + 1);
                Ok(file)
            }
        }
    }

    /// Creates a segment, waiting while the disk is full: nothing is written yet, so the round
    /// (and the appends waiting on it) can go on once space is freed, instead of failing the
    /// shard. Gives up only at close.
    async fn create_segment(&self, base: u64, size_bytes: u64) -> Result<Rc<dyn SegmentFile>> {
        loop {
            match self.store.create(base, size_bytes).await {
                Ok(file) => {
                    if self.waiting_for_space.replace(false) {
                        tracing::info!(segment = %self.store.describe(base), "disk space freed; segment created");
                    }
                    return Ok(file);
                }
                Err(e) if is_out_of_space(&e) && !self.space_waits_abandoned.get() => {
                    if !self.waiting_for_space.replace(true) {
                        tracing::error!(
                            segment = %self.store.describe(base),
                            size_bytes,
                            "disk full: cannot create the next segment; writes wait for space (new messages are refused)"
                        );
                    }
                    glommio::timer::sleep(Duration::from_millis(SPACE_RETRY_INTERVAL_MS)).await;
                }
                Err(e) => {
                    self.waiting_for_space.set(false);
                    return Err(EngineError::io("creating segment", self.store.describe(base), e));
                }
            }
        }
    }

    /// Whether staging `coming_bytes` more would need a segment that does not exist yet.
    pub fn needs_new_segment(&self, coming_bytes: usize) -> bool {
        let state = self.state.borrow();
        match state.segments.get(&state.active_base) {
            None => true,
            Some(active) => {
                state.staged_end + (BATCH_HEADER_BYTES + coming_bytes) as u64 > state.active_base + active.size_bytes
            }
        }
    }

    /// A segment creation is waiting for disk space.
    pub fn waiting_for_space(&self) -> bool {
        self.waiting_for_space.get()
    }

    pub fn segments_created(&self) -> u64 {
        self.segments_created.get()
    }

    /// Makes a creation waiting for space fail (at close), so nothing waits forever.
    pub fn abandon_space_waits(&self) {
        self.space_waits_abandoned.set(true);
    }

    /// Reserves `len` bytes for one record in the open batch, lets `encode` fill them, and returns
    /// the record's log position. The caller has checked `len` against the record limit.
    /// `coming_bytes` (this record and the rest of its append call) sizes a new buffer up front.
    pub fn stage(&self, len: usize, coming_bytes: usize, encode: impl FnOnce(&mut [u8])) -> u64 {
        assert!(len as u64 <= self.limits.record_size_max_bytes + 4096, "record limit not checked by caller");
        let mut state = self.state.borrow_mut();
        let fits = state.open.as_ref().is_some_and(|open| {
            let seg_end = open.segment_base
                + state.segments.get(&open.segment_base).map_or(self.limits.segment_size_bytes, |s| s.size_bytes);
            open.records < self.limits.group_commit_records_max as u32
                // Prefix included: the whole buffer stays within group_commit_max_bytes, so it
                // fits one block of glommio's (power-of-two, buddy) I/O memory arena.
                && open.prefix_len + open.len + len <= self.limits.group_commit_max_bytes
                && open.position + (open.len + len) as u64 <= seg_end
        });
        if !fits {
            self.seal_open(&mut state);
            self.open_batch(&mut state, len, coming_bytes);
        }
        let open = state.open.as_mut().expect("a batch was just opened");
        let needed = open.prefix_len + open.len + len;
        if needed > open.buf.len() {
            let wanted = (open.prefix_len + open.len + coming_bytes).min(self.limits.group_commit_max_bytes);
            grow(open, needed.max(wanted), self.alignment, self.limits.group_commit_max_bytes);
        }
        let at = open.prefix_len + open.len;
        encode(&mut open.buf.as_bytes_mut()[at..at + len]);
        let position = open.position + open.len as u64;
        open.len += len;
        open.records += 1;
        state.staged_end = position + len as u64;
        position
    }

    fn open_batch(&self, state: &mut LogState, record_len: usize, coming_bytes: usize) {
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
        let recent_max = state.recent_batch_bytes[0].max(state.recent_batch_bytes[1]);
        let capacity = batch_capacity(
            prefix_len + BATCH_HEADER_BYTES,
            record_len,
            coming_bytes.max(recent_max),
            self.alignment,
            self.limits.group_commit_max_bytes,
        );
        let mut buf = glommio::allocate_dma_buffer(capacity);
        buf.as_bytes_mut()[..prefix_len].copy_from_slice(&state.tail);
        state.open = Some(OpenBatch {
            position,
            segment_base,
            prefix_len,
            buf,
            capacity_bytes: capacity,
            len: BATCH_HEADER_BYTES,
            records: 0,
        });
        state.staged_end = position + BATCH_HEADER_BYTES as u64;
    }

    fn seal_open(&self, state: &mut LogState) {
        let Some(mut open) = state.open.take() else { return };
        assert!(open.records > 0, "an open batch always holds a record");
        let header = BatchHeader {
            batch_len: open.len as u32,
            record_count: open.records,
            position: open.position,
            synced_before: state.durable_end,
        };
        let end = open.prefix_len + open.len;
        state.recent_batch_bytes = [state.recent_batch_bytes[1], end];
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
            capacity_bytes: open.capacity_bytes,
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
    /// Before the first write into a new segment the previous one is synced, so unsynced data only
    /// ever sits in the last segment (recovery relies on this).
    pub async fn write_round(&self, round: &[SealedBatch]) -> Result<()> {
        for batch in round {
            // sync() also waits out a sync already running, whose segments have left `dirty`.
            let changed = self.state.borrow().last_written_base.is_some_and(|base| base != batch.segment_base);
            if changed {
                self.sync().await?;
            }
            let block_end = align_up(batch.end() as usize, self.alignment) as u64;
            if self.zero_range.get().is_some_and(|(start, end)| block_end > start && batch.position < end) {
                // Zeros are being written where this batch goes: they must land first.
                drop(self.zero_lock.lock().await);
            }
            let file = self.segment_file(batch.segment_base).await?;
            let write_offset = batch.position - batch.segment_base - batch.prefix_len as u64;
            {
                let state = self.state.borrow();
                if let Some(cause) = &state.poisoned {
                    return Err(EngineError::io(
                        "writing batch",
                        self.store.describe(batch.segment_base),
                        std::io::Error::other(cause.clone()),
                    ));
                }
                assert_eq!(write_offset % self.alignment as u64, 0, "O_DIRECT write must be aligned");
                assert!(batch.position >= state.written_end, "log position went backwards");
                debug_assert!(verify_batch(batch.bytes(), batch.position, self.limits.batch_max_bytes()).is_ok());
            }
            let written = file.write_at(batch.buf.clone(), write_offset).await;
            let mut state = self.state.borrow_mut();
            if let Err(e) = written {
                state.poisoned = Some(e.to_string());
                return Err(EngineError::io("writing batch", self.store.describe(batch.segment_base), e));
            }
            state.written_end = batch.end();
            state.dirty.insert(batch.segment_base);
            state.last_written_base = Some(batch.segment_base);
            self.tail_cache.borrow_mut().insert(
                batch.position,
                batch.len,
                batch.prefix_len,
                batch.buf.clone(),
                batch.capacity_bytes,
            );
        }
        Ok(())
    }

    /// fdatasyncs every segment written since the last sync (segments written O_DSYNC need
    /// none); returns the new durable end.
    pub async fn sync(&self) -> Result<u64> {
        let _one_at_a_time = self.sync_lock.lock().await;
        let (dirty, target) = {
            let mut state = self.state.borrow_mut();
            if let Some(cause) = &state.poisoned {
                return Err(EngineError::io("fdatasync", "log", std::io::Error::other(cause.clone())));
            }
            (std::mem::take(&mut state.dirty), state.written_end)
        };
        for base in dirty {
            let file = self.segment_file(base).await?;
            if file.writes_durable() {
                // Synced inside each write (O_DSYNC): nothing is left to flush or to time.
                continue;
            }
            let started = std::time::Instant::now();
            let synced = file.sync().await;
            self.fdatasync_seconds.record(started.elapsed().as_secs_f64());
            if let Err(e) = synced {
                self.state.borrow_mut().poisoned = Some(e.to_string());
                return Err(EngineError::io("fdatasync", self.store.describe(base), e));
            }
        }
        let mut state = self.state.borrow_mut();
        assert!(target <= state.written_end, "synced past what was written");
        state.durable_end = state.durable_end.max(target);
        Ok(state.durable_end)
    }

    /// Writes the next chunk of zeros past the staged end of the active segment and syncs it,
    /// while less than `zero_ahead_bytes` is zeroed ahead; returns the bytes zeroed (0: none
    /// needed). Callers start once `zeroing_due` and call again until it returns 0.
    /// Runs beside the committer: `write_round` waits for a chunk in flight before writing a
    /// batch that reaches into it, so zeros never land on data. A failure costs nothing but
    /// the saving: the log is not poisoned (no data was at stake), and the caller stops zeroing.
    pub async fn zero_ahead(&self) -> std::io::Result<u64> {
        let _one_at_a_time = self.zero_lock.lock().await;
        let Some(base) = self.opened_active_base() else { return Ok(0) };
        let file = self.segment_file(base).await.map_err(|e| std::io::Error::other(e.to_string()))?;
        // Claimed in the same step as it is chosen: a batch staged from here on that reaches
        // into the range waits (in `write_round`) until the zeros are down.
        let Some((start, end)) = self.next_zero_range(base, false) else { return Ok(0) };
        self.zero_range.set(Some((start, end)));
        let len = (end - start) as usize;
        let mut zeros = glommio::allocate_dma_buffer(len);
        zeros.as_bytes_mut().fill(0);
        assert_eq!((start - base) % self.alignment as u64, 0, "zeroing must be aligned");
        let zeroed = async {
            file.write_at(Rc::new(zeros), start - base).await?;
            file.sync().await
        };
        let result = zeroed.await;
        self.zero_range.set(None);
        result?;
        let mut state = self.state.borrow_mut();
        state.zeroed_end = state.zeroed_end.max(end);
        self.zeroed_bytes.set(self.zeroed_bytes.get() + len as u64);
        Ok(len as u64)
    }

    /// `[start, end)` of the next chunk of zeros for the segment at `base`, if any: from the
    /// block after the staged end (or the zeroed end, if further), at most `ZERO_CHUNK_BYTES`,
    /// up to `zero_ahead_bytes` past the staged end. `starting`: only if less than half of that
    /// is zeroed (so zeroing starts after a good stretch of appends, not after each one).
    fn next_zero_range(&self, base: u64, starting: bool) -> Option<(u64, u64)> {
        let state = self.state.borrow();
        let ahead_max = self.limits.zero_ahead_bytes;
        if ahead_max == 0 || state.poisoned.is_some() || state.active_base != base {
            return None;
        }
        let segment_end = base + state.segments.get(&base)?.size_bytes;
        let staged_block_end = align_up(state.staged_end as usize, self.alignment) as u64;
        let start = state.zeroed_end.max(staged_block_end).max(base);
        let ahead = start - staged_block_end.min(start);
        if ahead >= if starting { ahead_max / 2 } else { ahead_max } {
            return None;
        }
        let end = segment_end.min(start + ZERO_CHUNK_BYTES).min(staged_block_end + ahead_max);
        (end > start).then_some((start, end))
    }

    /// Whether `zero_ahead` has a chunk to write now (a cheap check before starting it).
    pub fn zeroing_due(&self) -> bool {
        self.opened_active_base().is_some_and(|base| self.next_zero_range(base, true).is_some())
    }

    /// The active segment's base once its file is open; before its first round writes (and
    /// opens or creates) it, there is nothing to zero.
    fn opened_active_base(&self) -> Option<u64> {
        let state = self.state.borrow();
        let base = state.active_base;
        state.segments.get(&base).is_some_and(|s| s.file.is_some()).then_some(base)
    }

    /// Bytes zeroed ahead of the log since open.
    pub fn zeroed_bytes(&self) -> u64 {
        self.zeroed_bytes.get()
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

    /// Reads `len` bytes of written log at `position`: from the tail cache when it still holds
    /// them, else zero-copy out of the DMA read buffer.
    pub async fn read(&self, position: u64, len: usize) -> Result<LogBytes> {
        let base = self.stored_base(position, len)?;
        if let Some(cached) = self.tail_cache.borrow_mut().get(position, len) {
            return Ok(cached);
        }
        let file = self.segment_file(base).await?;
        Ok(LogBytes::Read(self.read_segment(&*file, base, position - base, len).await?))
    }

    /// Tail cache (hits, misses, bytes held).
    pub fn tail_cache_stats(&self) -> (u64, u64, usize) {
        self.tail_cache.borrow().stats()
    }

    /// The base of the segment holding `[position, position + len)` of written log.
    fn stored_base(&self, position: u64, len: usize) -> Result<u64> {
        let state = self.state.borrow();
        let found = state.segments.range(..=position).next_back().map(|(b, s)| (*b, s.size_bytes));
        match found {
            Some((base, size))
                if position + len as u64 <= base + size && position + len as u64 <= state.written_end =>
            {
                Ok(base)
            }
            _ => Err(EngineError::PositionNotStored { position }),
        }
    }

    /// Reads several `(position, len)` ranges of written log, results in the order given.
    /// Ranges close together in one segment share one read, and the reads are all issued at
    /// once: a pop of records scattered among other queues' records costs about one I/O
    /// latency, not one per record. Ranges the tail cache holds are not read at all.
    pub async fn read_ranges(&self, ranges: &[(u64, usize)]) -> Result<Vec<LogBytes>> {
        assert!(ranges.len() <= READ_RANGES_MAX, "read_ranges takes at most {READ_RANGES_MAX} ranges");
        let mut out: Vec<Option<LogBytes>> = Vec::with_capacity(ranges.len());
        {
            let mut cache = self.tail_cache.borrow_mut();
            for &(position, len) in ranges {
                self.stored_base(position, len)?;
                out.push(cache.get(position, len));
            }
        }
        let spans = self.plan_spans(ranges, |index| out[index].is_none())?;
        let reads = spans.iter().map(|span| async move {
            let file = self.segment_file(span.base).await?;
            let len = (span.end - span.start) as usize;
            self.read_segment(&*file, span.base, span.start - span.base, len).await
        });
        let buffers = futures::future::try_join_all(reads).await?;
        for (span, buffer) in spans.iter().zip(&buffers) {
            for &index in &span.members {
                let (position, len) = ranges[index];
                let sliced = ReadResult::slice(buffer, (position - span.start) as usize, len)
                    .ok_or(EngineError::PositionNotStored { position })?;
                out[index] = Some(LogBytes::Read(sliced));
            }
        }
        // Every range belongs to exactly one span.
        Ok(out.into_iter().map(|r| r.expect("every range was read")).collect())
    }

    /// Groups ranges (by position) into reads within one segment, each at most
    /// `READ_SPAN_MAX_BYTES` (or one range) with gaps of at most `READ_GAP_MAX_BYTES`.
    /// Only ranges for which `wanted(index)` holds are planned.
    fn plan_spans(&self, ranges: &[(u64, usize)], wanted: impl Fn(usize) -> bool) -> Result<Vec<Span>> {
        let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| wanted(i)).collect();
        order.sort_unstable_by_key(|&i| ranges[i].0);
        let mut spans: Vec<Span> = Vec::new();
        for index in order {
            let (position, len) = ranges[index];
            let base = self.stored_base(position, len)?;
            let end = position + len as u64;
            match spans.last_mut() {
                Some(span)
                    if span.base == base
                        && position <= span.end + READ_GAP_MAX_BYTES
                        && end.max(span.end) - span.start <= READ_SPAN_MAX_BYTES =>
                {
                    span.end = span.end.max(end);
                    span.members.push(index);
                }
                _ => spans.push(Span { base, start: position, end, members: vec![index] }),
            }
        }
        Ok(spans)
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
        let next_base = {
            let mut state = self.state.borrow_mut();
            state.segments.remove(&base);
            state.segments.keys().next().copied().unwrap_or(state.active_base)
        };
        self.tail_cache.borrow_mut().forget_before(next_base);
        self.store.remove(base).await.map_err(|e| EngineError::io("deleting segment", self.store.describe(base), e))
    }
}

fn grow(open: &mut OpenBatch, needed: usize, alignment: usize, group_commit_max_bytes: usize) {
    let capacity = align_up(needed.max((open.buf.len() * 2).min(group_commit_max_bytes)), alignment);
    open.capacity_bytes = capacity;
    let mut bigger = glommio::allocate_dma_buffer(capacity);
    let used = open.prefix_len + open.len;
    // One copy per doubling keeps small batches small; amortised O(1) per byte.
    bigger.as_bytes_mut()[..used].copy_from_slice(&open.buf.as_bytes()[..used]);
    open.buf = bigger;
}

/// ENOSPC (or EDQUOT, a quota that works the same way for us).
fn is_out_of_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28 | 122))
}

/// The most `zero_ahead` writes at once: small, so an append arriving meanwhile waits little.
const ZERO_CHUNK_BYTES: u64 = 256 << 10;

/// Buffer bytes for a new batch that starts with `head_bytes` (the tail of the block before it
/// and the batch header) and the first record, `record_len`, of an append bringing
/// `coming_bytes` (or as much as a recent batch held, whichever is more). Sized from the last
/// two batches, not the last one: under steady load a round that fills the group commit leaves
/// a small remainder batch behind it, and a round sized from that remainder grew, copying
/// itself at every doubling. Rounded up to a power of two, the block glommio's buddy arena
/// hands out anyway. Never above `group_commit_max_bytes` unless one record needs more.
fn batch_capacity(
    head_bytes: usize,
    record_len: usize,
    coming_bytes: usize,
    alignment: usize,
    group_commit_max_bytes: usize,
) -> usize {
    let wanted = align_up(head_bytes + coming_bytes.max(BATCH_INITIAL_CAPACITY_BYTES), alignment);
    let needed = align_up(head_bytes + record_len, alignment);
    wanted.next_power_of_two().min(group_commit_max_bytes).max(needed)
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
    /// The log was closed cleanly: nothing can be torn, so any bad batch is corruption.
    clean: bool,
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
                    if self.is_last && !self.clean && self.is_torn_tail(offset, extent).await? {
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

    /// A bad batch is a torn write (cut off) only if it shows a sector the device never wrote
    /// and no later batch proves it was already durable. Anything else is corruption.
    async fn is_torn_tail(&self, offset: u64, extent: Option<u64>) -> Result<bool> {
        // Whole sectors: an unwritten sector reads as zeros to its end, past the batch too.
        let extent_end = offset + extent.unwrap_or(BATCH_HEADER_BYTES as u64);
        let read_end = extent_end.div_ceil(SECTOR_BYTES as u64).saturating_mul(SECTOR_BYTES as u64).min(self.size);
        let bytes = self.log.read_segment(self.file, self.base, offset, (read_end - offset) as usize).await?;
        if !has_unwritten_sector(&bytes, offset) {
            return Ok(false);
        }
        Ok(self.durable_batch_after(offset).await?.is_none())
    }

    /// The first batch after `offset` whose header shows the log was durable past `offset`.
    /// Reads the rest of the segment, so it runs only when recovery met damage or a crash.
    async fn durable_batch_after(&self, offset: u64) -> Result<Option<u64>> {
        let mut at = offset + 1;
        while at + BATCH_HEADER_BYTES as u64 <= self.size {
            // Overlap chunks by a header, so a header across a chunk edge is still seen.
            let len = (self.size - at).min(SCAN_WINDOW_BYTES as u64) as usize;
            let chunk = self.log.read_segment(self.file, self.base, at, len).await?;
            for i in 0..chunk.len().saturating_sub(BATCH_HEADER_BYTES - 1) {
                if record::le_u32(&chunk, i) != record::BATCH_MAGIC {
                    continue;
                }
                let position = self.base + at + i as u64;
                let header = record::decode_batch_header(&chunk[i..], position, u64::MAX);
                if header.is_ok_and(|h| h.synced_before > self.base + offset) {
                    return Ok(Some(position));
                }
            }
            if len < SCAN_WINDOW_BYTES {
                break;
            }
            at += (len - BATCH_HEADER_BYTES) as u64;
        }
        Ok(None)
    }

    /// After a crash: refuses to start if durable data follows `end` (a zeroed region inside the
    /// log), and otherwise zeroes leftovers of unacked writes after `end`, so a later recovery can
    /// never mistake them for records. Bytes before `end` are rewritten unchanged.
    async fn clear_after(&self, end: u64) -> Result<()> {
        if let Some(position) = self.durable_batch_after(end).await? {
            return Err(EngineError::CorruptRecord {
                segment: self.log.store.describe(self.base),
                offset_in_segment: end,
                position: self.base + end,
                detail: format!(
                    "the log ends here but a batch at position {position} was written after this point was durable"
                ),
            });
        }
        let align = self.log.alignment as u64;
        let mut at = end / align * align;
        while at < self.size {
            let len = (self.size - at).min(SCAN_WINDOW_BYTES as u64) as usize;
            let chunk = self.log.read_segment(self.file, self.base, at, len).await?;
            let keep = end.saturating_sub(at) as usize;
            if chunk[keep..].iter().any(|&b| b != 0) {
                tracing::warn!(segment = %self.log.store.describe(self.base), at, "zeroing leftovers of unacked writes");
                let mut buf = glommio::allocate_dma_buffer(len);
                buf.as_bytes_mut().fill(0);
                buf.as_bytes_mut()[..keep].copy_from_slice(&chunk[..keep]);
                let what = "zeroing after the log end";
                self.file
                    .write_at(Rc::new(buf), at)
                    .await
                    .map_err(|e| EngineError::io(what, self.log.store.describe(self.base), e))?;
                self.file.sync().await.map_err(|e| EngineError::io(what, self.log.store.describe(self.base), e))?;
            }
            at += len as u64;
        }
        Ok(())
    }
}

/// The intact batch stored at `position`, if there is one (`None` also for end of data).
async fn read_stored_batch(
    store: &dyn SegmentStore,
    segments: &[(u64, u64)],
    limits: LogLimits,
    position: u64,
) -> Result<Option<(BatchHeader, ReadResult)>> {
    let Some(&(base, size)) = segments.iter().find(|(b, s)| *b <= position && position < b + s) else {
        return Ok(None);
    };
    if position + BATCH_HEADER_BYTES as u64 > base + size {
        return Ok(None);
    }
    let file = store.open(base).await.map_err(|e| EngineError::io("opening segment", store.describe(base), e))?;
    let read = |offset: u64, len: usize| {
        let file = file.clone();
        async move {
            file.read_at(offset, len).await.map_err(|e| EngineError::io("reading segment", store.describe(base), e))
        }
    };
    let head = read(position - base, BATCH_HEADER_BYTES).await?;
    let max = limits.batch_max_bytes().min(base + size - position);
    let Ok(header) = record::decode_batch_header(&head, position, max) else {
        return Ok(None);
    };
    let bytes = read(position - base, header.batch_len as usize).await?;
    Ok(verify_batch(&bytes, position, max).is_ok().then_some((header, bytes)))
}

/// Whether any sector overlapping `bytes` (which start at segment offset `offset`) is all zero
/// within `bytes`: the mark of a write the device never completed.
fn has_unwritten_sector(bytes: &[u8], offset: u64) -> bool {
    let mut at = 0usize;
    while at < bytes.len() {
        let sector_left = SECTOR_BYTES - ((offset as usize + at) % SECTOR_BYTES);
        let piece = &bytes[at..(at + sector_left).min(bytes.len())];
        // A few zero bytes can be data; refuse to call that a torn write (and drop the batch).
        if piece.len() >= UNWRITTEN_PIECE_MIN_BYTES && piece.iter().all(|&b| b == 0) {
            return true;
        }
        at += piece.len();
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritten_sector_is_recognised_wherever_the_batch_starts() {
        // A header that starts 20 bytes before a sector boundary: its first sector was written,
        // its second never was (zeros to the end of that sector).
        let mut bytes = vec![0u8; 20 + 512];
        bytes[..20].fill(0xaa);
        assert!(has_unwritten_sector(&bytes, 512 - 20));
        // Fully written data with a few zero bytes is not taken for a torn write.
        let mut data = vec![0x11u8; 1024];
        data[600..620].fill(0);
        assert!(!has_unwritten_sector(&data, 0));
        // A whole zero sector inside a batch is.
        data[512..1024].fill(0);
        assert!(has_unwritten_sector(&data, 0));
    }

    #[test]
    fn a_batch_starts_big_enough_for_the_recent_rounds() {
        const MIB: usize = 1 << 20;
        let (head, record, align, max) = (4096 + BATCH_HEADER_BYTES, 1100, 4096, 4 * MIB);
        // After a 4 MiB round and its 272 KiB remainder, the next round starts at 4 MiB.
        let recent = (4 * MIB - 3000).max(272 << 10);
        assert_eq!(batch_capacity(head, record, recent, align, max), 4 * MIB);
        // A light load keeps small buffers: the initial size, rounded to its arena block.
        assert_eq!(batch_capacity(head, record, 1100, align, max), 128 << 10);
        assert_eq!(batch_capacity(0, record, 1100, align, max), BATCH_INITIAL_CAPACITY_BYTES);
        // Whatever was recent, a buffer never passes the group-commit limit...
        assert_eq!(batch_capacity(head, record, 9 * MIB, align, max), max);
        // ...unless one record needs more, and then it gets exactly its aligned size.
        let huge = 5 * MIB + 1;
        assert_eq!(batch_capacity(head, huge, huge, align, max), align_up(head + huge, align));
        // Not a power of two as configured: the limit still holds.
        assert_eq!(batch_capacity(head, record, 3 * MIB, align, 3 * MIB), 3 * MIB);
    }
}
