"""Helpers for the service tests: a tiny random vision-language checkpoint that carries the embedded
270M's tokenizer, free loopback ports, in-process servers, images good and bad."""

from __future__ import annotations

import io
import shutil
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tiny_vlm_with_tokenizer(path: Path) -> Path:
    """A random `Gemma3ForConditionalGeneration` written by transformers, small everywhere except its
    vocabulary, which is the 270M tokenizer's (262,144 ids, so any text tokenizes in range); the
    image placeholder id is 262144, beyond the vocabulary, as in the published 4B-27B checkpoints."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from lm.checkpoints import resolve_model

    text = Gemma3TextConfig(
        vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=32,
        max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
    )
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256,
                          image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
        # Large logits make greedy and sampled tokens far apart, so batch composition cannot flip them.
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    source = resolve_model("gemma3-270m", progress=False)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(role: str = "all", *, model: str, load_lm=None, load_vision=None, wait: bool = True, **overrides):
    """A TesseraServer on 127.0.0.1 (free port, metrics off unless given) on a thread of its own."""
    from service.config import ServeConfig
    from service.server import ServerThread, TesseraServer

    settings = dict(host="127.0.0.1", port=free_port(), metrics_port=0, kv_budget_mb=64, max_seq_len=1024,
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
