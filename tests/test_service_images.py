"""Image + text over loopback with a tiny random vision-language checkpoint (the 270M's tokenizer):
answers equal the in-process pipeline, every bad image is INVALID_ARGUMENT, cancellation and deadlines
free the engine, a full queue and an oversized message are RESOURCE_EXHAUSTED, loading is UNAVAILABLE."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2, lm_pb2_grpc
from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from vision.image import ImageError, load_image
from vision.pan_and_scan import PanAndScanConfig
from vision.preprocess import preprocess_batch
from service_fixtures import bad_images, photo, start_server

LONG = lm_pb2.SamplingParams(max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds())  # runs until stopped


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir


@pytest.fixture(scope="module")
def server(checkpoint):
    running = start_server(model=str(checkpoint), max_seq_len=2048)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gateway(server):
    with grpc.insecure_channel(server.target) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def wait_for(condition, what: str, timeout: float = 10.0, describe=lambda: "") -> None:
    """Poll `condition` until it holds; fail the test, saying what never happened, if it does not
    within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not reached within {timeout} s {describe()}".rstrip())
        time.sleep(0.01)


def wait_engine_idle(engine, timeout: float = 10.0) -> None:
    def idle() -> bool:
        stats = engine.stats()
        return stats.running == stats.waiting == stats.prefilling == 0

    wait_for(idle, "engine idle (no running, waiting or prefilling sequence)", timeout,
             describe=lambda: f"(last {engine.stats()})")


def query(prompt: str, images=(), *, pan_and_scan=False, **sampling):
    sampling.setdefault("max_new_tokens", 6)
    return gateway_pb2.QueryRequest(prompt=prompt, images=[tensor_pb2.Image(data=d) for d in images],
                                    pan_and_scan=tensor_pb2.PanAndScanOptions(enabled=pan_and_scan),
                                    sampling=lm_pb2.SamplingParams(**sampling))


