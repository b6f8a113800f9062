"""A gateway deployed apart from its backends, over real gRPC: its readiness follows the vision and
LM services (a killed LM turns it NOT_SERVING, the LM's return turns it SERVING again), its errors
name the backend, and it reaches backends that serve TLS (CA bundle, client certificate) and require
a token, or says NOT_SERVING when it cannot."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service_fixtures import free_port, health_status, photo, start_server, wait_status

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "tessera.gateway.v1.GatewayService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "internal-hop-token"


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir






def stays(channel, service: str, expected: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if health_status(channel, service) != expected:
            return False
        time.sleep(0.1)
    return True


def query(stub, prompt: str = "hi", images=(), metadata=()):
    return stub.Query(gateway_pb2.QueryRequest(prompt=prompt, images=[tensor_pb2.Image(data=d) for d in images],
                                               sampling=lm_pb2.SamplingParams(max_new_tokens=2)),
                      timeout=60, metadata=metadata)


def spawn_lm(checkpoint: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "lm", "--model", str(checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--kv-budget-mb", "64", "--max-seq-len", "1024"],
        cwd=REPO, env={**os.environ, "TESSERA_AUTH_TOKEN": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)


def test_readiness_follows_a_killed_and_restarted_lm_and_errors_name_it(checkpoint):
    vision = start_server("vision", model=str(checkpoint))
    lm_port = free_port()
    lm_target = f"127.0.0.1:{lm_port}"
    lm = spawn_lm(checkpoint, lm_port)
    gateway = start_server("gateway", model="unused", vision_target=vision.target, lm_target=lm_target)
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            wait_status(channel, GATEWAY, SERVING, timeout=120)  # once the LM process has loaded
            assert query(stub, images=[photo(64, 48)]).completion_tokens == 2

            lm.kill()
            lm.wait(30)
            wait_status(channel, GATEWAY, NOT_SERVING, timeout=10)
            assert health_status(channel, "") == SERVING  # liveness: the gateway process itself is fine
            with pytest.raises(grpc.RpcError) as error:
                query(stub)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error.value.details().startswith(f"LM service at {lm_target} is unavailable: "), \
                error.value.details()
            ready = gateway.server.metrics.registry.get_sample_value
            assert ready("tessera_backend_ready", {"backend": "LM service"}) == 0
            assert ready("tessera_backend_ready", {"backend": "vision service"}) == 1

            lm = spawn_lm(checkpoint, lm_port)  # the same address again
            wait_status(channel, GATEWAY, SERVING, timeout=120)
            assert query(stub).completion_tokens == 2  # SERVING means it answers
            assert ready("tessera_backend_ready", {"backend": "LM service"}) == 1
    finally:
        gateway.stop()
        vision.stop()
        if lm.poll() is None:
            lm.kill()
            lm.wait()


def test_health_watch_works_through_the_interceptors(checkpoint):
    """Health.Watch writes with context.write (no generator): the gateway's client-side health checks
    depend on it passing the interceptors."""
    vision = start_server("vision", model=str(checkpoint))
    try:
        with grpc.insecure_channel(vision.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="tessera.vision.v1.VisionService"), timeout=10)
            assert next(watch).status == SERVING
            watch.cancel()
    finally:
        vision.stop()


def test_backend_errors_name_the_backend_and_pass_request_outcomes_through():
    from service.gateway import backend_error
    from service.interceptors import BackendError, status_for

    def rpc_error(code, details):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    name = "LM service at 10.0.0.7:50052"
    for code, expected in [(grpc.StatusCode.UNAVAILABLE, "is unavailable"),
                           (grpc.StatusCode.UNAUTHENTICATED, "refused the gateway's token"),
                           (grpc.StatusCode.INTERNAL, "failed (INTERNAL)")]:
        error = backend_error(rpc_error(code, "what it said"), name)
        assert isinstance(error, BackendError)
        assert str(error) == f"{name} {expected}: what it said"
        assert status_for(error) == (grpc.StatusCode.INTERNAL if code == grpc.StatusCode.INTERNAL
                                     else grpc.StatusCode.UNAVAILABLE)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED):
        original = rpc_error(code, "image 0: truncated")
        assert backend_error(original, name) is original  # the request's own outcome, unchanged


# ----- TLS and the token on the internal hop -----------------------------------------------------------

def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_gateway_reaches_tls_backends_with_ca_client_certificate_and_token(checkpoint, tmp_path):
    server_cert, server_key = _self_signed(tmp_path, "backend")
    client_cert, client_key = _self_signed(tmp_path, "gateway-client")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tls = dict(tls_cert=str(server_cert), tls_key=str(server_key), tls_client_ca=str(client_cert),
               auth_token_file=str(token_file))
    vision = start_server("vision", model=str(checkpoint), **tls)
    lm = start_server("lm", model=str(checkpoint), **tls)
    targets = dict(vision_target=vision.target, lm_target=lm.target)
    gateways = {
        "tls": dict(backend_tls_ca=str(server_cert), backend_tls_cert=str(client_cert),
                    backend_tls_key=str(client_key), auth_token=TOKEN),
        "plaintext": dict(auth_token=TOKEN),
        "no client certificate": dict(backend_tls_ca=str(server_cert), auth_token=TOKEN),
        "wrong token": dict(backend_tls_ca=str(server_cert), backend_tls_cert=str(client_cert),
                            backend_tls_key=str(client_key), auth_token="not-the-token"),
    }
    running = {}
    try:
        for name, settings in gateways.items():
            running[name] = start_server("gateway", model="unused", **targets, **settings)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(running["tls"].target) as channel:
            wait_status(channel, GATEWAY, SERVING, timeout=30)
            reply = query(gateway_pb2_grpc.GatewayServiceStub(channel), images=[photo(64, 48)], metadata=auth)
            assert reply.completion_tokens == 2 and list(reply.tiles_per_image) == [1]
        failing_backend = {"plaintext": "LM service", "no client certificate": "LM service",
                           "wrong token": "LM service"}
        for name, backend in failing_backend.items():
            with grpc.insecure_channel(running[name].target) as channel:
                assert stays(channel, GATEWAY, NOT_SERVING, seconds=1.5), f"{name}: the gateway claimed SERVING"
                with pytest.raises(grpc.RpcError) as error:
                    query(gateway_pb2_grpc.GatewayServiceStub(channel), metadata=(
                        ("authorization", "Bearer not-the-token"),) if name == "wrong token" else auth)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert error.value.details().startswith(f"{backend} at {lm.target} "), error.value.details()
    finally:
        for server in [*running.values(), lm, vision]:
            server.stop()


# ----- configuration -----------------------------------------------------------------------------------

def test_token_file_and_backend_tls_settings(tmp_path):
    from service.commands.serve import add_arguments
    from service.config import ServeConfig, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    config = from_args("gateway", parser.parse_args(["gateway"]), {"TESSERA_AUTH_TOKEN_FILE": str(token_file)})
    assert config.bearer_token() == "from-a-file" and "from-a-file" not in config.redacted_json()
    assert from_args("lm", parser.parse_args(["lm"]), {"TESSERA_AUTH_TOKEN": "env"}).bearer_token() == "env"
    assert ServeConfig(role="lm").bearer_token() is None
    with pytest.raises(ValueError, match="once"):
        from_args("lm", parser.parse_args(["lm", "--auth-token-file", str(token_file)]), {"TESSERA_AUTH_TOKEN": "x"})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServeConfig(role="lm", auth_token_file=str(tmp_path / "empty")).bearer_token()
    with pytest.raises(ValueError, match="--backend-tls-ca"):
        ServeConfig(role="gateway", backend_tls_cert="c.pem", backend_tls_key="k.pem")
    with pytest.raises(ValueError, match="--backend-tls-key"):
        ServeConfig(role="gateway", backend_tls_ca="ca.pem", backend_tls_cert="c.pem")
    with pytest.raises(ValueError, match="--tls-cert"):
        ServeConfig(role="lm", tls_client_ca="ca.pem")
    help_text = "".join(parser.format_help().split())  # without argparse's line breaks
    assert "`ps`:preferTESSERA_AUTH_TOKENor--auth-token-file" in help_text


def test_the_reason_given_for_a_backend_that_answers_serving_again_does_not_contradict_its_state():
    """The warning "X is not ready (transient_failure): ..." asks the backend why; one that came back in
    the meantime answered SERVING, which read "not ready ...: its health is SERVING"."""
    import asyncio

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from service.backends import Backend, _why

    async def main() -> str:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("tessera.lm.v1.LanguageModelService", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return (await _why(Backend("LM service", f"127.0.0.1:{port}", "tessera.lm.v1.LanguageModelService"),
                                   channel))[0]
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == "it answers SERVING again (the connection is being re-made)"
