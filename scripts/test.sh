#!/usr/bin/env bash
# The test command (README): sets up, runs ruff and the test suite, including the pipeline tests
# against real Ray, Prefect and MLflow servers that the tests start and stop themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/ruff check ffsplit tasks flows tracking reports services tests bench scripts
.venv/bin/python -c "from ffsplit.models.registry import materialize as m; m('smollm2-135m'); m('minilm-l6')"  # cached after the first run
# Default: every test but the GPU ones, the real-model, whole-flow and deployment tests included
# (what CI runs). Pass pytest options to narrow it, e.g. -m "not slow and not gpu" for the quick
# tier (README, "Tests": its measured time). The whole run is bounded too (TEST_TIMEOUT, default
# 60 min): CI never stalls on a hang.
limit=${TEST_TIMEOUT:-60m}
if [ "$#" -eq 0 ]; then set -- -m "not gpu"; fi
exec timeout -k 60 "$limit" .venv/bin/python -m pytest -q "$@"
