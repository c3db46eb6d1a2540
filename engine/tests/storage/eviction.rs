//! Idle queues leave the shard's memory and come back from the index intact: offsets, records,
//! limits, deletion, restarts, and a crash replay that meets evicted queues.

use crate::common;

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use sluice_engine::segment::DmaSegmentStore;
use sluice_engine::{Engine, EngineConfig, EngineError, NewRecord, Shard, ShardStats};

const QUEUES: usize = 200;
/// Bound on waiting for the eviction task, so a regression fails instead of hanging.
const EVICTION_WAIT: Duration = Duration::from_secs(20);

fn eviction_config(dir: &std::path::Path) -> EngineConfig {
    let mut config = small_config(dir, 1);
    config.queue_idle_evict_ms = 20;
    config
}

fn shard_stats(engine: &Engine) -> ShardStats {
    block_on(engine.stats()).unwrap().remove(0)
}

fn wait_until_nothing_resident(engine: &Engine) -> ShardStats {
    let started = Instant::now();
    loop {
        let stats = shard_stats(engine);
        if stats.queues_resident == 0 {
            return stats;
        }
        assert!(started.elapsed() < EVICTION_WAIT, "idle queues still resident: {stats:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lite(i: usize) -> String {
    format!("chat%session-{i}")
}

#[test]
fn idle_queues_leave_memory_and_come_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = eviction_config(dir.path());
    config.queues_per_shard_max = QUEUES;
    let engine = open(&config);
    let records: Vec<NewRecord> = (0..QUEUES).map(|i| record(&lite(i), i as u64, 100)).collect();
    for chunk in records.chunks(50) {
        block_on(engine.append(chunk.to_vec())).unwrap();
    }
    let stats = wait_until_nothing_resident(&engine);
    assert_eq!(stats.queues, QUEUES, "evicted queues still count");
    assert!(stats.queues_evicted >= QUEUES as u64, "{stats:?}");
    for i in 0..QUEUES {
        let info = block_on(engine.queue_info(&lite(i))).unwrap().expect("an evicted queue still exists");
        assert_eq!((info.min_offset, info.max_offset), (0, 1));
        let read = read_all(&engine, &lite(i));
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].view().body, &body(0, i as u64, 100)[..]);
    }
    assert!(block_on(engine.queue_info("chat%never")).unwrap().is_none());

    // The limit counts evicted queues: a new one does not fit, an evicted one takes appends.
    let err = block_on(engine.append(vec![record("chat%extra", 0, 10)])).unwrap_err();
    assert!(matches!(err, EngineError::TooManyQueues { .. }), "{err}");
    let ack = block_on(engine.append(vec![record(&lite(7), 1000, 100)])).unwrap();
    assert_eq!(ack[0].offsets, vec![1], "offsets continue after the queue was evicted");
    assert_eq!(shard_stats(&engine).queues_resident, 1);

    // An evicted queue can be deleted, which frees its place.
    block_on(engine.delete_queue(&lite(8))).unwrap();
    assert!(block_on(engine.queue_info(&lite(8))).unwrap().is_none());
    assert_eq!(shard_stats(&engine).queues, QUEUES - 1);
    block_on(engine.append(vec![record("chat%extra", 0, 10)])).unwrap();
    wait_until_nothing_resident(&engine);
    engine.close().unwrap();

    let engine = open(&config);
    let stats = shard_stats(&engine);
    assert_eq!((stats.queues, stats.queues_resident), (QUEUES, 0), "a restart loads no queue into memory");
    let read = read_all(&engine, &lite(7));
    assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(read[1].view().body, &body(0, 1000, 100)[..]);
    engine.close().unwrap();
}

