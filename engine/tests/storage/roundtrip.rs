//! Append/read behaviour of a running engine: round trips across segment rolls, multi-dispatch,
//! lookups, consumer offsets, state tables, queue deletion, limits, restarts and retention.

use crate::common;

use common::*;
use sluice_engine::{EngineError, NewRecord, StateTable};

#[test]
fn append_read_round_trip_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 2);
    let engine = open(&config);
    // ~3 MiB into 256 KiB segments: a dozen rolls per shard, mixed sizes, several queues.
    let mut expected = std::collections::HashMap::new();
    for i in 0..600u64 {
        let queue = format!("orders#{}", i % 4);
        let len = 1 + ((i * 977) % 9000) as usize;
        let ack = block_on(engine.append(vec![record(&queue, i, len)])).unwrap();
        let list: &mut Vec<(u64, usize)> = expected.entry(queue).or_default();
        assert_eq!(ack[0].offsets, vec![list.len() as u64], "offsets are dense per queue");
        list.push((i, len));
    }
    for shard in 0..2 {
        assert!(segment_files(&config, shard).len() > 3, "segments rolled on shard {shard}");
    }
    for (queue, items) in &expected {
        let records = read_all(&engine, queue);
        assert_eq!(records.len(), items.len());
        for (offset, (record, (i, len))) in records.iter().zip(items).enumerate() {
            assert_eq!(record.offset, offset as u64);
            let view = record.view();
            assert_eq!(view.body, &body(0, *i, *len)[..]);
            assert_eq!(view.message_id, format!("{queue}-{i}"));
            assert_eq!(view.queue_refs().collect::<Vec<_>>(), vec![(queue.as_str(), offset as u64)]);
        }
    }
    engine.close().unwrap();
}

/// One read call for records scattered among another queue's: neighbours share I/Os, wide gaps
/// (another queue's 40 KiB records) and segment ends split them, and every record comes back
/// whole and in queue order.
#[test]
fn scattered_records_read_in_one_call_come_back_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    for i in 0..200u64 {
        block_on(engine.append(vec![record("a", i, 300 + (i as usize * 37) % 1500)])).unwrap();
        let gap_len = if i % 7 == 0 { 40 << 10 } else { 2000 };
        block_on(engine.append(vec![record("b", i, gap_len)])).unwrap();
    }
    assert!(segment_files(&config, 0).len() > 4, "the records span several segments");
    let batch = block_on(engine.read("a", 0, 1000, 64 << 20)).unwrap();
    assert_eq!(batch.records.len(), 200, "one call reads every record of the queue");
    for (i, r) in batch.records.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.view().body, &body(0, i as u64, 300 + (i * 37) % 1500)[..]);
    }
    // A window from the middle, bounded by bytes, starts and ends at record boundaries.
    let window = block_on(engine.read("a", 50, 20, 8 << 10)).unwrap();
    assert!(!window.records.is_empty() && window.records.len() < 20);
    assert_eq!(window.records[0].offset, 50);
    assert_eq!(window.next_offset, 50 + window.records.len() as u64);
    engine.close().unwrap();
}

fn tail_cache_counts(engine: &sluice_engine::Engine) -> (u64, u64, u64) {
    let stats = block_on(engine.stats()).unwrap();
    stats
        .iter()
        .fold((0, 0, 0), |(h, m, b), s| (h + s.tail_cache_hits, m + s.tail_cache_misses, b + s.tail_cache_bytes))
}

