#!/usr/bin/env bash
# Language-modeling table: every family trained with one config, perplexity by fairseq-eval-lm.
#   bash scripts/reproduce_lm.sh --scale cpu --raw ../shared/data/austen
#   bash scripts/reproduce_lm.sh --scale paper --families memsizer,transformer
# Options: python scripts/reproduce.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
exec python "$ROOT/scripts/reproduce.py" lm "$@"
