#!/usr/bin/env bash
# Create .venv and install ffsplit with the pipeline stack (idempotent; ~90 s on a fresh machine),
# then set the environment every command of the project runs under (docs/stack-notes.md).
#
#   source scripts/setup.sh    # from any folder: .venv/bin on PATH (ffsplit, prefect, mlflow, ray)
#                              # and the variables below exported; no cd, no `set -e` left behind
#   bash scripts/setup.sh      # install only
#
# torch is pinned to 2.13.0, a CPU build on local disk here; a looser pin pulls a multi-GB CUDA build.
_ffsplit_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! (
  set -euo pipefail
  cd "$_ffsplit_root"
  py=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  stamp=.venv/.ffsplit-installed
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing ffsplit and its stack into .venv (first run takes a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # setuptools 84 under pip 26 (what installs here) notes every editable install of this layout
    # with a "BuildBackendWarning: Editable installation" block: informational, about no setting
    # of ours.
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[pipeline,dev]"
    echo "$want" >"$stamp"
  fi
); then
  echo "[setup] failed: see the pip output above" >&2
  unset _ffsplit_root
  return 1 2>/dev/null || exit 1
fi
case ":$PATH:" in
  *":$_ffsplit_root/.venv/bin:"*) ;;
  *) export PATH="$_ffsplit_root/.venv/bin:$PATH" ;;
esac
unset _ffsplit_root
# Offline, no telemetry: the same variables services/stack.py sets for every service.
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false \
  MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
