#!/usr/bin/env bash
# The main job: a local broker + proxy (`sluice local`), then the send→receive latency benchmark
# through them at a fixed rate; the same with broker and proxy as separate processes (proxy→broker
# over RDMA when this host has a device, else TCP); then the transport's round-trip latency over
# the best transport present beside a raw TCP ping-pong. The storage engine's own benchmark is
# scripts/engine-bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/e2e-latency.sh both
exec bash scripts/transport-bench.sh
