#!/usr/bin/env bash
# Runs one command inside a QEMU guest that has a soft-RoCE device (rxe0), so the RDMA path can be
# tested for real on hosts whose own kernel has no InfiniBand support (this build machine, CI).
#
#   scripts/rdma-vm.sh [--timeout SECS] [--keep PATH]... -- CMD [ARGS...]
#
# The guest boots Debian's stock kernel (it has rdma_rxe) under software emulation (TCG; KVM hangs
# on these hosts). The host's `/` is the guest's root, read-only over 9p, so every host path is the
# same path inside: a test binary under target/ runs as it is. The guest has no network card; it
# makes a veth pair va (10.77.0.1/24) / vb (10.77.0.2/24) and puts rxe0 on va.
# CMD runs as root in the directory this script was started from, with a clean environment:
#   SLUICE_RDMA_DEVICE=rxe0 SLUICE_RDMA_SERVER_ADDR=10.77.0.1 SLUICE_IN_RDMA_VM=1 HOME=/tmp PATH
# (plus the host's values of the names in SLUICE_VM_PASS_ENV). The guest's /tmp and /run are
# tmpfs: the working directory, this script's directory and every --keep PATH (e.g. a
# CARGO_TARGET_DIR under /tmp) stay visible if they are under them; everything else is
# read-only. CMD's stdout and stderr are merged, in order, onto this
# script's stdout; rdma-vm's own messages go to stderr. The script exits with CMD's status,
# 124 if the run timed out, 125 if the VM itself failed (download, boot, rxe), 64 on usage errors.
#
# Environment:
#   SLUICE_VM_CACHE          kernel .deb + initramfs cache (default ~/.cache/sluice-rdma-vm)
#   SLUICE_VM_KERNEL_PKG     kernel package to use (default: what linux-image-amd64 depends on)
#   SLUICE_VM_KERNEL         boot this kernel image instead of the cached one (debugging only)
#   SLUICE_VM_BOOT_DEADLINE  seconds the guest has to boot (default 120)
#   SLUICE_VM_CONSOLE=1      also copy the guest's serial console to stderr
#   SLUICE_VM_PASS_ENV       host variables passed into the guest (default "RUST_LOG RUST_BACKTRACE")
#   SLUICE_VM_KEEP=1         keep the run directory (console log, output) even on success
set -euo pipefail

# ---- limits and fixed names -------------------------------------------------------------------
DEFAULT_TIMEOUT_SECS=900                                  # whole run: download + boot + CMD
BOOT_DEADLINE_SECS="${SLUICE_VM_BOOT_DEADLINE:-120}"      # qemu start -> "booted" marker
RXE_DEADLINE_SECS=30                                      # rdma link add -> port ACTIVE (guest)
KILL_GRACE_SECS=10                                        # after SIGTERM, qemu gets SIGKILL
DOWNLOAD_MAX_SECS=600                                     # apt-get download of the kernel
POLL_SECS=0.2
VM_MEM_MB=4096
VM_CPUS=2
NINEP_MSIZE=262144             # 9p's 8 KiB default makes reading binaries under TCG crawl
RXE_DEV=rxe0
VETH_A=va ADDR_A=10.77.0.1
VETH_B=vb ADDR_B=10.77.0.2
NET_PREFIX=24
GUEST_OUT=/run/sluice-out      # where the results share is mounted inside the guest
# Loaded in this order; each is expanded with its dependencies. crc32_generic: rxe cannot add a
# device without a crc32 implementation; ib_uverbs/rdma_ucm: /dev/infiniband for libibverbs/rdmacm.
MODULES=(crc32_generic virtio_pci 9pnet_virtio 9p veth rdma_rxe ib_uverbs rdma_ucm)

EXIT_USAGE=64
EXIT_VM_FAILED=125
EXIT_TIMEOUT=124

