#!/usr/bin/env bash
# Checks that pyproject.toml's lower bounds are real: installs every direct dependency (and the [test]
# extra) at the oldest release its bound admits into .cache/lowest-venv, transitive dependencies as pip
# resolves them, then runs the test suite there. torch stays at the locked build (2.5's need, enable_gqa,
# is an API fact; an old torch from PyPI is a multi-GB CUDA download). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.cache/lowest-venv
mkdir -p .cache
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
# name>=X becomes name==(the oldest final release >= X that the index has), e.g. opencv 4.8 -> 4.8.0.74.
"$venv/bin/python" - >.cache/lowest-constraints.txt <<'PY'
import re, subprocess, sys, tomllib

def release(version):
    return tuple(int(part) for part in version.split("."))

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.strip()).groups()
    if name == "torch":
        continue
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                             capture_output=True, text=True, check=True).stdout
    available = re.search(r"Available versions: (.*)", listing).group(1).split(", ")
    finals = [v for v in available if re.fullmatch(r"[0-9.]+", v) and release(v) >= release(bound)]
    print(f"{name}=={min(finals, key=release)}")
PY
"$venv/bin/python" -m pip install --quiet -c requirements-lock.txt torch
"$venv/bin/python" -m pip install --quiet -c .cache/lowest-constraints.txt -e ".[test]"
echo "lowest: installed $(tr '\n' ' ' <.cache/lowest-constraints.txt)"
exec "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
