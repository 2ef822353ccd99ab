#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks, each under its own time limit; everything
# lands in $OUT (copied into bench/results/ afterwards). Usage: bench/gpu_run.sh STEP...
# Steps: tests | ffn | e2e:MODEL[,MODEL...] | e2ec:MODEL[,...] (decode through torch.compile)
set -u -o pipefail
failed=""  # steps that exited non-zero: the call's exit status says so at the end
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/nvidia-smi.txt"
for step in "$@"; do
  case "$step" in
    tests)
      # several pytest processes at once: Triton compiles dominate (one process took > 220 s)
      k=tests/ffsplit/kernels/test_ffn_kernels.py
      t() { name=$1; shift; timeout ${TESTS_LIMIT:-150} python3 -m pytest -q -p no:cacheprovider "$@" \
        > "$OUT/t-$name.log" 2>&1; }
      t fused tests/ffsplit/split/test_fused.py &
      t gated "$k" -k test_gated_kernels &
      t kernels "$k" -k "not test_gated_kernels and not test_every_tuned_tile" &
      for id in lowrank-one lowrank-tile quant-one quant-tile; do t "$id" "$k::test_every_tuned_tile[$id]" & done
      wait
      for f in "$OUT"/t-*.log; do echo "== $f"; cat "$f"; done > "$OUT/tests.log"; rm -f "$OUT"/t-*.log
      grep -E "^== |passed|failed|error" "$OUT/tests.log" | tail -${TESTS_TAIL:-30}
      ! grep -qE "[0-9]+ (failed|errors?)\b" "$OUT/tests.log" || failed="$failed tests"
      ;;
    ffn)
      timeout ${FFN_LIMIT:-300} python3 bench/ffn.py --out "$OUT/ffn-h200.json" ${FFN_ARGS:-} \
        2>&1 | tee "$OUT/ffn.log" | tail -${FFN_TAIL:-80} || failed="$failed ffn"
      ;;
    e2ec:*)
      models=${step#e2ec:}
      timeout ${E2EC_LIMIT:-300} python3 bench/e2e.py --compile --models ${models//,/ } \
        --out "$OUT/e2e-h200-compile.json" ${E2EC_ARGS:-} 2>&1 | tee "$OUT/e2e-compile.log" \
        | { grep -v "^Loading" || true; } | tail -${E2EC_TAIL:-30} || failed="$failed $step"
      ;;
    e2e:*)
      models=${step#e2e:}
      timeout ${E2E_LIMIT:-420} python3 bench/e2e.py --models ${models//,/ } --out "$OUT/e2e-h200.json" ${E2E_ARGS:-} \
        2>&1 | tee "$OUT/e2e.log" | { grep -v "^Loading" || true; } | tail -${E2E_TAIL:-60} \
        || failed="$failed $step"
      ;;
  esac
done
[ -z "$failed" ] || { echo "failed steps:$failed"; exit 1; }
