#!/usr/bin/env bash
# The official Apache RocketMQ 5 Node.js client (rocketmq-client-nodejs, pinned in
# proxy/tests/node/package-lock.json, installed into proxy/tests/node/node_modules from npm)
# against a `sluice local` the tests start. Builds nothing: expects SLUICE_BIN, or
# target/debug/sluice. Prints a total line like pytest's ("N passed, N failed in Ns").
# Exit code: the test runner's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bin="${SLUICE_BIN:-$REPO/target/debug/sluice}"
if [[ ! -x "$bin" ]]; then
  echo "node-client-tests: sluice binary not found or not executable: $bin" >&2
  echo "  build it first (cargo build -p sluice) or set SLUICE_BIN" >&2
  exit 2
fi
export SLUICE_BIN="$bin"
command -v node >/dev/null || { echo "node-client-tests: node (18 or later) is required" >&2; exit 2; }

dir=proxy/tests/node
# Exactly what the lock file pins; --ignore-scripts: the client needs no install scripts.
(cd "$dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)

artifacts="$REPO/target/node-client-tests"
rm -rf "$artifacts"
mkdir -p "$artifacts"
export SLUICE_NODE_ARTIFACT_DIR="$artifacts"

started=$(date +%s)
status=0
node --test --test-reporter=tap --test-timeout=300000 "$dir/client.test.js" "$dir/tls.test.js" | tee "$artifacts/tap.txt" || status=$?
passed=$(grep -E '^# pass ' "$artifacts/tap.txt" | awk '{print $3}')
failed=$(grep -E '^# fail ' "$artifacts/tap.txt" | awk '{print $3}')
echo "${passed:-0} passed, ${failed:-0} failed in $(( $(date +%s) - started ))s"
exit "$status"
