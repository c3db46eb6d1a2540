#!/usr/bin/env bash
# Transport round-trip latency (echo, 64 B and 4 KiB requests), each figure beside a baseline
# measured in the same run:
#   - on this host: the transport's TCP path against a raw TCP ping-pong (same runtimes, same
#     cores), p50/p99 and their ratio; plus RDMA when this host has a device;
#   - with --rdma-vm: inside the soft-RoCE QEMU guest, the transport's RDMA path against
#     ibv_rc_pingpong (ratio of mean round trips only: the guest is emulated).
#   scripts/transport-bench.sh [--rdma-vm] [extra transport-latency flags, e.g. --iterations 5000]
# SLUICE_CARGO_PROFILE picks the build profile (default release; `ci` reuses the test build).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
rdma_vm=0
if [[ "${1:-}" == "--rdma-vm" ]]; then
  rdma_vm=1
  shift
fi
profile="${SLUICE_CARGO_PROFILE:-release}"
# The whole workspace, as the main job builds it: a `-p` selection would compile RocksDB again.
source scripts/build-once.sh
build_workspace "$profile"
bin=target/$profile/transport-latency
mkdir -p results
echo "== TCP on this host: transport vs raw TCP ping-pong =="
"$bin" --transport tcp --json results/transport-tcp.json "$@"
if compgen -G "/sys/class/infiniband/*" >/dev/null; then
  addr="${SLUICE_RDMA_SERVER_ADDR:-127.0.0.1}"
  echo "== RDMA on this host ($(ls /sys/class/infiniband | tr '\n' ' ')) =="
  "$bin" --transport rdma --server "$addr:0" --json results/transport-rdma.json "$@"
fi
if (( rdma_vm )); then
  echo "== RDMA in the soft-RoCE guest: transport vs ibv_rc_pingpong =="
  bash scripts/rdma-vm.sh --timeout 900 -- bash scripts/rdma-latency-guest.sh "$bin"
fi
