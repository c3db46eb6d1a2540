#!/usr/bin/env bash
# The standard benchmark suite: Sluice beside NATS JetStream and Redis Streams on this machine,
# at equal durability, with the raw-socket and transport ping-pongs as floors.
#
#   scripts/bench.sh [--short] [--durability sync|async|both] [--label TEXT] [--suite FILE]
#                    [--metrics-overhead | --aa] [--rounds N]
#   scripts/bench.sh --rdma-vm [--label TEXT]
#
# For each durability level it starts, in a scratch directory with free ports:
#   a `sluice broker` and a `sluice proxy` (proxy→broker over RDMA when this host has a device,
#   and then a second proxy over TCP for comparison), `redis-server` (AOF, appendfsync always
#   for sync, everysec for async), and `nats-server -js` (file storage), then runs
#   bench/suites/standard.toml through target/release/sluice-bench. Results go to results/
#   (<level>.json, report.html); the summary table with Sluice ÷ peer ratios is printed, and
#   for the saturation workloads (saturation-1k, saturation-64k) the highest rate each system
#   sustained with its CPU µs per message per server process (report.html plots p99 by rate).
# --short (CI) runs every workload for a few seconds (a saturation workload's first two steps)
#   and checks the JSON is valid and complete.
# --metrics-overhead adds a second broker and proxy with metrics off (`metrics = false`), as
#   the targets sluice-broker@nometrics and sluice-grpc@nometrics (run first in each
#   workload), to compare in the same run; bench/suites/metrics-overhead.toml is the short
#   suite for it. It ends with `sluice-bench overhead`: per workload, the median over rounds of
#   each figure's metrics-on ÷ metrics-off ratio.
# --aa is --metrics-overhead with metrics left on in the twin too (an A/A run): the same
#   table then shows how far two identical brokers and proxies differ on this machine, the
#   noise floor that any metrics on/off difference has to be read against.
# --rounds N runs each level's suite N times, the even rounds with the targets in reverse
#   order, so the order's own effect cancels in the medians (results/<level>-round<i>.json);
#   the summary and report show the first round.
# --rdma-vm builds here, then runs broker, proxies and sluice-bench inside the soft-RoCE guest
#   (scripts/rdma-vm.sh): bench/suites/rdma-vm.toml, sync durability, every Sluice target over
#   RDMA and its @tcp twin over TCP in the same guest, so the proxy→broker hop is measured both
#   ways (and `transport = "auto"` must really pick RDMA: the proxy's log is checked). Data lives
#   on the guest's 9p results share (its tmpfs has no O_DIRECT); the summary is printed and
#   kept in results/rdma-vm.txt. Only the RDMA ÷ TCP ratios mean anything: the CPU is emulated.
# SLUICE_RDMA_BUSY_POLL_US / SLUICE_RDMA_BUSY_POLL_MAX_US, when set, are the RDMA pollers'
#   busy-poll budget for the broker, the proxies and sluice-bench's transport clients
#   ([transport] rdma_busy_poll_us / rdma_busy_poll_max_us).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"

short=""; levels=(sync async); metrics_overhead=false; twin_metrics=false; rounds=1; label="$(hostname) $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
suite=bench/suites/standard.toml
rdma_vm=false; in_rdma_vm=false
RDMA_VM_TIMEOUT_SECS=1800       # boot + the rdma-vm suite under software emulation
RDMA_VM_SHARE=/run/sluice-out   # the guest's writable share (rdma-vm.sh's results share)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rdma-vm) rdma_vm=true; shift ;;
    --in-rdma-vm) in_rdma_vm=true; shift ;;
    --short) short="--short"; shift ;;
    --durability) case "$2" in sync|async) levels=("$2") ;; both) levels=(sync async) ;;
                    *) echo "--durability is sync, async or both" >&2; exit 2 ;; esac; shift 2 ;;
    --label) label="$2"; shift 2 ;;
    --suite) suite="$2"; shift 2 ;;
    --metrics-overhead) metrics_overhead=true; shift ;;
    --aa) metrics_overhead=true; twin_metrics=true; shift ;;
    --rounds) rounds="$2"; shift 2
              [[ $rounds =~ ^[1-9][0-9]?$ ]] || { echo "--rounds is a count from 1 to 99" >&2; exit 2; } ;;
    *) echo "usage: $0 [--short] [--durability sync|async|both] [--label TEXT] [--suite FILE] [--metrics-overhead | --aa] [--rounds N]" >&2
       exit 2 ;;
  esac
