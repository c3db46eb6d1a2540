#!/usr/bin/env bash
# Runs the engine's criterion benches and prints append throughput beside the raw O_DIRECT floor
# measured in the same run, with the ratio engine MB/s ÷ raw MB/s, and the latency of one appender's
# 1 KiB appends with the log zeroed ahead (the default) and without, from the same run.
#   scripts/engine-bench.sh            # append + index benches
#   SLUICE_BENCH_DIR=/mnt/nvme/x ...   # put the data on another disk
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_BENCH_DIR="${SLUICE_BENCH_DIR:-$PWD/target/bench-data}"
# RocksDB's C++ compiled once per checkout (scripts/build-once.sh). `cargo bench` builds into
# release/ with the release profile's settings, sharing the release build's artifacts, so it
# counts as the release build here.
source scripts/build-once.sh
rocksdb_once_link release
cargo bench -p sluice-engine --bench append -- --noplot
cargo bench -p sluice-engine --bench index -- --noplot
rocksdb_once_keep release
python3 - <<'PY'
# Summarise: MB/s = 10^6 bytes/s, from the same run's engine and raw_odirect estimates.
import json, pathlib
root = pathlib.Path("target/criterion")
def rate(group, name, batch):
    d = root / group / name / str(batch) / "new"
    est = json.loads((d / "estimates.json").read_text())
    # criterion's headline figure: the slope under linear sampling, else the mean
    mean_ns = (est.get("slope") or est["mean"])["point_estimate"]
    tp = json.loads((d / "benchmark.json").read_text())["throughput"]
    tp = tp.get("ElementsAndBytes") or tp
    secs = mean_ns / 1e9
    return tp["bytes"] / secs / 1e6, tp["elements"] / secs
print(f"\n{'record':>7} {'batch':>5} {'engine MB/s':>12} {'records/s':>11} {'raw MB/s':>9} {'ratio':>6}")
for group, label in [("append_1KiB", "1 KiB"), ("append_64KiB", "64 KiB")]:
    for batch in (1, 16, 256):
        try:
            mbs, rps = rate(group, "engine", batch)
            raw, _ = rate(group, "raw_odirect", batch)
        except FileNotFoundError:
            continue
        print(f"{label:>7} {batch:>5} {mbs:>12.1f} {rps:>11.0f} {raw:>9.1f} {mbs / raw:>6.2f}")
# One appender, one 1 KiB record per call: the log zeroed ahead (default) against not.
def mean_us(name):
    est = json.loads((root / "append_latency_1KiB" / name / "new" / "estimates.json").read_text())
    return (est.get("slope") or est["mean"])["point_estimate"] / 1e3
try:
    on, off = mean_us("engine"), mean_us("engine_no_zero_ahead")
    print(f"\nappend latency, 1 KiB, one appender: zero-ahead {on:.0f} µs, without {off:.0f} µs, ratio {on / off:.2f}")
except FileNotFoundError:
    pass
PY
