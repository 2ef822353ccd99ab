#!/usr/bin/env bash
# One device call for issue 13 (quantized light parts at kernel speed): GPU tests of the quant
# kernels, then the FFN benchmark of the quant variants against dense cuBLAS, GemLite and tinygemm,
# then end to end. Each step under its own time limit; a failed step does not stop the others and
# makes the call exit 1 at the end. Everything lands in $OUT (copied into bench/results/ after).
# Needs GemLite's package in .gemlite/src (scripts/fetch_gemlite.sh; carry .gemlite with the call).
# Usage: bench/gpu_quant.sh STEP...   steps: tests | ffn | ffnlib | e2e | e2ec
#   QFFN_ARGS / QE2E_ARGS add arguments (e.g. --shapes, --recipes, --models, --quant).
set -u -o pipefail
failed=""
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/.gemlite/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/nvidia-smi.txt"
for step in "$@"; do
  start=$(date +%s)
  case "$step" in
    tests)
      # several pytest processes: Triton compiles dominate, the 16 cores take them in parallel
      q=tests/ffsplit/kernels/test_qffn.py
      t() { name=$1; shift; FFSPLIT_KERNEL_AUTOTUNE=0 timeout ${TESTS_LIMIT:-200} python3 -m pytest -q \
        -p no:cacheprovider "$@" > "$OUT/t-$name.log" 2>&1; }
      for b in 2 3 4 5 6 7 8; do t "w$b" "$q" -k "test_every_width and [$b-" & done
      t mixed "$q" -k test_mixed_widths &
      t misc "$q" -k "other_groups or tile_shape or prefill" &
      t gpu "$q" -k "test_gpu_" &
      t layout tests/ffsplit/kernels/test_qlayout.py &
      t fused tests/ffsplit/split/test_fused.py &
      wait
      for f in "$OUT"/t-*.log; do echo "== $f"; cat "$f"; done > "$OUT/tests.log"; rm -f "$OUT"/t-*.log
      grep -E "^== |passed|failed|error" "$OUT/tests.log" | tail -${TESTS_TAIL:-40}
      ! grep -qE "[0-9]+ (failed|errors?)\b" "$OUT/tests.log" || failed="$failed tests"
      ;;
    ffn)  # ffsplit's kernels (tiles tuned on the first call per format: FFSPLIT_QTUNE=1)
      FFSPLIT_QTUNE=${FFSPLIT_QTUNE:-1} timeout ${FFN_LIMIT:-420} python3 bench/ffn.py --quant \
        --which ours --out "$OUT/quant-h200.json" ${QFFN_ARGS:-} 2>&1 | tee "$OUT/ffn.log" \
        | tail -${FFN_TAIL:-90} || failed="$failed ffn"
      ;;
    ffnlib)  # GemLite and tinygemm in their own process (a library's CUDA error ends only it)
      timeout ${FFNLIB_LIMIT:-240} python3 bench/ffn.py --quant --which libraries \
        --out "$OUT/quant-lib-h200.json" ${QLIB_ARGS:-} 2>&1 | tee "$OUT/ffnlib.log" \
        | tail -${FFNLIB_TAIL:-40} || failed="$failed ffnlib"
      ;;
    e2e)
      FFSPLIT_QTUNE=${FFSPLIT_QTUNE:-1} timeout ${E2E_LIMIT:-420} python3 bench/e2e.py --quant ${QUANT:-int4-light,int8-light} \
        --out "$OUT/e2e-quant-h200.json" ${QE2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" \
        | { grep -v "^Loading" || true; } | tail -${E2E_TAIL:-40} || failed="$failed e2e"
      ;;
    e2ec)
      FFSPLIT_QTUNE=${FFSPLIT_QTUNE:-1} timeout ${E2EC_LIMIT:-420} python3 bench/e2e.py --compile --compiled-batches b1 \
        --quant ${QUANT:-int4-light,int8-light} --out "$OUT/e2e-quant-compile-h200.json" \
        ${QE2EC_ARGS:-} 2>&1 | tee "$OUT/e2e-compile.log" | { grep -v "^Loading" || true; } \
        | tail -${E2EC_TAIL:-30} || failed="$failed e2ec"
      ;;
  esac
  echo "step $step: $(( $(date +%s) - start )) s"
done
[ -z "$failed" ] || { echo "failed steps:$failed"; exit 1; }