/// Copies a data directory while its engine is idle: what a crash at that moment leaves (the
/// index's memtable, which has no WAL, is lost; the log is whole).
fn crash_image(from: &std::path::Path, to: &std::path::Path) {
    for entry in walk(from) {
        let target = to.join(entry.strip_prefix(from).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Replay after a crash meets queues that were evicted (so are only in the index): it must
/// continue them from their metadata, and a queue deleted and re-created in the replayed log
/// must start over rather than pick up the deleted one's metadata.
#[test]
fn crash_replay_continues_evicted_queues_and_restarts_recreated_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = eviction_config(dir.path());
    let engine = open(&config);
    for i in 0..3 {
        block_on(engine.append(vec![record("kept", i, 200), record("recreated", i, 200)])).unwrap();
    }
    // A clean close flushes the index: from here on it holds both queues' metadata.
    engine.close().unwrap();
    let engine = open(&config);
    for i in 3..5 {
        block_on(engine.append(vec![record("kept", i, 200)])).unwrap();
    }
    block_on(engine.delete_queue("recreated")).unwrap();
    block_on(engine.append(vec![record("recreated", 100, 200), record("new", 0, 200)])).unwrap();
    let crashed = tempfile::tempdir().unwrap();
    crash_image(dir.path(), crashed.path());
    engine.close().unwrap();

    let config = eviction_config(crashed.path());
    let engine = open(&config);
    let stats = shard_stats(&engine);
    assert!(stats.recovery.as_ref().is_some_and(|r| r.batches_replayed > 0), "the log was replayed: {stats:?}");
    assert_eq!(stats.queues, 3);
    let kept = read_all(&engine, "kept");
    assert_eq!(kept.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    for r in &kept {
        assert_eq!(r.view().body, &body(0, r.offset, 200)[..]);
    }
    let recreated = read_all(&engine, "recreated");
    assert_eq!(recreated.len(), 1);
    assert_eq!((recreated[0].offset, recreated[0].view().body), (0, &body(0, 100, 200)[..]));
    let info = block_on(engine.queue_info("recreated")).unwrap().unwrap();
    assert_eq!((info.min_offset, info.max_offset), (0, 1));
    assert_eq!(read_all(&engine, "new").len(), 1);
    // Replayed queues are resident, then evicted like any other, and still continue.
    wait_until_nothing_resident(&engine);
    let ack = block_on(engine.append(vec![record("kept", 5, 200), record("recreated", 101, 200)])).unwrap();
    assert_eq!((ack[0].offsets.clone(), ack[1].offsets.clone()), (vec![5], vec![1]));
    engine.close().unwrap();
}

/// Retention trims evicted queues too: their minimum offset moves past the deleted segments, in
/// the index, and survives a restart.
#[test]
fn retention_trims_evicted_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = eviction_config(dir.path());
    config.retention.max_log_bytes_per_shard = Some(4 * SEGMENT_SIZE_BYTES);
    config.retention.check_interval_ms = 3_600_000; // run by hand below
    let engine = open(&config);
    for i in 0..200u64 {
        block_on(engine.append(vec![record("old#0", i, 8000), record("old#1", i, 100)])).unwrap();
    }
    let evicted_before = wait_until_nothing_resident(&engine).queues_evicted;
    assert!(block_on(engine.enforce_retention()).unwrap() > 0);
    for queue in ["old#0", "old#1"] {
        let info = block_on(engine.queue_info(queue)).unwrap().unwrap();
        assert!(info.min_offset > 0, "{queue}: min offset advanced past deleted segments");
        let records = read_all(&engine, queue);
        assert_eq!(records.first().unwrap().offset, info.min_offset);
        assert_eq!(records.last().unwrap().offset, 199);
    }
    let evicted_after = shard_stats(&engine).queues_evicted;
    assert_eq!(evicted_after, evicted_before, "trimming and reading load no queue (nothing was evicted again)");
    let trimmed = block_on(engine.queue_info("old#0")).unwrap().unwrap();
    engine.close().unwrap();
    let engine = open(&config);
    assert_eq!(block_on(engine.queue_info("old#0")).unwrap().unwrap(), trimmed, "the trim is in the index");
    engine.close().unwrap();
}

/// The invariant that makes eviction safe: a queue with an append or a deletion staged but not
/// yet durable and indexed stays in memory, however long it looks idle.
#[test]
fn a_queue_with_a_staged_append_or_deletion_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.queue_idle_evict_ms = 3_600_000; // only the passes this test runs
    let executor = glommio::LocalExecutorBuilder::default().make().unwrap();
    executor.run(async move {
        let faults = Faults::default();
        let closed = faults.syncs_held.clone();
        let inner = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
        let shard = Shard::open(config, 0, Rc::new(FaultyStore { inner, faults })).await.unwrap();
        shard
            .append(&[NewRecord::new("staged", b"0".to_vec()), NewRecord::new("doomed", b"0".to_vec())])
            .await
            .unwrap();
        closed.set(true);
        let append = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.append(&[NewRecord::new("staged", b"1".to_vec())]).await })
        };
        let delete = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.delete_queue("doomed").await })
        };
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let a_day_later = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 86_400_000;
        assert_eq!(shard.evict_idle(a_day_later), 0, "nothing staged may leave memory");
        assert_eq!(shard.stats().queues_resident, 2);
        closed.set(false);
        assert_eq!(append.await.unwrap()[0].offsets, vec![1]);
        delete.await.unwrap();
        assert_eq!((shard.stats().queues, shard.stats().queues_resident), (1, 1));
        // A looked-at queue is looked at again one idle period (an hour here) later.
        assert_eq!(shard.evict_idle(a_day_later + 7_200_000), 1, "settled, the queue goes");
        assert_eq!(shard.stats().queues_resident, 0);
        let ack = shard.append(&[NewRecord::new("staged", b"2".to_vec())]).await.unwrap();
        assert_eq!(ack[0].offsets, vec![2], "and comes back where it was");
        shard.close().await.unwrap();
    });
}
