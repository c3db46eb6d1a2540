//! Segment files: where CommitLog bytes live. The log talks to them only through these traits,
//! so tests can inject a layer that records the order of writes and syncs.
//!
//! Segments are named by their base log position (`00000000001073741824.log`), preallocated to
//! the configured size, and written with O_DIRECT through glommio's io_uring `DmaFile`.

use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::OnceLock;

use futures::future::LocalBoxFuture;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

/// The fault suite's injected fdatasync failure (`scripts/faults.sh`, case `sync-failure`): with
/// this variable naming a file, every fdatasync of the real store (and, with durable writes,
/// every write, whose fdatasync the kernel runs) fails with EIO while that file exists. Read
/// once; unset, a sync pays one `OnceLock` read for it.
pub const SYNC_FAULT_ENV: &str = "SLUICE_FAULT_SYNC_FAILS_WHILE";
static SYNC_FAULT_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

fn injected_sync_failure() -> Option<io::Error> {
    let file = SYNC_FAULT_FILE.get_or_init(|| std::env::var_os(SYNC_FAULT_ENV).map(PathBuf::from)).as_ref()?;
    let message = format!("injected fdatasync failure: {} exists ({SYNC_FAULT_ENV})", file.display());
    file.exists().then(|| io::Error::other(message))
}

/// One open segment file.
pub trait SegmentFile {
    /// Direct-I/O alignment of writes, in bytes.
    fn alignment(&self) -> u64;
    /// Writes all of `buf` at `offset` (aligned). Short writes are errors.
    fn write_at(&self, buf: Rc<DmaBuffer>, offset: u64) -> LocalBoxFuture<'_, io::Result<()>>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> LocalBoxFuture<'_, io::Result<()>>;
    /// Whether a write is durable once it completes (the file is O_DSYNC), so `sync` has
    /// nothing left to do.
    fn writes_durable(&self) -> bool {
        false
    }
    /// Reads `len` bytes at `offset` (any alignment) without copying out of the DMA buffer.
    fn read_at(&self, offset: u64, len: usize) -> LocalBoxFuture<'_, io::Result<ReadResult>>;
}

/// A directory of segment files.
pub trait SegmentStore {
    /// `(base, size_bytes)` of every segment present, sorted by base.
    fn list(&self) -> io::Result<Vec<(u64, u64)>>;
    fn open(&self, base: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>>;
    /// Creates a new segment preallocated to `size_bytes`.
    fn create(&self, base: u64, size_bytes: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>>;
    fn remove(&self, base: u64) -> LocalBoxFuture<'_, io::Result<()>>;
    /// Last modification time, used by age-based retention.
    fn modified(&self, base: u64) -> io::Result<std::time::SystemTime>;
    /// Human-readable name of a segment, for errors.
    fn describe(&self, base: u64) -> String;
}

/// Segment file name for a base position.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The real store: a directory of O_DIRECT files.
pub struct DmaSegmentStore {
    dir: PathBuf,
    durable_writes: bool,
}

impl DmaSegmentStore {
    /// Opens (creating if needed) a segment directory. Must run on a glommio executor.
    pub async fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        remove_unfinished_segments(&dir)?;
        calibrate_iopoll_probe(&dir).await?;
        Ok(DmaSegmentStore { dir, durable_writes: false })
    }

    /// Opens segments O_DSYNC: each write returns once it is durable, the kernel flushing it
    /// as an fdatasync would, so a group commit is one I/O and one completion instead of a
    /// write, a wake-up, then an fdatasync (which io_uring runs on a worker thread). For `sync`
    /// durability, where every write is followed by a sync anyway.
    pub fn with_durable_writes(self, durable_writes: bool) -> Self {
        DmaSegmentStore { durable_writes, ..self }
    }

    fn open_flags(&self) -> i32 {
        if self.durable_writes {
            rustix::fs::OFlags::DSYNC.bits() as i32
        } else {
            0
        }
    }

    fn path(&self, base: u64) -> PathBuf {
        self.dir.join(segment_file_name(base))
    }
}

/// Extension of a segment still being created.
const TEMPORARY_EXTENSION: &str = "log.creating";

/// Deletes segments whose creation a crash interrupted; none of them ever held a record.
fn remove_unfinished_segments(dir: &std::path::Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.to_str().is_some_and(|p| p.ends_with(TEMPORARY_EXTENSION)) {
            tracing::info!(path = %path.display(), "removing a segment whose creation was interrupted");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// glommio decides whether a device supports io_uring IOPOLL by reading offset 0 of the first
/// file it opens there, and caches the answer per device. If that file is empty or sparse, the
/// read never reaches the device and "succeeds", so glommio enables the poll ring and every later
/// read on a device without IOPOLL (virtio, most SATA) fails with EOPNOTSUPP. Opening a file with
/// a real data block first makes the probe ask the device.
async fn calibrate_iopoll_probe(dir: &std::path::Path) -> io::Result<()> {
    let path = dir.join(".iopoll-probe");
    {
        let mut file = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut file, &[0xa5; 4096])?;
        file.sync_all()?;
    }
    let opened = OpenOptions::new().read(true).dma_open(&path).await.map_err(to_io);
    if let Ok(file) = opened {
        let _ = file.close().await;
    }
    std::fs::remove_file(&path)
}

/// Keeps the OS error (ENOSPC must stay recognisable) with glommio's description of the call.
fn to_io(err: glommio::GlommioError<()>) -> io::Error {
    let described = err.to_string();
    match err {
        glommio::GlommioError::IoError(source) | glommio::GlommioError::EnhancedIoError { source, .. } => {
            match source.raw_os_error() {
                Some(code) => io::Error::new(io::Error::from_raw_os_error(code).kind(), described),
                None => io::Error::new(source.kind(), described),
            }
        }
        _ => io::Error::other(described),
    }
}

struct DmaSegment {
    file: DmaFile,
    /// Opened O_DSYNC (`DmaSegmentStore::with_durable_writes`).
    durable_writes: bool,
}

impl SegmentFile for DmaSegment {
    fn alignment(&self) -> u64 {
        self.file.alignment()
    }

    fn write_at(&self, buf: Rc<DmaBuffer>, offset: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.durable_writes {
                if let Some(injected) = injected_sync_failure() {
                    return Err(injected);
                }
            }
            let len = buf.len();
            let written = self.file.write_rc_at(buf, offset).await.map_err(to_io)?;
            if written != len {
                return Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write: {written} of {len} bytes")));
            }
            Ok(())
        })
    }

