//! Recovery: the index is rebuilt from the CommitLog, a torn tail is cut off, and corruption
//! anywhere else is a typed error naming its position, never skipped and never a panic.

use crate::common;

use common::*;
use sluice_engine::record::BATCH_HEADER_BYTES;
use sluice_engine::{EngineConfig, EngineError, NewRecord, StateTable};

const HEADER: u64 = BATCH_HEADER_BYTES as u64;

/// Deletes every shard's index and its clean-shutdown marker: the state after a crash that came
/// before the index covered the log's tail.
fn delete_indexes(config: &EngineConfig) {
    for shard in 0..config.shard_count {
        std::fs::remove_dir_all(config.shard_dir(shard).join("index")).unwrap();
        let _ = std::fs::remove_file(config.shard_dir(shard).join("clean-shutdown"));
    }
}

#[test]
fn deleted_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 2);
    let engine = open(&config);
    for i in 0..400u64 {
        let mut r = record(&format!("chat#{}", i % 4), i, 1500);
        r.queues.push(format!("chat#{}/s{}", i % 4, i % 3));
        r.keys = vec![format!("k{}", i % 10)];
        block_on(engine.append(vec![r])).unwrap();
    }
    block_on(engine.commit_consumer_offset("g", "chat#2", 17)).unwrap();
    block_on(engine.put_state("chat#2", StateTable::LiteMeta, b"sub".to_vec(), b"v".to_vec())).unwrap();
    let snapshot = |e: &sluice_engine::Engine| {
        let mut out = Vec::new();
        for q in 0..4 {
            for child in ["", "/s0", "/s1", "/s2"] {
                let name = format!("chat#{q}{child}");
                out.push((name.clone(), read_all(e, &name).iter().map(|r| (r.offset, r.position)).collect::<Vec<_>>()));
            }
        }
        out
    };
    let before = snapshot(&engine);
    engine.close().unwrap();

    delete_indexes(&config);
    let engine = open(&config);
    let stats = block_on(engine.stats()).unwrap();
    assert!(stats.iter().all(|s| s.recovery.as_ref().unwrap().batches_replayed > 0), "replayed on every shard");
    assert_eq!(snapshot(&engine), before, "queues rebuilt identically");
    assert_eq!(block_on(engine.consumer_offset("g", "chat#2")).unwrap(), Some(17));
    assert_eq!(
        block_on(engine.state("chat#2", StateTable::LiteMeta, b"sub".to_vec())).unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(block_on(engine.by_key("k3", 1000)).unwrap().len(), 40);
    assert!(block_on(engine.by_message_id("chat#1-9")).unwrap().is_some());
    // New appends continue the rebuilt offsets.
    let ack = block_on(engine.append(vec![record("chat#0", 1000, 10)])).unwrap();
    assert_eq!(ack[0].offsets, vec![100]);
    engine.close().unwrap();

    // The rebuild was persisted: the next start replays nothing.
    let engine = open(&config);
    let stats = block_on(engine.stats()).unwrap();
    assert!(stats.iter().all(|s| s.recovery.as_ref().unwrap().batches_replayed == 0));
}

/// Ten small records, then one 8 KiB record whose batch is the last thing in the log.
/// The index is deleted, as if the process died before the index covered the tail.
fn log_with_big_last_batch(config: &EngineConfig) -> sluice_engine::AppendAck {
    let engine = open(config);
    for i in 0..10 {
        block_on(engine.append(vec![record("q", i, 100)])).unwrap();
    }
    let last = block_on(engine.append(vec![record("q", 10, 8192)])).unwrap().remove(0);
    engine.close().unwrap();
    delete_indexes(config);
    last
}

#[test]
fn torn_tail_is_cut_off_and_the_log_continues() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let last = log_with_big_last_batch(&config);
    // A torn write: one sector of the last batch never reached the disk.
    let (file, offset) = locate(&config, 0, last.position);
    let sector = (offset + 2048) / 512 * 512;
    patch_file(&file, sector, |b| b[..512].fill(0));

    let engine = open(&config);
    let report = block_on(engine.stats()).unwrap()[0].recovery.clone().unwrap();
    assert_eq!(report.truncated_tail.map(|t| t.0), Some(last.position - HEADER), "cut at the torn batch");
    let records = read_all(&engine, "q");
    assert_eq!(records.len(), 10, "everything before the torn batch survives");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.view().body, &body(0, i as u64, 100)[..]);
    }
    let ack = block_on(engine.append(vec![record("q", 11, 300)])).unwrap();
    assert_eq!(ack[0].offsets, vec![10]);
    engine.close().unwrap();
    delete_indexes(&config);
    let engine = open(&config);
    assert_eq!(read_all(&engine, "q").len(), 11, "the log after the cut is clean");
}

