#!/usr/bin/env bash
# The README's main job, end to end from a fresh machine (10-30 minutes on 2 cores, by load):
#   1. installs .venv with the pipeline stack (scripts/setup.sh) and materialises SmolLM2;
#   2. starts local Prefect + MLflow servers and a Prefect process worker on the pool ffsplit-pool
#      (python -m flows.stack up; it says when a busy port 4200 or 5000 was replaced);
#   3. creates the deployments compress/default, sweep/nightly and cache-prune/nightly
#      (python -m flows.deploy), the two nightly ones PAUSED unless DEMO_KEEP_SCHEDULES=1, and
#      says which schedules are active;
#   4. runs a small SmolLM2 sweep THROUGH THE DEPLOYMENT (`prefect deployment run 'sweep/nightly'
#      --param ...`): the worker starts the flow, whose tasks run on an embedded Ray; meanwhile
#      `python -m flows.watch` prints the flow run's address, then stages and variants as they
#      finish;
#   5. prints the results table and how to reach the servers from another shell.
# The servers and the worker are LEFT RUNNING so the UIs can be browsed; stop them with
#   .venv/bin/python -m flows.stack down
# A second run reuses every cached artifact and registered version (minutes, not tens of them).
# Settings (environment): DEMO_CALIB_TOKENS (4096), DEMO_EVAL_TOKENS (4096), FFSPLIT_HOME (.ffsplit),
# DEMO_KEEP_SCHEDULES=1 (leave the nightly deployments active: the 02:00 UTC sweep then takes
# about an hour of both cores every night while the worker runs).
# Workload: 7 variants + the dense reference; each variant's latency is raced against dense over a
# 128-token prefill and 16 greedy decode steps, 3 rounds.
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
if [ "${DEMO_KEEP_SCHEDULES:-0}" = 1 ]; then
  stamp "deployments: compress/default, sweep/nightly and cache-prune/nightly, schedules ACTIVE (DEMO_KEEP_SCHEDULES=1)"
  "$PY" -m flows.deploy --pool ffsplit-pool
else
  stamp "deployments: compress/default, sweep/nightly and cache-prune/nightly, nightly schedules PAUSED (DEMO_KEEP_SCHEDULES=1 leaves them on)"
  "$PY" -m flows.deploy --pool ffsplit-pool --paused
fi

HOME_DIR=${FFSPLIT_HOME:-$PWD/.ffsplit}
RUN_NAME="demo-$(date -u +%Y%m%d-%H%M%S)"
RUN_DIR="$HOME_DIR/runs/$RUN_NAME"
CALIB=${DEMO_CALIB_TOKENS:-4096}
EVAL=${DEMO_EVAL_TOKENS:-4096}
FLOW_LOG="$HOME_DIR/logs/demo-flow-run.log"
stamp "sweep: lowrank and quant at 40% FFN reduction (heavy ratio 0.1) + uniform, random, prune baselines"
.venv/bin/prefect deployment run 'sweep/nightly' --flow-run-name "$RUN_NAME" \
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
    --param run_dir="\"$RUN_DIR\"" >"$FLOW_LOG" 2>&1 || {
    cat "$FLOW_LOG" >&2
    echo "demo: could not create the flow run (log above)" >&2
    exit 1
}
# Progress from the Prefect API while the worker runs the flow (flow and task logs: the Prefect UI,
# and $HOME_DIR/logs/worker.log).
"$PY" -m flows.watch "$RUN_NAME" --timeout 3600 || {
    echo "demo: the flow run did not complete; worker log $HOME_DIR/logs/worker.log" >&2
    exit 1
}

# The results table. rich wraps the stage-times line at 160 columns: join it back into one line
# (up to its "total N").
"$PY" -m flows.sweep report "$RUN_DIR" | awk '
    function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
    /^stage wall times/ {
        line = trim($0)
        while (line !~ /total [0-9.]+$/ && (getline more) > 0) line = line " " trim(more)
        print line; next
    }
    { print }'
PREFECT_UI=${PREFECT_API_URL%/api}
MODEL=ffsplit-smollm2-135m
cat <<EOF

Where to look
  MLflow UI:   $MLFLOW_TRACKING_URI   (experiment ffsplit/smollm2-135m; model $MODEL, aliases @dense, @champion)
  Prefect UI:  $PREFECT_UI   (flow run $RUN_NAME of deployment sweep/nightly)
  Run folder:  $RUN_DIR   (results.md, results.json, pareto.png)
  Worker log:  $HOME_DIR/logs/worker.log
The servers and the worker keep running. From another shell, in $PWD:
  source scripts/setup.sh && eval "\$(.venv/bin/python -m flows.stack env)"
then e.g. \`prefect deployment ls\`, or serve the champion (README, "Serve the champion"):
  mlflow models serve -m models:/$MODEL@champion --env-manager local -h 127.0.0.1 -p 5002
Stop the servers and the worker: .venv/bin/python -m flows.stack down
EOF
stamp "done in $(($(date +%s) - started)) s"
