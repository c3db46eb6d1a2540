#!/usr/bin/env bash
# Prints the GID index to use for RoCE on DEVICE for a local IPv4 address: the entry whose GID is
# the IPv4-mapped address (::ffff:a.b.c.d) and whose type is "RoCE v2" (routable over UDP; the
# type rdma_rxe speaks). RDMA tools need it as `-g N` (ibv_rc_pingpong, perftest), and the index
# differs per host, so scripts look it up instead of hard-coding it.
#   scripts/rxe-gid-index.sh DEVICE IPV4 [PORT]      e.g. rxe0 10.77.0.1  ->  1
# Exit: 0 index printed on stdout; 1 no such GID (yet: the table fills when the address is up);
# 64 usage error. Falls back to a RoCE v1 entry with a note on stderr if no v2 entry matches.
set -euo pipefail

usage() {
  echo "usage: $0 DEVICE IPV4 [PORT]" >&2
  exit 64
}
[[ $# -eq 2 || $# -eq 3 ]] || usage
device=$1 ipv4=$2 port=${3:-1}
[[ $ipv4 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || usage
for octet in "${BASH_REMATCH[@]:1}"; do ((octet <= 255)) || usage; done

port_dir=/sys/class/infiniband/$device/ports/$port
if [[ ! -d $port_dir/gids ]]; then
  echo "rxe-gid-index: no RDMA device $device with port $port (no $port_dir)" >&2
  exit 1
fi

# sysfs spells GIDs as eight 16-bit hex groups: 0000:...:0000:ffff:0a4d:0001 for 10.77.0.1
want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' \
  "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}" "${BASH_REMATCH[4]}")

v1=""
while read -r idx; do
  [[ $(cat "$port_dir/gids/$idx" 2>/dev/null) == "$want" ]] || continue
  # unused entries make the type file fail with EINVAL; those never match $want anyway
  type=$(cat "$port_dir/gid_attrs/types/$idx" 2>/dev/null || true)
  case $type in
    "RoCE v2")
      echo "$idx"
      exit 0
      ;;
    *) [[ -n $v1 ]] || v1=$idx ;;
  esac
done < <(find "$port_dir/gids" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n)

if [[ -n $v1 ]]; then
  echo "rxe-gid-index: no RoCE v2 GID for $ipv4 on $device; using index $v1 (RoCE v1)" >&2
  echo "$v1"
  exit 0
fi
echo "rxe-gid-index: $device port $port has no GID for $ipv4 (is the address up on its netdev?)" >&2
exit 1
