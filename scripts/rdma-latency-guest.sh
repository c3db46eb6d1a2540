#!/usr/bin/env bash
# Runs inside the soft-RoCE guest (scripts/rdma-vm.sh): for 64 B and 4 KiB, ibv_rc_pingpong's
# mean round trip and the transport's RDMA echo round trip with each poll mode (pollers as tasks
# on the runtimes, the default; a poller thread per link), alternating, then their ratios.
# Only the ratios mean anything: the guest's CPU is emulated.
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
modes=(runtime thread)

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

# Mean µs per round trip of the transport's RDMA echo with poll mode $2.
transport() {
  local size=$1 mode=$2
  "$bin" --transport rdma --rdma-poll "$mode" --server "$addr:0" --sizes "$size" --iterations "$iters" \
    --warmup 200 --rounds 1 --json /tmp/tr.json >/tmp/tr.log 2>&1 || { cat /tmp/tr.log >&2; return 1; }
  python3 -c 'import json;print(json.load(open("/tmp/tr.json"))[0]["mean_ns"]/1000)'
}

declare -A sum
for round in $(seq "$rounds"); do
  for size in 64 4096; do
    pp=$(pingpong "$size")
    line="round $round size $size: ibv_rc_pingpong ${pp} µs/iter"
    sum[pp,$size]=$(python3 -c "print(${sum[pp,$size]:-0} + $pp)")
    for mode in "${modes[@]}"; do
      tr=$(transport "$size" "$mode")
      line+=", transport rdma ($mode) ${tr} µs mean"
      sum[$mode,$size]=$(python3 -c "print(${sum[$mode,$size]:-0} + $tr)")
    done
    echo "$line"
  done
done
printf '\n%-6s %20s %20s %8s %20s %8s\n' size "ibv_rc_pingpong µs" "rdma runtime µs" ratio "rdma thread µs" ratio
for size in 64 4096; do
  python3 -c "
pp=${sum[pp,$size]}/$rounds; rt=${sum[runtime,$size]}/$rounds; th=${sum[thread,$size]}/$rounds
print(f'{$size:<6} {pp:>20.1f} {rt:>20.1f} {rt/pp:>8.2f} {th:>20.1f} {th/pp:>8.2f}')"
done
