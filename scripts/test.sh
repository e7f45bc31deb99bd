#!/usr/bin/env bash
# The import contracts (.importlinter: the tree's layering), then the test suite on CPU (what CI runs). Prints the
# slowest tests and the skipped ones (-ra, and conftest's count); --no-skips fails the run if any test skipped:
# GPU-only tests are deselected on CPU, so nothing should skip. The tests run on PYTEST_WORKERS pytest-xdist workers
# (default 2, CI's cores); a file's tests stay on one worker (--dist loadfile), so a module's engine is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
lint-imports
exec python -m pytest tests -q -ra --durations=25 --timeout=900 --no-skips \
    -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
