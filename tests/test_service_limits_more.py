"""More request limits, over real gRPC against a real server (tiny random vision-language checkpoint with
the 270M's tokenizer): millions of stop strings or chat messages are refused from their counts before
any work, while health checks and a running stream never pause; stop strings and chat messages have
per-item limits, counted with the text; the per-token stop-string scan looks only at the text that can
hold a new match; a text-only model refuses soft tokens; `image: false` is not an image part; request
ids are short visible ASCII at the LM service and the gateway."""

from __future__ import annotations

import argparse
import random
import shutil
import threading
import time
import tracemalloc
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lm.prompt import MIN_TOKENS_PER_TURN, PromptLimits
from lm.requests import MAX_REQUEST_ID_CHARS
from lm.sequence import TextStream
from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service.config import ServeConfig
from service_fixtures import photo, refused, start_server

MAX_SEQ_LEN = 2048
LONG = lm_pb2.SamplingParams(max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds())  # runs until cancelled
PROMPT_SECONDS = 2.0  # a refusal from counts alone must come well within a health check's deadline
# Receiving the bodies of one test at once (80 MB over loopback) takes seconds: a refusal must come
# soon after its body arrived, never after work that grows with the count.
RECEIVE_SECONDS = 6.0
LIMITS = PromptLimits()
MAX_REQUEST_FIELDS = ServeConfig(role="all").max_request_fields  # the servers here keep the default limits


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir


