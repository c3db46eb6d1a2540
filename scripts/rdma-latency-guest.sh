#!/usr/bin/env bash
# Runs inside the soft-RoCE guest (scripts/rdma-vm.sh): for 64 B and 4 KiB, ibv_rc_pingpong's
# mean round trip and the transport's RDMA echo round trip, alternating, then their ratio.
# Only the ratio means anything: the guest's CPU is emulated.
#   rdma-latency-guest.sh BIN      (SLUICE_RDMA_BENCH_ITERS round trips per measurement, default 2000)
set -euo pipefail
bin="$1"
shift || true
dev="${SLUICE_RDMA_DEVICE:-rxe0}"
addr="${SLUICE_RDMA_SERVER_ADDR:-10.77.0.1}"
gid=$(bash "$(dirname "$0")/rxe-gid-index.sh" "$dev" "$addr")
iters="${SLUICE_RDMA_BENCH_ITERS:-2000}"
rounds=3
port=18515

# Mean µs per round trip from ibv_rc_pingpong ("N iters in S seconds = U usec/iter").
pingpong() {
  local size=$1 out
  ibv_rc_pingpong -d "$dev" -g "$gid" -s "$size" -n "$iters" -p "$port" >/tmp/pp-server.log 2>&1 &
  local server=$!
  for _ in $(seq 100); do
    if grep -q ":$(printf '%04X' "$port") " /proc/net/tcp /proc/net/tcp6 2>/dev/null; then break; fi
    sleep 0.1
  done
  out=$(timeout 300 ibv_rc_pingpong -d "$dev" -g "$gid" -s "$size" -n "$iters" -p "$port" "$addr" 2>&1)
  wait "$server" || true
  echo "$out" | awk '/usec\/iter/ {print $(NF-1)}'
}

declare -A pp_sum tr_sum
for round in $(seq "$rounds"); do
  for size in 64 4096; do
    pp=$(pingpong "$size")
    "$bin" --transport rdma --server "$addr:0" --sizes "$size" --iterations "$iters" --warmup 200 --rounds 1 \
      --json /tmp/tr.json >/tmp/tr.log 2>&1 || { cat /tmp/tr.log; exit 1; }
    tr=$(python3 -c 'import json;print(json.load(open("/tmp/tr.json"))[0]["mean_ns"]/1000)')
    echo "round $round size $size: ibv_rc_pingpong ${pp} µs/iter, transport rdma ${tr} µs mean"
    pp_sum[$size]=$(python3 -c "print(${pp_sum[$size]:-0} + $pp)")
    tr_sum[$size]=$(python3 -c "print(${tr_sum[$size]:-0} + $tr)")
  done
done
printf '\n%-6s %22s %22s %8s\n' size "ibv_rc_pingpong µs" "transport rdma µs" ratio
for size in 64 4096; do
  python3 -c "pp=${pp_sum[$size]}/$rounds; tr=${tr_sum[$size]}/$rounds; print(f'{$size:<6} {pp:>22.1f} {tr:>22.1f} {tr/pp:>8.2f}')"
done
