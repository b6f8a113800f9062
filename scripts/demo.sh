#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set up, then run Tessera end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
sample=$(python -m vision.sample .cache/sample.jpg)
echo "== tessera preprocess --pan-and-scan $sample"
tessera preprocess --pan-and-scan "$sample"