# ==== guest side (runs as PID 1 after switch_root, with the host's / as root) ====================
# Kept in this file so the guest code is versioned with the host code; reached via stage2.sh.
guest_stage2() {
  local out=$1 rc i state
  set +e
  export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  guest_fail() {
    echo "rdma-vm guest: $*" >/dev/console
    echo "$*" >"$out/error"
    sync
    echo o >/proc/sysrq-trigger
    sleep 60
  }
  # devtmpfs has device nodes only; udev would normally add these (bash's <(...) needs /dev/fd)
  mkdir -p /dev/shm /dev/pts
  mount -t tmpfs -o mode=1777 tmpfs /dev/shm
  mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
  ln -sfn /proc/self/fd /dev/fd
  ln -sf /proc/self/fd/0 /dev/stdin
  ln -sf /proc/self/fd/1 /dev/stdout
  ln -sf /proc/self/fd/2 /dev/stderr
  ip link set lo up || guest_fail "ip link set lo up failed"
  ip link add "$VETH_A" type veth peer name "$VETH_B" || guest_fail "could not create veth pair"
  ip addr add "$ADDR_A/$NET_PREFIX" dev "$VETH_A" || guest_fail "ip addr add on $VETH_A failed"
  ip addr add "$ADDR_B/$NET_PREFIX" dev "$VETH_B" || guest_fail "ip addr add on $VETH_B failed"
  ip link set "$VETH_A" up || guest_fail "could not bring $VETH_A up"
  ip link set "$VETH_B" up || guest_fail "could not bring $VETH_B up"
  rdma link add "$RXE_DEV" type rxe netdev "$VETH_A" 2>"$out/rdma-link.err" \
    || guest_fail "rdma link add $RXE_DEV failed: $(cat "$out/rdma-link.err")"
  # The port turns ACTIVE once the netdev has carrier; poll rather than sleep a guessed time.
  state=""
  for ((i = 0; i < RXE_DEADLINE_SECS * 10; i++)); do
    state=$(cat "/sys/class/infiniband/$RXE_DEV/ports/1/state" 2>/dev/null)
    [[ $state == *ACTIVE* ]] && break
    sleep 0.1
  done
  [[ $state == *ACTIVE* ]] || guest_fail "$RXE_DEV port not ACTIVE after ${RXE_DEADLINE_SECS}s (state: ${state:-none})"
  ibv_devices 2>&1 | grep -qw "$RXE_DEV" || guest_fail "ibv_devices does not list $RXE_DEV"
  cat /proc/uptime >"$out/ready"

  # Clean environment: only what run.sh exports. stdin is /dev/null; no tty exists here.
  env -i /bin/bash --noprofile --norc "$out/run.sh" >>"$out/output" 2>&1 </dev/null
  rc=$?
  echo "$rc" >"$out/status.tmp" && mv "$out/status.tmp" "$out/status"
  sync
  echo o >/proc/sysrq-trigger
  sleep 60
}

if [[ ${1:-} == --guest-stage2 ]]; then
  guest_stage2 "$2"
  exit 1 # not reached: the guest powers off
fi

# ==== host side ==================================================================================
usage() {
  echo "usage: $0 [--timeout SECS] [--keep PATH]... -- CMD [ARGS...]" >&2
  exit "$EXIT_USAGE"
}
say() { echo "rdma-vm: $*" >&2; }
die() {
  say "ERROR: $*"
  exit "$EXIT_VM_FAILED"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

timeout_secs=$DEFAULT_TIMEOUT_SECS
extra_keep=()
while (($#)); do
  case $1 in
    --keep)
      [[ -n ${2:-} ]] || usage
      [[ -d $2 ]] || die "--keep $2: not a directory (keep the directory that holds the files)"
      extra_keep+=("$(readlink -f "$2")")
      shift 2
      ;;
    --timeout)
      [[ ${2:-} =~ ^[0-9]+$ && $2 -gt 0 ]] || usage
      timeout_secs=$2
      shift 2
      ;;
    --timeout=*)
      timeout_secs=${1#--timeout=}
      [[ $timeout_secs =~ ^[0-9]+$ && $timeout_secs -gt 0 ]] || usage
      shift
      ;;
    --)
      shift
      break
      ;;
    -h | --help) usage ;;
    -*) usage ;;
    *) break ;;
  esac
