//! Group commit, observed through an injected storage layer that records every completed
//! write and fdatasync: an append is acked only after a sync that followed the write holding it.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use futures::future::LocalBoxFuture;
use glommio::io::{DmaBuffer, ReadResult};
use sluice_engine::segment::{DmaSegmentStore, SegmentFile, SegmentStore};
use sluice_engine::{Durability, EngineConfig, EngineError, NewRecord, Shard};

#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// A write finished: log positions `[start, end)`.
    Wrote { start: u64, end: u64 },
    /// An fdatasync of the segment at `base` finished.
    Synced { base: u64 },
    /// An append resolved successfully for the record at `[start, end)`.
    Acked { start: u64, end: u64 },
}

type Journal = Rc<RefCell<Vec<Event>>>;

struct RecordingStore {
    inner: DmaSegmentStore,
    journal: Journal,
    fail_syncs: bool,
}

struct RecordingFile {
    base: u64,
    inner: Rc<dyn SegmentFile>,
    journal: Journal,
    fail_syncs: bool,
}

impl SegmentFile for RecordingFile {
    fn alignment(&self) -> u64 {
        self.inner.alignment()
    }

    fn write_at(&self, buf: Rc<DmaBuffer>, offset: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.inner.write_at(buf, offset).await?;
            let start = self.base + offset;
            self.journal.borrow_mut().push(Event::Wrote { start, end: start + len });
            Ok(())
        })
    }

    fn sync(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.fail_syncs {
                return Err(io::Error::other("injected EIO"));
            }
            self.inner.sync().await?;
            self.journal.borrow_mut().push(Event::Synced { base: self.base });
            Ok(())
        })
    }

    fn read_at(&self, offset: u64, len: usize) -> LocalBoxFuture<'_, io::Result<ReadResult>> {
        self.inner.read_at(offset, len)
    }
}

impl RecordingStore {
    fn wrap(&self, base: u64, inner: Rc<dyn SegmentFile>) -> Rc<dyn SegmentFile> {
        Rc::new(RecordingFile { base, inner, journal: self.journal.clone(), fail_syncs: self.fail_syncs })
    }
}

impl SegmentStore for RecordingStore {
    fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        self.inner.list()
    }

    fn open(&self, base: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move { Ok(self.wrap(base, self.inner.open(base).await?)) })
    }

    fn create(&self, base: u64, size_bytes: u64) -> LocalBoxFuture<'_, io::Result<Rc<dyn SegmentFile>>> {
        Box::pin(async move { Ok(self.wrap(base, self.inner.create(base, size_bytes).await?)) })
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

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = 1;
    config.segment_size_bytes = 256 << 10;
    config.record_size_max_bytes = 128 << 10;
    config.group_commit_max_bytes = 128 << 10;
    config.durability = Durability::Sync;
    config
}

/// Runs `appenders` concurrent appends of `record_bytes` each on one shard with the recording
/// store, and returns the journal and each append's outcome.
fn run_appends(fail_syncs: bool, appenders: usize, record_bytes: usize) -> (Vec<Event>, Vec<Result<(), EngineError>>) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let executor = glommio::LocalExecutorBuilder::default().make().unwrap();
    executor.run(async move {
        let journal: Journal = Rc::default();
        let inner = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
        let store = RecordingStore { inner, journal: journal.clone(), fail_syncs };
        let shard = Shard::open(config, 0, Rc::new(store)).await.unwrap();
        let tasks: Vec<_> = (0..appenders)
            .map(|i| {
                let (shard, journal) = (shard.clone(), journal.clone());
                glommio::spawn_local(async move {
                    let record = NewRecord::new(format!("q#{}", i % 3), vec![i as u8; record_bytes]);
                    let acks = shard.append(&[record]).await?;
                    let len = sluice_engine::record::encoded_len(&NewRecord::new(
                        format!("q#{}", i % 3),
                        vec![0; record_bytes],
                    ))
                    .unwrap();
                    let start = acks[0].position;
                    journal.borrow_mut().push(Event::Acked { start, end: start + len as u64 });
                    Ok(())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await);
        }
        let events = journal.borrow().clone();
        (events, outcomes)
    })
}

#[test]
fn append_is_acked_only_after_fdatasync_of_its_write() {
    // 300 appends of 1 KiB against 64 KiB group commits: several rounds, one segment roll.
    let (events, outcomes) = run_appends(false, 300, 1000);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let acks: Vec<(usize, u64, u64)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Event::Acked { start, end } => Some((i, *start, *end)),
            _ => None,
        })
        .collect();
    assert_eq!(acks.len(), 300);
    for (ack_at, start, end) in acks {
        let write_at = events[..ack_at]
            .iter()
            .position(|e| matches!(e, Event::Wrote { start: ws, end: we } if *ws <= start && end <= *we))
            .unwrap_or_else(|| panic!("record [{start},{end}) acked with no write covering it"));
        let synced = events[write_at..ack_at].iter().any(|e| matches!(e, Event::Synced { .. }));
        assert!(synced, "record [{start},{end}) acked before an fdatasync followed its write");
    }
    let syncs = events.iter().filter(|e| matches!(e, Event::Synced { .. })).count();
    assert!(syncs < 300 / 4, "group commit batches appends: {syncs} syncs for 300 appends");
}

#[test]
fn failed_fdatasync_fails_every_waiting_append_and_stops_the_shard() {
    let (events, outcomes) = run_appends(true, 20, 100);
    assert!(!events.iter().any(|e| matches!(e, Event::Acked { .. })), "nothing may be acked");
    for outcome in &outcomes {
        let err = outcome.as_ref().unwrap_err();
        assert!(matches!(err, EngineError::Io { .. } | EngineError::ShardFailed { .. }), "{err}");
    }
    assert!(outcomes.iter().any(|o| matches!(o, Err(EngineError::Io { what: "fdatasync", .. }))));
}

#[test]
fn queue_deleted_while_appends_are_in_flight_starts_over_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let executor = glommio::LocalExecutorBuilder::default().make().unwrap();
    executor.run(async move {
        let store = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
        let shard = Shard::open(config, 0, Rc::new(store)).await.unwrap();
        shard.append(&[NewRecord::new("q", b"first".to_vec())]).await.unwrap();
        let in_flight: Vec<_> = (0..10)
            .map(|i| {
                let shard = shard.clone();
                glommio::spawn_local(async move { shard.append(&[NewRecord::new("q", vec![i; 100])]).await })
            })
            .collect();
        glommio::yield_if_needed().await;
        futures::future::join(async { shard.delete_queue("q").await.unwrap() }, async {
            let err = shard.append(&[NewRecord::new("q", b"during".to_vec())]).await.unwrap_err();
            assert!(matches!(err, EngineError::QueueBeingDeleted(_)), "{err}");
        })
        .await;
        for task in in_flight {
            task.await.unwrap();
        }
        assert!(matches!(shard.read("q", 0, 10, 1 << 20).await, Err(EngineError::QueueNotFound(_))));
        let ack = shard.append(&[NewRecord::new("q", b"again".to_vec())]).await.unwrap();
        assert_eq!(ack[0].offsets, vec![0], "a re-created queue starts at offset 0");
        let batch = shard.read("q", 0, 10, 1 << 20).await.unwrap();
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].view().body, b"again");
    });
}
