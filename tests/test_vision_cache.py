"""Soft-token cache: keys that never collide across parameters or models, LRU in bytes, counters."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

from vision.cache import SoftTokenCache, cache_key

PARAMS = {"pan_and_scan": False, "min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2}


def png_bytes(mode: str, size=(8, 6), value=128) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(buffer, format="PNG")
    return buffer.getvalue()


def tokens(tiles: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((tiles, 256, 4), fill)  # 4 KiB per tile in fp32


def test_key_depends_on_bytes_params_and_model():
    image = png_bytes("RGB")
    base = cache_key(image, PARAMS, "model-a")
    assert base == cache_key(image, dict(reversed(list(PARAMS.items()))), "model-a")  # order-free
    different = [
        cache_key(image, {**PARAMS, "pan_and_scan": True}, "model-a"),
        cache_key(image, {**PARAMS, "max_num_crops": 5}, "model-a"),
        cache_key(image, {**PARAMS, "min_ratio_to_activate": 1.25}, "model-a"),
        cache_key(image, PARAMS, "model-b"),
        cache_key(image, PARAMS, "model-a-onnx-int8"),
        cache_key(png_bytes("L"), PARAMS, "model-a"),  # equal grey pixels, another mode
        cache_key(png_bytes("RGB", size=(6, 8)), PARAMS, "model-a"),  # same pixel count, other shape
    ]
    assert len({base, *different}) == len(different) + 1


def test_hits_misses_and_lru_eviction_in_bytes():
    cache = SoftTokenCache(max_bytes=3 * 4096)
    assert cache.get("a") is None
    for key in "abc":
        assert cache.put(key, tokens(1))
    assert cache.get("a") is not None  # "a" becomes most recent: "b" is now the oldest
    assert cache.put("d", tokens(1))
    assert cache.get("b") is None and cache.get("a") is not None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (2, 2, 1, 3)
    assert stats.bytes_used == 3 * 4096 <= stats.max_bytes


def test_large_entry_evicts_several_and_oversized_is_refused():
    cache = SoftTokenCache(max_bytes=4 * 4096)
    for key in "abcd":
        cache.put(key, tokens(1))
    assert cache.put("big", tokens(3))
    assert cache.stats().evictions == 3 and len(cache) == 2
    assert not cache.put("huge", tokens(5))
    assert cache.get("huge") is None and cache.stats().bytes_used == 4 * 4096


def test_replacing_a_key_updates_the_byte_count():
    cache = SoftTokenCache(max_bytes=10 * 4096)
    cache.put("a", tokens(3))
    cache.put("a", tokens(1, fill=1.0))
    assert cache.stats().bytes_used == 4096 and cache.get("a")[0, 0, 0] == 1.0


def test_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        SoftTokenCache(max_bytes=-1)


def test_concurrent_use_keeps_the_books_straight():
    cache = SoftTokenCache(max_bytes=16 * 4096)
    gets_per_thread, threads = 400, 8

    def worker(seed: int):
        for i in range(gets_per_thread):
            key = f"k{(seed * 7 + i) % 40}"
            if cache.get(key) is None:
                cache.put(key, tokens(1 + i % 2))

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    stats = cache.stats()
    assert stats.hits + stats.misses == gets_per_thread * threads
    assert stats.bytes_used == sum(v.numel() * v.element_size() for v in cache._entries.values())
    assert stats.bytes_used <= stats.max_bytes