@pytest.fixture(scope="module")
def server(checkpoint):
    running = start_server(model=str(checkpoint), max_seq_len=MAX_SEQ_LEN)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, [("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield channel


@pytest.fixture(scope="module")
def lm(channel):
    return lm_pb2_grpc.LanguageModelServiceStub(channel)


@pytest.fixture(scope="module")
def gateway(channel):
    return gateway_pb2_grpc.GatewayServiceStub(channel)




def invalid(call, *needles: str) -> float:
    """Seconds until `call` failed with INVALID_ARGUMENT whose details hold every needle."""
    error, seconds = refused(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert all(needle in error.details() for needle in needles), error.details()
    return seconds


def chat(*texts: str, role_first: str = "user") -> list[lm_pb2.ChatMessage]:
    roles = ("user", "assistant") if role_first == "user" else ("assistant", "user")
    return [lm_pb2.ChatMessage(role=roles[i % 2], content=[lm_pb2.ContentPart(text=text)])
            for i, text in enumerate(texts)]


# ----- hostile messages built as bytes (no client-side protobuf work beside the server) ---------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string or an embedded message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def many_stop_strings(count: int) -> bytes:
    """A serialized GenerateRequest with `count` stop strings "\\x01" and max_new_tokens=12."""
    sampling = lm_pb2.SamplingParams(max_new_tokens=12).SerializeToString() + _field(6, b"\x01") * count
    return lm_pb2.GenerateRequest(prompt="Hello").SerializeToString() + _field(5, sampling)


def many_messages(count: int, text: str | None) -> bytes:
    """The `messages` field (GenerateRequest and TokenizeRequest both number it 3) of `count` alternating
    user/assistant messages, each with one text part `text`, or no content at all when None."""
    content = [] if text is None else [lm_pb2.ContentPart(text=text)]
    pair = b"".join(_field(3, lm_pb2.ChatMessage(role=role, content=content).SerializeToString())
                    for role in ("user", "assistant"))
    return pair * (count // 2) + pair[:len(pair) // 2] * (count % 2)


def generate_raw(channel, body: bytes):
    return raw_call(channel, "Generate", lm_pb2.GenerateResponse)(body, timeout=30)


def raw_call(channel, method: str, response):
    return channel.unary_unary(f"/tessera.lm.v1.LanguageModelService/{method}",
                               response_deserializer=response.FromString)  # requests sent as bytes


# ----- N1 + N2: millions of stop strings or messages stall nobody ---------------------------------------

def test_millions_of_stop_strings_or_messages_are_refused_at_once_and_stall_nothing(channel, lm):
    """15 million stop strings (45 MB), 1,000,000 chat messages of "a" (CountTokens) and 1,000,000 empty
    messages (Generate) are each INVALID_ARGUMENT for holding more protobuf fields than the limits allow,
    before they are parsed; 100,000 stop strings (within the field limit) and one 8 MiB stop string are
    refused naming the limit they break; a chat just within the limits is built and counted off the event
    loop. Meanwhile health checks with a 2 s deadline all succeed and a running stream keeps producing
    tokens."""
    generate = raw_call(channel, "Generate", lm_pb2.GenerateResponse)
    count_tokens = raw_call(channel, "CountTokens", lm_pb2.CountTokensResponse)
    stop_flood = many_stop_strings(15_000_000)
    stop_many = many_stop_strings(100_000)
    chat_flood = many_messages(1_000_000, "a")
    empty_flood = lm_pb2.GenerateRequest(sampling=lm_pb2.SamplingParams(max_new_tokens=2)).SerializeToString() \
        + many_messages(1_000_000, None)
    assert len(stop_flood) > 45_000_000 and len(chat_flood) > 15_000_000
    turns = (MAX_SEQ_LEN - 2) // MIN_TOKENS_PER_TURN  # as many turns as the estimate lets through
    parts = [lm_pb2.ContentPart(text="a ")] * LIMITS.max_content_parts
    allowed = lm_pb2.TokenizeRequest(messages=[lm_pb2.ChatMessage(role=("user", "assistant")[i % 2], content=parts)
                                               for i in range(turns + 1)])
    too_many_fields = f"holds more than {MAX_REQUEST_FIELDS:,} protobuf fields"
    assert 100_000 < MAX_REQUEST_FIELDS < 1_000_000
    hostile = {
        "15M stop strings": (lambda: generate(stop_flood, timeout=60), RECEIVE_SECONDS, too_many_fields),
        "100k stop strings": (lambda: generate(stop_many, timeout=60), RECEIVE_SECONDS,
                              "100,000 stop strings; at most 16"),
        "8 MiB stop string": (lambda: lm.Generate(lm_pb2.GenerateRequest(prompt="Hello", sampling=lm_pb2.SamplingParams(
            max_new_tokens=12, stop=["\x01" * (8 << 20)])), timeout=60), RECEIVE_SECONDS,
            "stop string 0 is 8,388,608 bytes; a stop string may have at most 1,024 bytes"),
        "1M messages": (lambda: count_tokens(chat_flood, timeout=60), RECEIVE_SECONDS, too_many_fields),
        "1M empty messages": (lambda: generate(empty_flood, timeout=60), RECEIVE_SECONDS, too_many_fields),
        "allowed chat": (lambda: lm.CountTokens(allowed, timeout=60), None, None),
    }
    calls = {name: call for name, (call, _, _) in hostile.items()}
    outcomes, health_latencies, gaps = run_beside_a_stream(channel, lm, calls)

    for name, (_, seconds, message) in hostile.items():
        result, took = outcomes[name]
        if message is None:
            assert isinstance(result, lm_pb2.CountTokensResponse), (name, result)
            assert result.count >= 1 + turns * MIN_TOKENS_PER_TURN  # the estimate is a lower bound
            continue
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, result)
        assert message in result.details() and took < seconds, (name, result.details(), took)
    assert health_latencies and max(health_latencies) < 2
    assert len(gaps) >= 3 and max(gaps) < 1.5, (len(gaps), max(gaps))


def run_beside_a_stream(channel, lm, calls: dict) -> tuple[dict, list[float], list[float]]:
    """Run `calls` at once on threads while a long stream runs and health is checked (2 s deadline) in a
    loop; returns {name: (result or RpcError, seconds)}, the health latencies and the gaps between the
    stream's tokens (and the window's ends) while the calls ran."""
    health = health_pb2_grpc.HealthStub(channel)
    stream = lm.GenerateStream(lm_pb2.GenerateRequest(prompt="go on", sampling=LONG), timeout=120)
    arrivals: list[float] = []

    def consume():
        try:
            for _ in stream:
                arrivals.append(time.monotonic())
        except grpc.RpcError:
            pass  # cancelled at the end

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 30
    while len(arrivals) < 3:
        assert time.monotonic() < deadline, "the stream produced no tokens"
        time.sleep(0.01)

    outcomes: dict = {}

    def run(name, call):
        began = time.monotonic()
        try:
            result = call()
        except grpc.RpcError as error:
            result = error
        outcomes[name] = (result, time.monotonic() - began)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    window_start = time.monotonic()
    for thread in threads:
        thread.start()
    latencies = []
    try:
        while any(thread.is_alive() for thread in threads):
            began = time.monotonic()
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status  # raises if late
            assert status == health_pb2.HealthCheckResponse.SERVING
            latencies.append(time.monotonic() - began)
            time.sleep(0.05)
    finally:
        window_end = time.monotonic()
        stream.cancel()
    during = [t for t in arrivals if window_start <= t <= window_end]
    gaps = [b - a for a, b in zip([window_start] + during, during + [window_end])]
    return outcomes, latencies, gaps


# ----- N1: stop strings have a count and a size, counted with the text ----------------------------------

def test_stop_strings_are_limited_in_count_and_bytes_at_the_lm_and_the_gateway(server, lm, gateway):
    def generate(stop, prompt="Hello"):
        return lambda: lm.Generate(lm_pb2.GenerateRequest(prompt=prompt, sampling=lm_pb2.SamplingParams(
            max_new_tokens=2, stop=stop)), timeout=30)

    def query(stop, prompt="Hello", images=()):
        return lambda: gateway.Query(gateway_pb2.QueryRequest(
            prompt=prompt, images=[tensor_pb2.Image(data=d) for d in images],
            sampling=lm_pb2.SamplingParams(max_new_tokens=2, stop=stop)), timeout=30)

    most = LIMITS.max_stop_strings
    longest = "é" * (LIMITS.max_stop_bytes // 2)  # exactly max_stop_bytes bytes of UTF-8
    assert generate([longest] * most)().completion_tokens >= 1
    assert query([longest] * most)().completion_tokens >= 1
    for call in (generate, query):
        assert invalid(call(["x"] * (most + 1)), f"{most + 1} stop strings; at most {most}") < PROMPT_SECONDS
        invalid(call(["ok", longest + "e"]), f"stop string 1 is {LIMITS.max_stop_bytes + 1:,} bytes")
        # Stop strings count towards the request's text bytes.
        prompt = "p" * (LIMITS.max_text_bytes - 10)
        invalid(call(["0123456789", "x"], prompt), f"{LIMITS.max_text_bytes + 1:,} bytes (11 of them in stop strings)")
    cache = server.server.vision.cache
    misses = cache.stats().misses
    invalid(query(["x"] * (most + 1), images=[photo(64, 48, seed=7)]), "stop strings")
    assert cache.stats().misses == misses  # refused before the image was encoded


def test_the_stop_scan_reads_only_the_tail_that_can_hold_a_new_match():
    """After 8 million characters of text a push allocates about the new piece and the held-back tail,
    not the text so far (which the scan used to copy on every token)."""
    pieces = ["x" * 1000] * 8000 + ["STO", "P"]
    stream = TextStream(PieceDecoder(pieces), ("STOP", "never"))
    for token in range(8000):
        stream.push(token)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for token in range(8000, 8002):
            delta, hit = stream.push(token)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hit and delta == "x"  # held back "xSTO" (as long as the longest stop string), then "P" completes it
    assert peak < 1_000_000, peak  # the old scan copied all 8 MB of text on every token
    assert stream.text == "x" * 8_000_000 and stream.flush() == ""


class PieceDecoder:
    """An incremental decoder whose token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return ""


def streamed_reference(pieces: list[str], stop: tuple[str, ...]) -> tuple[str, bool]:
    """What a stream with stop strings releases: the text up to the earliest-starting stop string in the
    text at the first piece after which one is complete (the whole text when none ever is)."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)], True
    return text, False


@pytest.mark.parametrize("seed", range(40))
def test_streamed_text_with_stop_strings_equals_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab\n"
    stop = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 1, 2, 3, 7]))) for _ in range(60)]
    expected, stopped = streamed_reference(pieces, stop)
    stream = TextStream(PieceDecoder(pieces), stop)
    deltas, hit = [], False
    for token in range(len(pieces)):
        delta, hit = stream.push(token)
        deltas.append(delta)
        if hit:
            break
    deltas.append(stream.flush())
    assert hit == stopped and "".join(deltas) == stream.text == expected, (stop, pieces)


