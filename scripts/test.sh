#!/usr/bin/env bash
# The test command (README): sets up, runs ruff and the test suite, including the pipeline tests
# against real Ray, Prefect and MLflow servers that the tests start and stop themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/ruff check ffsplit tasks flows tests bench scripts
.venv/bin/python -c "from ffsplit.models.registry import materialize; materialize('smollm2-135m')"  # cached after the first run
# Default tier: everything but the slow real-model/pipeline tier and GPU tests (CI budget 25 min on
# 2 cores). Run the slow tier with: bash scripts/test.sh -m slow
# The whole run is bounded too (TEST_TIMEOUT; 40 min for the default tier): CI never stalls on a hang.
limit=${TEST_TIMEOUT:-240m}
if [ "$#" -eq 0 ]; then set -- -m "not gpu and not slow"; limit=${TEST_TIMEOUT:-40m}; fi
exec timeout -k 60 "$limit" .venv/bin/python -m pytest -q "$@"
