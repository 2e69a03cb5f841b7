#!/usr/bin/env bash
# The GPU check's Triton kernels compiled ahead, on a machine without a GPU
# (scripts/gpu_check.sh unpacks them into Triton's cache on the GPU machine):
#   bash scripts/gpu_cache.sh [PYTHON] [TORCH]     (defaults: python3.12, 2.11.0)
# Triton finds a compiled kernel only with the build of Triton that compiled it, so
# this compiles with the GPU machine's: give its Python (the minor version counts) and
# its torch release, whose Linux wheel pins its Triton (torch 2.11.0, the first GPU run's,
# pins Triton 3.6.0). It makes a virtualenv for them once ($GPU_CACHE_VENV, default under
# ~/.cache/linear_fairseq: that torch with its CUDA libraries, about 5 GB, and the wheels of
# ../shared/gpu/wheels.sh in .gpu/whl, fla-core among them), then writes
# .gpu/triton-cache.tar.xz with python -m benchmarks.triton_cache (about 25 minutes on 2
# cores; more arguments go to it). Rerun it after changing a kernel: an entry is its source's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3.12}"
TORCH="${2:-2.11.0}"
if ! "$PY" -c "import sys" 2>/dev/null; then
    echo "gpu_cache: $PY does not run here: give the GPU machine's Python, e.g. /usr/bin/python3.12" >&2
    exit 1
fi
if ! ls "$ROOT"/.gpu/whl/fla_core-*.whl >/dev/null 2>&1; then
    echo "gpu_cache: .gpu/whl has no fla-core wheel: run bash ../shared/gpu/wheels.sh first" >&2
    exit 1
fi
minor="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${GPU_CACHE_VENV:-$HOME/.cache/linear_fairseq/gpu-cache-py$minor-torch$TORCH}"
ready="import torch, triton, fairseq, fla, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')"
if ! "$venv/bin/python" -c "$ready" 2>/dev/null; then
    echo "[gpu_cache] making $venv (Python $minor, torch $TORCH)" >&2
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet)
    "${pip[@]}" "torch==$TORCH"
    "${pip[@]}" --no-deps "$ROOT"/.gpu/whl/*.whl
    # what fairseq (for text tasks) and fla-core import
    "${pip[@]}" numpy regex tqdm pyyaml sacrebleu scikit-learn cffi packaging sentencepiece einops
fi
cd "$ROOT"
env -u TRITON_INTERPRET PYTHONPATH="$ROOT" "$venv/bin/python" -m benchmarks.triton_cache \
    --out "$ROOT/.gpu/triton-cache.tar.xz" "${@:3}"
