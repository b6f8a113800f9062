"""The stack on the embedded default (`serve all` on the text-only 270M) over a real loopback socket:
answers equal the engine's in process, streaming, health, reflection, metrics, Tokenize/GetInfo."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service_fixtures import free_port, photo, start_server

PROMPT = "Name three primary colours."


@pytest.fixture(scope="module")
def server():
    running = start_server(model="gemma3-270m", metrics_port=free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def in_process(lm, prompt: str, params) -> list[int]:
    """What the engine gives for the same chat turn, called directly (no gRPC)."""
    from lm.engine import EngineConfig
    from lm.prompt import layout_chat
    from lm.requests import GenerationRequest

    layout = layout_chat(lm.tokenizer, [{"role": "user", "content": [{"type": "text", "text": prompt}]}])
    engine = lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=16 << 20, max_batch=1,
                                    stop_token_ids=lm.tokenizer.special.stop_ids))
    return engine.generate(GenerationRequest(layout.token_ids, params)).token_ids


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 1234)])
def test_text_query_equals_the_engine_in_process(server, channel, temperature, seed):
    from lm.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=40 if seed else 0, seed=seed)
    sampling = lm_pb2.SamplingParams(max_new_tokens=6, temperature=temperature, top_k=params.top_k)
    if seed is not None:
        sampling.seed = seed
    reply = gateway_pb2_grpc.GatewayServiceStub(channel).Query(
        gateway_pb2.QueryRequest(prompt=PROMPT, sampling=sampling), timeout=60)
    expected = in_process(server.server.lm.loaded.lm, PROMPT, params)
    assert list(reply.token_ids) == expected
    assert reply.text == server.server.lm.loaded.lm.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.completion_tokens == len(expected) and reply.prompt_tokens > 5


def test_raw_query_is_a_plain_completion(server, channel):
    from lm.engine import EngineConfig
    from lm.prompt import layout_text
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams

    prompt = "The capital of France is"
    reply = gateway_pb2_grpc.GatewayServiceStub(channel).Query(
        gateway_pb2.QueryRequest(prompt=prompt, raw=True, sampling=lm_pb2.SamplingParams(max_new_tokens=6)),
        timeout=60)
    lm = server.server.lm.loaded.lm
    layout = layout_text(lm.tokenizer, prompt)
    assert reply.prompt_tokens == len(layout.token_ids)  # no chat turn markers around it
    engine = lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=16 << 20, max_batch=1,
                                    stop_token_ids=lm.tokenizer.special.stop_ids))
    expected = engine.generate(GenerationRequest(layout.token_ids, SamplingParams(max_new_tokens=6))).token_ids
    assert list(reply.token_ids) == expected


def test_stream_pieces_add_up_to_the_unary_answer(channel):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    request = gateway_pb2.QueryRequest(prompt=PROMPT, sampling=lm_pb2.SamplingParams(max_new_tokens=6))
    messages = list(stub.QueryStream(request, timeout=60))
    assert messages[-1].HasField("done") and not any(m.HasField("done") for m in messages[:-1])
    assert len(messages) >= 3  # tokens arrive one by one, not in one piece
    unary = stub.Query(request, timeout=60)
    assert "".join(m.text for m in messages[:-1]) == unary.text == messages[-1].done.text


def test_lm_service_stream_carries_token_ids(server, channel):
    stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
    request = lm_pb2.GenerateRequest(prompt=PROMPT, sampling=lm_pb2.SamplingParams(max_new_tokens=5))
    messages = list(stub.GenerateStream(request, timeout=60))
    ids = [m.token_id for m in messages if m.HasField("token_id")]
    assert ids == list(messages[-1].done.token_ids) == list(stub.Generate(request, timeout=60).token_ids)


def test_tokenize_count_and_info(server, channel):
    lm = server.server.lm.loaded.lm
    stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
    raw = stub.Tokenize(lm_pb2.TokenizeRequest(prompt="hello world", raw=True))
    assert list(raw.token_ids) == lm.tokenizer.encode("hello world")
    chat = lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(text="hi")])
    count = stub.CountTokens(lm_pb2.TokenizeRequest(messages=[chat]))
    from lm.prompt import layout_chat

    layout = layout_chat(lm.tokenizer, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert count.count == len(layout.token_ids)
    assert count.max_prompt_tokens == 1023  # the server's max_seq_len of 1024 less one token to generate
    with_image = lm_pb2.ChatMessage(role="user", content=[lm_pb2.ContentPart(image=True),
                                                          lm_pb2.ContentPart(text="hi")])
    with pytest.raises(grpc.RpcError) as error:  # the 270M is text-only: image tiles are refused, not counted
        stub.CountTokens(lm_pb2.TokenizeRequest(messages=[with_image], image_tiles=[2]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text-only" in error.value.details()
    info = stub.GetInfo(lm_pb2.GetInfoRequest())
    # the 270M is text-only: it takes no tiles, so it states no tokens per tile
    assert (info.vocab_size, info.d_model, info.tokens_per_tile, info.accepts_images) == (lm.config.vocab_size, 640, 0,
                                                                                          False)
    engine = server.server.lm.loaded.engine
    assert (info.kv_block_size, info.kv_blocks_total) == (engine.layout.block_size, engine.storage.num_blocks)


def test_info_counts_prefix_cache_hits(server, channel):
    """The same 40-token prompt twice: the second request's full blocks come from the prefix cache, and
    GetInfo's counters say so."""
    stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
    before = stub.GetInfo(lm_pb2.GetInfoRequest())
    prompt = " ".join(f"word{i}" for i in range(20))
    request = lm_pb2.GenerateRequest(prompt=prompt, raw=True, sampling=lm_pb2.SamplingParams(max_new_tokens=3))
    first, second = stub.Generate(request, timeout=60), stub.Generate(request, timeout=60)
    assert list(first.token_ids) == list(second.token_ids)
    after = stub.GetInfo(lm_pb2.GetInfoRequest())
    assert after.prefix_cache_queries - before.prefix_cache_queries == 2
    assert after.prefix_cache_hits - before.prefix_cache_hits == 1
    block = after.kv_block_size
    prompt_tokens = first.prompt_tokens
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == (prompt_tokens - 1) // block * block