class Unreadable(Sequence):
    """A sequence of `length` items that fails the test when an item is read."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        raise AssertionError("an item was read before its count was compared with the limit")


@pytest.mark.parametrize("kwargs,message", [
    (dict(stop=Unreadable(15_000_000)), "15,000,000 stop strings; at most 16"),
    (dict(tiles_per_image=Unreadable(100_000)), "100,000 images; at most 8"),
    (dict(messages=1_000_000, stop=Unreadable(17), tiles_per_image=Unreadable(9)), "1,000,000 chat messages"),
])
def test_counts_are_compared_before_any_item_is_read(kwargs, message):
    from lm.prompt import RequestTooLarge, check_request_size

    kwargs = {"text_bytes": 0, "tiles_per_image": (), **kwargs}
    with pytest.raises(RequestTooLarge, match=message):
        check_request_size(limits=LIMITS, max_prompt_tokens=MAX_SEQ_LEN - 1, **kwargs)


# ----- N2: chat messages have a count, parts per message, and a token estimate --------------------------

def test_chat_messages_are_limited_in_count_parts_and_turns(lm):
    most = LIMITS.max_messages
    too_many = chat(*["a"] * (most + 1))
    for call in (lambda: lm.CountTokens(lm_pb2.TokenizeRequest(messages=too_many), timeout=30),
                 lambda: lm.Generate(lm_pb2.GenerateRequest(messages=too_many), timeout=30)):
        assert invalid(call, f"{most + 1:,} chat messages; at most {most:,}") < PROMPT_SECONDS
    wide = [lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(text="a")] * (LIMITS.max_content_parts + 1))]
    invalid(lambda: lm.CountTokens(lm_pb2.TokenizeRequest(messages=chat("hi", "yes") + wide), timeout=30),
            f"chat message 2 has {LIMITS.max_content_parts + 1} content parts; at most {LIMITS.max_content_parts}")
    # Within the count but more turns than fit in the context, whatever their text: refused untokenized.
    turns = (MAX_SEQ_LEN - 1) // MIN_TOKENS_PER_TURN + 1
    invalid(lambda: lm.Generate(lm_pb2.GenerateRequest(messages=chat(*[""] * (turns + 1))), timeout=30),
            f"{turns:,} chat turns take at least", f"prompt limit of {MAX_SEQ_LEN - 1}")
    # Message texts count towards the text bytes with the stop strings.
    half = "m" * (LIMITS.max_text_bytes // 2)
    invalid(lambda: lm.Generate(lm_pb2.GenerateRequest(messages=chat(half, half), sampling=lm_pb2.SamplingParams(
        stop=["s"])), timeout=30), f"{LIMITS.max_text_bytes + 1:,} bytes (1 of them in stop strings)")


# ----- N8 (b): an image part is `image: true` --------------------------------------------------------------

def test_image_false_is_refused_not_taken_for_an_image(server, lm):
    d_model = server.server.lm.loaded.lm.config.hidden_size
    soft = np.zeros((1, 256, d_model), np.float32)
    image = tensor_pb2.Tensor(data=soft.tobytes(), dtype="float32", shape=list(soft.shape))

    def request(flag: bool, images):
        content = [lm_pb2.ContentPart(text="Look:"), lm_pb2.ContentPart(image=flag)]
        return lm_pb2.GenerateRequest(messages=[lm_pb2.ChatMessage(role="user", content=content)], images=images,
                                      sampling=lm_pb2.SamplingParams(max_new_tokens=1))

    assert lm.Generate(request(True, [image]), timeout=30).prompt_tokens > 256
    for images in ([image], []):
        invalid(lambda: lm.Generate(request(False, images), timeout=30),
                "message 0, content part 1: image is false", "image: true")
    empty = lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart()])
    invalid(lambda: lm.CountTokens(lm_pb2.TokenizeRequest(messages=[empty]), timeout=30),
            "message 0, content part 0: neither text nor image is set")


# ----- N8 (c): request ids are short visible ASCII --------------------------------------------------------

BAD_IDS = {"1 MiB": "r" * (1 << 20), "newline": "abc\ndef", "NUL": "abc\x00def", "space": "a b",
           "non-ASCII": "idé", "one too long": "i" * (MAX_REQUEST_ID_CHARS + 1)}


@pytest.mark.parametrize("name", BAD_IDS)
def test_a_bad_request_id_is_refused_by_the_lm_and_the_gateway(lm, gateway, name):
    request_id = BAD_IDS[name]
    sampling = lm_pb2.SamplingParams(max_new_tokens=1)
    calls = [
        lambda: lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling, request_id=request_id), timeout=30),
        lambda: list(lm.GenerateStream(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling, request_id=request_id),
                                       timeout=30)),
        lambda: gateway.Query(gateway_pb2.QueryRequest(prompt="Hi", sampling=sampling, request_id=request_id),
                              timeout=30),
        lambda: list(gateway.QueryStream(gateway_pb2.QueryRequest(prompt="Hi", sampling=sampling,
                                                                  request_id=request_id), timeout=30)),
    ]
    for call in calls:
        assert invalid(call, "request_id", f"{MAX_REQUEST_ID_CHARS}") < PROMPT_SECONDS


def test_a_good_request_id_is_echoed(lm, gateway):
    visible = "".join(chr(c) for c in range(0x21, 0x7F))  # "!" to "~"
    request_id = (visible * 2)[:MAX_REQUEST_ID_CHARS]
    sampling = lm_pb2.SamplingParams(max_new_tokens=1)
    assert lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling, request_id=request_id),
                       timeout=30).request_id == request_id
    assert gateway.Query(gateway_pb2.QueryRequest(prompt="Hi", sampling=sampling, request_id=request_id),
                         timeout=30).request_id == request_id
    assert len(lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30).request_id) > 0


# ----- N8 (a): a text-only model refuses soft tokens --------------------------------------------------------

@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory):
    """A tiny random Gemma 3 text-only checkpoint (`Gemma3ForCausalLM`, no image token) with the 270M's
    tokenizer, like the real 270M."""
    import torch
    from transformers import Gemma3ForCausalLM

    from lm.checkpoints import DEFAULT_MODEL, resolve_model
    from service.tiny_checkpoints import TOKENIZER_FILES, tiny_captioning_config

    path = tmp_path_factory.mktemp("tiny-text-only")
    config = tiny_captioning_config(layers=2).text_config
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    source = resolve_model(DEFAULT_MODEL, progress=False)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path


def test_a_text_only_model_refuses_soft_tokens(text_only_checkpoint):
    running = start_server("lm", model=str(text_only_checkpoint))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
            info = stub.GetInfo(lm_pb2.GetInfoRequest(), timeout=30)
            assert not info.accepts_images
            soft = np.zeros((1, info.tokens_per_tile, info.d_model), np.float32)
            image = tensor_pb2.Tensor(data=soft.tobytes(), dtype="float32", shape=list(soft.shape))
            sampling = lm_pb2.SamplingParams(max_new_tokens=1)
            model = running.server.lm.model_name
            for call in (lambda: stub.Generate(lm_pb2.GenerateRequest(prompt="Hi", images=[image], sampling=sampling),
                                               timeout=30),
                         lambda: stub.CountTokens(lm_pb2.TokenizeRequest(prompt="Hi", image_tiles=[1]), timeout=30)):
                invalid(call, f"the model {model} is text-only", "accepts_images=false")
            reply = stub.Generate(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30)
            assert reply.completion_tokens == 1  # text is still served
    finally:
        running.stop()


# ----- the limits are settings ------------------------------------------------------------------------------

def test_the_new_limits_come_from_flags_and_environment():
    from service.config import ServeConfig, add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-messages", "10", "--max-stop-strings", "2"])
    config = from_args("lm", args, {"TESSERA_MAX_CONTENT_PARTS": "3", "TESSERA_MAX_STOP_BYTES": "40",
                                    "TESSERA_MAX_MESSAGES": "99"})
    assert config.prompt_limits() == PromptLimits(max_messages=10, max_content_parts=3, max_stop_strings=2,
                                                  max_stop_bytes=40)
    assert ServeConfig(role="all").prompt_limits() == PromptLimits()
    for flag in ("--max-messages", "--max-content-parts", "--max-stop-strings", "--max-stop-bytes"):
        with pytest.raises(ValueError, match=flag):
            from_args("lm", parser.parse_args([flag, "0"]), {})


def test_configured_new_limits_are_enforced(checkpoint):
    """A server started with `--max-messages 3 --max-content-parts 2 --max-stop-strings 1 --max-stop-bytes 4`
    enforces them at the LM service and (stop strings) the gateway, and its limit on a body's protobuf
    fields follows them. With --max-seq-len 64, a max_new_tokens of 2**31 - 1 ends at the full context."""
    settings = dict(max_seq_len=64, max_messages=3, max_content_parts=2, max_stop_strings=1, max_stop_bytes=4)
    limited = start_server(model=str(checkpoint), **settings)
    max_fields = ServeConfig(role="all", **settings).max_request_fields
    assert max_fields < MAX_REQUEST_FIELDS // 10
    try:
        with grpc.insecure_channel(limited.target) as channel:
            lm = lm_pb2_grpc.LanguageModelServiceStub(channel)
            gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
            endless = lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", raw=True, sampling=lm_pb2.SamplingParams(
                max_new_tokens=2**31 - 1, stop_token_ids=lm_pb2.StopTokenIds())), timeout=60)
            assert endless.finish_reason == "length"
            assert endless.prompt_tokens + endless.completion_tokens == settings["max_seq_len"]
            invalid(lambda: generate_raw(channel, many_stop_strings(max_fields)), f"more than {max_fields:,} protobuf")
            invalid(lambda: generate_raw(channel, many_stop_strings(max_fields // 2 - 8)), "stop strings; at most 1")
            sampling = lm_pb2.SamplingParams(max_new_tokens=1, stop=["abcd"])
            assert lm.Generate(lm_pb2.GenerateRequest(messages=chat("a", "b", "c"), sampling=sampling),
                               timeout=30).completion_tokens == 1
            invalid(lambda: lm.CountTokens(lm_pb2.TokenizeRequest(messages=chat("a", "b", "c", "d")), timeout=30),
                    "4 chat messages; at most 3")
            three = [lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(text="a")] * 3)]
            invalid(lambda: lm.CountTokens(lm_pb2.TokenizeRequest(messages=three), timeout=30),
                    "3 content parts; at most 2")
            for stop, message in [(["a", "b"], "2 stop strings; at most 1"), (["abcde"], "at most 4 bytes")]:
                sampling = lm_pb2.SamplingParams(max_new_tokens=1, stop=stop)
                invalid(lambda: lm.Generate(lm_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30),
                        message)
                invalid(lambda: gateway.Query(gateway_pb2.QueryRequest(prompt="Hi", sampling=sampling), timeout=30),
                        message)
    finally:
        limited.stop()