#[test]
fn torn_batch_header_leftovers_are_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let last = log_with_big_last_batch(&config);
    // The header never reached the disk but the record bytes after it did.
    let (file, offset) = locate(&config, 0, last.position - HEADER);
    patch_file(&file, offset, |b| b[..BATCH_HEADER_BYTES].fill(0));

    let engine = open(&config);
    assert_eq!(read_all(&engine, "q").len(), 10);
    // A short batch now lands on the old leftovers; they must have been zeroed, or the next
    // recovery would find garbage right after it.
    block_on(engine.append(vec![record("q", 11, 10)])).unwrap();
    engine.close().unwrap();
    delete_indexes(&config);
    let engine = open(&config);
    let records = read_all(&engine, "q");
    assert_eq!(records.len(), 11);
    assert_eq!(records[10].view().body, &body(0, 11, 10)[..]);
}

#[test]
fn flipped_byte_mid_log_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    let acks: Vec<_> =
        (0..20).map(|i| block_on(engine.append(vec![record("q", i, 1000)])).unwrap().remove(0)).collect();
    engine.close().unwrap();
    let victim = &acks[5];
    let (file, offset) = locate(&config, 0, victim.position);
    patch_file(&file, offset + 200, |b| b[0] ^= 0x10);

    // With the index intact, reading the record finds the damage.
    let engine = open(&config);
    assert_eq!(block_on(engine.read("q", 0, 5, 1 << 20)).unwrap().records.len(), 5, "records before it are fine");
    let err = block_on(engine.read("q", 5, 1, 1 << 20)).unwrap_err();
    assert_eq!(err.code(), 1020);
    assert!(matches!(err, EngineError::CorruptRecord { position, .. } if position == victim.position), "{err}");
    let after = block_on(engine.read("q", 6, 100, 1 << 20)).unwrap();
    assert_eq!(after.records.len(), 14, "records after it are still served");
    engine.close().unwrap();

    // Replaying the log over it refuses to start, naming segment and position.
    delete_indexes(&config);
    let err = sluice_engine::Engine::open(config.clone()).err().expect("open must fail");
    match &err {
        EngineError::CorruptRecord { segment, offset_in_segment, position, detail } => {
            assert_eq!(*position, victim.position - HEADER, "the damaged batch");
            assert_eq!(*offset_in_segment, offset - HEADER);
            assert!(segment.ends_with(".log"), "{segment}");
            assert!(detail.contains("CRC mismatch"), "{detail}");
        }
        other => panic!("expected CorruptRecord, got {other}"),
    }
    assert!(err.to_string().contains("truncate the log at this position"), "says what to do: {err}");
}

#[test]
fn corruption_in_the_last_batch_is_not_mistaken_for_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let last = log_with_big_last_batch(&config);
    // A single flipped bit leaves no unwritten sector behind: that is damage, not a torn write,
    // and cutting it off would silently drop an acked record.
    let (file, offset) = locate(&config, 0, last.position);
    patch_file(&file, offset + 4000, |b| b[0] ^= 1);
    let err = sluice_engine::Engine::open(config.clone()).err().expect("open must fail");
    assert!(matches!(err, EngineError::CorruptRecord { position, .. } if position == last.position - HEADER), "{err}");
}

#[test]
fn random_damage_never_panics_recovery() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SLUICE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config(dir.path(), 1);
        let engine = open(&config);
        for i in 0..30 {
            let records: Vec<NewRecord> =
                (0..rng.random_range(1..4)).map(|j| record("q", i * 10 + j, rng.random_range(1..3000))).collect();
            block_on(engine.append(records)).unwrap();
        }
        engine.close().unwrap();
        delete_indexes(&config);
        let file = &segment_files(&config, 0)[0];
        let len = std::fs::metadata(file).unwrap().len();
        for _ in 0..rng.random_range(1..20) {
            let at = rng.random_range(0..len.min(200_000));
            let value: u8 = rng.random();
            patch_file(file, at, |b| b[0] = value);
        }
        // Either it opens (damage was benign or a torn tail) and every record read is intact,
        // or it reports a typed error. It must not panic.
        match sluice_engine::Engine::open(config.clone()) {
            Ok(engine) => {
                let mut from = 0;
                while let Ok(batch) = block_on(engine.read("q", from, 10, 1 << 20)) {
                    if batch.records.is_empty() {
                        break;
                    }
                    from = batch.next_offset;
                }
            }
            Err(err) => assert!([1020, 1003].contains(&err.code()), "unexpected error {err}"),
        }
    }
}

