#!/usr/bin/env bash
# Quick start: set up, then train MemSizer and the softmax transformer on
# Multi30k, decode with fairseq-generate and print BLEU and decoding speed.
#   bash scripts/demo_mt.sh --data ../shared/data/multi30k   # local raw files
#   bash scripts/demo_mt.sh                                   # downloads Multi30k
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
exec python "$ROOT/scripts/demo_mt.py" "$@"
