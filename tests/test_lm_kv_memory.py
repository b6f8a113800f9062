"""KV-cache memory from the configs alone, against the formula of DESIGN.md section 5, evaluated here
from the fields of the published config.json as transformers reads them (layer types, KV heads,
head_dim, window): bytes per token = Σ_layers 2 × kv_heads × head_dim × bytes per element; local
(sliding-window) layers hold at most `sliding_window` tokens."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch

from lm.kv_cache import CacheShape, KVCache, kv_bytes_for_context, kv_bytes_per_token, slot_bytes
from lm.presets import PRESETS, PUBLISHED_CONFIGS

GIB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def reference_config(name: str):
    """The preset's published config.json as transformers' own config classes read it."""
    from transformers import Gemma3Config, Gemma3TextConfig

    raw = PUBLISHED_CONFIGS[name]
    fields = {key: value for key, value in raw.items() if key != "model_type"}
    return Gemma3Config(**fields).text_config if "text_config" in raw else Gemma3TextConfig(**fields)


def formula_bytes(reference, tokens: int, element_bytes: int, *, windowed: bool) -> int:
    per_layer_token = 2 * reference.num_key_value_heads * reference.head_dim * element_bytes
    held = [min(tokens, reference.sliding_window) if windowed and kind == "sliding_attention" else tokens
            for kind in reference.layer_types]
    assert set(reference.layer_types) == {"sliding_attention", "full_attention"}
    return per_layer_token * sum(held)


@pytest.mark.parametrize("dtype", list(BYTES), ids=str)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kv_bytes_equal_the_formula_on_the_published_config(name, dtype):
    config, reference = PRESETS[name], reference_config(name)
    window = reference.sliding_window
    assert kv_bytes_per_token(config, dtype) == formula_bytes(reference, 1, BYTES[dtype], windowed=False)
    for tokens in (1, 2, window - 1, window, window + 1, 3 * window + 5, 32 * 1024, 128 * 1024):
        for windowed in (False, True):
            expected = formula_bytes(reference, tokens, BYTES[dtype], windowed=windowed)
            assert kv_bytes_for_context(config, tokens, dtype, windowed=windowed) == expected, (tokens, windowed)
        assert slot_bytes(config, tokens, dtype) == formula_bytes(reference, tokens, BYTES[dtype], windowed=True)
    # Below the window nothing is saved; beyond it the local layers stop growing.
    assert kv_bytes_for_context(config, window, dtype) == kv_bytes_for_context(config, window, dtype, windowed=False)
    assert kv_bytes_for_context(config, window + 1, dtype) < kv_bytes_for_context(config, window + 1, dtype,
                                                                                   windowed=False)


# DESIGN.md section 5 (bf16 KV cache, GiB) as written there: all layers global vs local layers windowed.
DESIGN_TABLE = [
    ("gemma3-4b", 32 * 1024, "4.25", "0.74"),
    ("gemma3-27b", 32 * 1024, "15.5", "2.9"),
    ("gemma3-4b", 128 * 1024, "17.0", "2.6"),
    ("gemma3-27b", 128 * 1024, "62.0", "10.4"),
]


@pytest.mark.parametrize("name,context,all_global,windowed", DESIGN_TABLE)
def test_design_table_is_the_formula_rounded(name, context, all_global, windowed):
    """Each figure of the table is the computed size rounded to the digits it is written with."""
    config = PRESETS[name]
    for figure, is_windowed in ((all_global, False), (windowed, True)):
        gib = Decimal(kv_bytes_for_context(config, context, torch.bfloat16, windowed=is_windowed)) / GIB
        assert gib.quantize(Decimal(figure)) == Decimal(figure), (figure, gib)


def test_allocated_cache_is_the_size_the_formula_budgets():
    """The slot cache really allocates what the sizing formula charges, so a budget holds the slots it says."""
    config, reference = PRESETS["gemma3-270m"], reference_config("gemma3-270m")
    max_seq_len = reference.sliding_window + 8  # global layers longer than the local rings
    per_slot = formula_bytes(reference, max_seq_len, 2, windowed=True)
    shape = CacheShape.from_budget(config, budget_bytes=2 * per_slot + per_slot // 2, max_seq_len=max_seq_len,
                                   dtype=torch.bfloat16, max_slots=8)
    assert (shape.num_slots, shape.ring_len) == (2, reference.sliding_window)
    cache = KVCache(config, shape, dtype=torch.bfloat16, device="cpu")
    assert cache.total_bytes == shape.num_slots * per_slot
    assert CacheShape.from_budget(config, budget_bytes=10 * per_slot, max_seq_len=max_seq_len,
                                  dtype=torch.bfloat16, max_slots=3).num_slots == 3
