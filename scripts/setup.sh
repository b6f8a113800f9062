#!/usr/bin/env bash
# Creates .venv and installs Tessera with its test extras at the exact versions of
# requirements-lock.txt (pip constraints compiled by scripts/lock.sh). torch: the locked CPU build,
# only where no torch is present; a torch already in .venv (a CUDA build, say) is kept and the rest
# of the lock still applies. Safe to run again: pip changes only what differs from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements-lock.txt
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
constraints=$LOCK
skip=()
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    # The locked release is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet -c "$LOCK" torch
elif ! .venv/bin/python scripts/check_lock.py --quiet torch; then
    echo "setup: keeping the torch already installed; every other package comes from $LOCK" >&2
    constraints=.venv/constraints-without-torch.txt
    grep -v '^torch==' "$LOCK" >"$constraints"
    skip=(--skip torch)
fi
# The build backend's chatter goes to a log, shown only when the install fails.
if ! .venv/bin/python -m pip install --quiet -c "$constraints" -e ".[test]" >.venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup: installing the project failed (log above, also in .venv/setup.log)" >&2
    exit 1
fi
.venv/bin/python scripts/check_lock.py "${skip[@]}"
