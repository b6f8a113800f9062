#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set up, then run Tessera end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
sample=$(python -m vision.sample .cache/sample.jpg)
echo "== tessera preprocess --pan-and-scan $sample"
tessera preprocess --pan-and-scan "$sample"

server=""
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
start_stack() {  # start_stack MODEL: `tessera serve all` on free ports (gRPC, HTTP), wait until SERVING
    port=$(free_port)
    http_port=$(free_port)
    echo "== tessera serve all --model $1 --port $port --http-port $http_port (background)"
    tessera serve all --model "$1" --host 127.0.0.1 --port "$port" --http-port "$http_port" --metrics-port 0 \
        --max-seq-len 2048 --kv-budget-mb 256 &
    server=$!
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
}
stop_stack() {
    echo "== stopping the server (SIGTERM, graceful)"
    kill -TERM "$server"
    wait "$server"
    server=""
}
trap '[ -n "$server" ] && kill -TERM $server 2>/dev/null || true' EXIT

# The embedded Gemma 3 270M is a text-only base (pretrained, not instruction-tuned) model, so its
# query is a plain-text completion (--raw).
start_stack gemma3-270m
prompt="The printing press was invented by"
echo "== tessera query --raw --stream '$prompt'"
tessera query --target "127.0.0.1:$port" --raw --stream --max-new-tokens 32 "$prompt"
echo "== the same through the OpenAI-compatible HTTP API (openai client, POST /v1/completions)"
python - "$http_port" "$prompt" <<'PY'
import sys
from openai import OpenAI
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
reply = client.completions.create(model="gemma3-270m", prompt=sys.argv[2], max_tokens=32, temperature=0)
print(sys.argv[2] + reply.choices[0].text)
print(f"[{reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} completion tokens]")
PY
stop_stack

# Image + text through the same stack. No real SigLIP weights can be had here, so this runs a tiny
# random-weight Gemma 3 vision-language checkpoint with the 270M's tokenizer: the tiles, soft tokens
# and prompt layout are real, the words are noise. Serve a real checkpoint directory (4B/12B/27B)
# with --model DIR for real answers.
tiny=.cache/tiny-random-vlm
if [ ! -f "$tiny/config.json" ]; then
    python -c "import sys; from pathlib import Path; from service.tiny_checkpoints import write_tiny_captioning_checkpoint as w; w(Path(sys.argv[1]))" "$tiny" 2>/dev/null
fi
start_stack "$tiny"
echo "== tessera query --image $sample --pan-and-scan 'Describe this image.'   (random weights: the text is noise)"
tessera query --target "127.0.0.1:$port" --image "$sample" --pan-and-scan --max-new-tokens 12 "Describe this image."
stop_stack
trap - EXIT
