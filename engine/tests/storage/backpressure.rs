//! Back-pressure: a shard at its free-space floor refuses new messages with a retryable
//! `DiskFull` while control records (offsets, acks) still go in; a log roll that meets ENOSPC
//! waits for space instead of failing the shard; and a message that finds no room in the
//! in-flight budget of a stalled disk in time gets `ShardBusy` instead of waiting on. Nothing
//! acked is lost.

use crate::common;

use std::rc::Rc;
use std::time::Duration;

use common::{Faults, FaultyStore};
use sluice_engine::segment::DmaSegmentStore;
use sluice_engine::{Durability, EngineConfig, EngineError, NewRecord, Shard};
use sluice_transport::model::codes;

fn config(dir: &std::path::Path, disk_free_min_bytes: u64) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.shard_count = 1;
    config.pin_shards = false;
    config.segment_size_bytes = 256 << 10;
    config.record_size_max_bytes = 64 << 10;
    config.group_commit_max_bytes = 64 << 10;
    config.durability = Durability::Sync;
    config.disk_free_min_bytes = disk_free_min_bytes;
    config
}

async fn open_faulty(config: &EngineConfig) -> (Rc<Shard>, Faults) {
    let faults = Faults::default();
    let inner = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
    let store = FaultyStore { inner, faults: faults.clone() };
    (Shard::open(config.clone(), 0, Rc::new(store)).await.unwrap(), faults)
}

async fn open_real(config: &EngineConfig) -> Rc<Shard> {
    let store = DmaSegmentStore::new(config.shard_dir(0).join("log")).await.unwrap();
    Shard::open(config.clone(), 0, Rc::new(store)).await.unwrap()
}

async fn bodies(shard: &Shard, queue: &str) -> Vec<Vec<u8>> {
    let batch = shard.read(queue, 0, 1000, 64 << 20).await.unwrap();
    batch.records.iter().map(|r| r.view().body.to_vec()).collect()
}

fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::default().spawn(move || async move { f().await }).unwrap().join().unwrap();
}

#[test]
fn a_shard_at_its_free_space_floor_refuses_messages_but_keeps_control_records_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let accepted: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 3000]).collect();
        let shard = open_real(&config(&path, 0)).await;
        for body in &accepted {
            shard.append(&[NewRecord::new("jobs", body.clone())]).await.unwrap();
        }
        shard.close().await.unwrap();
        drop(shard);

        // A floor no disk can meet: every message append is refused, with the real free space.
        let floor = u64::MAX / 4;
        let shard = open_real(&config(&path, floor)).await;
        let err = shard.append(&[NewRecord::new("jobs", b"late".to_vec())]).await.unwrap_err();
        match &err {
            EngineError::DiskFull { shard: 0, free_bytes, needed_bytes } => {
                assert!(*free_bytes > 0 && *free_bytes < floor, "statvfs figure: {err}");
                assert!(*needed_bytes >= floor, "{err}");
            }
            other => panic!("expected DiskFull, got {other}"),
        }
        assert_eq!(err.code(), codes::DISK_FULL);
        let text = err.to_string();
        assert!(text.contains("Retry later") && text.contains("disk_free_min_bytes"), "{text}");
        let err = shard.append(&[NewRecord::new("new-queue", b"x".to_vec())]).await.unwrap_err();
        assert!(matches!(err, EngineError::DiskFull { .. }), "a new queue too: {err}");
        assert!(shard.queue_info("new-queue").unwrap().is_none(), "a refused append creates nothing");

        // Reads and control records (a consumer offset, as an ack writes) still work.
        assert_eq!(bodies(&shard, "jobs").await, accepted);
        shard.commit_consumer_offset("workers", "jobs", 7).await.unwrap();
        assert_eq!(shard.consumer_offset("workers", "jobs").await.unwrap(), Some(7));
        let stats = shard.stats();
        assert_eq!(stats.appends_refused_disk_full, 2, "{stats:?}");
        assert!(stats.disk_free_bytes > 0, "{stats:?}");
        shard.close().await.unwrap();
        drop(shard);

        // With room again, messages go in after everything accepted before.
        let shard = open_real(&config(&path, 1 << 20)).await;
        let ack = shard.append(&[NewRecord::new("jobs", b"later".to_vec())]).await.unwrap();
        assert_eq!(ack[0].offsets, vec![10]);
        assert_eq!(shard.consumer_offset("workers", "jobs").await.unwrap(), Some(7));
        assert_eq!(bodies(&shard, "jobs").await.len(), 11);
        shard.close().await.unwrap();
    });
}

