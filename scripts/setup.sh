#!/usr/bin/env bash
# Create .venv and install ffsplit with the pipeline stack (idempotent; ~90 s on a fresh machine).
# torch is pinned to 2.13.0, a CPU build on local disk here; a looser pin pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ffsplit-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing ffsplit and its stack into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[pipeline,dev]"
  echo "$want" > "$stamp"
fi
# The environment every command of the project runs under (../shared/docs/stack.md).
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false \
  MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
