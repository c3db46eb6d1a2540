#!/usr/bin/env bash
# The test command: format check, build everything, lint with warnings denied, run every test,
# the official RocketMQ Python and Node.js clients against `sluice local`, the benchmark suite in
# short mode, the dashboard's queries through Prometheus, the lite-topic scale benchmark in short
# mode, the fault suite in short mode (scripts/faults.sh --short), then the RDMA tests for real
# inside a soft-RoCE QEMU guest (scripts/hw-tests.sh --vm).
# The crash test's rounds can be raised with SLUICE_CRASH_ROUNDS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
# One build for everything below: the `ci` profile (optimised, with debug assertions and
# overflow checks; see Cargo.toml), so RocksDB is compiled once.
export SLUICE_CARGO_PROFILE=ci
export SLUICE_BIN="$PWD/target/ci/sluice"
started=$(date +%s)
# Each step's wall time, printed at the end: CI has a time budget, and this shows where it goes.
phase_started=$started
phase_times=()
phase() {
  local now
  now=$(date +%s)
  phase_times+=("$1 $((now - phase_started))s")
  phase_started=$now
}
cargo fmt --all --check
phase fmt
# The whole workspace with every test target; RocksDB's C++ compiled once per checkout, whichever
# profile builds first (scripts/build-once.sh).
source scripts/build-once.sh
build_workspace ci
phase build
cargo clippy --workspace --all-targets --locked --profile ci -- -D warnings
phase clippy
# The cargo-fuzz target lives outside the workspace (libFuzzer instruments on nightly). What it
# runs, `sluice_transport::fuzzing`, is built and property-tested with the workspace; here its
# own Cargo.lock must still resolve the transport's dependencies without changes. (Compiling
# the 15-line wrapper would check its dependencies again, a minute of CI.)
cargo metadata --manifest-path transport/fuzz/Cargo.toml --locked --format-version 1 >/dev/null
phase fuzz-lock
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Four test threads on two cores: the system tests spend most of their time waiting on the
# processes they start (leases, TTLs, restarts), so four overlap that wait (measured on 2 cores:
# the system binary in 101 s instead of 172 s; six: 91 s).
cargo test --workspace --locked --profile ci -- --test-threads 4 2>&1 | tee "$log"
phase cargo-test
# The official RocketMQ 5 Python client (rocketmq-python-client==5.1.2 from PyPI, in a venv)
# against a `sluice local` each run starts itself.
bash scripts/python-client-tests.sh 2>&1 | tee -a "$log"
phase python-client
# The official RocketMQ 5 Node.js client (rocketmq-client-nodejs 1.0.8 from npm, pinned in
# proxy/tests/node/package-lock.json) against a `sluice local` of its own.
bash scripts/node-client-tests.sh 2>&1 | tee -a "$log"
phase node-client
# The benchmark suite in its short mode on every system (Sluice, NATS, Redis, the floors): a few
# seconds per workload, then sluice-bench checks the JSON results are valid and complete. It
# asserts no timings. Sync durability only, to keep CI within its time: the main job runs both
# levels, and the engine's tests cover async flushing.
bash scripts/bench.sh --short --durability sync 2>&1 | tee -a "$log"
phase bench-short
# The Grafana dashboard's queries through a real Prometheus scraping a real `sluice local`
# under load: every panel must show data.
bash scripts/dashboard-snapshot.sh --check --seconds 25 2>&1 | tee -a "$log"
phase dashboard
# The lite-topic scale benchmark, small (20,000 lite topics): it runs end to end against a
# broker and Redis; no timings are asserted.
bash scripts/lite-bench.sh --short 2>&1 | tee -a "$log"
phase lite-bench
# The fault suite, short: broker SIGKILLs, a full disk, proxy SIGKILLs, a cut network, a frozen
# broker and a restart storm, each under load through the proxy and checked for lost,
# duplicated, corrupt and out-of-order messages (the full suite: scripts/faults.sh).
bash scripts/faults.sh --short 2>&1 | tee -a "$log"
phase faults
# The RDMA path for real: the RDMA tests and hw-tests inside the soft-RoCE QEMU guest (or on
# this host if it has a device). SLUICE_SKIP_RDMA_VM=1 skips it for quick local runs.
# CI checks behaviour here, not speed: a quarter of the bulk transfer and of the latency probe's
# round trips (scripts/hw-tests.sh alone keeps the full sizes). Passed into the guest by name.
export SLUICE_HW_BULK_MIB=${SLUICE_HW_BULK_MIB:-64} SLUICE_HW_LATENCY_ROUND_TRIPS=${SLUICE_HW_LATENCY_ROUND_TRIPS:-5000}
export SLUICE_VM_PASS_ENV="${SLUICE_VM_PASS_ENV:-RUST_LOG RUST_BACKTRACE} SLUICE_HW_BULK_MIB SLUICE_HW_LATENCY_ROUND_TRIPS"
if [[ "${SLUICE_SKIP_RDMA_VM:-0}" == 1 ]]; then
  echo "test.sh: RDMA tests in the soft-RoCE guest SKIPPED (SLUICE_SKIP_RDMA_VM=1)"
elif compgen -G "/sys/class/infiniband/*" >/dev/null; then
  bash scripts/hw-tests.sh 2>&1 | tee -a "$log"
else
  bash scripts/hw-tests.sh --vm 2>&1 | tee -a "$log"
fi
phase rdma
# Rust's "test result:" lines and pytest's summary line ("N failed, N passed in Ns").
count() {
  grep -E '^test result:|^[0-9]+ (passed|failed).* in [0-9.]+s' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'
}
echo "test.sh: step times: ${phase_times[*]}"
echo "test.sh: finished in $(( $(date +%s) - started ))s"
echo "tests: $(count passed) passed, $(count failed) failed"
