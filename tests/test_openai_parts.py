"""Pieces of the OpenAI-compatible API on their own: the Hermes tool-call parser (whole and streamed, split
anywhere), image URLs (base64 data: URLs; http(s) fetched only from allowed hosts, public addresses, within
size limits, no redirects)."""

from __future__ import annotations

import base64
import http.server
import json
import threading

import pytest

from service import media_fetch
from service.openai_protocol import ApiError, image_from_url
from service.tool_calls import ToolCallStream, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXTS = [
    "no calls at all",
    CALL,
    "Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"),
    '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call> done',
    "<tool_call>not json</tool_call> kept as text",
    "<tool_call>\n{\"arguments\": {}}\n</tool_call>",  # no name: not a call
    "an unfinished <tool_call>\n{\"name\": \"f\"",
    "a lone < and <tool_ and <tool_call",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_split_anywhere_gives_the_whole_parse(text):
    content, calls = parse_tool_calls(text)
    for step in (1, 2, 3, 7):
        stream = ToolCallStream()
        got, streamed = "", []
        for start in range(0, len(text), step):
            piece, done = stream.push(text[start:start + step])
            got += piece
            streamed += done
        got += stream.flush()
        assert got.strip() == content
        assert [(c.name, json.loads(c.arguments)) for c in streamed] == [(c.name, json.loads(c.arguments)) for c in calls]


def test_what_the_parser_takes_and_leaves():
    assert parse_tool_calls(TEXTS[0]) == ("no calls at all", [])
    content, calls = parse_tool_calls(TEXTS[2])
    assert content == "Let me look." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert len({c.id for c in calls}) == 2
    assert json.loads(parse_tool_calls(TEXTS[3])[1][0].arguments) == {"x": 1}
    assert parse_tool_calls(TEXTS[4]) == ("<tool_call>not json</tool_call> kept as text", [])
    assert parse_tool_calls(TEXTS[5])[1] == []
    assert parse_tool_calls(TEXTS[6]) == (TEXTS[6], [])


