"""`tessera serve` as a real process: SIGTERM during a stream drains cleanly, `tessera query` answers,
configuration comes from flags and TESSERA_* variables; the committed stubs match the .proto files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
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
from service_fixtures import free_port, health_status, start_server

REPO = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_not_stale():
    from service.protogen import stale_stubs

    assert stale_stubs() == [], "stale gRPC stubs: run scripts/gen_proto.sh"


def test_staleness_ignores_version_stamps_but_not_proto_changes(tmp_path):
    """A copy of the repository's protos and stubs: restamping the stubs with other generator
    versions keeps them current; adding a field to a .proto makes its stubs stale."""
    from service.protogen import stale_stubs

    shutil.copytree(REPO / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    pb2, grpc_stub = tmp_path / "proto/tessera/lm/v1/lm_pb2.py", tmp_path / "proto/tessera/lm/v1/lm_pb2_grpc.py"
    text = pb2.read_text()
    restamped = re.sub(r"# Protobuf Python Version: \S+", "# Protobuf Python Version: 99.1.2", text)
    restamped = re.sub(r"(Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1 99, 1, 2,", restamped)
    assert restamped != text
    pb2.write_text(restamped)
    grpc_text = grpc_stub.read_text()
    grpc_stub.write_text(re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", "GRPC_GENERATED_VERSION = '9.9.9'", grpc_text))
    assert grpc_stub.read_text() != grpc_text
    assert stale_stubs(tmp_path, proto_root=tmp_path) == []

    proto = tmp_path / "proto/tessera/lm/v1/lm.proto"
    proto.write_text(proto.read_text().replace("message GetInfoRequest {", "message GetInfoRequest {\n  string added = 1;", 1))
    assert stale_stubs(tmp_path, proto_root=tmp_path) == [
        "proto/tessera/lm/v1/lm_pb2.py", "proto/tessera/lm/v1/lm_pb2.pyi"]


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


def test_serve_refuses_a_model_path_and_a_device_it_cannot_use_before_binding(tmp_path, capsys):
    """Exit status 2 with the reason, and no port bound or announced: a missing path, a file that is not
    a .gguf, a directory without config.json, an unavailable device."""
    from service.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    port = free_port()
    for model, reason in [(tmp_path / "missing", "neither a named model"), (tmp_path / "notes.txt", "not a .gguf"),
                          (tmp_path / "empty", "has no config.json")]:
        assert main(["serve", "all", "--model", str(model), "--port", str(port), "--http-port", "0",
                     "--metrics-port", "0"]) == 2
        err = capsys.readouterr().err
        assert reason in err and "listening" not in err, err
    assert main(["serve", "lm", "--device", "no-such-device", "--port", str(port), "--metrics-port", "0"]) == 2
    assert "--device" in capsys.readouterr().err
    from lm.checkpoints import ModelNotInstalledError, check_model_spec

    try:
        check_model_spec("qwen2.5-coder-1.5b-instruct")
    except ModelNotInstalledError:  # the packaged model's extra is not installed here, nor its conversion cached
        assert main(["serve", "lm", "--model", "qwen2.5-coder-1.5b-instruct", "--port", str(port),
                     "--metrics-port", "0"]) == 2
        err = capsys.readouterr().err
        assert "qwen25-coder" in err and "listening" not in err, err


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir


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


@contextlib.contextmanager
def serve_all(checkpoint, grace: int, *flags: str, environ: dict | None = None):
    """`tessera serve all` on the checkpoint as a process (grace period `grace` s, metrics off, `flags`
    added), SERVING when this yields (process, gRPC port); killed afterwards if it still runs."""
    port = free_port()
    env = {**os.environ, "TESSERA_GRACE_PERIOD": str(grace), "TESSERA_METRICS_PORT": "0", **(environ or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "all", "--model", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--kv-budget-mb", "64", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_during_a_stream_finishes_it_then_exits(checkpoint):
    with serve_all(checkpoint, 30, "--max-seq-len", "1024", environ={"TESSERA_HTTP_PORT": "0"}) as (process, port):
        target = f"127.0.0.1:{port}"
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
    stderr = process.stderr.read()
    config = json.loads(next(line for line in stderr.splitlines() if line.startswith("{")))
    assert config["role"] == "all" and config["grace_period"] == 30.0 and config["port"] == port
    assert "stopping" in stderr


def test_a_second_signal_ends_the_drain_at_once(checkpoint):
    """SIGINT starts the graceful drain (grace 60 s); a second SIGINT aborts the stream still running
    and the process exits within seconds, with status 0."""
    with serve_all(checkpoint, 60, "--max-seq-len", "4096", environ={"TESSERA_HTTP_PORT": "0"}) as (process, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = gateway_pb2.QueryRequest(prompt="go on", sampling=lm_pb2.SamplingParams(
                max_new_tokens=4000, stop_token_ids=lm_pb2.StopTokenIds()))
            stream = stub.QueryStream(request, timeout=120)
            [next(stream) for _ in range(3)]
            process.send_signal(signal.SIGINT)
            time.sleep(1.0)
            assert process.poll() is None  # draining: the stream goes on
            process.send_signal(signal.SIGINT)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError):
                list(stream)  # aborted, not run to its 4,000 tokens
            assert process.wait(timeout=30) == 0
            assert time.monotonic() - started < 20
    assert "second signal" in process.stderr.read()


def test_an_http_stream_outliving_the_grace_period_ends_with_an_error_event(checkpoint):
    """SIGTERM with a 3 s grace period and an HTTP stream that needs longer: the stream ends with OpenAI's
    error JSON (503, shutting down) and [DONE] instead of being cut mid-transfer, and the server exits 0
    without an ASGI traceback."""
    import httpx2 as httpx

    http_port = free_port()
    with serve_all(checkpoint, 3, "--http-port", str(http_port), "--max-seq-len", "8192", "--served-model-name",
                   "tiny") as (process, _):
        body = {"model": "tiny", "prompt": "go on", "max_tokens": 8000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60) as reply:
            assert reply.status_code == 200
            data = []
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    data.append(line)
                    if len(data) == 3:
                        process.send_signal(signal.SIGTERM)
            assert data[-1] == "data: [DONE]", data[-3:]
            error = json.loads(data[-2].removeprefix("data: "))["error"]
            assert "shutting down" in error["message"] and error["type"], error
        assert process.wait(timeout=30) == 0
    stderr = process.stderr.read()
    assert "Exception in ASGI application" not in stderr and "Traceback" not in stderr, stderr[-3000:]


def test_status_codes_by_exception_and_internal_errors_carry_a_request_id(caplog):
    import asyncio
    import threading

    from lm.requests import EngineOverloaded, EngineStopped, InvalidRequest, PromptTooLong
    from service.interceptors import DeadlineExceeded, ErrorsAndMetricsInterceptor, NotReady, status_for
    from service.metrics import ServerMetrics
    from vision.image import ImageError

    assert status_for(PromptTooLong("x")) == status_for(InvalidRequest("x")) == status_for(ValueError("x")) == \
        status_for(ImageError("empty", "x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(EngineOverloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(NotReady("x")) == status_for(EngineStopped("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(KeyError("bug")) is None
    # a model's non-finite logits: INTERNAL with the engine's own words (no traceback, no hidden message), and
    # the HTTP front's 500 says them too
    from service.openai_api import api_error

    assert status_for(FloatingPointError("the model's logits ... not finite")) == grpc.StatusCode.INTERNAL
    assert (api_error(FloatingPointError("not finite")).status, api_error(FloatingPointError("not finite")).message) \
        == (500, "not finite")

    async def buggy(request, context):
        raise KeyError("a bug")

    metrics = ServerMetrics()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(interceptors=[ErrorsAndMetricsInterceptor(metrics)])
        handler = grpc.method_handlers_generic_handler("test.Buggy", {"Call": grpc.unary_unary_rpc_method_handler(
            buggy, request_deserializer=bytes, response_serializer=bytes)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Buggy/Call", request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as error:
                call(b"", timeout=10)
        assert error.value.code() == grpc.StatusCode.INTERNAL
        request_id = error.value.details().split("request id ")[1].split(")")[0]
        assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
        assert metrics.requests.labels("Call", "INTERNAL")._value.get() == 1
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(checkpoint, tmp_path):
    from service_fixtures import start_server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    running = start_server(model=str(checkpoint), tls_cert=str(cert), tls_key=str(key))
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(running.target, credentials) as channel:
            reply = gateway_pb2_grpc.GatewayServiceStub(channel).Query(
                gateway_pb2.QueryRequest(prompt="hi", sampling=lm_pb2.SamplingParams(max_new_tokens=2)), timeout=60)
            assert reply.completion_tokens == 2
        with grpc.insecure_channel(running.target) as channel:  # plaintext is refused
            with pytest.raises(grpc.RpcError):
                gateway_pb2_grpc.GatewayServiceStub(channel).Query(gateway_pb2.QueryRequest(prompt="hi"), timeout=5)
    finally:
        running.stop()


def test_ctrl_c_ends_any_command_with_130_and_no_traceback(monkeypatch, capsys):
    """KeyboardInterrupt inside a command's run (after its own finally blocks) becomes status 130 and one
    line, as a shell reports SIGINT."""
    import types

    from service import cli

    def interrupted(args):
        raise KeyboardInterrupt

    real_load = cli._load
    monkeypatch.setattr(cli, "_load", lambda name: types.SimpleNamespace(
        run=interrupted, add_arguments=real_load(name).add_arguments))
    assert cli.main(["generate", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == "tessera generate: interrupted\n"


def test_a_busy_metrics_port_is_named_and_the_process_exits_cleanly():
    """Every role listens for metrics on 9090 by default, so a second role on the same host meets a
    taken metrics port: the error names that port (not the free gRPC one), with no traceback after it."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics_port, port = busy.getsockname()[1], free_port()
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "gateway", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", str(metrics_port), "--vision-target", "127.0.0.1:9", "--lm-target", "127.0.0.1:9"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"the metrics port {metrics_port}:" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_serves_on_an_ipv6_address():
    """--host :: or [::1]: gRPC needs an IPv6 literal in brackets ([::1]:PORT); written host:port it refused
    the address ("Misformatted domain name") and the server did not start."""
    import socket

    from service.config import ServeConfig

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    assert ServeConfig(role="lm", host="[::]").host == "::"
    assert ServeConfig(role="lm", host="::").address(50052) == "[::]:50052"
    assert ServeConfig(role="lm", host="0.0.0.0").address(50052) == "0.0.0.0:50052"
    for bad in ("", "a b", "[::", "host/24"):
        with pytest.raises(ValueError, match="--host"):
            ServeConfig(role="lm", host=bad)
    with pytest.raises(ValueError, match="without a port"):
        ServeConfig(role="lm", host="0.0.0.0:8080")
    for bad, words in (("::::", "in brackets"), ("::1:50051", "in brackets"), ("tessera-lm", "HOST:PORT"),
                       ("tessera-lm:0", "port from 1 to 65535"), ("a b:1", "HOST:PORT"), ("[::1]", r"\[IPv6\]:PORT"),
                       ("tessera-lm:5005l", "port from 1"), ("localhost:50051/", "port from 1")):
        with pytest.raises(ValueError, match=f"--lm-target {re.escape(repr(bad))}: .*{words}"):
            ServeConfig(role="gateway", lm_target=bad)
    for good in ("[::1]:50052", "dns:///tessera-lm:50052", "unix:/run/lm.sock", "tessera-lm.ns.svc:50052",
                 "DNS:///tessera-lm:50052", "[fe80::1%eth0]:50052"):
        assert ServeConfig(role="gateway", lm_target=good).lm_target == good
    server = start_server("gateway", model="unused", host="[::1]", port=port, vision_target="127.0.0.1:9",
                          lm_target="127.0.0.1:9", wait=False)
    try:
        assert server.target == f"[::1]:{port}"
        with grpc.insecure_channel(server.target) as channel:
            assert health_status(channel, "") is not None  # answered over IPv6
    finally:
        server.stop()


