#!/usr/bin/env bash
# Sets up soft-RoCE (the rdma_rxe driver) on a real host's network interface, so Sluice's RDMA
# transport and hw-tests can run on hosts without an RDMA NIC. Needs a kernel with rdma_rxe; on
# one without (like the build machine), it says so and points at scripts/rdma-vm.sh instead.
#   scripts/soft-roce.sh IFACE            add device rxe_IFACE on IFACE (no-op if IFACE has one)
#   scripts/soft-roce.sh --remove IFACE   delete the soft-RoCE device(s) on IFACE
# Exit: 0 done; 1 failed; 2 this kernel has no rdma_rxe; 64 usage error.
# Packages: iproute2 (rdma), kmod (modprobe), ibverbs-utils (ibv_devices); see scripts/setup.sh.
set -euo pipefail

EXIT_FAILED=1
EXIT_UNSUPPORTED=2
EXIT_USAGE=64
PORT_DEADLINE_SECS=10       # rdma link add -> port ACTIVE

usage() {
  echo "usage: $0 IFACE | $0 --remove IFACE" >&2
  exit "$EXIT_USAGE"
}
say() { echo "soft-roce: $*"; }
die() {
  echo "soft-roce: ERROR: $*" >&2
  exit "$EXIT_FAILED"
}

remove=""
case $# in
  1) [[ $1 != -* ]] || usage; iface=$1 ;;
  2) [[ $1 == --remove && $2 != -* ]] || usage; remove=1 iface=$2 ;;
  *) usage ;;
esac
dev="rxe_$iface"

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

# soft-RoCE devices currently bound to $iface, from `rdma link`: "link rxe_eth0/1 ... netdev eth0"
rxe_on_iface() {
  rdma link show 2>/dev/null | awk -v want="$iface" '
    { for (i = 1; i < NF; i++) if ($i == "netdev" && $(i + 1) == want) { split($2, a, "/"); print a[1] } }' \
    | sort -u
}

if [[ -n $remove ]]; then
  if [[ ! -d /sys/class/infiniband ]]; then
    say "no RDMA devices on this host; nothing to remove"
    exit 0
  fi
  command -v rdma >/dev/null || die "the rdma tool is missing (package iproute2)"
  found=$(rxe_on_iface)
  if [[ -z $found ]]; then
    say "no soft-RoCE device on $iface; nothing to remove"
    exit 0
  fi
  for d in $found; do
    $SUDO rdma link delete "$d" || die "rdma link delete $d failed"
    say "removed $d (was on $iface)"
  done
  exit 0
fi

# ---- does this kernel have rdma_rxe at all? ---------------------------------------------------
kver=$(uname -r)
# Loaded or built in shows under /sys/module; otherwise modprobe -n (dry run) must find it.
if [[ ! -d /sys/module/rdma_rxe ]] && ! modprobe -n rdma_rxe >/dev/null 2>&1; then
  echo "soft-roce: this kernel ($kver) has no rdma_rxe module: soft-RoCE is not available here;" \
    "use scripts/rdma-vm.sh to run the RDMA tests in a QEMU guest" >&2
  seen="modprobe -n rdma_rxe failed"
  [[ -d /lib/modules/$kver ]] || seen="$seen; /lib/modules/$kver is missing"
  [[ -d /sys/class/infiniband ]] || seen="$seen; /sys/class/infiniband is missing"
  echo "soft-roce: (checked: $seen)" >&2
  exit "$EXIT_UNSUPPORTED"
fi

for tool in rdma ibv_devices; do
  command -v "$tool" >/dev/null || die "$tool is missing; run scripts/setup.sh (iproute2, ibverbs-utils)"
done
ip link show dev "$iface" >/dev/null 2>&1 || die "no network interface named $iface (see: ip -br link)"

if [[ ! -d /sys/module/rdma_rxe ]]; then
  $SUDO modprobe rdma_rxe || die "modprobe rdma_rxe failed"
fi

existing=$(rxe_on_iface)
if [[ -n $existing ]]; then
  # Idempotent: a second run (or a device made by hand under another name) is fine.
  say "$iface already has soft-RoCE device(s): $(echo "$existing" | paste -sd ' ')"
  dev=$(echo "$existing" | head -n 1)
else
  $SUDO rdma link add "$dev" type rxe netdev "$iface" || die "rdma link add $dev type rxe netdev $iface failed"
  say "added $dev on $iface"
fi

# The port goes ACTIVE once the interface has carrier; wait briefly so callers can use it at once.
state=""
for ((i = 0; i < PORT_DEADLINE_SECS * 10; i++)); do
  state=$(cat "/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null || true)
  [[ $state == *ACTIVE* ]] && break
  sleep 0.1
done
[[ $state == *ACTIVE* ]] || echo "soft-roce: warning: $dev port is ${state:-missing}, not ACTIVE (is $iface up with carrier?)" >&2

rdma link show "$dev/1"
ibv_devices
addr=$(ip -4 -o addr show dev "$iface" | awk '{ split($4, a, "/"); print a[1]; exit }')
if [[ -n $addr ]]; then
  here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
  if gid=$(bash "$here/rxe-gid-index.sh" "$dev" "$addr" 2>/dev/null); then
    say "use: SLUICE_RDMA_DEVICE=$dev SLUICE_RDMA_SERVER_ADDR=$addr (GID index $gid for $addr)"
  fi
fi
