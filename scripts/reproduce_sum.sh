#!/usr/bin/env bash
# Summarization table: every family trained with one config, decoded, scored (ROUGE).
#   bash scripts/reproduce_sum.sh --scale cpu --raw ../shared/data/news
#   bash scripts/reproduce_sum.sh --scale paper --families memsizer,transformer
# Options: python scripts/reproduce.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
exec python "$ROOT/scripts/reproduce.py" sum "$@"
