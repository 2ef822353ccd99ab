#!/usr/bin/env bash
# The device calls of issue 15 (bench/flow_gpu.py). Every call runs this same command and carries
# one part of the payload that scripts/build_gpu_wheels.py packed (.gpucarry/part-N); the warm
# machine keeps the parts of earlier calls (ignored paths). When all parts are here, checked by
# sha256, it installs the wheels and runs the whole benchmark; until then it only reports which
# parts it has (and the image's versions against the carried packages' pins) and exits 0.
#   run(command="bash bench/gpu_flow.sh", carry=[".gpucarry/part-N"], timeout_s=600)
# Knobs (environment): LLAMA_LAYERS (7B-config layers, default 8; 32 = all of Llama-2-7B; 0 skips
# it), PACKAGED (the packaged model, default minilm-l6; empty skips it),
# CALL_LIMIT (seconds the call may take, default 590), PY (python3), WORK, SITE, DRY_RUN=1 (a CPU
# check: installs for Python 3.12 into SITE but runs on the caller's own environment), JSON_NAME
# (default flow-h200.json). A later call on the same warm machine reuses the install (seconds).
# Everything lands in $OUT: carry-status.json, install.log, $JSON_NAME, flow_gpu.log,
# services.log, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
OUT=${OUT:-/tmp/ffsplit-gpu-out}
PY=${PY:-python3}
WORK=${WORK:-/tmp/ffsplit-gpu}
SITE=${SITE:-/tmp/site}
LLAMA_LAYERS=${LLAMA_LAYERS:-8}
PACKAGED=${PACKAGED-minilm-l6}
CALL_LIMIT=${CALL_LIMIT:-590}
JSON_NAME=${JSON_NAME:-flow-h200.json}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

"$PY" bench/flow_gpu.py status --json "$OUT/carry-status.json" > "$WORK/status.txt" 2>&1
ready=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ready"))' \
  "$OUT/carry-status.json" 2>/dev/null)
"$PY" - "$OUT/carry-status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print("carry ready:", s.get("ready"), "| builds seen:", s.get("builds_seen"), "|", s.get("error", ""))
for p in s.get("parts", []):
    print(f"  {p['folder']}: {'ok' if p['sha256_ok'] else ('damaged' if p['here'] else 'missing')}")
misses = s.get("image_misses") or {}
print("image packages missing a pin:", {k: v["version"] for k, v in misses.items()} or "none")
EOF
if [ "$ready" != "True" ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv
  echo "not all parts here yet: carry the next part (took $(( $(date +%s) - t0 )) s)"
  exit 0
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
free -g; df -h /tmp | tail -1
"$PY" bench/flow_gpu.py install --work "$WORK" --site "$SITE" > "$OUT/install.log" 2>&1
status=$?
tail -n 40 "$OUT/install.log"
if [ $status -ne 0 ]; then
  echo "install failed (exit $status): see install.log"
  exit 1
fi
if [ "${DRY_RUN:-0}" = "1" ]; then
  export PYTHONPATH=$PWD  # the caller's environment already has the stack
else
  export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH
fi
"$PY" -c 'import ray, prefect, mlflow, torch, transformers as t; print("ray", ray.__version__, "prefect", prefect.__version__, "mlflow", mlflow.__version__, "torch", torch.__version__, "transformers", t.__version__, "gpus", torch.cuda.device_count())' \
  2>&1 | tail -n 5 | tee -a "$OUT/install.log"
budget=$(( CALL_LIMIT - ($(date +%s) - t0) - 25 ))
echo "benchmark budget ${budget} s, 7B-config layers ${LLAMA_LAYERS}"
timeout $(( budget + 20 )) "$PY" bench/flow_gpu.py run --work "$WORK" --json "$OUT/$JSON_NAME" \
  --llama-layers "$LLAMA_LAYERS" --packaged "$PACKAGED" --budget-s "$budget" 2>&1 \
  | tee "$OUT/flow_gpu.log"
status=${PIPESTATUS[0]}
for log in "$WORK"/stack/logs/*.log; do
  [ -f "$log" ] && { echo "== $log"; tail -n 40 "$log"; }
done > "$OUT/services.log" 2>&1
echo "flow_gpu exit $status after $(( $(date +%s) - t0 )) s"
exit $status
