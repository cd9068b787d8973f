#!/usr/bin/env bash
# The GPU checks of the engine in one run, for a session that is lent a CUDA machine (H100/H200):
# the CUDA tests, then the GPU benchmark. Results go to $OUT (default: ./gpu_checks), each with the
# machine it ran on; record them in experiments/RESULTS.md with the date and this command.
#
#     bash experiments/gpu_checks.sh            # about 5-8 minutes on an H200
#
# It needs torch with CUDA, triton, pytest, numpy and scikit-learn (the real-gradient fixture), all
# of them in the lent machines' image; nothing of the Hydra app. The package runs from the
# checkout (PYTHONPATH), so no install is needed there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_checks}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
  date -u +"date %FT%TZ"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/machine.txt"

# 1. The CUDA tests: paged == device, peak memory, accuracy through the Triton kernels, CUDA graphs.
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fisher_gpu.py 2>&1 | tee "$OUT/test_fisher_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. Issue 11's GPU table: dynamic d = 272,474 and 11.7M at m = 1024 (fp32/bf16, device and paged),
#    static d = 2M; each case next to its floor, with ops, host reads and peak memory.
timeout 420 python3 experiments/bench_fisher.py --device cuda --json "$OUT/bench_fisher_gpu.json" \
  2>&1 | tee "$OUT/bench_fisher_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit "$status"
