#!/usr/bin/env bash
# The Grafana dashboard against a real run: starts `sluice local` and a Prometheus (Debian's
# `prometheus` package) scraping its /metrics every second, runs a workload that moves every
# panel (sluice-bench at 1,000 msg/s; a topic with a keeping-up group, a group throttled by its
# receive quota that falls behind, and a group that never acks, so messages go to its DLQ),
# then runs every panel's query through Prometheus (scripts/dashboard_snapshot.py).
#
#   scripts/dashboard-snapshot.sh [--check] [--seconds N] [--png FILE]
#
# --check (CI) fails when a panel shows no data. Without it the panels are also drawn into
# docs/dashboard.png (matplotlib, installed into target/py-venv), the picture in the README.
# Grafana itself is not installed: this machine reaches no Grafana package source.
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"

check=false; seconds=75; png=docs/dashboard.png
while [[ $# -gt 0 ]]; do
  case "$1" in
    --check) check=true; shift ;;
    --seconds) seconds="$2"; shift 2
               [[ $seconds =~ ^[1-9][0-9]{1,3}$ ]] || { echo "--seconds is 10 to 9999" >&2; exit 2; } ;;
    --png) png="$2"; shift 2 ;;
    *) echo "usage: $0 [--check] [--seconds N] [--png FILE]" >&2; exit 2 ;;
  esac
done

command -v prometheus >/dev/null || { echo "dashboard: prometheus is missing; running scripts/setup.sh"; bash scripts/setup.sh; }
profile="${SLUICE_CARGO_PROFILE:-release}"
source scripts/build-once.sh
build_workspace "$profile"
sluice=target/$profile/sluice
bench=target/$profile/sluice-bench
python=python3
if ! $check; then
  [[ -x target/py-venv/bin/python ]] || python3 -m venv target/py-venv
  target/py-venv/bin/python -c 'import matplotlib' 2>/dev/null ||
    target/py-venv/bin/python -m pip install -q matplotlib==3.10.7
  python=target/py-venv/bin/python
fi

# The run exports no spans, whatever the environment says.
unset "${!OTEL_@}"

work="$(mktemp -d /tmp/sluice-dashboard.XXXXXX)"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
source scripts/ports.sh
wait_port() {
  local port=$1 name=$2 log=$3
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "dashboard: $name did not open port $port within 30 s; its log:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

grpc=$(free_port); http=$(free_port); prom=$(free_port)
"$sluice" local --data-dir "$work/data" --grpc "127.0.0.1:$grpc" --http "127.0.0.1:$http" --shards 2 \
  >"$work/sluice.log" 2>&1 &
pids+=($!)
wait_port "$grpc" "sluice local" "$work/sluice.log"
cat >"$work/prometheus.yml" <<EOF
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: sluice
    static_configs: [{ targets: ["127.0.0.1:$http"] }]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="127.0.0.1:$prom" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_port "$prom" prometheus "$work/prometheus.log"

endpoint=(--endpoint "127.0.0.1:$grpc")
"$sluice" topic create orders --type normal --queues 4 "${endpoint[@]}" >/dev/null
"$sluice" group create workers "${endpoint[@]}" >/dev/null
"$sluice" group create reporting --max-receive-tps 20 --throttle wait "${endpoint[@]}" >/dev/null
"$sluice" group create audit --max-delivery-attempts 1 "${endpoint[@]}" >/dev/null
start=$(date +%s)
echo "dashboard: ${seconds}s of load on sluice local (gRPC $grpc), Prometheus on $prom"
# orders: about 200 msg/s in batches, read by three groups.
(
  i=0
  while (( $(date +%s) < start + seconds )); do
    seq "$i" $(( i + 19 )) | sed 's/^/order /' |
      "$sluice" send --topic orders --key "batch-$i" "${endpoint[@]}" >/dev/null 2>>"$work/orders.log" ||
      echo "dashboard: a send to orders failed: $(tail -n 1 "$work/orders.log")" >&2
    i=$(( i + 20 )); sleep 0.1
  done
) & pids+=($!)
"$sluice" consume --topic orders --group workers --follow "${endpoint[@]}" >/dev/null 2>"$work/workers.log" & pids+=($!)
"$sluice" consume --topic orders --group reporting --follow "${endpoint[@]}" >/dev/null 2>"$work/reporting.log" & pids+=($!)
"$sluice" consume --topic orders --group audit --follow --no-ack --invisible-secs 1 "${endpoint[@]}" \
  >/dev/null 2>"$work/audit.log" & pids+=($!)
# The benchmark's own topics and group: latency-sized load on the gRPC path.
"$bench" run --name dashboard --rate 1000 --size-bytes 1024 --producers 2 --consumers 2 --topics 2 \
  --duration-secs "$(( seconds - 5 ))" --warmup-secs 2 --target "sluice-grpc=127.0.0.1:$grpc" \
  --out "$work/bench.json" >"$work/bench.log" 2>&1 || { tail -n 20 "$work/bench.log" >&2; exit 1; }
while (( $(date +%s) < start + seconds )); do sleep 1; done
sleep 3
end=$(date +%s)

args=(--prometheus "http://127.0.0.1:$prom" --start "$start" --end "$end" --step 2
      # Over TCP with no back-pressure: no RDMA completions and no credit waits to show.
      --may-be-empty "Credit waits /s, RDMA completions /s")
if ! $check; then
  mkdir -p "$(dirname "$png")"
  args+=(--png "$png" --caption "$(git rev-parse --short HEAD) · ${seconds}s: sluice-bench 1,000 msg/s + orders 200 msg/s to workers, reporting (20/s quota), audit (never acks)")
fi
"$python" scripts/dashboard_snapshot.py "${args[@]}"
