#!/usr/bin/env bash
# The main job. Today Sluice is its storage engine and its transport, so this runs the engine
# benchmark (append throughput under `sync` durability beside a raw O_DIRECT write of the same
# bytes to the same disk, plus index lookup latency), then the transport's round-trip latency
# over the best transport present (TCP beside a raw TCP ping-pong; RDMA too with a device).
# (It grows into "local broker + proxy, then the latency benchmark" as those parts land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/engine-bench.sh
exec bash scripts/transport-bench.sh
