#!/usr/bin/env bash
# Runs inside the soft-RoCE guest (or on an RDMA host): every RDMA test binary with its
# ignored (hardware) tests included, one test at a time, then the latency comparison
# against ibv_rc_pingpong. Exits non-zero if any test fails.
#   rdma-guest-tests.sh BENCH_BINARY TEST_BINARY...
set -uo pipefail
bench="$1"
shift
status=0
for binary in "$@"; do
  echo "== $(basename "$binary")"
  if ! "$binary" --include-ignored --test-threads=1; then
    status=1
  fi
done
if [[ "${SLUICE_RDMA_BENCH_ITERS:-1000}" != 0 ]]; then
  echo "== latency: transport RDMA vs ibv_rc_pingpong (same guest, same run)"
  SLUICE_RDMA_BENCH_ITERS="${SLUICE_RDMA_BENCH_ITERS:-1000}" \
    bash "$(dirname "$0")/rdma-latency-guest.sh" "$bench" || status=1
fi
exit "$status"
