#!/usr/bin/env bash
# Builds .whl/ for benchmarks/gpu/check.sh on a machine WITH network (here). The GPU machine has torch,
# triton, transformers and peft but no diffusers or DeepSpeed, and reaches no package index; these are
# the packages it lacks (Python 3.12, x86-64 manylinux), at the versions in constraints.txt.
# Usage: bash benchmarks/gpu/wheels.sh [folder]     (default .whl; keep it out of git: .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
mkdir -p "$DEST"
pin() { grep -i "^$1==" constraints.txt | head -1; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Pure-Python or binary wheels for CPython 3.12; no dependencies resolved (the image has the rest).
for name in diffusers hjson pydantic pydantic_core annotated-types typing-inspection importlib_metadata zipp; do
    spec=$(pin "$name" || true)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
        -d "$DEST" "${spec:-$name}"
done
# DeepSpeed ships an sdist only; its wheel is pure Python (the ops are JIT-compiled where they run).
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)"
ls -1 "$DEST"
