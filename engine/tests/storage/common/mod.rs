//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use glommio::io::{DmaBuffer, ReadResult};
use sluice_engine::segment::{DmaSegmentStore, SegmentFile, SegmentStore};

use sluice_engine::{Durability, Engine, EngineConfig, NewRecord};

pub const SEGMENT_SIZE_BYTES: u64 = 256 << 10;

/// A small-segment, unpinned config so segment rolls happen quickly and tests can run together.
pub fn small_config(dir: &Path, shards: usize) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = shards;
    config.pin_shards = false;
    config.segment_size_bytes = SEGMENT_SIZE_BYTES;
    config.record_size_max_bytes = 128 << 10;
    config.group_commit_max_bytes = 128 << 10;
    config.index_block_cache_bytes = 1 << 20;
    config.io_memory_bytes = 1 << 20;
    // Reads go to disk, so the tests exercise the O_DIRECT read path; the tail cache has its own.
    config.log_tail_cache_bytes = 0;
    config.durability = Durability::Sync;
    config
}

pub fn open(config: &EngineConfig) -> Engine {
    Engine::open(config.clone()).expect("engine opens")
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Body whose bytes encode (queue tag, i), so reads can be checked byte for byte.
pub fn body(tag: u8, i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (j as u64).wrapping_mul(31).wrapping_add(i).wrapping_add(u64::from(tag)) as u8).collect()
}

pub fn record(queue: &str, i: u64, len: usize) -> NewRecord {
    let mut r = NewRecord::new(queue, body(0, i, len));
    r.message_id = format!("{queue}-{i}");
    r
}

/// Reads a whole queue, or nothing if it was never created.
pub fn read_all_if_exists(engine: &Engine, queue: &str) -> Vec<sluice_engine::OwnedRecord> {
    match block_on(engine.queue_info(queue)).expect("queue info") {
        Some(_) => read_all(engine, queue),
        None => Vec::new(),
    }
}

/// Reads a whole queue from offset 0.
pub fn read_all(engine: &Engine, queue: &str) -> Vec<sluice_engine::OwnedRecord> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let batch = block_on(engine.read(queue, from, 1000, 4 << 20)).expect("read");
        if batch.records.is_empty() {
            return out;
        }
        from = batch.next_offset;
        out.extend(batch.records);
    }
}

pub fn segment_files(config: &EngineConfig, shard: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(config.shard_dir(shard).join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// The segment file and in-file offset holding a log position.
pub fn locate(config: &EngineConfig, shard: usize, position: u64) -> (PathBuf, u64) {
    for file in segment_files(config, shard).into_iter().rev() {
        let base: u64 = file.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        if base <= position {
            return (file, position - base);
        }
    }
    panic!("no segment holds position {position}");
}

pub fn patch_file(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let mut bytes = std::fs::read(path).expect("read segment");
    f(&mut bytes[offset as usize..]);
    std::fs::write(path, bytes).expect("write segment");
}

/// Faults a `FaultyStore` injects, switched on and off by the test.
#[derive(Clone, Default)]
pub struct Faults {
    /// fdatasync does not finish while set: a stalled disk, appends stay staged.
    pub syncs_held: Rc<Cell<bool>>,
    /// Creating a segment fails with ENOSPC while set.
    pub full: Rc<Cell<bool>>,
    /// Segment creations refused so far.
    pub creations_refused: Rc<Cell<u32>>,
    /// Writes of nothing but zeros (the log zeroing ahead) start this many ms late: a disk
    /// that completes a later write first.
    pub zero_writes_late_ms: Rc<Cell<u64>>,
}

/// The real segment store with `Faults` injected.
pub struct FaultyStore {
    pub inner: DmaSegmentStore,
    pub faults: Faults,
}

struct FaultyFile {
    inner: Rc<dyn SegmentFile>,
    faults: Faults,
}

impl FaultyStore {
    fn wrap(&self, inner: Rc<dyn SegmentFile>) -> Rc<dyn SegmentFile> {
        Rc::new(FaultyFile { inner, faults: self.faults.clone() })
    }
}

impl SegmentFile for FaultyFile {
    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }

    fn write_at(&self, buf: Rc<DmaBuffer>, offset: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let late_ms = self.faults.zero_writes_late_ms.get();
            if late_ms > 0 && buf.as_bytes().iter().all(|b| *b == 0) {
                glommio::timer::sleep(Duration::from_millis(late_ms)).await;
            }
            self.inner.write_at(buf, offset).await
        })
    }

    fn sync(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            while self.faults.syncs_held.get() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            self.inner.sync().await
        })
    }

    fn read_at(&self, offset: u64, len: usize) -> LocalBoxFuture<'_, io::Result<ReadResult>> {
        self.inner.read_at(offset, len)
    }
}

impl SegmentStore for FaultyStore {
    fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        self.inner.list()
    }

    fn open(&self, base: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move { Ok(self.wrap(self.inner.open(base).await?)) })
    }

    fn create(&self, base: u64, size_bytes: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move {
            if self.faults.full.get() {
                self.faults.creations_refused.set(self.faults.creations_refused.get() + 1);
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            Ok(self.wrap(self.inner.create(base, size_bytes).await?))
        })
    }

    fn remove(&self, base: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        self.inner.remove(base)
    }

    fn modified(&self, base: u64) -> io::Result<std::time::SystemTime> {
        self.inner.modified(base)
    }

    fn describe(&self, base: u64) -> String {
        self.inner.describe(base)
    }
}

pub const ENOSPC: i32 = 28;
