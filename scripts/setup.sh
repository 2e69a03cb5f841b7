#!/usr/bin/env bash
# Set up linear_fairseq in ./.venv (or in the virtualenv that is already active).
# Idempotent: a second run only checks. Source it to stay in the env, or run it.
#   - torch: kept if already importable (a CUDA build too); otherwise torch 2.13.0,
#     the CPU build on machines without an NVIDIA driver (no multi-GB CUDA download).
#   - fairseq: ve-fairseq 0.12.3 (prebuilt cp311 wheel of fairseq main), installed
#     without its declared deps so torchaudio is never pulled in.
#   - linear_fairseq in editable mode with its deps and the test extra.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
    # shellcheck disable=SC1091
    . "$ROOT/.venv/bin/activate"
fi
PIP="python -m pip install --quiet"
stamp="$VIRTUAL_ENV/.linear_fairseq-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | cksum)"
# installed already: the stamp matches and the packages are found (found, not imported: importing
# torch and fairseq takes seconds, and every script runs this check)
found="import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch', 'fairseq', 'linear_fairseq'))))"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "$found" 2>/dev/null; then
    exit 0 2>/dev/null || return 0
fi
echo "[setup] installing into $VIRTUAL_ENV" >&2
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PIP "torch==2.13.0"
    else
        # torch alone from the CPU index (fail fast if it is unreachable and a
        # local wheel serves), then its dependencies from the usual index
        $PIP --no-deps --retries 1 --timeout 15 "torch==2.13.0" \
            --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
        $PIP "torch==2.13.0"
    fi
fi
$PIP --no-deps "ve-fairseq==0.12.3"
$PIP -e "$ROOT[test,bench]"
python -c "import fairseq, torch, linear_fairseq; print(f'[setup] fairseq {fairseq.__version__}, torch {torch.__version__}')" 2>/dev/null
echo "$want" > "$stamp"
