#!/usr/bin/env bash
# The test command (README): sets up, runs ruff and the whole test suite, including the real
# SmolLM2 tests and the pipeline tests against real Ray, Prefect and MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
.venv/bin/ruff check ffsplit tasks flows tests bench scripts
.venv/bin/python -c "from ffsplit.models.registry import materialize; materialize('smollm2-135m')"  # cached after the first run
exec .venv/bin/python -m pytest -q "$@"
