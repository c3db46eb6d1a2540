#!/usr/bin/env bash
# Installs the system packages Sluice's build and tests need (Debian/Ubuntu).
# Safe to run more than once: apt-get skips what is already installed.
set -euo pipefail

packages=(
  build-essential pkg-config
  openssl curl                # the TLS tests make certificates and fetch over HTTPS (sluice/tests/system/tls.rs)
  clang libclang-dev          # bindgen, used by rocksdb and rdma-sys
  libibverbs-dev librdmacm-dev # RDMA verbs headers for rdma-sys
  # soft-RoCE: scripts/rdma-vm.sh (QEMU guest with Debian's kernel) and scripts/soft-roce.sh
  qemu-system-x86 busybox-static cpio kmod iproute2
  ibverbs-utils ibverbs-providers # ibv_devices, ibv_rc_pingpong; the rxe provider (a Recommends)
  python3 python3-venv        # the official RocketMQ Python client tests (scripts/python-client-tests.sh)
  nats-server redis-server    # the peers scripts/bench.sh measures Sluice against
  chromium                    # the browser test of lite-topic SSE (proxy/tests/python/test_sse.py)
  tmux                        # drives `sluice stats --watch` in a terminal (sluice/tests/system/watch.rs)
  libfaketime                 # steps the wall clock of broker and proxy (faults.sh clock_step)
  prometheus                  # runs the Grafana dashboard's queries (scripts/dashboard-snapshot.sh)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Node.js (18 or later) and npm for the official Node.js client tests; Debian's packages when the
# machine has none of its own.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  missing+=(nodejs npm)
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all system packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
