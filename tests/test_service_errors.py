"""What no request may do to a server, over real gRPC: a client that cancels or runs out of time is
CANCELLED / DEADLINE_EXCEEDED (counted as such, never an ERROR line); a body that is not the method's
protobuf message is INVALID_ARGUMENT with one warning (not UNKNOWN with a traceback); a refused token
is counted; the LM's GetInfo says whether its checkpoint takes images."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest

from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service_fixtures import start_server

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ENDLESS = lm_pb2.SamplingParams(max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds())


def count(metrics, method: str, code: str) -> float:
    return metrics.registry.get_sample_value("tessera_grpc_requests_total", {"method": method, "code": code}) or 0.0


def wait_count(metrics, method: str, code: str, expected: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while count(metrics, method, code) < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{method} {code} counted {count(metrics, method, code)} times, expected {expected}")
        time.sleep(0.02)


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def wait_engine_idle(engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().running or engine.stats().waiting:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.02)


# ----- cancellation while a response is being written (gRPC drops the handler's generator) -------------

class _LoopThread:
    """An event loop on a thread of its own, for a bare grpc.aio server."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def endless_server():
    """A server whose stream handler yields without ever awaiting: a cancellation can only land while
    gRPC writes a response, so gRPC drops (closes) the interceptor's generator mid-stream."""
    from service.interceptors import ErrorsAndMetricsInterceptor
    from service.metrics import ServerMetrics

    metrics = ServerMetrics()
    closed = threading.Event()

    async def endless(request, context):
        try:
            while True:
                yield b"x" * 256
        finally:
            closed.set()

    async def start():
        server = grpc.aio.server(interceptors=[ErrorsAndMetricsInterceptor(metrics)])
        handler = grpc.method_handlers_generic_handler(
            "test.Endless", {"Stream": grpc.unary_stream_rpc_method_handler(endless)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = _LoopThread()
    server, port = loop.call(start())
    try:
        yield f"127.0.0.1:{port}", metrics, closed
    finally:
        loop.call(server.stop(0))
        loop.close()


def test_client_cancel_while_writing_is_cancelled_not_internal(endless_server, caplog):
    target, metrics, closed = endless_server
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream("/test.Endless/Stream")(b"", timeout=30)
        for _ in range(3):
            next(call)
        call.cancel()
        wait_count(metrics, "Stream", "CANCELLED", 1)
    assert closed.wait(5), "the handler's generator was closed (its cleanup ran)"
    assert count(metrics, "Stream", "INTERNAL") == 0 and count(metrics, "Stream", "UNKNOWN") == 0
    assert errors_logged(caplog) == []


def test_deadline_while_writing_is_deadline_exceeded(endless_server, caplog):
    target, metrics, closed = endless_server
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            for _ in channel.unary_stream("/test.Endless/Stream")(b"", timeout=0.5):
                pass
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_count(metrics, "Stream", "DEADLINE_EXCEEDED", 1)
    assert count(metrics, "Stream", "CANCELLED") == 0 and count(metrics, "Stream", "INTERNAL") == 0
    assert errors_logged(caplog) == []


def test_a_failed_write_logged_by_grpc_core_is_not_an_error(caplog):
    """grpc.aio logs ERROR for a response write that fails in core when it has not yet seen the client's
    close (a race between two core operations): once a server interceptor exists, that line is DEBUG;
    grpc's other errors keep their level."""
    from service.interceptors import ErrorsAndMetricsInterceptor

    ErrorsAndMetricsInterceptor()
    caplog.set_level(logging.WARNING)
    core = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        core.exception("ExecuteBatchError raised in core by servicer method [/test.Endless/Stream]")
        core.exception("Unexpected [ValueError] raised by servicer method [/test.Endless/Stream]")
    assert errors_logged(caplog) == [
        "grpc._cython.cygrpc: Unexpected [ValueError] raised by servicer method [/test.Endless/Stream]"]


def test_a_cancellation_at_the_deadline_counts_as_the_deadline():
    """A client whose deadline passes cancels before the server's copy of the deadline expires (it
    arrived a transit time later): a cancellation that close to the deadline is the deadline's."""
    from service.interceptors import DEADLINE_SLACK_S, cancellation_code

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    assert cancellation_code(Context(0.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancellation_code(Context(DEADLINE_SLACK_S / 2)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancellation_code(Context(DEADLINE_SLACK_S * 4)) == grpc.StatusCode.CANCELLED
    assert cancellation_code(Context(None)) == grpc.StatusCode.CANCELLED  # no deadline at all


# ----- the whole stack ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_vlm_tok_dir):
    checkpoint = tiny_vlm_tok_dir
    running = start_server(model=str(checkpoint), auth_token=TOKEN)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def test_cancelled_streams_are_counted_cancelled_without_error_lines(server, channel, caplog):
    caplog.set_level(logging.WARNING)
    metrics, engine = server.server.metrics, server.server.lm.loaded.engine
    before = {m: count(metrics, m, "CANCELLED") for m in ("QueryStream", "GenerateStream")}
    calls = {  # started one at a time
        "QueryStream": lambda: gateway_pb2_grpc.GatewayServiceStub(channel).QueryStream(
            gateway_pb2.QueryRequest(prompt="go on", sampling=ENDLESS), timeout=60, metadata=AUTH),
        "GenerateStream": lambda: lm_pb2_grpc.LanguageModelServiceStub(channel).GenerateStream(
            lm_pb2.GenerateRequest(prompt="go on", sampling=ENDLESS), timeout=60, metadata=AUTH),
    }
    for method, start in calls.items():
        call = start()
        for _ in range(3):
            assert not next(call).HasField("done")
        call.cancel()
        wait_count(metrics, method, "CANCELLED", before[method] + 1)
        wait_engine_idle(engine)
    for method in calls:
        assert count(metrics, method, "INTERNAL") == 0 and count(metrics, method, "UNKNOWN") == 0
    assert errors_logged(caplog) == []


def test_expired_stream_is_counted_deadline_exceeded(server, channel, caplog):
    caplog.set_level(logging.WARNING)
    metrics = server.server.metrics
    before = count(metrics, "QueryStream", "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as error:
        for _ in gateway_pb2_grpc.GatewayServiceStub(channel).QueryStream(
                gateway_pb2.QueryRequest(prompt="go on", sampling=ENDLESS), timeout=0.8, metadata=AUTH):
            pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_count(metrics, "QueryStream", "DEADLINE_EXCEEDED", before + 1)
    wait_engine_idle(server.server.lm.loaded.engine)
    assert count(metrics, "QueryStream", "INTERNAL") == 0
    assert errors_logged(caplog) == []


BAD_UTF8_PROMPT = b"\x0a\x02\xff\xfe"  # field 1 (prompt), length 2, bytes that are not UTF-8
NOT_PROTOBUF = b"\xff\xff\xff\xff\xff\xff"


@pytest.mark.parametrize("method,streaming,expected_type", [
    ("/tessera.gateway.v1.GatewayService/Query", False, "tessera.gateway.v1.QueryRequest"),
    ("/tessera.gateway.v1.GatewayService/QueryStream", True, "tessera.gateway.v1.QueryRequest"),
    ("/tessera.lm.v1.LanguageModelService/Generate", False, "tessera.lm.v1.GenerateRequest"),
])
@pytest.mark.parametrize("body", [BAD_UTF8_PROMPT, NOT_PROTOBUF], ids=["bad-utf8-string", "not-protobuf"])
def test_malformed_request_bodies_are_invalid_argument(server, channel, caplog, method, streaming, expected_type,
                                                       body):
    caplog.set_level(logging.WARNING)
    metrics = server.server.metrics
    name = method.rsplit("/", 1)[-1]
    before = count(metrics, name, "INVALID_ARGUMENT")
    identity = dict(request_serializer=None, response_deserializer=None)  # raw bytes both ways
    call = (channel.unary_stream if streaming else channel.unary_unary)(method, **identity)
    with pytest.raises(grpc.RpcError) as error:
        reply = call(body, timeout=30, metadata=AUTH)
        if streaming:
            list(reply)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected_type in error.value.details()
    assert count(metrics, name, "INVALID_ARGUMENT") == before + 1
    assert count(metrics, name, "UNKNOWN") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "service.interceptors"]
    assert len(warnings) == 1 and expected_type in warnings[0].getMessage()
    assert errors_logged(caplog) == [] and not any(r.exc_info for r in caplog.records)
    reply = gateway_pb2_grpc.GatewayServiceStub(channel).Query(
        gateway_pb2.QueryRequest(prompt="still there?", sampling=lm_pb2.SamplingParams(max_new_tokens=2)),
        timeout=30, metadata=AUTH)
    assert reply.completion_tokens == 2


def test_auth_refusals_are_counted_and_the_body_is_not_parsed(server, channel):
    metrics = server.server.metrics
    before = {m: count(metrics, m, "UNAUTHENTICATED") for m in ("Query", "QueryStream")}
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as error:
            stub.Query(gateway_pb2.QueryRequest(prompt="hi"), timeout=30, metadata=metadata)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        list(stub.QueryStream(gateway_pb2.QueryRequest(prompt="hi"), timeout=30))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    raw = channel.unary_unary("/tessera.gateway.v1.GatewayService/Query")  # no token and a broken body
    with pytest.raises(grpc.RpcError) as error:
        raw(NOT_PROTOBUF, timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert count(metrics, "Query", "UNAUTHENTICATED") == before["Query"] + 3
    assert count(metrics, "QueryStream", "UNAUTHENTICATED") == before["QueryStream"] + 1


def test_lm_info_accepts_images_only_with_a_vision_language_checkpoint(server, channel):
    info = lm_pb2_grpc.LanguageModelServiceStub(channel).GetInfo(lm_pb2.GetInfoRequest(), metadata=AUTH)
    assert info.accepts_images  # the tiny checkpoint has a vision config and an image token
    text_only = start_server("lm", model="gemma3-270m")
    try:
        with grpc.insecure_channel(text_only.target) as other:
            info = lm_pb2_grpc.LanguageModelServiceStub(other).GetInfo(lm_pb2.GetInfoRequest(), timeout=30)
        assert not info.accepts_images
    finally:
        text_only.stop()


def test_tools_a_chat_template_never_reads_are_refused_unless_a_call_is_forced(server, channel):
    """Gemma 3's template has no `tools`: free text with tools would drop them in silence (INVALID_ARGUMENT
    naming it); a grammar-forced call (what tool_choice "required" sends) still runs."""
    import json

    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    messages = [lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(text="Weather in Paris?")])]
    stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(lm_pb2.GenerateRequest(messages=messages, tools_json=tools,
                                             sampling=lm_pb2.SamplingParams(max_new_tokens=2)), timeout=60, metadata=AUTH)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat template does not take tools" in refused.value.details()
    forced = lm_pb2.SamplingParams(max_new_tokens=2, structured_output=lm_pb2.StructuredOutput(json_object=True))
    reply = stub.Generate(lm_pb2.GenerateRequest(messages=messages, tools_json=tools, sampling=forced), timeout=60,
                          metadata=AUTH)
    assert reply.finish_reason == "length" and reply.completion_tokens == 2 and reply.text.startswith("{")