#[test]
fn index_ahead_of_the_log_is_discarded_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    let acks: Vec<_> = (0..12).map(|i| block_on(engine.append(vec![record("q", i, 500)])).unwrap().remove(0)).collect();
    engine.close().unwrap();
    // As after a power loss under `async`: the index was flushed, but the last two batches never
    // reached the disk.
    let (file, offset) = locate(&config, 0, acks[10].position - HEADER);
    patch_file(&file, offset, |b| b[..2 * (500 + 200)].fill(0));
    let _ = std::fs::remove_file(config.shard_dir(0).join("clean-shutdown"));

    let engine = open(&config);
    let records = read_all(&engine, "q");
    assert_eq!(records.len(), 10, "the index no longer claims the lost records");
    assert_eq!(block_on(engine.append(vec![record("q", 99, 10)])).unwrap()[0].offsets, vec![10]);
}

#[test]
fn zeroed_region_inside_durable_log_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    let acks: Vec<_> = (0..20).map(|i| block_on(engine.append(vec![record("q", i, 700)])).unwrap().remove(0)).collect();
    engine.close().unwrap();
    delete_indexes(&config);
    // A whole batch in the middle reads as zeros; later batches prove it had been durable.
    let (file, offset) = locate(&config, 0, acks[7].position - HEADER);
    patch_file(&file, offset, |b| b[..HEADER as usize + 600].fill(0));
    let err = sluice_engine::Engine::open(config.clone()).err().expect("open must fail");
    assert!(
        matches!(err, EngineError::CorruptRecord { position, .. } if position == acks[7].position - HEADER),
        "{err}"
    );
}

#[test]
fn after_a_clean_shutdown_a_damaged_last_batch_is_corruption_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    let engine = open(&config);
    for i in 0..10 {
        block_on(engine.append(vec![record("q", i, 100)])).unwrap();
    }
    let last = block_on(engine.append(vec![record("q", 10, 8192)])).unwrap().remove(0);
    engine.close().unwrap();
    // The index goes (forcing a replay) but the clean-shutdown marker stays: nothing can be torn.
    std::fs::remove_dir_all(config.shard_dir(0).join("index")).unwrap();
    let (file, offset) = locate(&config, 0, last.position);
    patch_file(&file, (offset + 2048) / 512 * 512, |b| b[..512].fill(0));
    let err = sluice_engine::Engine::open(config.clone()).err().expect("open must fail");
    assert!(matches!(err, EngineError::CorruptRecord { position, .. } if position == last.position - HEADER), "{err}");
}

#[test]
fn index_ahead_of_a_log_trimmed_by_retention_is_refused_not_silently_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.retention.max_log_bytes_per_shard = Some(2 * SEGMENT_SIZE_BYTES);
    config.retention.check_interval_ms = 3_600_000;
    let engine = open(&config);
    let mut last = None;
    for i in 0..120u64 {
        if i == 100 {
            block_on(engine.commit_consumer_offset("g", "r#0", 50)).unwrap();
        }
        last = Some(block_on(engine.append(vec![record("r#0", i, 8000)])).unwrap().remove(0));
    }
    assert!(block_on(engine.enforce_retention()).unwrap() > 0);
    engine.close().unwrap();
    let last = last.unwrap();
    // The checkpoint's last batch is lost, as after a power loss under `async`.
    let (file, offset) = locate(&config, 0, last.position);
    patch_file(&file, offset, |b| b[..4096].fill(0));
    let _ = std::fs::remove_file(config.shard_dir(0).join("clean-shutdown"));
    let err = sluice_engine::Engine::open(config.clone()).err().expect("open must refuse");
    assert_eq!(err.code(), 1003, "{err}");
    assert!(err.to_string().contains("delete"), "says what to do: {err}");
}
