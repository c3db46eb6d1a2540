#!/usr/bin/env bash
# Send→receive latency at a fixed rate through proxy and broker, with the RocketMQ v2 gRPC
# API (target/release/e2e-latency), in two deployments started here:
#   local  one `sluice local` process (broker + proxy, loopback TCP between them);
#   split  a `sluice broker` process and a `sluice proxy` process, proxy→broker over the
#          best transport present (auto: RDMA when this host has a device and the broker an
#          RDMA address, else TCP).
# Beside each, in the same run, a unary gRPC round trip to the same proxy is the floor.
#   scripts/e2e-latency.sh [local|split|both] [extra e2e-latency flags, e.g. --rate 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
mode="${1:-both}"
if [[ $# -gt 0 ]]; then shift; fi
case "$mode" in local|split|both) ;; *) echo "usage: $0 [local|split|both] [e2e-latency flags]" >&2; exit 2 ;; esac

cargo build --release --locked -p sluice-proxy --bin sluice -p sluice-bench --bin e2e-latency
sluice=target/release/sluice
bench=target/release/e2e-latency
work="$(mktemp -d /tmp/sluice-e2e.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p results

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 name=$2 log=$3
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$name did not open port $port within 30 s; its log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

run_local() {
  local grpc http
  grpc=$(free_port); http=$(free_port)
  "$sluice" local --data-dir "$work/local" --grpc "127.0.0.1:$grpc" --http "127.0.0.1:$http" \
    --segment-size-bytes 268435456 >"$work/local.log" 2>&1 &
  pids+=($!)
  wait_port "$grpc" "sluice local" "$work/local.log"
  echo "== local: one process, broker + proxy over loopback TCP =="
  "$bench" --endpoint "127.0.0.1:$grpc" --label local --json results/e2e-local.json "$@"
  stop_all
}

run_split() {
  local broker_port grpc transport rdma_line=""
  broker_port=$(free_port); grpc=$(free_port)
  # Shard i listens on port + i: leave room for the second shard.
  broker_port=$(( (broker_port / 2) * 2 ))
  transport=tcp
  if compgen -G "/sys/class/infiniband/*" >/dev/null; then
    transport=auto
    rdma_line="rdma_listen = \"${SLUICE_RDMA_ADDR:-127.0.0.1}:$(( broker_port + 100 ))\""
  fi
  cat >"$work/broker.toml" <<EOF
[broker]
name = "bench-broker"
listen = "127.0.0.1:$broker_port"
$rdma_line
data_dir = "$work/split"
segment_size_bytes = 268435456
EOF
  cat >"$work/proxy.toml" <<EOF
[proxy]
name = "bench-proxy"
grpc = "127.0.0.1:$grpc"
brokers = ["127.0.0.1:$broker_port"]
transport = "$transport"
EOF
  "$sluice" broker --config "$work/broker.toml" >"$work/broker.log" 2>&1 &
  pids+=($!)
  wait_port "$broker_port" "sluice broker" "$work/broker.log"
  "$sluice" proxy --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
  pids+=($!)
  wait_port "$grpc" "sluice proxy" "$work/proxy.log"
  echo "== split: broker and proxy as separate processes, proxy->broker over $transport =="
  "$bench" --endpoint "127.0.0.1:$grpc" --label "split-$transport" --json results/e2e-split.json "$@"
  stop_all
}

if [[ "$mode" == local || "$mode" == both ]]; then run_local "$@"; fi
if [[ "$mode" == split || "$mode" == both ]]; then run_split "$@"; fi
