#!/usr/bin/env bash
# Sets up the project's virtual environment if needed (scripts/setup.sh), then runs the test suite.
# pytest's exit code is returned as is: "no tests collected" (5) is a failure, not a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
