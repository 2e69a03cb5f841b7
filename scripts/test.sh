#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite, one pytest worker per core
# (pytest-xdist; a test file stays on one worker, so its shared fixtures are
# built once; files go out in the order tests/conftest.py collects them, the
# end-to-end ones first); the 25 slowest tests are listed at the end. Extra
# arguments go to pytest: -n 0 runs in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"
cd "$ROOT"
exec python -m pytest -q -ra -n auto --dist loadfile --no-loadscope-reorder --durations=25 "$@"
