"""An LRU cache of soft tokens, bounded in bytes, safe to share between threads.

Keys hash the image's encoded bytes together with every preprocessing parameter and the model
identity, so the same file under different Pan & Scan settings, or under another model / backend /
dtype, never hits. Two different files that decode to equal pixels miss (harmless: one more encode);
the converse, equal pixels in a different shape or mode colliding, cannot happen because the bytes
differ.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import torch


def cache_key(image_bytes: bytes, params: Mapping[str, Any], model_identity: str) -> str:
    """sha256 over length-prefixed fields: model identity, canonical JSON of `params`, image bytes.

    `params` must hold every preprocessing setting that changes the tiles (Pan & Scan on/off and its
    limits, tile size, ...); values must be JSON-serialisable (dataclasses: pass `asdict(...)`)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256()
    for field in (model_identity.encode(), canonical.encode(), image_bytes):
        digest.update(len(field).to_bytes(8, "little"))  # length prefix: fields cannot run together
        digest.update(field)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes_used: int
    max_bytes: int


class SoftTokenCache:
    """key -> soft tokens [1+k, 256, d_model]; least recently used entries go first when full."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: str, soft_tokens: torch.Tensor) -> bool:
        """Store (replacing any entry under `key`); False when the tensor alone exceeds the bound.
        The tensor is stored as given: callers must not modify it afterwards."""
        size = soft_tokens.numel() * soft_tokens.element_size()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self._evictions += 1
            self._entries[key] = soft_tokens
            self._bytes += size
            return True

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes_used=self._bytes,
                max_bytes=self.max_bytes,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
