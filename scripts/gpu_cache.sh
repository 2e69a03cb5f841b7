#!/usr/bin/env bash
# The GPU check's Triton kernels compiled ahead, on a machine without a GPU
# (scripts/gpu_check.sh unpacks them into Triton's cache on the GPU machine):
#   bash scripts/gpu_cache.sh [PYTHON] [TRITON]     (defaults: python3.12, 3.6.0)
# Triton finds a compiled kernel only with the build of Triton that compiled it, so
# this compiles with the GPU machine's: give its Python (the minor version counts) and
# the Triton its torch pins (torch 2.11, the first GPU run's, pins 3.6.0). It makes a
# virtualenv for them once ($GPU_CACHE_VENV, default ~/.cache/linear_fairseq/...: torch's
# CPU build, that Triton, and the wheels of ../shared/gpu/wheels.sh in .gpu/whl, fla-core
# among them), then writes .gpu/triton-cache.tar.xz with python -m benchmarks.triton_cache
# (about 25 minutes on 2 cores). Rerun it after changing a kernel: an entry is its source's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3.12}"
TRITON="${2:-3.6.0}"
if ! command -v "$PY" >/dev/null; then
    echo "gpu_cache: $PY not found: give the GPU machine's Python, e.g. bash scripts/gpu_cache.sh python3.12" >&2
    exit 1
fi
if ! ls "$ROOT"/.gpu/whl/fla_core-*.whl >/dev/null 2>&1; then
    echo "gpu_cache: .gpu/whl has no fla-core wheel: run bash ../shared/gpu/wheels.sh first" >&2
    exit 1
fi
minor="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="${GPU_CACHE_VENV:-$HOME/.cache/linear_fairseq/gpu-cache-py$minor-triton$TRITON}"
if ! "$venv/bin/python" -c "import triton, fairseq, fla, sys; sys.exit(triton.__version__ != '$TRITON')" 2>/dev/null
then
    echo "[gpu_cache] making $venv (Python $minor, Triton $TRITON)" >&2
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet)
    "${pip[@]}" --no-deps --retries 1 --timeout 15 torch \
        --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" || "${pip[@]}" torch
    "${pip[@]}" "triton==$TRITON"
    "${pip[@]}" --no-deps "$ROOT"/.gpu/whl/*.whl
    # what torch, fairseq (for text tasks) and fla-core import
    "${pip[@]}" filelock fsspec jinja2 networkx sympy typing-extensions numpy regex tqdm pyyaml sacrebleu \
        scikit-learn cffi packaging sentencepiece einops
fi
cd "$ROOT"
env -u TRITON_INTERPRET PYTHONPATH="$ROOT" "$venv/bin/python" -m benchmarks.triton_cache \
    --out "$ROOT/.gpu/triton-cache.tar.xz" "${@:3}"
