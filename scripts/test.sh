#!/usr/bin/env bash
# The test command: format check, build everything, lint with warnings denied, run every test.
# The crash test's rounds can be raised with SLUICE_CRASH_ROUNDS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
started=$(date +%s)
cargo fmt --all --check
cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
# The cargo-fuzz target lives outside the workspace (libFuzzer instruments on nightly); make
# sure it still builds against the decoder.
cargo check --manifest-path transport/fuzz/Cargo.toml --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
count() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "test.sh: finished in $(( $(date +%s) - started ))s"
echo "tests: $(count passed) passed, $(count failed) failed"
