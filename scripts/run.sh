#!/usr/bin/env bash
# The main job. Today Sluice is its storage engine, so this runs the engine benchmark: append
# throughput under `sync` durability beside a raw O_DIRECT write of the same bytes to the same
# disk, plus index lookup latency. (It grows into "local broker + proxy, then the latency
# benchmark over the best transport" as those parts land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/engine-bench.sh
