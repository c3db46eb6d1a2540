#!/usr/bin/env bash
# Soft-RoCE self-test: proves the RDMA stack works end to end before the real RDMA tests run.
# Lists the device, then runs a real RC ping-pong (ibv_rc_pingpong, server + client on the same
# device) and prints the client's latency line. Meant to run inside the QEMU guest:
#   scripts/rdma-vm.sh -- bash scripts/rdma-guest-selftest.sh
# but works on any host with an RDMA device. Uses SLUICE_RDMA_DEVICE (default rxe0) and
# SLUICE_RDMA_SERVER_ADDR (default 10.77.0.1), which rdma-vm.sh sets. Exits non-zero on failure.
set -euo pipefail

DEVICE=${SLUICE_RDMA_DEVICE:-rxe0}
SERVER_ADDR=${SLUICE_RDMA_SERVER_ADDR:-10.77.0.1}
ITERS=2000
SIZE=64
TCP_PORT=18515              # ibv_rc_pingpong exchanges QP numbers over this TCP port
PINGPONG_TIMEOUT_SECS=120   # per side; TCG guests are slow but 2000 x 64 B takes well under 1 s
LISTEN_DEADLINE_SECS=30     # server start -> TCP port listening
GID_DEADLINE_SECS=10        # the GID table fills shortly after the address comes up

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
say() { echo "selftest: $*"; }
fail() {
  echo "selftest: FAILED: $*" >&2
  exit 1
}

say "ibv_devices"
ibv_devices
say "ibv_devinfo -d $DEVICE"
ibv_devinfo -d "$DEVICE" || fail "ibv_devinfo -d $DEVICE failed"

gid=""
for ((i = 0; i < GID_DEADLINE_SECS * 10; i++)); do
  gid=$(bash "$here/rxe-gid-index.sh" "$DEVICE" "$SERVER_ADDR" 2>/dev/null) && break
  sleep 0.1
done
[[ -n $gid ]] || gid=$(bash "$here/rxe-gid-index.sh" "$DEVICE" "$SERVER_ADDR") || fail "no GID for $SERVER_ADDR on $DEVICE"
say "GID index $gid ($(cat "/sys/class/infiniband/$DEVICE/ports/1/gids/$gid"), $(cat "/sys/class/infiniband/$DEVICE/ports/1/gid_attrs/types/$gid"))"

tmp=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -z $server_pid ]] || kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

args=(-d "$DEVICE" -g "$gid" -n "$ITERS" -s "$SIZE" -p "$TCP_PORT")
say "server: ibv_rc_pingpong ${args[*]}"
timeout "$PINGPONG_TIMEOUT_SECS" ibv_rc_pingpong "${args[@]}" >"$tmp/server.log" 2>&1 &
server_pid=$!

# Start the client only once the server listens, instead of sleeping a guessed time.
listening=""
for ((i = 0; i < LISTEN_DEADLINE_SECS * 10; i++)); do
  if [[ -n $(ss -Hltn "sport = :$TCP_PORT" 2>/dev/null) ]]; then
    listening=1
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z $listening ]]; then
  cat "$tmp/server.log" >&2
  fail "ibv_rc_pingpong server did not listen on TCP $TCP_PORT within ${LISTEN_DEADLINE_SECS}s"
fi

say "client: ibv_rc_pingpong ${args[*]} $SERVER_ADDR"
client_rc=0
timeout "$PINGPONG_TIMEOUT_SECS" ibv_rc_pingpong "${args[@]}" "$SERVER_ADDR" >"$tmp/client.log" 2>&1 || client_rc=$?
server_rc=0
wait "$server_pid" || server_rc=$?
server_pid=""

sed 's/^/  client| /' "$tmp/client.log"
sed 's/^/  server| /' "$tmp/server.log"
((client_rc == 0)) || fail "client exited with status $client_rc"
((server_rc == 0)) || fail "server exited with status $server_rc"
result=$(grep -E '^[0-9]+ iters in .* usec/iter' "$tmp/client.log") || fail "no 'iters in ... usec/iter' line from the client"
say "ping-pong OK: $result"
