#!/usr/bin/env bash
# Regenerate the gRPC stubs under proto/ from the .proto files (grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m service.protogen "$@"