def test_data_urls():
    png = b"\x89PNG\r\n\x1a\n" + b"x" * 100
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    image = image_from_url(url, max_bytes=1000, where="p")
    assert image.data == png and image.mime_type == "image/png"
    for bad, status, words in [("data:image/png,rawbytes", 400, "not base64"), ("data:image/png;base64,@@@@", 400,
                               "invalid base64"), (url, 413, "at most 50"), ("https://x.example/a.png", 400, "data: URL")]:
        with pytest.raises(ApiError) as caught:
            image_from_url(bad, max_bytes=50, where="p")
        assert caught.value.status == status and words in caught.value.message


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        body = b"P" * (100 if self.path == "/small.png" else 5000)
        self.send_response(200 if self.path != "/missing.png" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


def fetch(url, domains=("localhost",), max_bytes=1000):
    return media_fetch.fetch_image(url, allowed_domains=domains, max_bytes=max_bytes, timeout_s=5)


def test_image_urls_are_refused_unless_allowed_and_public(image_host):
    for url, domains, words in [(image_host + "/small.png", (), "does not fetch"),
                                (image_host + "/small.png", ("example.com",), "not from 'localhost'"),
                                ("ftp://localhost/x.png", ("localhost",), "only data:, http: and https:"),
                                (image_host + "/small.png", ("localhost",), "non-public address")]:
        with pytest.raises(ApiError) as caught:
            fetch(url, domains)
        assert caught.value.status == 400 and words in caught.value.message
    assert media_fetch.host_allowed("img.example.com", ("example.com",))
    assert not media_fetch.host_allowed("badexample.com", ("example.com",))


def test_an_allowed_public_host_is_fetched_within_the_limits(image_host, monkeypatch):
    # The test server is on loopback: the address check is replaced by one that pins it, as it would
    # pin a public address.
    monkeypatch.setattr(media_fetch, "public_address", lambda host, port: "127.0.0.1")
    assert fetch(image_host + "/small.png") == b"P" * 100
    for path, status, words in [("/big.png", 413, "at most 1,000"), ("/missing.png", 400, "HTTP 404"),
                                ("/moved", 400, "HTTP 302")]:
        with pytest.raises(ApiError) as caught:
            fetch(image_host + path)
        assert caught.value.status == status and words in caught.value.message


def test_serve_openai_needs_the_models_name():
    from service.config import ServeConfig

    with pytest.raises(ValueError, match="served-model-name"):
        ServeConfig(role="openai")
    assert ServeConfig(role="openai", served_model_name="qwen3").port == 8000


@pytest.mark.parametrize("code,reason,status", [
    ("INVALID_ARGUMENT", "request-too-large", 413),  # a limit the gateway or a backend checks
    ("RESOURCE_EXHAUSTED", None, 413),  # a message over gRPC's own size limit
    ("RESOURCE_EXHAUSTED", "overloaded", 429),  # an engine's full queue
    ("RESOURCE_EXHAUSTED", "reply-too-large", 400),  # the answer asked for is over the gateway's limit
    ("INVALID_ARGUMENT", None, 400),
    ("UNAVAILABLE", None, 503),
])
def test_a_remote_gateways_refusal_gets_the_http_status_it_gets_in_process(code, reason, status):
    """`serve openai` reads the gateway's status and its tessera-error-reason trailing metadata."""
    import asyncio

    import grpc

    from service.interceptors import ERROR_REASON_KEY
    from service.openai_api import RemoteGateway, api_error

    trailing = grpc.aio.Metadata(*([(ERROR_REASON_KEY, reason)] if reason else []))
    error = grpc.aio.AioRpcError(getattr(grpc.StatusCode, code), grpc.aio.Metadata(), trailing, details="what went wrong")

    class Call:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise error

        def cancel(self):
            pass

    gateway = RemoteGateway.__new__(RemoteGateway)
    gateway.stub, gateway.metadata, gateway.name = type("Stub", (), {"QueryStream": lambda *a, **k: Call()})(), (), "gw"

    async def consume():
        async for _ in gateway.stream(None, timeout=None):
            pass

    with pytest.raises(Exception) as caught:
        asyncio.run(consume())
    mapped = api_error(caught.value)
    assert mapped.status == status and "what went wrong" in str(mapped)


def test_sampling_fields_out_of_the_wires_range_name_the_field():
    """What int32 / float32 cannot carry as sent is a 400 naming the field (not "Value out of range", not
    an inf the sender never wrote); top_k -1 means off, as vLLM's clients send it."""
    from service.openai_protocol import CompletionRequest, sampling_to_proto

    def proto(max_tokens=None, **fields):
        body = CompletionRequest(model="m", prompt="p", **fields)
        return sampling_to_proto(body, max_tokens=max_tokens, default_max_tokens=64, logprobs=None)

    for max_tokens in (0, -3, 2**31):
        with pytest.raises(ApiError) as refused:
            proto(max_tokens)
        assert refused.value.status == 400 and refused.value.param == "max_tokens"
    with pytest.raises(ApiError) as refused:  # the chat API's newer name is the one named
        sampling_to_proto(CompletionRequest(model="m", prompt="p"), max_tokens=0, default_max_tokens=64,
                          logprobs=None, max_tokens_field="max_completion_tokens")
    assert refused.value.param == "max_completion_tokens" and "max_completion_tokens must be" in refused.value.message
    for name, value in [("temperature", 1e308), ("top_p", -1e39), ("presence_penalty", float("inf")),
                        ("repetition_penalty", float("nan")), ("top_k", -2), ("top_k", 2**31)]:
        with pytest.raises(ApiError) as refused:
            proto(**{name: value})
        assert refused.value.status == 400 and refused.value.param == name, (name, value)
    assert proto(top_k=-1).top_k == 0 and proto(top_k=-1).HasField("top_k")
    assert proto(top_k=5).top_k == 5 and not proto().HasField("top_k")
    assert proto(2**31 - 1).max_new_tokens == 2**31 - 1 and proto().max_new_tokens == 64


def test_a_message_without_content_is_refused_unless_it_carries_tool_calls():
    from service.openai_protocol import Message, messages_to_proto

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ok, _ = messages_to_proto([Message(role="user", content="hi"), Message(role="assistant", tool_calls=[call]),
                               Message(role="tool", content="{}", tool_call_id="c1")], max_image_bytes=1 << 20)
    assert [m.role for m in ok] == ["user", "assistant", "tool"]
    for role in ("user", "system", "tool", "assistant"):
        with pytest.raises(ApiError) as refused:
            messages_to_proto([Message(role="user", content="hi"), Message(role=role, content=None)],
                              max_image_bytes=1 << 20)
        assert refused.value.status == 400 and refused.value.param == "messages[1].content"
