#!/usr/bin/env bash
# Runs the RDMA tests against a real device, release builds: sluice-hw-tests (ping-pong, bulk
# transfer, latency probe; #[ignore]d in plain `cargo test`), transport's rdma_link driver tests
# and rdma_client_server (the request-response layer over RDMA).
#
#   scripts/hw-tests.sh                 build, then run on this host (an RDMA host)
#   scripts/hw-tests.sh --vm            build here, run inside the soft-RoCE QEMU guest (rdma-vm.sh)
#   scripts/hw-tests.sh --run BIN...    run already-built test binaries here (what --vm runs inside)
#
# Before the tests, where `ibv_rc_pingpong` exists, 64 B and 4 KiB RC ping-pongs on the same device
# give a baseline: on emulated or shared hosts only the latency probe's ratio to it means much.
# Without a device the tests print `skipped: no RDMA device` and pass; with SLUICE_IN_RDMA_VM=1
# (rdma-vm.sh sets it) a missing device fails them. Environment: SLUICE_RDMA_DEVICE (device to use),
# SLUICE_RDMA_SERVER_ADDR (address to bind/connect, default 127.0.0.1), SLUICE_HW_BULK_MIB,
# SLUICE_HW_LATENCY_ROUND_TRIPS. Exits non-zero if any test binary fails.
set -euo pipefail

VM_TIMEOUT_SECS=1500            # boot + all tests under software emulation
PINGPONG_ITERS=2000
PINGPONG_SIZES=(64 4096)
PINGPONG_PORT=18516
PINGPONG_TIMEOUT_SECS=120
LISTEN_DEADLINE_SECS=30

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
root=$(dirname "$here")
say() { echo "hw-tests: $*"; }

build() {
  export LIBCLANG_PATH=${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}
  say "building release test binaries (sluice-hw-tests; sluice-transport rdma_link, rdma_client_server)" >&2
  # The JSON lines name each built test executable; keep the ones we run.
  # SLUICE_CARGO_PROFILE=ci (the test command) reuses the tests' build: with its selection
  # (the whole workspace), since a `-p` one resolves features differently and recompiles.
  local profile=${SLUICE_CARGO_PROFILE:-release} packages=(-p sluice-hw-tests -p sluice-transport)
  [[ "$profile" == ci ]] && packages=(--workspace)
  (cd "$root" && cargo test --profile "$profile" --locked "${packages[@]}" --test rdma_hw --test rdma_link \
    --test rdma_client_server --no-run --message-format=json) |
    grep -o '"executable":"[^"]*/\(rdma_hw\|rdma_link\|rdma_client_server\)-[^"]*"' |
    sed 's/"executable":"\(.*\)"/\1/'
}
EXPECTED_BINARIES=3

# ibv_rc_pingpong server + client on the local device, for each size; prints its
# "N iters in S seconds = U usec/iter" line.
baseline() {
  local size
  for size in "${PINGPONG_SIZES[@]}"; do baseline_size "$size"; done
}

baseline_size() {
  command -v ibv_rc_pingpong >/dev/null || { say "baseline: ibv_rc_pingpong not installed (ibverbs-utils); skipped"; return 0; }
  local size=$1 dev=${SLUICE_RDMA_DEVICE:-} addr=${SLUICE_RDMA_SERVER_ADDR:-127.0.0.1} args gid
  [[ -n $dev ]] || dev=$(ibv_devices 2>/dev/null | awk 'NR > 2 { print $1; exit }' || true)
  [[ -n $dev ]] || { say "baseline: no RDMA device; skipped"; return 0; }
  args=(-d "$dev" -n "$PINGPONG_ITERS" -s "$size" -p "$PINGPONG_PORT")
  # RoCE needs a GID index (the IPv4-mapped RoCE v2 entry of the address); InfiniBand does not.
  if gid=$(bash "$here/rxe-gid-index.sh" "$dev" "$addr" 2>/dev/null); then args+=(-g "$gid"); fi
  local tmp server rc=0 i
  tmp=$(mktemp -d)
  timeout "$PINGPONG_TIMEOUT_SECS" ibv_rc_pingpong "${args[@]}" >"$tmp/server.log" 2>&1 &
  server=$!
  for ((i = 0; i < LISTEN_DEADLINE_SECS * 10; i++)); do
    grep -q ":$(printf '%04X' "$PINGPONG_PORT") " /proc/net/tcp /proc/net/tcp6 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  timeout "$PINGPONG_TIMEOUT_SECS" ibv_rc_pingpong "${args[@]}" "$addr" >"$tmp/client.log" 2>&1 || rc=$?
  wait "$server" || true
  if ((rc == 0)) && grep -q 'usec/iter' "$tmp/client.log"; then
    say "baseline ibv_rc_pingpong ${args[*]}: $(grep 'usec/iter' "$tmp/client.log")"
  else
    say "baseline ibv_rc_pingpong failed (status $rc):"
    sed 's/^/  /' "$tmp/client.log" "$tmp/server.log"
  fi
  rm -rf "$tmp"
}

run() {
  local failed=0 bin
  if command -v ibv_devices >/dev/null; then ibv_devices || true; fi
  baseline
  for bin in "$@"; do
    if [[ ! -x $bin ]]; then
      local hint=""
      [[ -n ${SLUICE_IN_RDMA_VM:-} ]] \
        && hint=" (the guest has its own /tmp and /run: keep the directory visible with rdma-vm.sh --keep DIR)"
      say "$bin: not found or not executable here$hint"
      failed=1
      continue
    fi
    say "running $(basename "$bin")"
    local started=$SECONDS
    # --include-ignored: the hw-tests are #[ignore]d in plain `cargo test`; rdma_link's are not.
    if "$bin" --include-ignored --test-threads=1 --nocapture; then
      say "$(basename "$bin"): passed in $((SECONDS - started)) s"
    else
      say "$(basename "$bin"): FAILED"
      failed=1
    fi
  done
  return "$failed"
}

case ${1:-} in
  --run)
    shift
    (($#)) || { echo "usage: $0 --run BIN..." >&2; exit 64; }
    run "$@"
    ;;
  --vm)
    mapfile -t bins < <(build)
    ((${#bins[@]} == EXPECTED_BINARIES)) || { say "expected $EXPECTED_BINARIES test binaries, got: ${bins[*]:-none}"; exit 1; }
    cd "$root"
    # The guest's /tmp and /run are its own: keep the build's profile directory (the test
    # binaries, and the binaries they start) visible there wherever CARGO_TARGET_DIR is.
    # Resolved, since a symlink under /tmp would not be there either.
    keep=() resolved=()
    for bin in "${bins[@]}"; do
      resolved+=("$(readlink -f "$bin")")
      keep+=(--keep "$(dirname "$(dirname "${resolved[-1]}")")")
    done
    exec bash "$here/rdma-vm.sh" --timeout "$VM_TIMEOUT_SECS" "${keep[@]}" -- bash "$here/hw-tests.sh" --run "${resolved[@]}"
    ;;
  "")
    mapfile -t bins < <(build)
    ((${#bins[@]} == EXPECTED_BINARIES)) || { say "expected $EXPECTED_BINARIES test binaries, got: ${bins[*]:-none}"; exit 1; }
    run "${bins[@]}"
    ;;
  *)
    echo "usage: $0 [--vm | --run BIN...]" >&2
    exit 64
    ;;
esac
