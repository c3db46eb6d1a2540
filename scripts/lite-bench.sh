#!/usr/bin/env bash
# The lite-topic scale benchmark: a million lite topics on one broker, one message each, then a
# consumer subscribed to 100,000 of them while 10,000 msg/s are spread over them; Redis Streams
# (one stream per session, appendfsync always) runs the same workload in the same run.
#
#   scripts/lite-bench.sh [--short] [--lite-topics N] [--subscribed N] [--rate N]
#
# Starts a `sluice broker` (sync durability) and `redis-server` in a scratch directory, runs
# target/<profile>/lite-scale, prints both and their ratios; results/lite-scale.json.
# --short (CI) runs it small (20,000 lite topics, 5,000 subscribed, 2,000 msg/s, 3 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"

lite=1000000; subscribed=100000; rate=10000; duration=20; warmup=3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --short) lite=20000; subscribed=5000; rate=2000; duration=3; warmup=1; shift ;;
    --lite-topics) lite="$2"; shift 2 ;;
    --subscribed) subscribed="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --duration-secs) duration="$2"; shift 2 ;;
    *) echo "usage: $0 [--short] [--lite-topics N] [--subscribed N] [--rate N] [--duration-secs N]" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null || bash scripts/setup.sh
profile="${SLUICE_CARGO_PROFILE:-release}"
source scripts/build-once.sh
build_workspace "$profile"
sluice=target/$profile/sluice

work="$(mktemp -d /tmp/sluice-lite-bench.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
source scripts/ports.sh
wait_port() {
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "lite-bench: $2 did not open port $1 within 30 s; its log:" >&2
  tail -n 40 "$3" >&2
  exit 1
}

broker_port=$(broker_port_span); redis_port=$(free_port)
cat >"$work/broker.toml" <<TOML
[broker]
name = "lite-bench"
listen = "127.0.0.1:$broker_port"
data_dir = "$work/sluice"
durability = "sync"
segment_size_bytes = 268435456
metrics_listen = "127.0.0.1:0"
TOML
"$sluice" broker --config "$work/broker.toml" >"$work/broker.log" 2>&1 &
broker_pid=$!; pids+=("$broker_pid")
wait_port "$broker_port" "sluice broker" "$work/broker.log"
mkdir -p "$work/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
  --dir "$work/redis" --daemonize no --protected-mode no >"$work/redis.log" 2>&1 &
redis_pid=$!; pids+=("$redis_pid")
wait_port "$redis_port" redis-server "$work/redis.log"

echo "== lite-bench: sluice broker (sync) · redis-server $(redis-server --version | grep -oE 'v=[0-9.]+' | cut -c3-) (appendfsync always) =="
"target/$profile/lite-scale" --broker "127.0.0.1:$broker_port" --broker-pid "$broker_pid" --broker-data "$work/sluice" \
  --redis "127.0.0.1:$redis_port" --redis-pid "$redis_pid" --lite-topics "$lite" --subscribed "$subscribed" --rate "$rate" --duration-secs "$duration" --warmup-secs "$warmup" --out results/lite-scale.json