/// Records read right after their append come from the tail cache, byte for byte what the disk
/// holds; what fell out of the cache (or a restarted engine) is read from disk, and the cache
/// never holds more than it is given.
#[test]
fn fresh_records_are_read_from_the_tail_cache_and_match_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.log_tail_cache_bytes = 512 << 10;
    let engine = open(&config);
    for i in 0..400u64 {
        block_on(engine.append(vec![record("fresh", i, 2000 + (i as usize * 37) % 3000)])).unwrap();
        if i % 50 == 49 {
            let batch = block_on(engine.read("fresh", i, 1, 1 << 20)).unwrap();
            assert_eq!(batch.records[0].view().body, &body(0, i, 2000 + (i as usize * 37) % 3000)[..]);
        }
    }
    let (hits, misses, held) = tail_cache_counts(&engine);
    assert_eq!((hits, misses), (8, 0), "each read of the newest record was a cache hit");
    assert!(held > 0 && held <= 512 << 10, "the cache holds {held} bytes, bounded by 512 KiB");
    // The whole queue: ~2 MiB written, so the oldest records come from disk, the newest from memory.
    let all = read_all(&engine, "fresh");
    let (hits_after, misses_after, _) = tail_cache_counts(&engine);
    assert!(misses_after > 0 && hits_after > hits, "both paths served: {hits_after} hits, {misses_after} misses");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.view().body, &body(0, i as u64, 2000 + (i * 37) % 3000)[..], "record {i}");
    }
    engine.close().unwrap();
    let engine = open(&config);
    let again = read_all(&engine, "fresh");
    assert_eq!(again.len(), 400);
    assert_eq!(tail_cache_counts(&engine).0, 0, "a restarted engine reads from disk");
    for (a, b) in all.iter().zip(&again) {
        assert_eq!(a.bytes, b.bytes);
    }
    engine.close().unwrap();
}

/// Retention deletes a segment the cache still holds batches of: reads below the new log start
/// are answered as retention dictates, never from the cache.
#[test]
fn retention_forgets_cached_batches_of_deleted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.io_memory_bytes = 64 << 20;
    config.log_tail_cache_bytes = 32 << 20;
    config.retention.max_log_bytes_per_shard = Some(2 * SEGMENT_SIZE_BYTES);
    config.retention.check_interval_ms = 3_600_000;
    let engine = open(&config);
    for i in 0..200u64 {
        block_on(engine.append(vec![record("r#0", i, 8000)])).unwrap();
    }
    let held_before = tail_cache_counts(&engine).2;
    assert!(block_on(engine.enforce_retention()).unwrap() > 0);
    assert!(tail_cache_counts(&engine).2 < held_before, "deleted segments' batches left the cache");
    let info = block_on(engine.queue_info("r#0")).unwrap().unwrap();
    let records = read_all(&engine, "r#0");
    assert_eq!(records.first().unwrap().offset, info.min_offset);
    for r in &records {
        assert_eq!(r.view().body, &body(0, r.offset, 8000)[..]);
    }
    engine.close().unwrap();
}

#[test]
fn batch_append_keeps_order_and_reads_respect_limits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&small_config(dir.path(), 1));
    let records: Vec<NewRecord> = (0..256).map(|i| record("q", i, 1000)).collect();
    let acks = block_on(engine.append(records)).unwrap();
    assert_eq!(acks.iter().map(|a| a.offsets[0]).collect::<Vec<_>>(), (0..256).collect::<Vec<_>>());
    assert!(acks.windows(2).all(|w| w[0].position < w[1].position), "positions increase");

    let batch = block_on(engine.read("q", 10, 5, 1 << 20)).unwrap();
    assert_eq!(batch.records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![10, 11, 12, 13, 14]);
    assert_eq!(batch.next_offset, 15);
    assert_eq!(batch.max_offset, 256);
    let small = block_on(engine.read("q", 0, 100, 2500)).unwrap();
    assert!(!small.records.is_empty() && small.records.len() <= 2, "byte limit bounds a read");
    let one = block_on(engine.read("q", 0, 100, 1)).unwrap();
    assert_eq!(one.records.len(), 1, "a read returns at least one record");
    let past_end = block_on(engine.read("q", 256, 10, 1 << 20)).unwrap();
    assert!(past_end.records.is_empty());
    assert_eq!(past_end.next_offset, 256);
}

