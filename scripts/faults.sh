#!/usr/bin/env bash
# The fault suite: real `sluice` broker and proxy processes with producers and consumers running
# through the proxy the whole time, one fault per case (sluice/tests/system/faults.rs):
#   broker-sigkill   the broker SIGKILLed and restarted on its data directory, 100 rounds
#   disk-full        the data directory's file system (a 256 MiB loop device: needs root) filled
#                    for 20 s, then freed: sends refused, consumers go on, sends resume
#   sync-failure     every fdatasync fails (injected) for 10 s: nothing acked, then a restart
#   proxy-sigkill    one of two proxies SIGKILLed mid-request and restarted, 20 rounds
#   network-cut      the proxy↔broker link cut for 30 s (a relay holding every byte), then healed
#   broker-freeze    the broker SIGSTOPped for 10 s, then SIGCONT
#   clock-step       the wall clock of broker and proxy stepped +1 h, back, then -1 h (libfaketime)
#   slow-consumer    consumers paused while 1M messages pile up (100k with --short), then drained
#   restart-storm    the broker stopped and restarted 20 times in a row under load
# The workload: normal, FIFO, LITE, DELAY and transactional topics (commits, rollbacks, checks
# answered). Each case prints one line: sent, acked, unknown (an error or time-out: maybe stored),
# delivered, lost, unexpected, duplicated (beyond what a broker restart explains), corrupt,
# out-of-order (FIFO groups, lite topics), early (delay messages), rolled back and
# delivered-though-rolled-back, the longest client stall, PASS/FAIL, then delivered/acked per kind
# of topic; the table comes at the end.
#
#   scripts/faults.sh            the full suite (about 8 minutes)
#   scripts/faults.sh --short    fewer rounds and shorter outages (CI, about 2.5 minutes)
#   scripts/faults.sh CASE...    only these cases, e.g. `scripts/faults.sh broker_sigkill`
#
# Exits non-zero when a case fails. Builds the `ci` profile (optimised, with debug assertions:
# the tests' own build) unless SLUICE_CARGO_PROFILE names another.
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBCLANG_PATH="${LIBCLANG_PATH:-/usr/lib/llvm-14/lib}"
profile=${SLUICE_CARGO_PROFILE:-ci}
cases=()
export SLUICE_FAULTS_SHORT=0
for arg in "$@"; do
  case "$arg" in
    --short) SLUICE_FAULTS_SHORT=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "faults.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) cases+=("faults::$arg") ;;
  esac
done
[[ ${#cases[@]} -gt 0 ]] || cases=("faults::")

source scripts/build-once.sh
build_workspace "$profile"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# One case at a time: each runs its own processes and measures stalls.
cargo test --profile "$profile" --locked --workspace --test system -- --ignored --test-threads 1 \
  --nocapture "${cases[@]}" 2>&1 | tee "$log" || status=$?
echo
echo "faults: $( [[ $SLUICE_FAULTS_SHORT == 1 ]] && echo short || echo full ) run, profile $profile, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# The test harness prints `test faults::… ... ` before a case's own line.
grep -oE 'faults: [a-z-]+ +sent .*' "$log" | sed 's/^faults: /  /' || echo "  no case printed its line"
if [[ $status -ne 0 ]] || grep -qE '^test result: FAILED' "$log"; then
  echo "faults: FAILED (the failing case's assertion and logs are above)"
  exit 1
fi
echo "faults: every case passed"
