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


IM_END, END_OF_TEXT, THINK = 151_645, 151_643, 151_667  # Qwen 3's <|im_end|>, <|endoftext|>, <think>


def write_tiny_qwen3(directory: Path, tokenizer_dir: Path, *, tie_word_embeddings: bool = True) -> Path:
    """A random two-layer Qwen 3 with Qwen 3's real tokenizer and chat template (stops: <|im_end|>,
    <|endoftext|>, as the published generation_config.json says)."""
    import json
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=151_936, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
                                  bos_token_id=END_OF_TEXT, eos_token_id=IM_END)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, END_OF_TEXT]}))
    return directory


def write_scripted_qwen3(directory: Path, tokenizer_dir: Path, script: dict[int, int]) -> Path:
    """A Qwen 3 checkpoint (real tokenizer and template) whose next token is `script[last token]`, at
    any temperature: every layer's output projections are zero, so the last hidden state is the last
    token's embedding; scripted tokens embed as distinct basis vectors and the (untied) head maps each
    to its successor with a logit of 80 (after the final RMSNorm), every other token 0. Unscripted
    tokens embed as zero (uniform logits)."""
    import torch
    from safetensors.torch import load_file, save_file

    write_tiny_qwen3(directory, tokenizer_dir, tie_word_embeddings=False)
    path = directory / "model.safetensors"
    weights = load_file(path)
    hidden = weights["model.embed_tokens.weight"].shape[1]
    if len(script) > hidden:
        raise ValueError(f"a script of {len(script)} states needs more than {hidden} dimensions")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name].zero_()
    weights["model.embed_tokens.weight"].zero_()
    weights["lm_head.weight"].zero_()
    weights["model.norm.weight"].fill_(1.0)
    for state, (token, successor) in enumerate(script.items()):
        weights["model.embed_tokens.weight"][token, state] = 1.0
        weights["lm_head.weight"][successor, state] = 10.0  # x 8, the RMSNorm of a one-hot 64-vector
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, path, metadata={"format": "pt"})
    return directory


def start_process(model: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 180):
    """`tessera serve all --model MODEL` on free loopback ports (gRPC, HTTP; metrics off), waited for
    until /health answers 200. Returns (process, gRPC target, HTTP base URL)."""
    import os
    import subprocess
    import sys
    import tempfile
    import urllib.request

    port, http_port = free_port(), free_port()
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would stall the server once full
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "all", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"tessera serve all exited with {process.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                if reply.status == 200:
                    return process, f"127.0.0.1:{port}", base
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("tessera serve all did not become ready")
        time.sleep(0.2)
