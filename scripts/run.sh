#!/usr/bin/env bash
# The main job: the standard benchmark suite (scripts/bench.sh). It starts a Sluice broker and
# proxy (proxy→broker over RDMA when this host has a device, else TCP), NATS JetStream and
# Redis Streams on this machine at equal durability, runs bench/suites/standard.toml through
# sluice-bench, and prints the summary table with Sluice ÷ peer ratios. Flags go to bench.sh
# (e.g. --durability sync, --short).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/bench.sh "$@"
