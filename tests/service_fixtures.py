"""Helpers for the service tests: a tiny random vision-language checkpoint that carries the embedded
270M's tokenizer, free loopback ports, in-process servers, images good and bad."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

def build_tiny_vlm_with_tokenizer(path: Path) -> Path:
    """A random Gemma 3 vision-language checkpoint with the embedded 270M's tokenizer (the same one the
    caption benchmark uses): small everywhere except its 262,144-id vocabulary, the image placeholder
    262144 beyond it as in the published checkpoints, and random projector and patch weights so that
    the image really changes the answer."""
    from service.tiny_checkpoints import write_tiny_captioning_checkpoint

    return write_tiny_captioning_checkpoint(path, layers=6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(role: str = "all", *, model: str, load_lm=None, load_vision=None, wait: bool = True, **overrides):
    """A TesseraServer on 127.0.0.1 (free port, metrics off unless given) on a thread of its own."""
    from service.config import ServeConfig
    from service.server import ServerThread, TesseraServer

    settings = dict(host="127.0.0.1", port=free_port(), metrics_port=0, http_port=0, kv_budget_mb=64, max_seq_len=1024,
                    max_batch=8, grace_period=5.0)
    settings.update(overrides)
    config = ServeConfig(role=role, model=model, **settings)
    return ServerThread(TesseraServer(config, load_lm=load_lm, load_vision=load_vision)).start(wait_loaded=wait)


def photo(width: int = 320, height: int = 240, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; no pixel data worth decoding follows."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def bad_images() -> dict[str, bytes]:
    good = photo(64, 48)
    return {
        "truncated": good[: len(good) // 2],
        "random_bytes": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "huge_dimensions": png_claiming(100_000, 100_000),
        "zero_width": png_claiming(0, 10),
        "plain_text": b"hello, this is plain text\n" * 20,
        "corrupt_jpeg": photo(64, 48, fmt="JPEG")[:200] + bytes(range(256)) * 8,
        "svg_text": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    }


def refused(call) -> tuple[grpc.RpcError, float]:
    """The RpcError `call()` raises (the test fails if it returns) and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value, time.monotonic() - started


def health_status(channel, service: str) -> int | None:
    """`service`'s health status (grpc.health.v1 Check, 2 s deadline), None when the check fails."""
    try:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError:
        return None


def wait_status(channel, service: str, expected: int, timeout: float) -> float:
    """Seconds until `service` reports `expected`; fails after `timeout`."""
    started = time.monotonic()
    while health_status(channel, service) != expected:
        assert time.monotonic() - started < timeout, \
            f"{service or 'server'} not {health_pb2.HealthCheckResponse.ServingStatus.Name(expected)} after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - started