    fn sync(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if let Some(injected) = injected_sync_failure() {
                return Err(injected);
            }
            if self.durable_writes {
                return Ok(());
            }
            self.file.fdatasync().await.map_err(to_io)
        })
    }

    fn writes_durable(&self) -> bool {
        self.durable_writes
    }

    fn read_at(&self, offset: u64, len: usize) -> LocalBoxFuture<'_, io::Result<ReadResult>> {
        Box::pin(async move {
            let read = self.file.read_at(offset, len).await.map_err(to_io)?;
            if read.len() != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {len} bytes", read.len()),
                ));
            }
            Ok(read)
        })
    }
}

impl SegmentStore for DmaSegmentStore {
    fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(base) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push((base, entry.metadata()?.len()));
        }
        segments.sort_unstable();
        Ok(segments)
    }

    fn open(&self, base: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(self.open_flags())
                .dma_open(self.path(base))
                .await
                .map_err(to_io)?;
            Ok(Rc::new(DmaSegment { file, durable_writes: self.durable_writes }) as Rc<dyn SegmentFile>)
        })
    }

    fn create(&self, base: u64, size_bytes: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move {
            // Built under a temporary name and renamed into place once fully preallocated, so a
            // crash never leaves a short segment that recovery would take for a damaged log.
            let path = self.path(base);
            let temporary = path.with_extension(TEMPORARY_EXTENSION);
            let _ = std::fs::remove_file(&temporary);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(self.open_flags())
                .dma_open(&temporary)
                .await
                .map_err(to_io)?;
            let prepared = async {
                match file.pre_allocate(size_bytes, false).await.map_err(to_io) {
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        // Some filesystems (9p, some network ones) cannot preallocate. A sparse
                        // file of the full size reads the same to recovery (zeros past the end of
                        // the log); its blocks are taken as records land, so a full disk fails a
                        // write (which stops the shard) rather than the segment's creation.
                        tracing::warn!(path = %temporary.display(), "the filesystem cannot preallocate segments (fallocate unsupported); creating a sparse one");
                        std::fs::OpenOptions::new().write(true).open(&temporary)?.set_len(size_bytes)?;
                    }
                    other => other?,
                }
                file.fdatasync().await.map_err(to_io)
            };
            if let Err(e) = prepared.await {
                // A partial preallocation holds blocks a full disk needs back.
                let _ = std::fs::remove_file(&temporary);
                return Err(e);
            }
            file.rename(&path).await.map_err(to_io)?;
            // The new directory entry must survive a crash before any record in it is acked.
            std::fs::File::open(&self.dir)?.sync_all()?;
            Ok(Rc::new(DmaSegment { file, durable_writes: self.durable_writes }) as Rc<dyn SegmentFile>)
        })
    }

    fn remove(&self, base: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move { std::fs::remove_file(self.path(base)) })
    }

    fn modified(&self, base: u64) -> io::Result<std::time::SystemTime> {
        std::fs::metadata(self.path(base))?.modified()
    }

    fn describe(&self, base: u64) -> String {
        self.path(base).display().to_string()
    }
}
