#!/usr/bin/env bash
# Every GPU check in one command, on a machine with an NVIDIA GPU:
#   bash scripts/gpu_check.sh [OUT]        (default benchmarks/results/cuda)
# Steps, most telling first:
# 1. benchmarks/gpu_ops_check.py: every family's fast forms against the quadratic
#    references on the GPU (outputs, gradients), fp16/bf16 at T = 4096 and 16384,
#    each LM's decoding steps and training pass (fp32, bf16) on the Triton kernels
#    against the torch forms, then forward+backward time and memory against SDPA
#    and fla-core                                                     -> OUT/gpu_ops.json
# 2. python -m benchmarks.run --device cuda, suites train, decode (to 256 and 1024 tokens;
#    the decoding target is at 256), then train again in bfloat16 (as fairseq's --bf16
#    runs a model)                                        -> OUT/{train,decode,train-bf16}/results.{json,md}
#    python -m benchmarks.profile_train --device cuda: one training step of every row at
#    context 2048, in float32 and bfloat16, by operator: kernels launched, where the
#    time goes                                                        -> OUT/train_profile.json
# 3. python -m benchmarks.train_check --precision fp16,amp: a short fairseq-train of every
#    family through the stock CLI on generated data, with --fp16 and with --amp
#                                                                      -> OUT/train_check.json
# 4. the local suite (local precision's cost, 256 tokens)              -> OUT/local/results.{json,md}
# 5. python -m benchmarks.gpu_block: the issue's GPU targets as measured, and the
#    checks, as the GPU block of docs/performance.md                  -> OUT/gpu_check.md
#    (python -m benchmarks.gpu_block OUT --readme docs/performance.md puts it there)
# The whole check keeps to GPU_CHECK_SECONDS (default 540): each step runs under a
# time limit of its own, at most what is left less 30 s kept for the block; a step
# that runs out of time is stopped and named, one that no time is left for is skipped
# and named, and the block says which files are missing.
# Kernels compiled ahead: where .gpu/triton-cache.tar.xz (or $GPU_CHECK_KERNELS) exists
# (python -m benchmarks.triton_cache, run on a CPU machine with this machine's Python and
# Triton: bash scripts/gpu_cache.sh), its kernels go into Triton's cache here first, so
# that launches that match them load rather than compile; OUT/triton_cache.json says what
# they were built with and how many kernels the check compiled here all the same.
# Triton's autotuner times each configuration over 10 ms rather than 100
# (GPU_CHECK_AUTOTUNE_MS; fla-core's kernels try up to 48 configurations a new key).
# It uses the Python whose torch sees CUDA (python3, or $PYTHON). Where fairseq
# is not installed, the wheels of ../shared/gpu/wheels.sh in .gpu/whl are
# installed into a temporary folder first (no network needed). Each step's
# output goes to OUT/gpu_check.log as well; a failed step is named at the end.
# An OUT that holds an earlier check (its gpu_check.log) is refused.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/benchmarks/results/cuda}" && cd "${1:-$ROOT/benchmarks/results/cuda}" && pwd)"
PY="${PYTHON:-python3}"
SECONDS_ALL="${GPU_CHECK_SECONDS:-540}"
case "$SECONDS_ALL" in
    ''|*[!0-9]*) echo "gpu_check: GPU_CHECK_SECONDS=$SECONDS_ALL: give whole seconds, e.g. 540" >&2; exit 1 ;;
esac
deadline=$(( $(date +%s) + SECONDS_ALL ))  # the wheels' installation counts too
cd "$ROOT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY's torch on this machine; run it where one is" >&2
    exit 1
fi
if [ -e "$OUT/gpu_check.log" ]; then
    echo "gpu_check: $OUT holds an earlier check (gpu_check.log); give another OUT, or move that one away" >&2
    exit 1
fi
if ! "$PY" -c "import fairseq" 2>/dev/null; then
    if ! ls .gpu/whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: fairseq is not installed and .gpu/whl has no wheels: run bash ../shared/gpu/wheels.sh on a machine with package access and copy .gpu/ along" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .gpu/whl/*.whl || exit 1
    export PATH="/tmp/gpu_check_site/bin:$PATH"
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_AUTOTUNE_MS=10
cached="" kernels="${GPU_CHECK_KERNELS:-.gpu/triton-cache.tar.xz}"
if [ -f "$kernels" ]; then
    "$PY" -m benchmarks.triton_cache --unpack "$kernels" --record "$OUT/triton_cache.json" 2>&1 \
        | tail -1 | tee -a "$OUT/gpu_check.log" && cached=1
fi
within() {  # within SECONDS COMMAND...: coreutils' timeout where the machine has it (exit 124 when stopped)
    if command -v timeout >/dev/null; then timeout "$@"; else shift; "$@"; fi
}
failed=()
step() {  # step NAME LIMIT COMMAND...: run it under min(LIMIT, time left - 30 s), its output to the console and the log
    local name="$1" limit="$2" left
    shift 2
    left=$(( deadline - $(date +%s) - 30 ))
    [ "$name" = block ] && left=$(( left + 30 ))
    if [ "$left" -lt 10 ]; then
        echo "== gpu_check: $name skipped: no time left of GPU_CHECK_SECONDS=$SECONDS_ALL" | tee -a "$OUT/gpu_check.log"
        failed+=("$name (skipped, no time left)")
        return
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    echo "== gpu_check: $name (at most $limit s)" | tee -a "$OUT/gpu_check.log"
    within "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
    case "${PIPESTATUS[0]}" in
        0) ;;
        124) failed+=("$name (stopped after $limit s)") ;;
        *) failed+=("$name") ;;
    esac
}
step ops 180 "$PY" benchmarks/gpu_ops_check.py --device cuda --out "$OUT/gpu_ops.json"
step train-suite 150 "$PY" -m benchmarks.run --device cuda --suite train --budget 60 --out "$OUT/train" --no-plots
step decode-suite 150 "$PY" -m benchmarks.run --device cuda --suite decode --lengths 256,1024 --budget 30 \
    --out "$OUT/decode" --no-plots
step train-suite-bf16 120 "$PY" -m benchmarks.run --device cuda --suite train --dtype bfloat16 --budget 60 \
    --out "$OUT/train-bf16" --no-plots
step train-profile 90 "$PY" -m benchmarks.profile_train --device cuda --ctx 2048 --dtype float32,bfloat16 \
    --out "$OUT/train_profile.json"
step half-train 150 "$PY" -m benchmarks.train_check --precision fp16,amp --updates 40 --out "$OUT/train_check.json"
step local-suite 90 "$PY" -m benchmarks.run --device cuda --suite local --lengths 256 --budget 30 --out "$OUT/local" \
    --no-plots
[ -n "$cached" ] && "$PY" -m benchmarks.triton_cache --tally --record "$OUT/triton_cache.json" 2>&1 | tail -1 \
    | tee -a "$OUT/gpu_check.log"
step block 60 "$PY" -m benchmarks.gpu_block "$OUT"
if [ "${#failed[@]}" -gt 0 ]; then
    printf -v list '%s, ' "${failed[@]}"
    echo "gpu_check: steps that did not finish: ${list%, } (log: $OUT/gpu_check.log)" >&2
    exit 1
fi
echo "gpu_check: done; JSON and tables in $OUT"
