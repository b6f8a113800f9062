"""A bounded load test over loopback: 16 concurrent clients, a fixed number of mixed text-only and
image requests through the gateway, no errors; prints p50/p99 latency and throughput."""

from __future__ import annotations

import statistics
import threading
import time

import grpc
import pytest

from proto.tessera.common.v1 import tensor_pb2
from proto.tessera.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from proto.tessera.lm.v1 import lm_pb2
from service_fixtures import photo, start_server

CLIENTS = 16
REQUESTS_PER_CLIENT = 4


@pytest.fixture(scope="module")
def server(tiny_vlm_tok_dir):
    checkpoint = tiny_vlm_tok_dir
    running = start_server(model=str(checkpoint), max_batch=16, max_queue=64)
    yield running
    running.stop()


def test_sixteen_concurrent_clients_mixed_requests(server):
    images = [photo(160 + 16 * i, 120, seed=i) for i in range(4)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            start.wait()
            for n in range(REQUESTS_PER_CLIENT):
                with_image = (index + n) % 2 == 0
                request = gateway_pb2.QueryRequest(
                    prompt=f"client {index} request {n}",
                    images=[tensor_pb2.Image(data=images[(index + n) % len(images)])] if with_image else [],
                    sampling=lm_pb2.SamplingParams(max_new_tokens=8, stop_token_ids=lm_pb2.StopTokenIds()))
                began = time.perf_counter()
                try:
                    if n % 2:
                        reply = [m for m in stub.QueryStream(request, timeout=120)][-1].done
                    else:
                        reply = stub.Query(request, timeout=120)
                    assert reply.completion_tokens == 8
                except BaseException as error:  # noqa: BLE001 - collected and reported below
                    with lock:
                        errors.append(error)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - began
    assert not any(thread.is_alive() for thread in threads), "a client was still waiting after 300 s"
    assert not errors, errors[:3]
    assert len(latencies) == CLIENTS * REQUESTS_PER_CLIENT
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"\nload: {len(ordered)} requests from {CLIENTS} clients (half with an image) in {elapsed:.2f} s: "
          f"{len(ordered) / elapsed:.1f} req/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    engine = server.server.lm.loaded.engine
    assert engine.stats().running == engine.stats().waiting == 0