def test_health_per_service_and_text_only_vision(channel):
    health = health_pb2_grpc.HealthStub(channel)
    status = {name: health.Check(health_pb2.HealthCheckRequest(service=name)).status
              for name in ("", "tessera.lm.v1.LanguageModelService", "tessera.gateway.v1.GatewayService",
                           "tessera.vision.v1.VisionService")}
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert status == {"": serving, "tessera.lm.v1.LanguageModelService": serving,
                      "tessera.gateway.v1.GatewayService": serving, "tessera.vision.v1.VisionService": not_serving}
    with pytest.raises(grpc.RpcError) as error:
        gateway_pb2_grpc.GatewayServiceStub(channel).Query(
            gateway_pb2.QueryRequest(prompt="what is this?", images=[tensor_pb2.Image(data=photo(32, 32))]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text-only" in error.value.details()


def test_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"tessera.lm.v1.LanguageModelService", "tessera.gateway.v1.GatewayService",
            "tessera.vision.v1.VisionService", "grpc.health.v1.Health"} <= names


def test_bad_sampling_parameters_are_invalid_argument_with_reasons(channel):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Query(gateway_pb2.QueryRequest(prompt="x", sampling=lm_pb2.SamplingParams(
            max_new_tokens=-1, temperature=-2.0, top_p=0.0)), timeout=30)
    details = error.value.details()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in details and "temperature" in details and "top_p" in details


def test_prompt_too_long_is_invalid_argument(channel):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Query(gateway_pb2.QueryRequest(prompt="word " * 2000, sampling=lm_pb2.SamplingParams(max_new_tokens=2)),
                   timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 1023" in error.value.details()


def test_metrics_count_requests_by_method_and_code(server, channel):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    stub.Query(gateway_pb2.QueryRequest(prompt="hi", sampling=lm_pb2.SamplingParams(max_new_tokens=2)), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Query(gateway_pb2.QueryRequest(prompt="hi", sampling=lm_pb2.SamplingParams(max_new_tokens=0)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'tessera_grpc_requests_total{code="OK",method="Query"}' in text
    assert 'tessera_grpc_requests_total{code="INVALID_ARGUMENT",method="Query"}' in text
    assert "tessera_time_to_first_token_seconds_count" in text and "tessera_engine_queue_depth" in text
    generated = [line for line in text.splitlines() if line.startswith("tessera_tokens_generated_total")]
    assert generated and float(generated[0].split()[-1]) >= 2


def test_a_thinking_budget_on_a_model_that_does_not_think_is_invalid_argument(channel):
    stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(lm_pb2.GenerateRequest(prompt="hi", sampling=lm_pb2.SamplingParams(thinking_budget=8)),
                      timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not think" in error.value.details()