#[test]
fn multi_dispatch_stores_one_copy_indexed_into_every_queue() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&small_config(dir.path(), 2));
    block_on(engine.append(vec![record("chat#1", 0, 10)])).unwrap();
    let mut r = NewRecord::new("chat#1", b"token stream chunk".to_vec());
    r.queues.push("chat#1/session-42".into());
    r.queues.push("chat#1/agent-7".into());
    let ack = block_on(engine.append(vec![r])).unwrap().remove(0);
    assert_eq!(ack.offsets, vec![1, 0, 0]);

    let parent = read_all(&engine, "chat#1");
    let session = read_all(&engine, "chat#1/session-42");
    let agent = read_all(&engine, "chat#1/agent-7");
    assert_eq!(parent.len(), 2);
    assert_eq!((session.len(), agent.len()), (1, 1));
    // The same stored bytes at the same log position, reached through three queues.
    assert_eq!(session[0].position, ack.position);
    assert_eq!(agent[0].position, ack.position);
    assert_eq!(parent[1].position, ack.position);
    assert_eq!(session[0].view().body, b"token stream chunk");
    let stats = block_on(engine.stats()).unwrap();
    assert_eq!(stats.iter().map(|s| s.records_appended).sum::<u64>(), 2, "stored once");

    let mut across = NewRecord::new("chat#1", b"x".to_vec());
    let other =
        (0..100).map(|i| format!("other#{i}")).find(|q| engine.shard_of(q) != engine.shard_of("chat#1")).unwrap();
    across.queues.push(other);
    let err = block_on(engine.append(vec![across])).unwrap_err();
    assert!(matches!(err, EngineError::DispatchAcrossShards { .. }), "{err}");
    assert_eq!(err.code(), 1016);
}

#[test]
fn lookups_by_message_id_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&small_config(dir.path(), 2));
    for i in 0..20u64 {
        let mut r = record(&format!("t#{}", i % 3), i, 100);
        r.keys = vec![format!("order-{}", i % 5), "all".into()];
        r.tag = "created".into();
        block_on(engine.append(vec![r])).unwrap();
    }
    let found = block_on(engine.by_message_id("t#1-7")).unwrap().expect("id found");
    assert_eq!(found.view().body, &body(0, 7, 100)[..]);
    assert_eq!(found.view().tag, "created");
    assert!(block_on(engine.by_message_id("nope")).unwrap().is_none());
    let by_key = block_on(engine.by_key("order-2", 100)).unwrap();
    let mut ids: Vec<String> = by_key.iter().map(|r| r.view().message_id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, vec!["t#0-12", "t#1-7", "t#2-17", "t#2-2"]);
    assert_eq!(block_on(engine.by_key("all", 5)).unwrap().len(), 5);
}

#[test]
fn restart_keeps_acked_records_offsets_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 2);
    let engine = open(&config);
    for i in 0..300u64 {
        block_on(engine.append(vec![record(&format!("q#{}", i % 3), i, 700)])).unwrap();
    }
    block_on(engine.commit_consumer_offset("group-a", "q#1", 42)).unwrap();
    block_on(engine.put_state("q#1", StateTable::PopState, b"receipt-1".to_vec(), b"invisible-until".to_vec()))
        .unwrap();
    block_on(engine.put_state("q#1", StateTable::Timer, b"t".to_vec(), b"1".to_vec())).unwrap();
    block_on(engine.delete_state("q#1", StateTable::Timer, b"t".to_vec())).unwrap();
    engine.close().unwrap();

    let engine = open(&config);
    for q in 0..3 {
        let records = read_all(&engine, &format!("q#{q}"));
        assert_eq!(records.len(), 100);
        for (n, record) in records.iter().enumerate() {
            let i = q + 3 * n as u64;
            assert_eq!(record.view().body, &body(0, i, 700)[..]);
        }
    }
    assert_eq!(block_on(engine.consumer_offset("group-a", "q#1")).unwrap(), Some(42));
    assert_eq!(block_on(engine.consumer_offset("group-b", "q#1")).unwrap(), None);
    let state = block_on(engine.state("q#1", StateTable::PopState, b"receipt-1".to_vec())).unwrap();
    assert_eq!(state.as_deref(), Some(&b"invisible-until"[..]));
    assert_eq!(block_on(engine.state("q#1", StateTable::Timer, b"t".to_vec())).unwrap(), None);
    // Appends continue where they stopped.
    let ack = block_on(engine.append(vec![record("q#0", 999, 10)])).unwrap();
    assert_eq!(ack[0].offsets, vec![100]);
}

