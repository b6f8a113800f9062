"""`tessera serve` as a real process: SIGTERM during a stream drains cleanly, `tessera query` answers,
configuration comes from flags and TESSERA_* variables; the committed stubs match the .proto files."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service_fixtures import build_tiny_vlm_with_tokenizer, free_port

REPO = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_not_stale(tmp_path):
    from service.protogen import generate

    written = generate(tmp_path)
    assert written
    for path in written:
        committed = REPO / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run scripts/gen_proto.sh"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run scripts/gen_proto.sh"


def test_flags_win_over_environment_and_secrets_are_redacted():
    from service.commands.serve import add_arguments
    from service.config import from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["lm", "--max-batch", "4"])
    environ = {"TESSERA_MAX_BATCH": "2", "TESSERA_METRICS_PORT": "9100", "TESSERA_AUTH_TOKEN": "s3cr3t-value",
               "TESSERA_GRACE_PERIOD": "7.5"}
    config = from_args("lm", args, environ)
    assert (config.max_batch, config.metrics_port, config.auth_token, config.grace_period, config.port) == \
        (4, 9100, "s3cr3t-value", 7.5, 50052)
    printed = json.loads(config.redacted_json())
    assert printed["auth_token"] == "<redacted>" and "s3cr3t" not in config.redacted_json()
    assert from_args("gateway", parser.parse_args(["gateway"]), {}).port == 50050
    with pytest.raises(ValueError, match="TESSERA_MAX_QUEUE"):
        from_args("lm", args, {"TESSERA_MAX_QUEUE": "many"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_vlm_with_tokenizer(tmp_path_factory.mktemp("tiny-vlm-proc"))


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {target} not SERVING after {timeout} s")


def test_sigterm_during_a_stream_finishes_it_then_exits(checkpoint):
    port = free_port()
    env = {**os.environ, "TESSERA_GRACE_PERIOD": "30", "TESSERA_METRICS_PORT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "all", "--model", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--kv-budget-mb", "64", "--max-seq-len", "1024"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process)
        answer = subprocess.run([sys.executable, "-m", "service.cli", "query", "--target", target, "--stream",
                                 "--max-new-tokens", "4", "Say hi"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert answer.returncode == 0, answer.stderr
        assert "4 generated tokens" in answer.stderr

        with grpc.insecure_channel(target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.QueryRequest(prompt="go on", sampling=lm_pb2.SamplingParams(
                max_new_tokens=300, stop_token_ids=lm_pb2.StopTokenIds()))
            stream = stub.QueryStream(request, timeout=60)
            pieces = [next(stream) for _ in range(3)]
            process.send_signal(signal.SIGTERM)
            pieces += list(stream)  # the in-flight stream runs to its end within the grace period
        assert pieces[-1].HasField("done") and pieces[-1].done.finish_reason == "length"
        assert pieces[-1].done.completion_tokens == 300
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    config = json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))
    assert config["role"] == "all" and config["grace_period"] == 30.0 and config["port"] == port
    assert "stopping" in stderr
