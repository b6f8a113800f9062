"""A gateway deployed apart from its backends, over real gRPC, when a backend misbehaves without
going away: a frozen LM process (SIGSTOP) is found by keepalive pings (readiness NOT_SERVING, calls
without a deadline end naming the LM, SIGCONT brings it back); a gateway that cannot reach a backend
(plaintext against TLS) or holds the wrong token says so in its log, naming the backend; and queries
that succeed end as OK on the LM, never CANCELLED."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service_fixtures import free_port, health_status, photo, start_server, wait_status

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "tessera.gateway.v1.GatewayService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
KEEPALIVE_S = 1.0  # the gateway's --backend-keepalive-s in these tests (the smallest allowed)
# A frozen backend is found within two keepalive periods (a ping, then its timeout), plus scheduling.
DETECTION_S = 2 * KEEPALIVE_S + 4
TOKEN = "internal-hop-token"


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir






def query(prompt: str = "hi", images=(), **sampling) -> gateway_pb2.QueryRequest:
    sampling.setdefault("max_new_tokens", 2)
    return gateway_pb2.QueryRequest(prompt=prompt, images=[tensor_pb2.Image(data=d) for d in images],
                                    sampling=lm_pb2.SamplingParams(**sampling))


def finished_within(call, seconds: float):
    """Runs `call` on a thread; (its result or the RpcError it raised, the seconds it took), failing
    when it has not returned within `seconds` (the thread is left to the call's own end)."""
    outcome = {}

    def run():
        started = time.monotonic()
        try:
            outcome["result"] = call()
        except grpc.RpcError as error:
            outcome["result"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call had not ended after {seconds} s"
    return outcome["result"], outcome["seconds"]


# ----- N4: a frozen LM is found, and calls without a deadline do not hang on it -----------------------

def spawn_lm(checkpoint: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "lm", "--model", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--kv-budget-mb", "64", "--max-seq-len", "2048"],
        cwd=REPO, env={**os.environ, "TESSERA_AUTH_TOKEN": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_frozen_lm_is_found_and_calls_without_deadline_end_naming_it(checkpoint):
    vision = start_server("vision", model=str(checkpoint))
    lm_port = free_port()
    lm_target = f"127.0.0.1:{lm_port}"
    lm = spawn_lm(checkpoint, lm_port)
    # --backend-timeout far beyond the bounds below: the calls must end through keepalive, not through it
    gateway = start_server("gateway", model="unused", vision_target=vision.target, lm_target=lm_target,
                           backend_keepalive_s=KEEPALIVE_S, backend_timeout=120.0)
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            wait_status(channel, GATEWAY, SERVING, timeout=120)  # once the LM process has loaded
            assert stub.Query(query(), timeout=60).completion_tokens == 2
            running = stub.QueryStream(query("go on", max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds()))
            assert next(running).text is not None  # streaming, no deadline

            os.kill(lm.pid, signal.SIGSTOP)
            wait_status(channel, GATEWAY, NOT_SERVING, timeout=DETECTION_S)
            assert health_status(channel, "") == SERVING  # liveness: the gateway itself is fine
            ended, _ = finished_within(lambda: list(running), DETECTION_S)
            for error in (ended, finished_within(lambda: stub.Query(query()), 15)[0]):  # neither has a deadline
                assert isinstance(error, grpc.RpcError), error
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                assert error.details().startswith(f"LM service at {lm_target} "), error.details()

            os.kill(lm.pid, signal.SIGCONT)
            wait_status(channel, GATEWAY, SERVING, timeout=30)
            assert stub.Query(query(), timeout=60).completion_tokens == 2
    finally:
        os.kill(lm.pid, signal.SIGCONT)
        gateway.stop()
        vision.stop()
        lm.kill()
        lm.wait()


def test_the_default_backend_deadline_names_the_backend():
    from service.gateway import backend_error
    from service.interceptors import BackendError, status_for

    expired = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "Deadline Exceeded")
    name = "LM service at 10.0.0.7:50052"
    assert backend_error(expired, name) is expired  # the caller's own deadline: its outcome, unchanged
    error = backend_error(expired, name, default_timeout=600)
    assert isinstance(error, BackendError) and status_for(error) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(error).startswith(f"{name} did not finish within 600 s") and "--backend-timeout" in str(error)


def test_backend_settings_come_from_flags_and_environment():
    import argparse

    from service.commands.serve import add_arguments
    from service.config import ServeConfig, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args("gateway", parser.parse_args(["gateway", "--backend-timeout", "30"]),
                       {"TESSERA_BACKEND_KEEPALIVE_S": "2.5"})
    assert (config.backend_timeout, config.backend_keepalive_s) == (30.0, 2.5)
    with pytest.raises(ValueError, match="--backend-keepalive-s"):
        ServeConfig(role="gateway", backend_keepalive_s=0.5)
    with pytest.raises(ValueError, match="--backend-timeout"):
        ServeConfig(role="gateway", backend_timeout=0)


# ----- N7: a successful query is OK on the LM too ----------------------------------------------------

def generate_streams(server) -> dict[str, float]:
    """The LM server's GenerateStream calls counted so far, by status code."""
    return {sample.labels["code"]: sample.value for family in server.server.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "tessera_grpc_requests_total" and sample.labels["method"] == "GenerateStream"}


def test_successful_gateway_queries_are_ok_on_the_lm(checkpoint):
    """The LM's handler here lingers a little after its final message, as a busy LM's event loop does
    before it ends the call: a gateway that cancelled the call on `done` would be counted CANCELLED
    there. Queries with and without images, unary and streaming, several at once."""
    vision = start_server("vision", model=str(checkpoint))
    lm = start_server("lm", model=str(checkpoint))
    servicer = lm.server.lm
    stream = servicer.stream

    async def lingering(request):
        async for message in stream(request):
            yield message
        await asyncio.sleep(0.3)

    servicer.stream = lingering
    gateway = start_server("gateway", model="unused", vision_target=vision.target, lm_target=lm.target)
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            wait_status(channel, GATEWAY, SERVING, timeout=30)

            def one(index: int) -> int:
                if index % 3 == 0:
                    return stub.Query(query(images=[photo(40, 30, seed=index)]), timeout=60).completion_tokens
                if index % 3 == 1:
                    return stub.Query(query(), timeout=60).completion_tokens
                return list(stub.QueryStream(query(), timeout=60))[-1].done.completion_tokens

            queries = 12
            with ThreadPoolExecutor(max_workers=8) as pool:
                assert list(pool.map(one, range(queries))) == [2] * queries
        deadline = time.monotonic() + 5  # until the LM has counted every call (it would be at once)
        while sum((outcomes := generate_streams(lm)).values()) < queries and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes == {"OK": queries}, outcomes
    finally:
        gateway.stop()
        lm.stop()
        vision.stop()


# ----- N5: a gateway that cannot use a backend says so -------------------------------------------------

def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def _warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "service.backends" and r.levelno == logging.WARNING and needle in r.getMessage()]


def _wait_for_warnings(caplog, needle: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := _warnings(caplog, needle)) < count:
        assert time.monotonic() < deadline, f"{count} warning(s) with {needle!r} expected within {timeout} s; " \
                                            f"the log has {[r.getMessage() for r in caplog.records]}"
        time.sleep(0.05)
    return found


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_a_misconfigured_gateway_says_which_backend_and_why(checkpoint, tmp_path, caplog, monkeypatch):
    from service import backends

    caplog.set_level(logging.INFO, logger="service.backends")
    cert, key = _self_signed(tmp_path, "backend")
    backend = start_server("all", model=str(checkpoint), tls_cert=str(cert), tls_key=str(key), auth_token=TOKEN)
    targets = dict(vision_target=backend.target, lm_target=backend.target)
    started = []
    try:
        # The wrong token is reported at once, when the backend first refuses it (no waiting period).
        started.append(start_server("gateway", model="unused", backend_tls_ca=str(cert), auth_token="wrong",
                                    **targets))
        refusals = _wait_for_warnings(caplog, "refuses this server's credentials", 2, timeout=5)
        assert {message.split(" at ")[0] for message in refusals} == {"vision service", "LM service"}
        assert all(f" at {backend.target} refuses this server's credentials: UNAUTHENTICATED: " in m
                   for m in refusals), refusals

        # Plaintext against TLS: never ready; said after the waiting period, then repeated while so.
        monkeypatch.setattr(backends, "NOT_READY_WARN_AFTER_S", 1.0)
        monkeypatch.setattr(backends, "NOT_READY_REPEAT_S", 1.5)
        began = time.monotonic()
        started.append(start_server("gateway", model="unused", auth_token=TOKEN, **targets))
        needle = f"LM service at {backend.target} has not been ready for "
        first = _wait_for_warnings(caplog, needle, 1, timeout=5)[0]
        assert time.monotonic() - began >= 1.0
        assert "UNAVAILABLE" in first and "--backend-tls-ca" in first, first
        _wait_for_warnings(caplog, needle, 2, timeout=5)  # again, while it stays so
        assert len(_warnings(caplog, needle)) <= 1 + (time.monotonic() - began) / 1.5  # rate-limited
    finally:
        for server in [*started, backend]:
            server.stop()
