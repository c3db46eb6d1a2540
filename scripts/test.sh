#!/usr/bin/env bash
# The test command: build everything, lint with warnings denied, run every test.
# The crash test's rounds can be raised with SLUICE_CRASH_ROUNDS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
cargo fmt --all --check
cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