def test_query_refuses_what_grpc_cannot_take_before_connecting(capsys, tmp_path):
    from service.cli import main

    for flags, words in [(["--max-message-mb", "2048"], "--max-message-mb must be 1 to 2047"),
                         (["--max-message-mb", "-1"], "--max-message-mb must be 1 to 2047"),
                         (["--timeout", "0"], "--timeout must be positive"),
                         (["--max-new-tokens", str(2**40)], "--max-new-tokens must be 1 to 2147483647"),
                         (["--max-new-tokens", "0"], "--max-new-tokens must be 1 to 2147483647"),
                         (["--ca-cert", str(tmp_path / "missing.pem")], "--ca-cert")]:
        assert main(["query", "--target", "127.0.0.1:9", *flags, "hi"]) == 2
        assert words in capsys.readouterr().err


def test_query_reads_a_prompt_of_dash_from_standard_input(monkeypatch):
    import io

    from service.commands.query import add_arguments, build_request

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    long_prompt = "word " * 40_000  # ~200 KB: past what one command-line argument may hold on Linux
    monkeypatch.setattr("sys.stdin", io.StringIO(long_prompt))
    assert build_request(parser.parse_args(["-"])).prompt == long_prompt
    assert build_request(parser.parse_args(["plain"])).prompt == "plain"