#[test]
fn deleted_queue_loses_its_index_entries_and_can_be_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    for i in 0..10 {
        block_on(engine.append(vec![record("lite/abc", i, 50), record("keep", i, 50)])).unwrap();
    }
    block_on(engine.delete_queue("lite/abc")).unwrap();
    let err = block_on(engine.read("lite/abc", 0, 10, 1 << 20)).unwrap_err();
    assert!(matches!(err, EngineError::QueueNotFound(_)));
    assert_eq!(err.code(), 1015);
    block_on(engine.append(vec![record("lite/abc", 100, 50)])).unwrap();
    engine.close().unwrap();

    // After a restart the deletion still holds, whether or not the index is rebuilt.
    for rebuild in [false, true] {
        if rebuild {
            std::fs::remove_dir_all(config.shard_dir(0).join("index")).unwrap();
        }
        let engine = open(&config);
        let recreated = read_all(&engine, "lite/abc");
        assert_eq!(recreated.len(), 1, "rebuild={rebuild}");
        assert_eq!(recreated[0].view().body, &body(0, 100, 50)[..]);
        assert_eq!(read_all(&engine, "keep").len(), 10);
        engine.close().unwrap();
    }
}

#[test]
fn limits_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.queues_per_shard_max = 3;
    config.append_batch_records_max = 8;
    let engine = open(&config);

    let err = block_on(engine.append(vec![NewRecord::new("q", vec![0u8; 140 << 10])])).unwrap_err();
    assert!(matches!(err, EngineError::RecordTooLarge { max_bytes: 131072, .. }), "{err}");
    assert_eq!(err.code(), 1010);

    let err = block_on(engine.append((0..9).map(|i| record("q", i, 1)).collect())).unwrap_err();
    assert!(matches!(err, EngineError::BatchTooLarge { count: 9, max: 8 }), "{err}");

    block_on(engine.append(vec![record("a", 0, 1), record("b", 0, 1), record("c", 0, 1)])).unwrap();
    let err = block_on(engine.append(vec![record("d", 0, 1)])).unwrap_err();
    assert!(matches!(err, EngineError::TooManyQueues { max: 3, .. }), "{err}");

    let err = block_on(engine.append(vec![NewRecord::new("bad\nname", vec![1])])).unwrap_err();
    assert_eq!(err.code(), 1013);
    let mut twice = NewRecord::new("a", vec![1]);
    twice.queues.push("a".into());
    assert_eq!(block_on(engine.append(vec![twice])).unwrap_err().code(), 1012);
    // Nothing above was stored.
    assert_eq!(read_all(&engine, "a").len(), 1);
    assert!(sluice_engine::Engine::open({
        let mut bad = config.clone();
        bad.segment_size_bytes = 1000;
        bad
    })
    .is_err());
}

#[test]
fn retention_by_size_deletes_old_segments_and_their_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.retention.max_log_bytes_per_shard = Some(4 * SEGMENT_SIZE_BYTES);
    config.retention.check_interval_ms = 3_600_000; // run by hand below
    let engine = open(&config);
    for i in 0..200u64 {
        block_on(engine.append(vec![record("old#0", i, 8000)])).unwrap();
    }
    let before = segment_files(&config, 0).len();
    assert!(before > 5);
    let deleted = block_on(engine.enforce_retention()).unwrap();
    assert!(deleted > 0);
    assert!(segment_files(&config, 0).len() <= 4);
    let info = block_on(engine.queue_info("old#0")).unwrap().unwrap();
    assert!(info.min_offset > 0, "min offset advanced past deleted segments");
    let records = read_all(&engine, "old#0");
    assert_eq!(records.first().unwrap().offset, info.min_offset);
    assert_eq!(records.last().unwrap().offset, 199);
    for r in &records {
        assert_eq!(r.view().body, &body(0, r.offset, 8000)[..]);
    }
    let stale = block_on(engine.read("old#0", 0, 1, 1 << 20)).unwrap();
    assert_eq!(stale.records[0].offset, info.min_offset, "reads below the minimum start at it");
    engine.close().unwrap();
    let engine = open(&config);
    assert_eq!(read_all(&engine, "old#0").len(), records.len(), "retention survives a restart");
}