@pytest.mark.parametrize("size,pan_and_scan", [((320, 240), False), ((900, 300), True)])
def test_image_query_equals_the_pipeline_in_process(server, gateway, size, pan_and_scan):
    import torch

    from lm.engine import EngineConfig
    from lm.prompt import layout_chat
    from lm.requests import GenerationRequest
    from lm.sampling import SamplingParams
    from service.pipeline import encode_images

    image = photo(*size, seed=3)
    reply = gateway.Query(query("What is in the picture?", [image], pan_and_scan=pan_and_scan, temperature=0.7,
                                seed=99), timeout=60)
    lm = server.server.lm.loaded.lm
    images = encode_images(lm, [image], pan_and_scan=pan_and_scan)  # its own encoder, loaded afresh
    content = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    prompt = layout_chat(lm.tokenizer, [{"role": "user", "content": content}], images.tiles_per_image)
    engine = lm.engine(EngineConfig(max_seq_len=2048, kv_budget_bytes=32 << 20, max_batch=1,
                                    stop_token_ids=lm.tokenizer.special.stop_ids))
    expected = engine.generate(GenerationRequest(prompt.token_ids, SamplingParams(max_new_tokens=6, temperature=0.7,
                                                                                  seed=99),
                                                 soft_tokens=images.soft_tokens,
                                                 image_mask=torch.tensor(prompt.image_mask)))
    assert list(reply.tiles_per_image) == list(images.tiles_per_image)
    assert (images.tiles_per_image[0] > 1) == pan_and_scan
    assert list(reply.token_ids) == expected.token_ids
    assert reply.prompt_tokens == len(prompt.token_ids)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_are_invalid_argument_and_the_server_keeps_serving(gateway, name):
    data = bad_images()[name]
    with pytest.raises(grpc.RpcError) as error:
        gateway.Query(query("what is this?", [photo(40, 30), data]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("image 1: ")  # names the image and why
    code = error.value.details().rsplit("(", 1)[-1].rstrip(")")
    with pytest.raises(ImageError) as decoded:  # the reason the image decoder itself gives for these bytes
        load_image(data)
    assert code == decoded.value.code
    assert gateway.Query(query("still there?", [photo(40, 30)]), timeout=30).completion_tokens == 6


def test_vision_service_encode_cache_and_preprocess(server):
    with grpc.insecure_channel(server.target, [("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.EncodeRequest(images=[tensor_pb2.Image(data=photo(200, 100, seed=11))])
        first, second = stub.Encode(request), stub.Encode(request)
        assert [first.images[0].cache_hit, second.images[0].cache_hit] == [False, True]
        assert first.images[0].cache_key == second.images[0].cache_key
        assert list(first.images[0].soft_tokens.shape) == [1, 256, 64]
        assert first.images[0].soft_tokens.data == second.images[0].soft_tokens.data
        options = tensor_pb2.PanAndScanOptions(enabled=True, min_crop_size=32, min_ratio_to_activate=1.5)
        item = stub.Preprocess(vision_pb2.PreprocessRequest(images=request.images, pan_and_scan=options)).images[0]
        expected = preprocess_batch([request.images[0].data], PanAndScanConfig(True, min_crop_size=32,
                                                                              min_ratio_to_activate=1.5))[0]
        assert expected.num_crops == item.num_crops == 2
        assert list(item.tiles.shape) == list(expected.tiles.shape) and item.tiles.data == expected.tiles.tobytes()
        assert [tuple((b.x0, b.y0, b.x1, b.y1)) for b in item.crop_boxes] == list(expected.boxes)
        info = stub.GetInfo(vision_pb2.GetInfoRequest())
        assert (info.d_model, info.tokens_per_tile, info.image_size) == (64, 256, 896)
        for empty in (lambda: stub.Encode(vision_pb2.EncodeRequest()),
                      lambda: stub.Preprocess(vision_pb2.PreprocessRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                empty()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no images" in refused.value.details()


def test_cancelling_a_stream_frees_the_engine_sequence(server, gateway):
    engine = server.server.lm.loaded.engine
    call = gateway.QueryStream(query("go on", max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds()), timeout=60)
    received = [next(call) for _ in range(3)]
    assert engine.stats().running == 1 and all(not m.HasField("done") for m in received)
    call.cancel()
    wait_engine_idle(engine, timeout=5)


def test_deadline_expiry_stops_the_work(server, gateway):
    engine = server.server.lm.loaded.engine
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        for _ in gateway.QueryStream(query("go on", max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds()),
                                     timeout=0.8):
            pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    wait_engine_idle(engine, timeout=5)


def test_full_queue_is_resource_exhausted(checkpoint):
    running = start_server(model=str(checkpoint), max_batch=1, max_queue=1)
    try:
        engine = running.server.lm.loaded.engine
        with grpc.insecure_channel(running.target) as channel:
            stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
            first = stub.GenerateStream(lm_pb2.GenerateRequest(prompt="a", sampling=LONG), timeout=60)
            next(first)  # running in the only slot
            second = stub.GenerateStream(lm_pb2.GenerateRequest(prompt="b", sampling=LONG), timeout=60)
            wait_for(lambda: engine.stats().waiting == 1, "the second request queued behind the first",
                     describe=lambda: f"(last {engine.stats()})")
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(lm_pb2.GenerateRequest(prompt="c", sampling=lm_pb2.SamplingParams(max_new_tokens=2)))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in error.value.details()
            first.cancel()
            second.cancel()
            wait_engine_idle(engine)
    finally:
        running.stop()


def test_oversized_message_is_resource_exhausted(checkpoint):
    running = start_server(model=str(checkpoint), max_message_mb=1)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Query(query("big", [b"\x89PNG" + bytes(2 << 20)]), timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Query(query("small", max_new_tokens=2), timeout=30).completion_tokens == 2
    finally:
        running.stop()


def test_requests_while_loading_are_unavailable_and_health_not_serving(checkpoint):
    from service.config import ServeConfig
    from service.server import default_lm_loader, default_vision_loader

    release = threading.Event()
    config = ServeConfig(role="all", model=str(checkpoint), kv_budget_mb=64, max_seq_len=1024)

    def held(load):
        def wait_then_load():
            release.wait(60)
            return load()
        return wait_then_load

    running = start_server(model=str(checkpoint), wait=False, load_lm=held(default_lm_loader(config)),
                           load_vision=held(default_vision_loader(config, required=False)))
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            names = ["", "tessera.lm.v1.LanguageModelService", "tessera.vision.v1.VisionService",
                     "tessera.gateway.v1.GatewayService"]
            for name in names:
                status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING, name
            calls = {
                "lm": lambda: lm_pb2_grpc.LanguageModelServiceStub(channel).Generate(
                    lm_pb2.GenerateRequest(prompt="hi"), timeout=10),
                "vision": lambda: vision_pb2_grpc.VisionServiceStub(channel).Encode(
                    vision_pb2.EncodeRequest(images=[tensor_pb2.Image(data=photo(32, 32))]), timeout=10),
                "gateway": lambda: gateway_pb2_grpc.GatewayServiceStub(channel).Query(query("hi"), timeout=10),
            }
            for service, call in calls.items():
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, service
                assert "loading" in error.value.details()
            release.set()
            running.call(running.server.loaded.wait(), timeout=120)
            for name in names:
                assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                    health_pb2.HealthCheckResponse.SERVING
            assert calls["gateway"]().completion_tokens == 6
    finally:
        release.set()
        running.stop()


def test_bearer_token_is_required_except_for_health(checkpoint):
    running = start_server(model=str(checkpoint), auth_token="s3cret")
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for metadata in [(), (("authorization", "Bearer wrong"),)]:
                with pytest.raises(grpc.RpcError) as error:
                    stub.Query(query("hi", max_new_tokens=2), metadata=metadata, timeout=30)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Query(query("hi", max_new_tokens=2), metadata=(("authorization", "Bearer s3cret"),), timeout=30)
            assert reply.completion_tokens == 2
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_separately_deployed_services_behind_a_gateway(checkpoint, server, gateway):
    vision = start_server("vision", model=str(checkpoint))
    lm = start_server("lm", model=str(checkpoint), max_seq_len=2048)
    front = start_server("gateway", model="unused", vision_target=vision.target, lm_target=lm.target)
    try:
        with grpc.insecure_channel(front.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = query("What is in the picture?", [photo(300, 200, seed=5)], temperature=0.5, seed=7)
            assert list(stub.Query(request, timeout=60).token_ids) == list(gateway.Query(request, timeout=60).token_ids)
            # The caller's deadline travels to the LM service, whose engine stops the work.
            with pytest.raises(grpc.RpcError) as error:
                for _ in stub.QueryStream(query("go on", max_new_tokens=1500, stop_token_ids=lm_pb2.StopTokenIds()),
                                          timeout=0.8):
                    pass
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_engine_idle(lm.server.lm.loaded.engine, timeout=5)
            with pytest.raises(grpc.RpcError) as error:  # a bad image's status comes back through the gateway
                stub.Query(query("x", [bad_images()["empty"]]), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in error.value.details()
    finally:
        for running in (front, lm, vision):
            running.stop()


def test_vision_role_refuses_a_text_only_model():
    with pytest.raises(RuntimeError, match="no vision tower"):
        start_server("vision", model="gemma3-270m")


def _soft_tokens(server, tiles: int, **overrides):
    """A Tensor message of `tiles` tiles of soft tokens for the served model, with fields overridden."""
    import numpy as np

    d_model = server.server.lm.loaded.lm.config.hidden_size
    array = np.zeros((tiles, 256, d_model), dtype=np.float32)
    fields = {"data": array.tobytes(), "dtype": "float32", "shape": list(array.shape)}
    fields.update(overrides)
    return tensor_pb2.Tensor(**fields)


@pytest.mark.parametrize("case,needle", [
    ("bytes", "bytes of data"),
    ("dtype", "dtype"),
    ("width", "soft"),
    ("tokens", "256"),
])
def test_wrong_soft_token_tensors_are_invalid_argument(server, case, needle):
    """Soft tokens arriving at the LM service with a wrong byte count, dtype, width or tokens per tile are
    refused with a reason, and the service keeps serving."""
    d_model = server.server.lm.loaded.lm.config.hidden_size
    tensor = {
        "bytes": lambda: _soft_tokens(server, 1, data=b"\x00" * 12),
        "dtype": lambda: _soft_tokens(server, 1, dtype="int64"),
        "width": lambda: _soft_tokens(server, 1, data=b"\x00" * (256 * (d_model + 1) * 4), shape=[1, 256, d_model + 1]),
        "tokens": lambda: _soft_tokens(server, 1, data=b"\x00" * (100 * d_model * 4), shape=[1, 100, d_model]),
    }[case]()
    request = lm_pb2.GenerateRequest(prompt="what is this?", images=[tensor],
                                     sampling=lm_pb2.SamplingParams(max_new_tokens=2))
    with grpc.insecure_channel(server.target) as channel:
        stub = lm_pb2_grpc.LanguageModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in error.value.details(), error.value.details()
        ok = stub.Generate(lm_pb2.GenerateRequest(prompt="still there?", sampling=lm_pb2.SamplingParams(max_new_tokens=2)),
                           timeout=30)
        assert ok.completion_tokens == 2
