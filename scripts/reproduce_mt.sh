#!/usr/bin/env bash
# Translation table: every family trained with one config, decoded, scored.
#   bash scripts/reproduce_mt.sh --scale cpu --raw ../shared/data/multi30k
#   bash scripts/reproduce_mt.sh --scale paper [--dataset iwslt14] --families memsizer,transformer
# Options: python scripts/reproduce.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
exec python "$ROOT/scripts/reproduce.py" mt "$@"
