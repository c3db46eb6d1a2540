//! What recording metrics costs per message, with the real Prometheus recorder installed, beside
//! a baseline every message already pays in the same run: the CRC32C of a 1 KiB body.
//!
//! - `message_in`: the broker's per-message counters and size histogram (cached handles).
//! - `messages_out`: the proxy's delivery counters, once per receive (a mutex and a hash).
//! - `histogram_record`: one sample into a cached histogram (RPC latency, round trip, fsync).
//!
//! `cargo bench --profile ci -p sluice --bench metrics` (scripts/bench.sh measures the same
//! end to end with `--metrics-overhead`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use metrics_exporter_prometheus::PrometheusBuilder;

fn per_message(c: &mut Criterion) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder");
    // Upkeep drains histogram samples, as the sluice binary does every second.
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        handle.run_upkeep();
    });
    let body = vec![0x5a_u8; 1024];
    let shard = sluice_engine::metrics::ShardMetrics::new();
    let histogram = metrics::histogram!("bench_seconds");
    let mut group = c.benchmark_group("metrics_per_message");
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("baseline_crc32c_1KiB", |b| b.iter(|| crc32c::crc32c(black_box(&body))));
    group.bench_function("message_in", |b| b.iter(|| shard.message_in(black_box("orders#3"), 1, 1024)));
    group.bench_function("messages_out", |b| {
        b.iter(|| sluice_proxy::metrics::messages_out(black_box("orders"), black_box("billing"), 1, 1024))
    });
    group.bench_function("histogram_record", |b| b.iter(|| histogram.record(black_box(0.000_42))));
    group.finish();
}

criterion_group!(benches, per_message);
criterion_main!(benches);
