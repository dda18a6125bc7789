#!/usr/bin/env bash
# Kernel checks on a GPU (issue 12 items 5-7): the cuda-marked kernel tests, then the EMA and
# dual-time embedding benchmarks. Each part writes its log to $OUT (or ./gpu_kernel_check/) as it
# finishes, so a timeout loses only the part it interrupted.
#   bash benchmarks/gpu_kernel_check.sh            # needs torch with CUDA, triton, pytest, diffusers
# Extra packages may be put in build/gpu_deps (added to PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_kernel_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/build/gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
[ -e twinflow/kernels ] || ln -s ../kernels twinflow/kernels
unset TRITON_INTERPRET
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/versions.txt"
timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -m cuda -W ignore::RuntimeWarning \
  tests/kernels/test_common_helpers.py tests/kernels/test_ema.py tests/kernels/test_twinflow_loss.py \
  tests/kernels/test_dual_time_embedding.py -k "not zero3" 2>&1 | tail -40 | tee "$OUT/cuda_tests.txt"
for match in ${BENCH_MATCH:-ema/ dual_time_embedding/}; do
  timeout "${BENCH_TIMEOUT:-240}" python benchmarks/run_gpu.py --only kernels --match "$match" \
    2>&1 | tail -40 | tee "$OUT/bench_${match%/}.txt"
done
cp benchmarks/results/gpu_cuda.json "$OUT/" 2>/dev/null || true
