"""The vision service's own request limits, over real gRPC against a real server (tiny random
vision-language checkpoint): Preprocess and Encode refuse too many images or tiles from the image
headers before any decoding (the `--max-images` / `--max-tiles` the gateway enforces, also in
`serve all`), and a request whose reply would exceed the max message size, naming the size, instead
of doing the work and failing in the transport; health checks keep answering meanwhile, and every
refusal is counted with its status (never OK)."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.vision.v1 import vision_pb2, vision_pb2_grpc
from service_fixtures import photo, refused, start_server

WIDE = tensor_pb2.PanAndScanOptions(enabled=True, min_crop_size=1, max_num_crops=16)  # a 4000 x 1 image: 17 tiles
TILE_BYTES = 3 * 896 * 896 * 4  # one float32 Preprocess tile
REFUSAL_SECONDS = 2.0  # a refusal from the headers comes well within a health check's deadline


def crops(n: int) -> tensor_pb2.PanAndScanOptions:
    """Pan & Scan options giving a 4000 x 1 image exactly 1 + n tiles."""
    return tensor_pb2.PanAndScanOptions(enabled=True, min_crop_size=1, max_num_crops=n)


@pytest.fixture(scope="module")
def checkpoint(tiny_vlm_tok_dir):
    return tiny_vlm_tok_dir


@pytest.fixture(scope="module")
def server(checkpoint):
    """`serve all` with the default limits: 8 images, 32 tiles, 64 MiB messages."""
    running = start_server("all", model=str(checkpoint))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small(checkpoint):
    """`serve vision --max-images 4 --max-tiles 20 --max-message-mb 1`."""
    running = start_server("vision", model=str(checkpoint), max_images=4, max_tiles=20, max_message_mb=1)
    yield running
    running.stop()


def stub_for(server):
    channel = grpc.insecure_channel(server.target, [("grpc.max_send_message_length", 256 << 20),
                                                    ("grpc.max_receive_message_length", 256 << 20)])
    return channel, vision_pb2_grpc.VisionServiceStub(channel)


def images(count: int, width: int = 4000, height: int = 1) -> list[tensor_pb2.Image]:
    return [tensor_pb2.Image(data=photo(width, height, seed=i)) for i in range(count)]  # distinct: no cache hit




def counted(server, method: str) -> dict[str, float]:
    return {sample.labels["code"]: sample.value for family in server.server.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "tessera_grpc_requests_total" and sample.labels["method"] == method}


@pytest.fixture
def no_decoding(monkeypatch):
    """Any image decoded or tiled fails the call with INTERNAL: a refusal must come before."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an image was decoded for a request that had to be refused from its headers")
    monkeypatch.setattr("service.vision_service.preprocess_batch", forbidden)


# ----- the tester's inputs, at the default limits ----------------------------------------------------------

@pytest.mark.parametrize("method,count,message", [
    ("Preprocess", 8, "136 tiles in all"),
    ("Preprocess", 16, "16 images; at most 8"),
    ("Encode", 16, "16 images; at most 8"),
    ("Encode", 8, "136 tiles in all"),
])
def test_too_many_images_or_tiles_are_refused_before_decoding(server, no_decoding, method, count, message):
    channel, stub = stub_for(server)
    health = health_pb2_grpc.HealthStub(channel)
    cache = server.server.vision.cache
    misses = cache.stats().misses
    before = counted(server, method)
    request = (vision_pb2.PreprocessRequest if method == "Preprocess" else vision_pb2.EncodeRequest)(
        images=images(count), pan_and_scan=WIDE)
    outcome = {}

    def call():
        outcome["error"], outcome["seconds"] = refused(lambda: getattr(stub, method)(request, timeout=60))

    thread = threading.Thread(target=call)
    thread.start()
    while thread.is_alive():  # raises if a check misses its 2 s deadline
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.05)
    thread.join()
    channel.close()
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()
    assert outcome["seconds"] < REFUSAL_SECONDS
    assert cache.stats().misses == misses  # nothing looked up, nothing encoded
    after = counted(server, method)
    assert after.get("INVALID_ARGUMENT", 0) == before.get("INVALID_ARGUMENT", 0) + 1
    assert after.get("OK") == before.get("OK")


