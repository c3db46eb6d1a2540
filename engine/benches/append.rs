//! Append throughput of one shard under policy `sync` (every ack after fdatasync), for 1 KiB and
//! 64 KiB records in append calls of 1, 16 and 256 records, from 16 appender tasks on the shard's
//! executor (as the broker's request handlers run) so group commit can batch. Beside each,
//! `raw_odirect` writes the same bytes with a plain sequential O_DIRECT write to the same disk in
//! the same run: the floor. `scripts/engine-bench.sh` turns the two into the ratio engine MB/s ÷
//! raw MB/s.
//!
//! `append_latency_1KiB` is the moderate-load case instead: one appender, one 1 KiB record per
//! call, each waiting for its fdatasync, on two engines in the same run: with the log zeroed
//! ahead of its end (the default) and without (`log_zero_ahead_bytes = 0`), where every sync
//! writes into preallocated, never-written blocks.
//!
//! Data goes under `SLUICE_BENCH_DIR` (default `target/bench-data`), on the disk being measured.
#![allow(unsafe_code)] // only in floor.rs: the raw io_uring write has to be unsafe

mod floor;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_engine::{Durability, Engine, EngineConfig, NewRecord};

/// The allocator the `sluice` binary runs with, so allocations cost what they cost in the broker.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APPENDERS: u64 = 16;
const SEGMENT_SIZE_BYTES: u64 = 256 << 20;

fn bench_dir() -> PathBuf {
    std::env::var_os("SLUICE_BENCH_DIR").map_or_else(|| PathBuf::from("../target/bench-data"), PathBuf::from)
}

fn open_engine(dir: &std::path::Path) -> Engine {
    open_engine_with(dir, |_| {})
}

fn open_engine_with(dir: &std::path::Path, adjust: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shard_count = 1;
    config.durability = Durability::Sync;
    config.segment_size_bytes = SEGMENT_SIZE_BYTES;
    config.retention.max_log_bytes_per_shard = Some(8 * SEGMENT_SIZE_BYTES);
    config.retention.check_interval_ms = 1000;
    // 16 appenders of 256 × 64 KiB offer 256 MiB, four times the in-flight budget: the rest
    // wait for room (as producers would retry) instead of being refused after the default 1 s.
    config.append_wait_max_ms = 60_000;
    adjust(&mut config);
    Engine::open(config).expect("open engine")
}

/// Runs `appends` append calls of `batch` records, spread over `APPENDERS` concurrent callers.
/// Each caller is a task on the shard's own executor calling `Shard::append`, as the broker's
/// request handlers are; each builds its batch there, as a handler builds it from a frame.
fn run_appends(engine: &Engine, appends: u64, batch: usize, record: &NewRecord) -> Duration {
    let record = record.clone();
    let started = Instant::now();
    let work = engine.on_shard(0, move |shard| {
        Box::pin(async move {
            let callers: Vec<_> = (0..APPENDERS)
                .map(|caller| {
                    let calls = appends / APPENDERS + u64::from(caller < appends % APPENDERS);
                    let (shard, record) = (shard.clone(), record.clone());
                    glommio::spawn_local(async move {
                        for _ in 0..calls {
                            shard.append(&vec![record.clone(); batch]).await?;
                        }
                        Ok::<_, sluice_engine::EngineError>(())
                    })
                })
                .collect();
            futures::future::try_join_all(callers).await.map(drop)
        })
    });
    futures::executor::block_on(work).expect("append");
    started.elapsed()
}

fn append_throughput(c: &mut Criterion) {
    let root = bench_dir();
    let _ = std::fs::remove_dir_all(&root);
    let engine = open_engine(&root.join("engine"));
    let mut floor = floor::RawFloor::new(root.join("floor"), SEGMENT_SIZE_BYTES).expect("raw floor");
    // Keep this thread off the shard's core (shard 0 is pinned to CPU 0).
    if let Some(last) = core_affinity::get_core_ids().and_then(|ids| ids.last().copied()) {
        core_affinity::set_for_current(last);
    }
    for record_bytes in [1usize << 10, 64 << 10] {
        let mut group = c.benchmark_group(format!("append_{}KiB", record_bytes >> 10));
        group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
        let record = NewRecord::new("bench#0", vec![0xabu8; record_bytes]);
        for batch in [1usize, 16, 256] {
            let bytes = (batch * record_bytes) as u64;
            group.throughput(Throughput::ElementsAndBytes { elements: batch as u64, bytes });
            group.bench_function(BenchmarkId::new("engine", batch), |b| {
                b.iter_custom(|iters| run_appends(&engine, iters, batch, &record))
            });
            group.bench_function(BenchmarkId::new("raw_odirect", batch), |b| {
                b.iter_custom(|iters| floor.write(iters * bytes).expect("raw write"))
            });
        }
        group.finish();
    }
    engine.close().expect("close engine");
    let _ = std::fs::remove_dir_all(&root);
}

/// One appender, one 1 KiB record per call: each call's time is one group commit's latency.
fn append_latency(c: &mut Criterion) {
    let root = bench_dir().join("latency");
    let _ = std::fs::remove_dir_all(&root);
    let zeroing = open_engine(&root.join("zero-ahead"));
    let plain = open_engine_with(&root.join("no-zero-ahead"), |config| config.log_zero_ahead_bytes = 0);
    if let Some(last) = core_affinity::get_core_ids().and_then(|ids| ids.last().copied()) {
        core_affinity::set_for_current(last);
    }
    let record = NewRecord::new("bench#0", vec![0xabu8; 1 << 10]);
    let mut group = c.benchmark_group("append_latency_1KiB");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for (name, engine) in [("engine", &zeroing), ("engine_no_zero_ahead", &plain)] {
        group.bench_function(name, |b| {
            b.iter(|| futures::executor::block_on(engine.append(vec![record.clone()])).expect("append"))
        });
    }
    group.finish();
    zeroing.close().expect("close engine");
    plain.close().expect("close engine");
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, append_throughput, append_latency);
criterion_main!(benches);
