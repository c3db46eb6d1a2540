#!/usr/bin/env bash
# The official Apache RocketMQ 5 Python client (proxy/tests/python, pinned in requirements.txt)
# against `sluice local`. Builds nothing: expects SLUICE_BIN, or target/debug/sluice.
#   SLUICE_PY_VENV  the virtualenv to use/create (default: target/py-venv)
#   SLUICE_BIN      the sluice binary (default: target/debug/sluice)
#   SLUICE_PY_WORKERS  pytest-xdist workers, each with its own `sluice local` (default 2: most
#                   of the time goes to waiting out invisible durations, so two overlap it)
# Extra arguments go to pytest (e.g. -k push). JUnit XML: target/python-client-tests.xml;
# server stdout/stderr and the client's log: target/python-client-tests/<worker>/.
# Exit code: pytest's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bin="${SLUICE_BIN:-$REPO/target/debug/sluice}"
if [[ ! -x "$bin" ]]; then
  echo "python-client-tests: sluice binary not found or not executable: $bin" >&2
  echo "  build it first (cargo build) or set SLUICE_BIN" >&2
  exit 2
fi
export SLUICE_BIN="$bin"

venv="${SLUICE_PY_VENV:-$REPO/target/py-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r proxy/tests/python/requirements.txt

artifacts="$REPO/target/python-client-tests"
rm -rf "$artifacts"
mkdir -p "$artifacts"
export SLUICE_PY_ARTIFACT_DIR="$artifacts"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the source tree

status=0
"$venv/bin/python" -m pytest proxy/tests/python -q \
  -p no:cacheprovider -n "${SLUICE_PY_WORKERS:-2}" \
  --junitxml="$REPO/target/python-client-tests.xml" \
  "$@" || status=$?
exit "$status"
