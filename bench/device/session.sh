#!/usr/bin/env bash
# Steps run on the GPU machine (device tool), each with its own time limit; results under $OUT.
#   bash bench/device/session.sh STEP [STEP ...]
# Steps: env gputests bench-decode bench-prefill bench-kernels tune-decode tune-prefill
set -uo pipefail
export PYTHONPATH=/opt/devsite:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export GPT2K_CACHE_DIR=/root/keep/libs
log() { echo "== $(date +%T) $*"; }
for step in "$@"; do
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv | tee "$OUT/env.txt"
      python -c "import tvm; d=tvm.cuda(0); print('tvm', tvm.__version__, d.exist, d.compute_version)" | tee -a "$OUT/env.txt" ;;
    gputests)
      log gputests; timeout 420 python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu_model.py -s 2>&1 | grep -v Warning | tail -25 | tee "$OUT/gputests.txt" ;;
    bench-decode)
      log bench decode; timeout 480 python -m bench.cli decode --batch 1,8,32 --variants ${VARIANTS:-untuned,tuned,torch-eager} --json "$OUT/decode.json" 2>&1 | tail -30 | tee "$OUT/decode.txt" ;;
    bench-prefill)
      log bench prefill; timeout 420 python -m bench.cli prefill --seq-len 128,512,1024 --variants ${VARIANTS:-untuned,tuned,torch-eager} --json "$OUT/prefill.json" 2>&1 | tail -30 | tee "$OUT/prefill.txt" ;;
    bench-kernels)
      log bench kernels; timeout 420 python -m bench.cli kernels --phase decode --batch 8 --json "$OUT/kernels_decode.json" 2>&1 | tail -30 | tee "$OUT/kernels_decode.txt" ;;
    tune-decode)
      log tune decode; timeout ${TUNE_LIMIT:-540} python -m tuning.cli --arch sm_90 --quantization ${QUANT:-q0f16} --phases decode --batch-buckets ${BATCHES:-8} --trials-per-task ${TRIALS:-32} --space ${SPACE:-llm} --kinds ${KINDS:-gemv,reduction,elementwise} 2>&1 | tail -40 | tee "$OUT/tune_decode.txt" ;;
    tune-prefill)
      log tune prefill; timeout ${TUNE_LIMIT:-540} python -m tuning.cli --arch sm_90 --quantization ${QUANT:-q0f16} --phases prefill --prefill-buckets ${CHUNKS:-1024} --trials-per-task ${TRIALS:-32} --space ${SPACE:-llm} 2>&1 | tail -40 | tee "$OUT/tune_prefill.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