done

if $twin_metrics; then label+=" · A/A: the @nometrics twin has metrics on"; fi
if $rdma_vm; then
  profile="${SLUICE_CARGO_PROFILE:-release}"
  source scripts/build-once.sh
  build_workspace "$profile"
  mkdir -p results
  # The guest sees this checkout read-only at the same path; it writes to its share only.
  if [[ -n ${SLUICE_RDMA_BUSY_POLL_US:-}${SLUICE_RDMA_BUSY_POLL_MAX_US:-} ]]; then
    label+=" · RDMA busy-poll ${SLUICE_RDMA_BUSY_POLL_US:-default}..${SLUICE_RDMA_BUSY_POLL_MAX_US:-default} µs"
  fi
  SLUICE_CARGO_PROFILE=$profile \
    SLUICE_VM_PASS_ENV="SLUICE_CARGO_PROFILE RUST_LOG SLUICE_RDMA_BUSY_POLL_US SLUICE_RDMA_BUSY_POLL_MAX_US" \
    bash scripts/rdma-vm.sh --timeout "$RDMA_VM_TIMEOUT_SECS" -- \
    bash scripts/bench.sh --in-rdma-vm --label "$label · soft-RoCE guest" | tee results/rdma-vm.txt
  exit "${PIPESTATUS[0]}"
fi
results=results
if $in_rdma_vm; then
  [[ -d /sys/class/infiniband ]] || { echo "bench: --in-rdma-vm runs inside scripts/rdma-vm.sh's guest" >&2; exit 2; }
  suite=bench/suites/rdma-vm.toml; levels=(sync); results=$RDMA_VM_SHARE/results
fi
for tool in nats-server redis-server; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing; running scripts/setup.sh"; bash scripts/setup.sh; break; }
done
# SLUICE_CARGO_PROFILE=ci (the test command) reuses the tests' optimised build instead of
# compiling everything again for release.
profile="${SLUICE_CARGO_PROFILE:-release}"
source scripts/build-once.sh
$in_rdma_vm || build_workspace "$profile"
sluice=target/$profile/sluice
bench=target/$profile/sluice-bench

# In the guest: on the share, because the engine writes with O_DIRECT and tmpfs has none.
work="$(mktemp -d "$($in_rdma_vm && echo "$RDMA_VM_SHARE" || echo /tmp)/sluice-bench.XXXXXX")"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
mkdir -p "$results"

source scripts/ports.sh

wait_port() { # port name log [host]
  local port=$1 name=$2 log=$3 host=${4:-127.0.0.1}
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench: $name did not open port $port within 30 s; its log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

# The RDMA pollers' busy-poll budget, where asked for: the servers' [transport] and sluice-bench's.
transport_section=""; busy_poll_flags=()
if [[ -n ${SLUICE_RDMA_BUSY_POLL_US:-} || -n ${SLUICE_RDMA_BUSY_POLL_MAX_US:-} ]]; then
  transport_section="[transport]"
  if [[ -n ${SLUICE_RDMA_BUSY_POLL_US:-} ]]; then
    transport_section+=$'\n'"rdma_busy_poll_us = $SLUICE_RDMA_BUSY_POLL_US"
    busy_poll_flags+=(--rdma-busy-poll-us "$SLUICE_RDMA_BUSY_POLL_US")
  fi
  if [[ -n ${SLUICE_RDMA_BUSY_POLL_MAX_US:-} ]]; then
    transport_section+=$'\n'"rdma_busy_poll_max_us = $SLUICE_RDMA_BUSY_POLL_MAX_US"
    busy_poll_flags+=(--rdma-busy-poll-max-us "$SLUICE_RDMA_BUSY_POLL_MAX_US")
  fi
fi

rdma=false
if compgen -G "/sys/class/infiniband/*" >/dev/null; then rdma=true; fi
# The IPv4 address of the first RDMA device's network interface (or $SLUICE_RDMA_ADDR).
rdma_addr() {
  if [[ -n ${SLUICE_RDMA_ADDR:-} ]]; then echo "$SLUICE_RDMA_ADDR"; return; fi
  local netdev
  netdev=$(rdma link 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "netdev") { print $(i + 1); exit }}')
  ip -4 -o addr show dev "${netdev:?no RDMA link with a netdev; set SLUICE_RDMA_ADDR}" | awk '{split($4, a, "/"); print a[1]; exit}'
}
nats_version="$(nats-server --version | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1)"
nats_has_sync_interval() { [[ "$(printf '%s\n' 2.10.0 "$nats_version" | sort -V | head -n1)" == 2.10.0 ]]; }

