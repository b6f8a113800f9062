#!/usr/bin/env bash
# Refreshes requirements-lock.txt to the newest versions that pyproject.toml (dependencies + [test])
# and scripts/lock.in allow, with pip-tools' pip-compile, then installs exactly those into .venv and
# runs the test suite against them. If the suite fails, the previous lock is put back, .venv is synced
# back to it, the rejected lock is left in .cache/requirements-lock.rejected.txt, and it exits 1.
# Run it when a dependency's new release matters, before a release, and after changing a bound in
# pyproject.toml; commit requirements-lock.txt when it passes. Extra arguments go to pytest.
# Elsewhere than the dev machines (whose pip finds the CPU build of torch on local disk), add the CPU
# wheel index first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tools=.cache/lock-tools
mkdir -p .cache
if [ ! -x "$tools/bin/pip-compile" ]; then
    "$PYTHON" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --upgrade pip pip-tools
fi
cp requirements-lock.txt .cache/requirements-lock.previous.txt
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/bin/pip-compile" --quiet --upgrade --extra test \
    --strip-extras --no-emit-index-url --no-emit-find-links --output-file requirements-lock.txt \
    pyproject.toml scripts/lock.in
if cmp -s requirements-lock.txt .cache/requirements-lock.previous.txt; then
    echo "lock: no newer versions allowed; requirements-lock.txt unchanged"
else
    echo "lock: changed pins:"
    diff <(grep '==' .cache/requirements-lock.previous.txt) <(grep '==' requirements-lock.txt) | grep '^[<>]' || true
fi
if bash scripts/test.sh "$@"; then
    echo "lock: the suite passes on requirements-lock.txt; commit it"
else
    cp requirements-lock.txt .cache/requirements-lock.rejected.txt
    cp .cache/requirements-lock.previous.txt requirements-lock.txt
    bash scripts/setup.sh >/dev/null
    echo "lock: the suite failed on the refreshed versions; the previous lock is back in place and" \
        "the rejected one is in .cache/requirements-lock.rejected.txt" >&2
    exit 1
fi
