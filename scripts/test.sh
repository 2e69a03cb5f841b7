#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
cd "$ROOT"
exec python -m pytest -q -ra "$@"
