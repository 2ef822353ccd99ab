#!/usr/bin/env bash
# The one device call of issue 5 (kind nvidia-h200-x2): the pipeline's profile and compress
# stages as Ray tasks on 2 GPUs, then on 1 GPU, for Llama-2-7B's config (bench/multigpu.py).
# Ray comes from the carried slim wheels (scripts/build_ray_wheel.py -> .whl), the calibration
# ids from .gpucarry (python bench/multigpu.py --prepare). The device tool's command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
#     bash bench/gpu_multigpu.sh
# with carry [".whl", ".gpucarry"]. Everything lands in $OUT (copied to bench/results/ after).
set -x
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0 RAY_memory_monitor_refresh_ms=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$OUT/nvidia-smi.txt"
df -h /dev/shm /tmp
free -g
# The range partials (36 GB of float64 Grams each for the 7B model) go through RAM: a tmpfs of
# our own (/dev/shm is sized from the boot-time memory, which starts small on these machines).
SCRATCH=/mnt/ffscratch
PREFAULT=72
if ! { mkdir -p $SCRATCH && mount -t tmpfs -o size=200g ffscratch $SCRATCH; }; then
  SCRATCH=/tmp/ffscratch
  PREFAULT=0
fi
python3 -c 'import ray, torch, transformers; print(ray.__version__, torch.__version__, transformers.__version__, torch.cuda.device_count())'
timeout ${LIMIT:-540} python3 bench/multigpu.py --model llama2-7b --settings ${SETTINGS:-2,1} \
  --threads 8 --scratch $SCRATCH/run --work /tmp/ffsplit-multigpu/work --prefault-gib $PREFAULT \
  --json "$OUT/multigpu-h200.json" 2>&1 | tee "$OUT/multigpu.log"
status=$?
free -g
du -sh /tmp/ffsplit-multigpu/work/* 2>/dev/null
echo "multigpu exit $status"
