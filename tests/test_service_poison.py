"""Over real gRPC against an LM server on the tiny vision-language checkpoint: soft tokens holding NaN
or Inf are INVALID_ARGUMENT naming the image and the first bad position, and the server's next
answers equal a fresh engine's; a tiny temperature is the greedy answer, also beside other requests."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from service_fixtures import start_server

TEXT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_vlm_tok_dir):
    checkpoint = tiny_vlm_tok_dir
    running = start_server(role="lm", model=str(checkpoint), max_batch=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield lm_pb2_grpc.LanguageModelServiceStub(channel)


def text_request(**sampling) -> lm_pb2.GenerateRequest:
    return lm_pb2.GenerateRequest(prompt=TEXT, raw=True, sampling=lm_pb2.SamplingParams(
        max_new_tokens=NEW_TOKENS, stop_token_ids=lm_pb2.StopTokenIds(), **sampling))


@pytest.fixture(scope="module")
def fresh_answer(server, stub) -> list[int]:
    """The text request's greedy tokens on a fresh engine (same weights, a cache never used before)."""
    from lm.engine import EngineConfig
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams

    lm = server.server.lm.loaded.lm
    ids = list(stub.Tokenize(lm_pb2.TokenizeRequest(prompt=TEXT, raw=True)).token_ids)
    engine = lm.engine(EngineConfig(max_seq_len=1024, kv_budget_bytes=16 << 20, max_batch=1, stop_token_ids=()))
    return engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=()))).token_ids


def soft_token_tensor(server, tiles: int, seed: int, poison=None) -> tensor_pb2.Tensor:
    """Small random soft tokens float32 [tiles, 256, d_model]; `poison(array)` writes the bad values."""
    d_model = server.server.lm.loaded.lm.config.hidden_size
    array = (np.random.default_rng(seed).standard_normal((tiles, 256, d_model)) * 0.02).astype(np.float32)
    if poison is not None:
        poison(array)
    return tensor_pb2.Tensor(data=array.tobytes(), dtype="float32", shape=list(array.shape))


def one_nan(array):
    array[0, 17, 3] = np.nan


def all_inf(array):
    array[:] = np.inf


def late_minus_inf(array):
    array[1, 5, 9] = -np.inf
    array[1, 200, 0] = np.nan


@pytest.mark.parametrize("images,expected", [
    (lambda s: [soft_token_tensor(s, 1, 0, one_nan)],
     "image 0: soft token tensor has a non-finite value (nan) at tile 0, token 17, channel 3"),
    (lambda s: [soft_token_tensor(s, 1, 0, all_inf)],
     "image 0: soft token tensor has a non-finite value (inf) at tile 0, token 0, channel 0"),
    (lambda s: [soft_token_tensor(s, 1, 1), soft_token_tensor(s, 2, 2, late_minus_inf)],
     "image 1: soft token tensor has a non-finite value (-inf) at tile 1, token 5, channel 9"),
], ids=["one-nan", "all-inf", "second-image"])
def test_non_finite_soft_tokens_are_invalid_argument_and_poison_nothing(server, stub, fresh_answer, images,
                                                                        expected):
    request = lm_pb2.GenerateRequest(prompt="What is in the picture?", images=images(server),
                                     sampling=lm_pb2.SamplingParams(max_new_tokens=4))
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.value.details(), error.value.details()
    assert list(stub.Generate(text_request(), timeout=60).token_ids) == fresh_answer
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tiny_temperatures_are_the_greedy_answer_beside_other_requests(server, stub, fresh_answer):
    """1e-40 arrives as a float32 subnormal, 7e-38 and 1e-30 as normal float32s that overflowed
    logits / temperature; all run in one batch with a greedy request and an image request."""
    image = lm_pb2.GenerateRequest(prompt="What is in the picture?", images=[soft_token_tensor(server, 1, 3)],
                                   sampling=lm_pb2.SamplingParams(max_new_tokens=12))
    image_alone = list(stub.Generate(image, timeout=60).token_ids)
    temperatures = [1e-40, 7e-38, 1e-30]
    futures = [stub.Generate.future(text_request(temperature=t, seed=i), timeout=120) for i, t in enumerate(temperatures)]
    futures.append(stub.Generate.future(image, timeout=120))
    futures.append(stub.Generate.future(text_request(), timeout=120))
    replies = [f.result() for f in futures]  # raises on any non-OK status
    for t, reply in zip(temperatures, replies):
        assert (reply.finish_reason, list(reply.token_ids)) == ("length", fresh_answer), t
    assert list(replies[-2].token_ids) == image_alone
    assert list(replies[-1].token_ids) == fresh_answer
