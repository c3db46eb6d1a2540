//! Index lookup latency on one shard's RocksDB holding 1,000,000 queue entries over 1,000 queues:
//! a point lookup of one (queue, offset), a range of 16 entries, and a one-record read through
//! the engine handle (cross-thread hop, index lookup, O_DIRECT read, CRC check).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use sluice_engine::index::{Index, QueueEntry};
use sluice_engine::{Engine, EngineConfig, NewRecord};

const QUEUES: u64 = 1_000;
const ENTRIES_PER_QUEUE: u64 = 1_000;

fn index_lookups(c: &mut Criterion) {
    let root =
        std::env::var_os("SLUICE_BENCH_DIR").map_or_else(|| "../target/bench-data".into(), std::path::PathBuf::from);
    std::fs::create_dir_all(&root).unwrap();
    let dir = tempfile::tempdir_in(root).unwrap();
    let index = Index::open(&dir.path().join("index"), 64 << 20).unwrap();
    for q in 0..QUEUES {
        let mut batch = index.batch();
        for offset in 0..ENTRIES_PER_QUEUE {
            let entry = QueueEntry {
                offset,
                position: q * 1_000_000 + offset * 100,
                size_bytes: 100,
                message_type: 1,
                ..QueueEntry::default()
            };
            batch.put_entry(&format!("queue#{q}"), &entry);
        }
        index.write(batch).unwrap();
    }
    index.flush().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group("index");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("point_lookup", |b| {
        b.iter(|| {
            let q = rng.random_range(0..QUEUES);
            index.queue_entry(&format!("queue#{q}"), rng.random_range(0..ENTRIES_PER_QUEUE)).unwrap().unwrap()
        })
    });
    group.bench_function("range_16", |b| {
        b.iter(|| {
            let q = rng.random_range(0..QUEUES);
            let from = rng.random_range(0..ENTRIES_PER_QUEUE - 16);
            index.queue_range(&format!("queue#{q}"), from, from + 16).unwrap()
        })
    });
    group.finish();

    let mut config = EngineConfig::new(dir.path().join("engine"));
    config.shard_count = 1;
    let engine = Engine::open(config).unwrap();
    let records: Vec<NewRecord> =
        (0..4096).map(|i| NewRecord::new(format!("read#{}", i % 64), vec![1u8; 1024])).collect();
    futures::executor::block_on(engine.append(records)).unwrap();
    c.bench_function("engine/read_one_1KiB", |b| {
        b.iter(|| {
            let q = rng.random_range(0..64);
            let batch =
                futures::executor::block_on(engine.read(&format!("read#{q}"), rng.random_range(0..64), 1, 1 << 20))
                    .unwrap();
            assert_eq!(batch.records.len(), 1);
        })
    });
    engine.close().unwrap();
}

criterion_group!(benches, index_lookups);
criterion_main!(benches);
