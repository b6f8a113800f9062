#!/usr/bin/env bash
# Creates .venv, installs torch (the CPU build, only where no torch is present), then Tessera with its
# test extras. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    # The pinned release is the CPU build; a loose spec would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
# The build backend's chatter goes to a log, shown only when the install fails.
if ! .venv/bin/python -m pip install --quiet -e ".[test]" >.venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup: installing the project failed (log above, also in .venv/setup.log)" >&2
    exit 1
fi
echo "setup: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
