//! Zeroing the log ahead of its end (`log_zero_ahead_bytes`): the idle shard writes zeros past
//! the end, so later appends land on written blocks, and zeros never land on data, also when
//! appends arrive while a chunk of zeros is in flight.

use crate::common;

use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use sluice_engine::segment::DmaSegmentStore;
use sluice_engine::shard::Shard;
use sluice_engine::NewRecord;

const ZEROED_WAIT: Duration = Duration::from_secs(20);

fn zeroed_bytes(engine: &sluice_engine::Engine) -> u64 {
    block_on(engine.stats()).expect("stats").iter().map(|s| s.log_zeroed_bytes).sum()
}

fn wait_zeroed(engine: &sluice_engine::Engine, at_least: u64) -> u64 {
    let deadline = Instant::now() + ZEROED_WAIT;
    loop {
        let zeroed = zeroed_bytes(engine);
        if zeroed >= at_least || Instant::now() >= deadline {
            return zeroed;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first 4 KiB block of each extent of `path` still unwritten (preallocated, never
/// written), from `filefrag -v`; None where the tool or the file system cannot tell.
fn unwritten_extent_starts(path: &std::path::Path) -> Option<Vec<u64>> {
    let out = std::process::Command::new("filefrag").arg("-v").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.contains("logical_offset").then(|| {
        text.lines()
            .filter(|l| l.contains("unwritten"))
            .filter_map(|l| l.split(':').nth(1)?.split("..").next()?.trim().parse().ok())
            .collect()
    })
}

#[test]
fn an_idle_shard_zeroes_ahead_and_appends_never_lose_data_to_the_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.segment_size_bytes = 1 << 20;
    config.log_zero_ahead_bytes = 512 << 10;
    let engine = open(&config);
    block_on(engine.append(vec![record("q", 0, 100)])).unwrap();
    // Idle: half the distance at least, in chunks, right after the first append.
    let zeroed = wait_zeroed(&engine, 256 << 10);
    assert!(zeroed >= 256 << 10, "zeroed only {zeroed} bytes ahead while idle");
    let segment = segment_files(&config, 0).into_iter().next().expect("a segment");
    // Where the file system reports its extents (ext4, XFS; not tmpfs), the record's block and
    // the zeros after it are written extents now.
    if let Some(starts) = unwritten_extent_starts(&segment) {
        let zeroed_blocks = zeroed / 4096;
        assert!(starts.iter().all(|b| *b > zeroed_blocks), "unwritten extents at blocks {starts:?}");
        assert!(!starts.is_empty(), "the rest of the segment is still preallocated");
    }

    // Appends one at a time with idle gaps, so each comes while zeros may be in flight right
    // where it goes, across segment rolls; then a restart reads everything back from disk.
    let mut sent = vec![(0u64, 100usize)];
    for i in 1..600u64 {
        let len = 1 + ((i * 7919) % 6000) as usize;
        block_on(engine.append(vec![record("q", i, len)])).unwrap();
        sent.push((i, len));
        if i % 3 == 0 {
            std::thread::sleep(Duration::from_micros(300 + (i % 7) * 200));
        }
    }
    assert!(zeroed_bytes(&engine) > zeroed, "zeroing went on between the appends");
    assert!(segment_files(&config, 0).len() > 1, "the appends rolled segments");
    engine.close().unwrap();
    let engine = open(&config);
    let records = read_all(&engine, "q");
    assert_eq!(records.len(), sent.len(), "every record is back after the restart");
    for (record, (i, len)) in records.iter().zip(&sent) {
        assert_eq!(record.view().body, &body(0, *i, *len)[..], "record {i} intact");
    }
    engine.close().unwrap();
}

#[test]
fn zeroing_ahead_off_writes_no_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.log_zero_ahead_bytes = 0;
    let engine = open(&config);
    block_on(engine.append(vec![record("q", 0, 100)])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(zeroed_bytes(&engine), 0);
    engine.close().unwrap();
}

/// Zeros that reach the disk after a later append's data would wipe it: the append must wait
/// for the chunk in flight where it goes. The store starts every zero write 20 ms late, so
/// without that wait the appends right after each segment roll (where zeroing starts at the
/// log's end) land first and are then overwritten.
#[test]
fn an_append_into_a_chunk_being_zeroed_waits_for_the_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path(), 1);
    config.log_zero_ahead_bytes = 1 << 20;
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let faults = Faults::default();
            faults.zero_writes_late_ms.set(20);
            let inner = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
            let store = FaultyStore { inner, faults: faults.clone() };
            let shard = Shard::open(config.clone(), 0, Rc::new(store)).await.unwrap();
            let mut sent = Vec::new();
            for i in 0..200u64 {
                // Each append finds the committer idle, now and then with zeros in flight.
                glommio::timer::sleep(Duration::from_millis(5)).await;
                let body = body(1, i, 5000);
                shard.append(&[NewRecord::new("q", body.clone())]).await.unwrap();
                sent.push(body);
            }
            assert!(shard.stats().log_zeroed_bytes > 0, "zeros were written meanwhile");
            shard.close().await.unwrap();
            drop(shard);
            let inner = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
            let shard = Shard::open(config.clone(), 0, Rc::new(inner)).await.unwrap();
            assert!(segment_files(&config, 0).len() > 2, "the appends rolled segments");
            let read = shard.read("q", 0, 1000, 4 << 20).await.unwrap();
            let bodies: Vec<Vec<u8>> = read.records.iter().map(|r| r.view().body.to_vec()).collect();
            assert_eq!(bodies, sent, "every append is on disk, none overwritten by zeros");
            shard.close().await.unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
}