#[test]
fn async_durability_round_trip_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 2);
    config.durability = sluice_engine::Durability::Async { flush_interval_ms: 5 };
    let engine = open(&config);
    for i in 0..200u64 {
        block_on(engine.append(vec![record(&format!("a#{}", i % 2), i, 900)])).unwrap();
    }
    assert_eq!(read_all(&engine, "a#0").len(), 100, "acked records are readable at once");
    engine.close().unwrap();
    let engine = open(&config);
    let records = read_all(&engine, "a#1");
    assert_eq!(records.len(), 100);
    assert_eq!(records[99].view().body, &body(0, 199, 900)[..]);
}

/// The open flags of this process's descriptors for the segments in the log directory `dir`
/// (RocksDB's write-ahead logs, elsewhere, end in `.log` too), read from /proc/self/fdinfo.
fn segment_open_flags(dir: &std::path::Path) -> Vec<u32> {
    let mut flags = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let fd = entry.unwrap().file_name();
        let Ok(target) = std::fs::read_link(std::path::Path::new("/proc/self/fd").join(&fd)) else { continue };
        if target.parent() != Some(dir) || target.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(std::path::Path::new("/proc/self/fdinfo").join(&fd)) else { continue };
        let octal = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        flags.push(u32::from_str_radix(octal, 8).unwrap());
    }
    flags
}

/// Under `sync` durability the log's segments are open O_DSYNC (a write returns once durable,
/// and no fdatasync follows); under `async` they are not (writes are flushed every interval).
#[test]
fn sync_durability_opens_segments_o_dsync_and_async_does_not() {
    let o_dsync = rustix::fs::OFlags::DSYNC.bits();
    for (durability, want_dsync) in
        [(sluice_engine::Durability::Sync, true), (sluice_engine::Durability::Async { flush_interval_ms: 5 }, false)]
    {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small_config(dir.path(), 1);
        config.durability = durability;
        let engine = open(&config);
        // Enough to roll a segment: the new one is opened the same way.
        for i in 0..80u64 {
            block_on(engine.append(vec![record("flags#0", i, 8000)])).unwrap();
        }
        assert!(segment_files(&config, 0).len() > 1, "segments rolled");
        let flags = segment_open_flags(&config.shard_dir(0).join("log").canonicalize().unwrap());
        assert!(!flags.is_empty(), "the engine holds its segments open");
        for f in flags {
            assert_eq!(f & o_dsync != 0, want_dsync, "{durability:?}: flags {f:o}");
        }
        engine.close().unwrap();
    }
}

#[test]
fn retention_by_age_deletes_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.retention.max_age = Some(std::time::Duration::ZERO);
    config.retention.check_interval_ms = 3_600_000; // run by hand below
    let engine = open(&config);
    for i in 0..100u64 {
        block_on(engine.append(vec![record("aged#0", i, 8000)])).unwrap();
    }
    assert!(segment_files(&config, 0).len() > 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(block_on(engine.enforce_retention()).unwrap() > 0);
    assert_eq!(segment_files(&config, 0).len(), 1, "only the active segment is left");
    let info = block_on(engine.queue_info("aged#0")).unwrap().unwrap();
    let records = read_all(&engine, "aged#0");
    assert_eq!(records.len() as u64, 100 - info.min_offset);
    let ack = block_on(engine.append(vec![record("aged#0", 100, 10)])).unwrap();
    assert_eq!(ack[0].offsets, vec![100], "offsets keep growing after retention");
}

#[test]
fn appends_beyond_the_inflight_budget_wait_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.append_inflight_max_bytes = 200 << 10;
    let engine = open(&config);
    // 64 concurrent appends of ~100 KiB: far more than the 200 KiB budget at once.
    let calls = (0..64u64).map(|i| engine.append(vec![record("budget", i, 100 << 10)]));
    let acks = block_on(futures::future::join_all(calls));
    assert!(acks.iter().all(Result::is_ok));
    assert_eq!(read_all(&engine, "budget").len(), 64);
}
