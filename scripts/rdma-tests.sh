#!/usr/bin/env bash
# Runs the RDMA path for real: builds the RDMA tests, the hw-tests and the latency benchmark
# (release: the guest's CPU is emulated) and runs them inside the soft-RoCE QEMU guest
# (scripts/rdma-vm.sh), or directly when this host has an RDMA device. In the guest a
# missing device fails the tests instead of skipping them (SLUICE_IN_RDMA_VM=1).
#   scripts/rdma-tests.sh            # guest unless this host has a device
#   SLUICE_RDMA_BENCH_ITERS=0 ...    # skip the latency comparison
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"

# Test binaries that exercise RDMA: cargo prints each executable as JSON.
mapfile -t binaries < <(
  cargo test --release --locked -p sluice-transport -p sluice-hw-tests --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
wanted = {"rdma_link", "rdma_rpc"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if t["name"] in wanted or m["package_id"].find("hw-tests") >= 0 or "sluice-hw-tests" in m["package_id"]:
        print(m["executable"])
')
if (( ${#binaries[@]} < 3 )); then
  echo "rdma-tests: expected the rdma_link, rdma_rpc and hw-tests binaries, found: ${binaries[*]:-none}" >&2
  exit 1
fi
cargo build --release --locked -p sluice-bench --bin transport-latency
bench=target/release/transport-latency

if compgen -G "/sys/class/infiniband/*" >/dev/null; then
  echo "rdma-tests: RDMA device present on this host; running here"
  bash scripts/rdma-guest-tests.sh "$bench" "${binaries[@]}"
else
  echo "rdma-tests: no RDMA device on this host; running in the soft-RoCE guest"
  bash scripts/rdma-vm.sh --timeout 1200 -- bash scripts/rdma-guest-tests.sh "$bench" "${binaries[@]}"
fi
