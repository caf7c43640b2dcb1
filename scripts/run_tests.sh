#!/usr/bin/env bash
# Run the whole test suite in ./.venv (created and filled on first use).
#   ./scripts/run_tests.sh            # everything
#   ./scripts/run_tests.sh -k auth    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import comfy_ws_proxy, tornado, jwt, prometheus_client, pytest_tornasync, hypothesis, standardwebhooks, openapi_spec_validator, docutils" 2>/dev/null \
   || [ setup.cfg -nt .venv/.installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch .venv/.installed
fi
exec .venv/bin/python -m pytest "$@"
