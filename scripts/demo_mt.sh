#!/usr/bin/env bash
# Quick start: set up, then train MemSizer and the softmax transformer on
# Multi30k (configs/mt/multi30k_demo.yaml: the CPU recipe cut to 400 updates),
# decode the test set with fairseq-generate and print BLEU, chrF and decoding
# speed. It is the reproduce pipeline's --demo mode.
#   bash scripts/demo_mt.sh --data ../shared/data/multi30k   # local raw files
#   bash scripts/demo_mt.sh                                   # downloads Multi30k
# Options (--updates N, --families ..., --work DIR): python scripts/reproduce.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
exec python "$ROOT/scripts/reproduce.py" mt --demo "$@"