done
(($#)) || usage
[[ $BOOT_DEADLINE_SECS =~ ^[0-9]+$ && $BOOT_DEADLINE_SECS -gt 0 ]] \
  || die "SLUICE_VM_BOOT_DEADLINE must be a positive number of seconds"

started_ms=$(now_ms)
remaining_secs() { echo $((timeout_secs - ($(now_ms) - started_ms) / 1000)); }

self=$(readlink -f "${BASH_SOURCE[0]}")
cwd=$PWD
# The guest mounts fresh tmpfs on /tmp and /run, hiding whatever the host has there. The
# working directory, this script's directory and each --keep directory are kept visible
# (bind-mounted over the tmpfs) when they live there, e.g. a CI checkout or a CARGO_TARGET_DIR
# in /tmp; the kernel command line names them.
keep_paths=()
# Sorted, so a path inside one already kept is skipped (its parent brings it along).
while IFS= read -r path; do
  case $path/ in
    /tmp/* | /run/*)
      [[ $path =~ ^[A-Za-z0-9/._+-]+$ ]] || die "cannot keep $path visible in the guest: unusual characters in the path"
      for kept in "${keep_paths[@]}"; do
        [[ $path/ == "$kept"/* ]] && continue 2
      done
      keep_paths+=("$path")
      ;;
  esac
done < <(printf '%s\n' "$cwd" "$(dirname "$self")" "${extra_keep[@]}" | LC_ALL=C sort -u)
keep_arg=""
if ((${#keep_paths[@]})); then
  keep_arg=" sluice_keep=$(IFS=,; echo "${keep_paths[*]}")"
fi

for tool in qemu-system-x86_64 busybox cpio depmod modprobe dpkg apt-get apt-cache flock timeout gzip; do
  command -v "$tool" >/dev/null || die "$tool not found; run scripts/setup.sh (needs qemu-system-x86 busybox-static cpio kmod)"
done
busybox_bin=$(command -v busybox)
# The initramfs has no libc, so its busybox must be the static one (package busybox-static).
if ldd "$busybox_bin" >/dev/null 2>&1; then
  die "$busybox_bin is dynamically linked; install busybox-static"
fi

# ---- kernel: Debian's stock image, by exact package name -------------------------------------
cache_root=${SLUICE_VM_CACHE:-$HOME/.cache/sluice-rdma-vm}
mkdir -p "$cache_root"
if [[ -n ${SLUICE_VM_KERNEL_PKG:-} ]]; then
  kpkg=$SLUICE_VM_KERNEL_PKG
else
  # A glob (linux-image-*) would match every version (1.6 GB); ask which one the meta package means.
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }') || true
  [[ -n $kpkg ]] || die "cannot resolve linux-image-amd64 to a kernel package (apt-cache depends); run apt-get update"
fi
kver_dir="$cache_root/$kpkg"
mkdir -p "$kver_dir"

# One preparer at a time per cache (two runs may start together in CI).
exec 9>"$cache_root/.lock"
flock -w "$DOWNLOAD_MAX_SECS" 9 || die "timed out waiting for the cache lock $cache_root/.lock"

deb=$(find "$kver_dir" -maxdepth 1 -name "${kpkg}_*.deb" -print -quit)
if [[ -z $deb ]]; then
  budget=$(remaining_secs)
  ((budget > DOWNLOAD_MAX_SECS)) && budget=$DOWNLOAD_MAX_SECS
  ((budget > 0)) || die "no time left for the kernel download"
  say "downloading $kpkg (once; cached in $kver_dir)"
  dl=$(mktemp -d "$kver_dir/.download.XXXXXX")
  # Sandbox::User=root: apt's _apt user cannot write into this private cache dir (only a warning)
  if ! (cd "$dl" && timeout "$budget" apt-get download -q -o APT::Sandbox::User=root "$kpkg") >&2; then
    rm -rf "$dl"
    rmdir "$kver_dir" 2>/dev/null || true
    die "download of kernel package $kpkg failed (apt-get download; is the Debian mirror reachable?)"
  fi
  got=$(find "$dl" -maxdepth 1 -name "${kpkg}_*.deb" -print -quit)
  [[ -n $got ]] || { rm -rf "$dl"; die "apt-get download $kpkg produced no .deb"; }
  mv "$got" "$kver_dir/" && rm -rf "$dl"
  deb="$kver_dir/$(basename "$got")"
fi

# ---- initramfs: busybox + modules; rebuilt when this script, busybox or the kernel changes -----
initrd="$kver_dir/initrd.gz"
vmlinuz="$kver_dir/vmlinuz"
key=$({ cat "$self" "$busybox_bin"; basename "$deb"; } | sha256sum | cut -c1-16)
if [[ ! -s $initrd || ! -s $vmlinuz || $(cat "$kver_dir/initrd.key" 2>/dev/null) != "$key" ]]; then
  say "building initramfs for $kpkg"
  work=$(mktemp -d "$kver_dir/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  dpkg -x "$deb" "$work/k" || die "dpkg -x $deb failed"
  # merged-/usr kernels ship usr/lib/modules; modprobe -d wants DIR/lib/modules
  [[ -d $work/k/lib/modules ]] || ln -s usr/lib "$work/k/lib"
  kver=$(find "$work/k/lib/modules/" -mindepth 1 -maxdepth 1 -printf '%f\n')
  [[ $(wc -w <<<"$kver") -eq 1 ]] || die "expected one kernel version in $deb, found: $kver"
  depmod -b "$work/k" "$kver" || die "depmod failed"
  ird="$work/initramfs"
  mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$busybox_bin" "$ird/bin/busybox"
  : >"$ird/modules.list"
  n=0
  declare -A seen=()
  for m in "${MODULES[@]}"; do
    deps=$(modprobe -d "$work/k" -S "$kver" --show-depends "$m") || die "module $m not found in $kpkg"
    while read -r kind path _; do
      [[ $kind == insmod && -z ${seen[$path]:-} ]] || continue
      seen[$path]=1
      n=$((n + 1))
      base=$(basename "$path")
      name=$(printf '%02d-%s' "$n" "${base%%.ko*}.ko")
      # busybox insmod wants plain .ko; decompress here rather than rely on in-kernel support
      case $path in
        *.ko) cp "$path" "$ird/lib/modules/$name" ;;
        *.ko.xz) xz -dc "$path" >"$ird/lib/modules/$name" ;;
        *.ko.zst) zstd -qdc "$path" >"$ird/lib/modules/$name" ;;
        *.ko.gz) gzip -dc "$path" >"$ird/lib/modules/$name" ;;
        *) false ;;
      esac || die "could not copy module $path into the initramfs (xz/zstd missing?)"
      echo "$name" >>"$ird/modules.list"
    done <<<"$deps"
  done
  cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the initramfs: load modules, mount the host's / (read-only) and the results share
# over 9p, then switch_root into the host's userland and run stage2.sh from the share.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
fail() {
  echo "rdma-vm init: $*"
  echo o >/proc/sysrq-trigger
  sleep 60
}
for m in $(cat /modules.list); do
  insmod "/lib/modules/$m" || fail "insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=@MSIZE@
# cache=loose: the root is read-only here, and caching cuts each exec from ~1 s to ~0.1 s under
# TCG. A host file changed during the run may be seen stale; fine for a test run.
mount -t 9p -o "$opts,ro,cache=loose" hostroot /newroot || fail "mounting the host root over 9p failed"
# Host paths under /tmp or /run the run needs (sluice_keep=A,B on the kernel command line):
# hold them aside before the tmpfs mounts hide them, then put them back at the same paths.
keep=$(sed -n 's/.*sluice_keep=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
i=0
for path in $keep; do
  mkdir -p "/keep/$i" && mount -o bind "/newroot$path" "/keep/$i" || fail "holding $path failed"
  i=$((i + 1))
done
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fail "tmpfs on /tmp failed"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs on /run failed"
i=0
for path in $keep; do
  mkdir -p "/newroot$path" && mount --move "/keep/$i" "/newroot$path" || fail "restoring $path failed"
  i=$((i + 1))
done
mkdir -p /newroot@OUT@
mount -t 9p -o "$opts" out /newroot@OUT@ || fail "mounting the results share failed"
cat /proc/uptime >/newroot@OUT@/booted
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh @OUT@/stage2.sh
INIT
  sed -i -e "s|@MSIZE@|$NINEP_MSIZE|g" -e "s|@OUT@|$GUEST_OUT|g" "$ird/init"
  chmod 755 "$ird/init"
  (cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) >"$work/initrd.gz" \
    || die "building the initramfs cpio failed"
  cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz" || die "no boot/vmlinuz-$kver in $deb"
  mv "$work/vmlinuz" "$vmlinuz"
  mv "$work/initrd.gz" "$initrd"
  echo "$key" >"$kver_dir/initrd.key"
  rm -rf "$work"
  trap - EXIT
  say "initramfs: $n modules, $(du -k "$initrd" | cut -f1) KiB"
fi
flock -u 9

kernel=${SLUICE_VM_KERNEL:-$vmlinuz}
[[ -r $kernel ]] || die "kernel image $kernel does not exist or is not readable"

# ---- per-run results share ------------------------------------------------------------------
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-rdma-vm.XXXXXX")
console="$run_dir/console.log"
: >"$run_dir/output"
printf 'exec /bin/bash %q --guest-stage2 %q\n' "$self" "$GUEST_OUT" >"$run_dir/stage2.sh"
{
  echo "# generated by rdma-vm.sh: the command to run inside the guest"
  printf 'cd -- %q || exit 125\n' "$cwd"
  printf 'export PATH=%q\n' "$PATH:/usr/local/sbin:/usr/sbin:/sbin"
  echo "export HOME=/tmp SLUICE_RDMA_DEVICE=$RXE_DEV SLUICE_RDMA_SERVER_ADDR=$ADDR_A SLUICE_IN_RDMA_VM=1"
  for name in ${SLUICE_VM_PASS_ENV-RUST_LOG RUST_BACKTRACE}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad name in SLUICE_VM_PASS_ENV: $name"
    [[ -n ${!name+set} ]] && printf 'export %s=%q\n' "$name" "${!name}"
  done
  # ibv_reg_mr pins pages; root may lock unlimited memory, say so explicitly
  echo "ulimit -l unlimited"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$run_dir/run.sh"

qemu_pid="" tail_pid="" console_pid="" keep_run_dir=${SLUICE_VM_KEEP:-}
# shellcheck disable=SC2317  # called from the traps below
stop_children() {
  local p
  for p in $qemu_pid $tail_pid $console_pid; do kill "$p" 2>/dev/null || true; done
}
# shellcheck disable=SC2317
finish() {
  stop_children
  if [[ -z $keep_run_dir ]]; then
    rm -rf "$run_dir"
  else
    say "run directory kept: $run_dir"
  fi
}
trap finish EXIT
trap 'say "interrupted"; exit 130' INT TERM

vm_failed() {
  keep_run_dir=1
  say "ERROR: $*"
  if [[ -s $console ]]; then
    say "last lines of the guest console ($console):"
    # strip the terminal escapes SeaBIOS prints; awk also ends an unterminated last line
    tail -n 30 "$console" | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' -e 's/\r//g' \
      | awk '{ print "  | " $0 }' >&2
  fi
  exit "$EXIT_VM_FAILED"
}

budget=$(remaining_secs)
((budget > 0)) || { say "ERROR: --timeout ${timeout_secs}s used up before the guest started"; exit "$EXIT_TIMEOUT"; }

# -cpu max: host binaries may use instructions (SSE4.2, AVX2, ...) that plain qemu64 lacks.
# clocksource=tsc: under TCG the kernel otherwise falls back to the HPET, where every clock read
# (clock_gettime, Instant::now) is an emulated device access that costs microseconds; RDMA hosts
# read the TSC, for a few nanoseconds, in user space.
qemu_started_ms=$(now_ms)
timeout -k "$KILL_GRACE_SECS" "$budget" \
  qemu-system-x86_64 -cpu max -m "$VM_MEM_MB" -smp "$VM_CPUS" -nographic -no-reboot -nic none \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 quiet panic=-1 clocksource=tsc tsc=reliable$keep_arg" \
  -fsdev "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap" \
  -device virtio-9p-pci,fsdev=r,mount_tag=hostroot \
  -fsdev "local,id=o,path=$run_dir,security_model=none" \
  -device virtio-9p-pci,fsdev=o,mount_tag=out \
  </dev/null >"$console" 2>&1 &
qemu_pid=$!

# CMD's output lands in the share as it is written; tail follows it and, with --pid, reads to the
# end of the file after qemu has gone, so the last lines are not lost.
tail -n +1 -F --pid="$qemu_pid" "$run_dir/output" 2>/dev/null &
tail_pid=$!
if [[ -n ${SLUICE_VM_CONSOLE:-} ]]; then
  tail -n +1 -F --pid="$qemu_pid" "$console" >&2 2>/dev/null &
  console_pid=$!
fi

boot_deadline_ms=$((qemu_started_ms + BOOT_DEADLINE_SECS * 1000))
while [[ ! -e $run_dir/booted ]]; do
  if ! kill -0 "$qemu_pid" 2>/dev/null; then
    wait "$qemu_pid" && qrc=0 || qrc=$?
    vm_failed "qemu exited (status $qrc) before the guest booted"
  fi
  if (($(now_ms) > boot_deadline_ms)); then
    vm_failed "guest did not boot within ${BOOT_DEADLINE_SECS}s (no booted marker in $run_dir)"
  fi
  sleep "$POLL_SECS"
done
say "guest booted in $(secs_since "$qemu_started_ms")s"

# Wait for the device (or a reported failure) so its time is visible, then for the guest to end.
while [[ ! -e $run_dir/ready && ! -e $run_dir/error ]] && kill -0 "$qemu_pid" 2>/dev/null; do
  sleep "$POLL_SECS"
done
[[ -e $run_dir/ready ]] && say "$RXE_DEV ready after $(secs_since "$qemu_started_ms")s; running:$(printf ' %q' "$@")"

wait "$qemu_pid" && qrc=0 || qrc=$?
qemu_pid=""
wait "$tail_pid" 2>/dev/null || true
tail_pid=""

if [[ -e $run_dir/error ]]; then
  vm_failed "guest setup failed: $(cat "$run_dir/error")"
fi
if [[ ! -e $run_dir/status ]]; then
  if ((qrc == 124 || qrc == 137)); then
    keep_run_dir=1
    say "ERROR: timed out: the whole run exceeded --timeout ${timeout_secs}s; qemu was stopped"
    exit "$EXIT_TIMEOUT"
  fi
  vm_failed "the command's exit status is missing (qemu status $qrc): the guest died before CMD finished"
fi
status=$(cat "$run_dir/status")
[[ $status =~ ^[0-9]+$ ]] || vm_failed "unreadable exit status '$status' in $run_dir/status"
say "finished in $(secs_since "$started_ms")s, exit status $status"
exit "$status"