def test_a_preprocess_reply_over_the_message_size_is_refused_naming_it(server, no_decoding):
    """7 tiles are 67.4 MB of float32 pixels, over the default 64 MiB message size."""
    channel, stub = stub_for(server)
    with channel:
        error, seconds = refused(lambda: stub.Preprocess(vision_pb2.PreprocessRequest(
            images=images(1), pan_and_scan=crops(6)), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and seconds < REFUSAL_SECONDS
    size = int(re.search(r"reply would be ([\d,]+) bytes", error.details())[1].replace(",", ""))
    assert size >= 7 * TILE_BYTES and f"max message size of {64 << 20:,} bytes" in error.details(), error.details()
    assert "at most 6 tiles fit" in error.details(), error.details()


def test_a_preprocess_reply_that_fits_is_served(server):
    channel, stub = stub_for(server)
    with channel:
        reply = stub.Preprocess(vision_pb2.PreprocessRequest(images=images(1), pan_and_scan=crops(5)), timeout=60)
    assert reply.images[0].num_crops == 5 and reply.ByteSize() <= 64 << 20
    assert len(reply.images[0].tiles.data) == 6 * TILE_BYTES


# ----- the limits are the server's settings; the reply bound is tight -----------------------------------------

def test_configured_limits_apply_to_preprocess_and_encode(small, no_decoding):
    channel, stub = stub_for(small)
    with channel:
        for method in ("Preprocess", "Encode"):
            kind = vision_pb2.PreprocessRequest if method == "Preprocess" else vision_pb2.EncodeRequest
            for request, message in [(kind(images=images(5, 40, 30)), "5 images; at most 4"),
                                     (kind(images=images(2), pan_and_scan=crops(10)), "22 tiles in all")]:
                error, _ = refused(lambda: getattr(stub, method)(request, timeout=30))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), \
                    (method, error.details())
        error, _ = refused(lambda: stub.Preprocess(vision_pb2.PreprocessRequest(images=images(1, 40, 30)), timeout=30))
        assert "max message size of 1,048,576 bytes" in error.details() and "at most 0 tiles fit" in error.details()


def test_encode_serves_exactly_the_tiles_that_fit_in_a_reply(small):
    """The refusal states how many tiles fit; that many are served in a reply within the limit, one
    more is refused before any encoding."""
    channel, stub = stub_for(small)
    cache = small.server.vision.cache
    with channel:
        misses = cache.stats().misses
        error, _ = refused(lambda: stub.Encode(vision_pb2.EncodeRequest(images=images(1), pan_and_scan=crops(16)),
                                               timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "the Encode reply would be" in error.details()
        assert cache.stats().misses == misses
        fit = int(re.search(r"at most (\d+) tiles fit", error.details())[1])
        assert 1 < fit < 17
        reply = stub.Encode(vision_pb2.EncodeRequest(images=images(1), pan_and_scan=crops(fit - 1)), timeout=120)
        assert list(reply.images[0].soft_tokens.shape)[0] == fit and reply.ByteSize() <= 1 << 20
        error, _ = refused(lambda: stub.Encode(vision_pb2.EncodeRequest(
            images=images(1, 4001), pan_and_scan=crops(fit)), timeout=60))
        assert f"at most {fit} tiles fit" in error.details(), error.details()


def test_a_reply_over_the_message_size_is_resource_exhausted_not_ok(small, monkeypatch):
    """The backstop behind the services' own checks: with the Preprocess check taken away, the reply
    (9.6 MB for one tile) is refused by the interceptor with its size, counted as such, never OK."""
    monkeypatch.setattr("service.vision_service.check_reply_size", lambda *args, **kwargs: None)
    before = counted(small, "Preprocess")
    channel, stub = stub_for(small)
    with channel:
        error, _ = refused(lambda: stub.Preprocess(vision_pb2.PreprocessRequest(images=images(1, 40, 30)),
                                                   timeout=60))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert re.match(r"the reply is [\d,]+ bytes, over the server's max message size of 1,048,576 bytes",
                    error.details()), error.details()
    after = counted(small, "Preprocess")
    assert after.get("RESOURCE_EXHAUSTED", 0) == before.get("RESOURCE_EXHAUSTED", 0) + 1
    assert after.get("OK") == before.get("OK")