run_level() {
  local level=$1 dir="$work/$1"
  mkdir -p "$dir"
  local broker_port grpc grpc_tcp redis_port nats_port flush_ms=1000
  broker_port=$(broker_port_span); grpc=$(free_port); redis_port=$(free_port); nats_port=$(free_port)
  local rdma_line="" transport=tcp host=127.0.0.1
  if $rdma; then
    # auto: the client meets the broker over TCP and moves to RDMA when the broker offers it,
    # at the address it reached the broker on: so the broker listens on the RDMA device's.
    transport=auto host=$(rdma_addr)
    # rdma_listen is not loopback, and sluice-bench talks to the broker without the transport
    # secret: the benchmark's private network is trusted.
    rdma_line="rdma_listen = \"$host:$(( broker_port + 100 ))\"
allow_unauthenticated_peers = true"
  fi
  start_broker() { # name port metrics rdma_line
    # Async: acked once written, flushed every second, like Redis appendfsync everysec.
    cat >"$dir/$1.toml" <<TOML
[broker]
name = "$1"
listen = "$host:$2"
$4
data_dir = "$dir/$1-data"
durability = "$level"
flush_interval_ms = $flush_ms
segment_size_bytes = 268435456
metrics = $3
metrics_listen = "127.0.0.1:0"
$transport_section
TOML
    "$sluice" broker --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
    pids+=($!)
    wait_port "$2" "sluice broker ($1)" "$dir/$1.log" "$host"
  }
  start_broker broker "$broker_port" true "$rdma_line"
  local broker_pid=${pids[-1]}
  start_proxy() { # name port transport [broker port] [metrics]
    cat >"$dir/$1.toml" <<TOML
[proxy]
name = "$1"
grpc = "127.0.0.1:$2"
brokers = ["$host:${4:-$broker_port}"]
transport = "$3"
metrics = ${5:-true}
$transport_section
TOML
    # The transport's choice (tcp or rdma, and why) is logged at info.
    SLUICE_LOG="${SLUICE_LOG:-warn},sluice_transport::client=info" \
      "$sluice" proxy --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
    pids+=($!)
    wait_port "$2" "sluice proxy ($3)" "$dir/$1.log"
  }
  start_proxy proxy "$grpc" "$transport"
  local proxy_pid=${pids[-1]}

  local fsync=always; [[ $level == async ]] && fsync=everysec
  mkdir -p "$dir/redis"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync "$fsync" \
    --dir "$dir/redis" --daemonize no --protected-mode no >"$dir/redis.log" 2>&1 &
  local redis_pid=$!; pids+=("$redis_pid")
  wait_port "$redis_port" redis-server "$dir/redis.log"

  mkdir -p "$dir/nats"
  if nats_has_sync_interval && [[ $level == sync ]]; then
    printf 'jetstream { store_dir: "%s", sync_interval: always }\n' "$dir/nats" >"$dir/nats.conf"
  else
    printf 'jetstream { store_dir: "%s" }\n' "$dir/nats" >"$dir/nats.conf"
  fi
  nats-server -c "$dir/nats.conf" -a 127.0.0.1 -p "$nats_port" >"$dir/nats.log" 2>&1 &
  local nats_pid=$!; pids+=("$nats_pid")
  wait_port "$nats_port" nats-server "$dir/nats.log"

  local targets=(
    --target raw-tcp
    --target "transport=$transport://$host:$broker_port"
    --target "sluice-broker=$transport://$host:$broker_port"
    --target "sluice-grpc=127.0.0.1:$grpc"
    --target "nats=nats://127.0.0.1:$nats_port"
    --target "redis=redis://127.0.0.1:$redis_port"
  )
  local kinds=raw-tcp,transport,sluice-broker,sluice-grpc,nats,redis
  local cpu=(--pid "broker=$broker_pid" --pid "proxy=$proxy_pid" --pid "nats=$nats_pid" --pid "redis=$redis_pid")
  if $rdma; then
    # RDMA against TCP for the proxy→broker hop, in the same run.
    grpc_tcp=$(free_port)
    start_proxy proxy-tcp "$grpc_tcp" tcp
    cpu+=(--pid "proxy@tcp=${pids[-1]}")
    targets+=(--target "sluice-grpc@tcp=127.0.0.1:$grpc_tcp"
              --target "sluice-broker@tcp=tcp://$host:$broker_port"
              --target "transport@tcp=tcp://$host:$broker_port")
  fi
  if $metrics_overhead; then
    local bare_broker_port bare_grpc
    bare_broker_port=$(broker_port_span); bare_grpc=$(free_port)
    local bare_rdma_line=""
    if $rdma; then bare_rdma_line="rdma_listen = \"$(rdma_addr):$(( bare_broker_port + 100 ))\"
allow_unauthenticated_peers = true"; fi
    start_broker broker-nometrics "$bare_broker_port" "$twin_metrics" "$bare_rdma_line"
    cpu+=(--pid "broker@nometrics=${pids[-1]}")
    start_proxy proxy-nometrics "$bare_grpc" "$transport" "$bare_broker_port" "$twin_metrics"
    cpu+=(--pid "proxy@nometrics=${pids[-1]}")
    # First, so the targets with metrics run later in each workload (the other order of
    # the standard run's): compare both to see the run order's own effect.
    targets=(--target "sluice-broker@nometrics=$transport://$host:$bare_broker_port"
             --target "sluice-grpc@nometrics=127.0.0.1:$bare_grpc" "${targets[@]}")
  fi
  echo "== bench: $level durability · sluice $level (async flushes every ${flush_ms} ms) · redis appendfsync $fsync · nats-server $nats_version =="
  local round out order
  for (( round = 1; round <= rounds; round++ )); do
    out="$results/$level.json"; order=("${targets[@]}")
    if (( round > 1 )); then
      out="$results/$level-round$round.json"
      echo "== round $round of $rounds =="
    fi
    if (( round % 2 == 0 )); then
      order=()
      for (( i = ${#targets[@]} - 2; i >= 0; i -= 2 )); do order+=("${targets[i]}" "${targets[i+1]}"); done
    fi
    "$bench" suite "$suite" "${order[@]}" "${cpu[@]}" "${busy_poll_flags[@]}" --durability "$level" $short \
      --label "$label" --out "$out"
    round_files+=("$out")
  done
  if [[ -n $short ]]; then
    "$bench" check "$results/$level.json" --suite "$suite" --kinds "$kinds"
  fi
  if $rdma; then
    # transport = "auto" must have moved the proxy onto RDMA, or the table compares TCP with TCP.
    local chose
    chose=$(grep -m1 -o 'transport: chose [a-z]* ([^)]*)' "$dir/proxy.log" || echo "no transport choice logged")
    echo "bench: proxy→broker with transport = \"auto\": $chose"
    [[ $chose == "transport: chose rdma"* ]] || { echo "bench: the proxy did not move to RDMA; its log:" >&2; tail -n 40 "$dir/proxy.log" >&2; exit 1; }
  fi
  stop_all
}

files=(); round_files=()
for level in "${levels[@]}"; do
  run_level "$level"
  files+=("$results/$level.json")
done
"$bench" report "${files[@]}" --out "$results/report.html"
echo
echo "== summary ($results/: ${files[*]}, report.html) =="
"$bench" summary "${files[@]}"
if $metrics_overhead; then
  echo
  echo "== metrics overhead (${round_files[*]}) =="
  if $twin_metrics; then echo "(--aa: the @nometrics twin ran with metrics on too, so every Δ here is noise)"; fi
  "$bench" overhead "${round_files[@]}"
fi