#[test]
fn a_log_roll_that_meets_enospc_waits_for_space_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        // No floor: only the ENOSPC path is under test.
        let config = config(&path, 0);
        let (shard, faults) = open_faulty(&config).await;
        let (full, creations_refused) = (faults.full, faults.creations_refused);
        // 60 KiB records: the fifth one no longer fits the first 256 KiB segment.
        let body = |i: u8| vec![i; 60 << 10];
        for i in 0..4 {
            shard.append(&[NewRecord::new("jobs", body(i))]).await.unwrap();
        }
        full.set(true);
        let rolling = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.append(&[NewRecord::new("jobs", body(4))]).await })
        };
        let mut waited_ms = 0;
        while creations_refused.get() < 2 {
            glommio::timer::sleep(Duration::from_millis(10)).await;
            waited_ms += 10;
            assert!(waited_ms < 10_000, "the roll never retried its segment creation");
        }
        // The roll waits; the shard has not failed, and new messages get the retryable error.
        let err = shard.append(&[NewRecord::new("jobs", b"meanwhile".to_vec())]).await.unwrap_err();
        assert!(matches!(err, EngineError::DiskFull { .. }), "{err}");
        assert_eq!(bodies(&shard, "jobs").await.len(), 4, "reads go on while the roll waits");

        full.set(false);
        let ack = rolling.await.unwrap();
        assert_eq!(ack[0].offsets, vec![4], "the held append completes once space returns");
        let ack = shard.append(&[NewRecord::new("jobs", body(5))]).await.unwrap();
        assert_eq!(ack[0].offsets, vec![5], "messages are accepted again");
        shard.close().await.unwrap();
        drop(shard);

        let shard = open_real(&config).await;
        let expected: Vec<Vec<u8>> = (0..6).map(body).collect();
        assert_eq!(bodies(&shard, "jobs").await, expected, "everything acked survives a restart");
        shard.close().await.unwrap();
    });
}

#[test]
fn close_gives_up_a_roll_that_waits_for_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let config = config(&path, 0);
        let (shard, faults) = open_faulty(&config).await;
        let (full, creations_refused) = (faults.full, faults.creations_refused);
        let kept: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 60 << 10]).collect();
        for body in &kept {
            shard.append(&[NewRecord::new("jobs", body.clone())]).await.unwrap();
        }
        full.set(true);
        let rolling = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.append(&[NewRecord::new("jobs", vec![9; 60 << 10])]).await })
        };
        while creations_refused.get() == 0 {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        shard.close().await.unwrap();
        assert!(rolling.await.is_err(), "an append never written is not acked");
        drop(shard);

        let shard = open_real(&config).await;
        assert_eq!(bodies(&shard, "jobs").await, kept);
        shard.close().await.unwrap();
    });
}

#[test]
fn a_message_that_finds_no_room_behind_a_stalled_disk_in_time_gets_shard_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let mut config = config(&path, 0);
        config.append_inflight_max_bytes = 64 << 10;
        config.append_wait_max_ms = 50;
        let (shard, faults) = open_faulty(&config).await;
        let hold = faults.syncs_held;
        shard.append(&[NewRecord::new("jobs", b"before".to_vec())]).await.unwrap();

        hold.set(true);
        // Takes 40 KiB of the 64 KiB budget and stays unacked while the disk stalls.
        let stalled = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.append(&[NewRecord::new("jobs", vec![1; 40 << 10])]).await })
        };
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let err = shard.append(&[NewRecord::new("jobs", vec![2; 40 << 10])]).await.unwrap_err();
        match &err {
            EngineError::ShardBusy { shard: 0, inflight_max_bytes, waited_ms: 50 } => {
                assert_eq!(*inflight_max_bytes, 64 << 10)
            }
            other => panic!("expected ShardBusy, got {other}"),
        }
        assert_eq!(err.code(), codes::SHARD_BUSY);
        assert!(err.to_string().contains("Retry later"), "{err}");
        assert_eq!(shard.stats().appends_refused_busy, 1);

        hold.set(false);
        let ack = stalled.await.unwrap();
        assert_eq!(ack[0].offsets, vec![1], "the waiting append completes once the disk moves");
        let ack = shard.append(&[NewRecord::new("jobs", vec![3; 40 << 10])]).await.unwrap();
        assert_eq!(ack[0].offsets, vec![2], "the refused one took no offset");
        assert_eq!(bodies(&shard, "jobs").await.len(), 3);
        shard.close().await.unwrap();
    });
}
