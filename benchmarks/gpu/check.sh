#!/usr/bin/env bash
# The prepared GPU check: one script for a fresh 1-GPU machine that has torch, triton, transformers and
# peft but no diffusers or DeepSpeed and no network. Run it from the repository root:
#
#   bash benchmarks/gpu/wheels.sh                 # here, with network: .whl/ (diffusers, DeepSpeed, ...)
#   OUT=/some/folder bash benchmarks/gpu/check.sh [part ...]      # there; parts: setup kernels train bench
#
# setup   installs the carried wheels and this package into $GPU_CHECK_SITE, writes env.json
# kernels compiles every Triton kernel on the GPU and checks it against eager (the `cuda`-marked tests)
# train   a tiny 1-GPU ZeRO-3 run with the GPU optimizers: save, kill, resume, equal losses
#         (benchmarks/gpu/train_check.py)
# bench   the kernel benchmarks (benchmarks/run_gpu.py --only kernels; GPU_CHECK_MATCH=ema/ narrows them),
#         masked vs packed attention (benchmarks/attention_paths.py), then the end-to-end step; each
#         results JSON is copied to $OUT when its call ends
#
# Each part writes its log to $OUT/<part>.log and one line to $OUT/summary.txt the moment it ends, and is
# stopped after $GPU_CHECK_PART_SECONDS (default 480): a timeout loses nothing already written.
# GPU_CHECK_DRY_RUN=1 (what CI runs) does every step that needs no GPU: the install into a scratch
# folder, collecting the cuda tests, the training commands, and the benchmark's refusal without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
SITE=${GPU_CHECK_SITE:-/tmp/twinflow_gpu_site}
LIMIT=${GPU_CHECK_PART_SECONDS:-480}  # one part per device call when the lease is short: check.sh train, then kernels, then bench
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(setup kernels train bench)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

note() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

setup() {
    mkdir -p "$SITE"
    # The wheels are built for the GPU machine's Python (3.12); a dry run installs only this package.
    if [ "$DRY" != 1 ]; then
        ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ folder: run benchmarks/gpu/wheels.sh first and carry .whl"; return 3; }
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return
    fi
    # This package, built from the checkout (setuptools is on the image; nothing is fetched).
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$ROOT" || return
    (cd "$OUT" && $PY -m twinflow.env --json > "$OUT/env.json") && cat "$OUT/env.json"
}

kernels() {
    # From a folder outside the checkout: the installed package is what runs, as for a user.
    if [ "$DRY" = 1 ]; then
        (cd "$OUT" && $PY -m pytest -q -p no:cacheprovider -m cuda --collect-only "$ROOT/tests/kernels")
    else
        (cd "$OUT" && $PY -m pytest -q -p no:cacheprovider -m cuda -rs "$ROOT/tests/kernels" "$ROOT/tests/backbones")
    fi
}

train() {
    local dry=(); [ "$DRY" = 1 ] && dry=(--dry-run)
    (cd "$OUT" && $PY "$ROOT/benchmarks/gpu/train_check.py" --work /tmp/twinflow_train_check "${dry[@]}")
}

bench() {
    if [ "$DRY" = 1 ]; then
        # Without a GPU the benchmark must refuse (exit 2) with its reason, measuring nothing.
        $PY benchmarks/run_gpu.py; [ $? -eq 2 ]
        return
    fi
    # Kernels first (each record is written when its call ends), then the attention paths and the step.
    local rc=0
    $PY benchmarks/run_gpu.py --only kernels ${GPU_CHECK_MATCH:+--match "$GPU_CHECK_MATCH"} || rc=1
    $PY benchmarks/attention_paths.py || rc=1
    $PY benchmarks/run_gpu.py --only e2e || rc=1
    return $rc
}

status=0
for part in "${PARTS[@]}"; do
    case $part in setup|kernels|train|bench) ;; *) note "$part: unknown part (setup kernels train bench)"; exit 2;; esac
    start=$(date +%s)
    timeout "$LIMIT" bash -c "$(declare -f $part); $(declare -p ROOT OUT SITE DRY PY); $part" > "$OUT/$part.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    note "$part: rc=$rc in $(( $(date +%s) - start )) s ($( [ $rc -eq 124 ] && echo 'TIMED OUT' || ([ $rc -eq 0 ] && echo ok || echo FAILED) ))"
done
exit $status
