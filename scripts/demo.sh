#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set up, then run Tessera end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
sample=$(python -m vision.sample .cache/sample.jpg)
echo "== tessera preprocess --pan-and-scan $sample"
tessera preprocess --pan-and-scan "$sample"

# The gRPC stack on the embedded default (serve all: gateway + LM in one process) on a free port.
# The embedded Gemma 3 270M is a text-only base (pretrained, not instruction-tuned) model, so the
# query is a plain-text completion (--raw); image queries need a vision-language checkpoint
# (serve all --model DIR) and add --image PATH.
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== tessera serve all --port $port (background)"
tessera serve all --host 127.0.0.1 --port "$port" --metrics-port 0 --max-seq-len 1024 --kv-budget-mb 256 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
python - "$port" <<'PY'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except grpc.RpcError:
        pass
    time.sleep(0.5)
sys.exit("server did not become SERVING within 600 s")
PY
prompt="The printing press was invented by"
echo "== tessera query --raw --stream '$prompt'"
tessera query --target "127.0.0.1:$port" --raw --stream --max-new-tokens 32 "$prompt"
echo "== stopping the server (SIGTERM, graceful)"
kill -TERM "$server"
wait "$server"
trap - EXIT
