"""KV-cache memory from the configs alone, against the formula of DESIGN.md section 5, evaluated here
from the fields of the published config.json as transformers reads them (layer types, KV heads,
head_dim, window): bytes per token = Σ_layers 2 × kv_heads × head_dim × bytes per element; local
(sliding-window) layers hold at most `sliding_window` tokens."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch

from lm.kv_cache import KVLayout, PagedKVStorage, kv_bytes_for_context, kv_bytes_per_token, request_budget_bytes
from lm.presets import PRESETS, PUBLISHED_CONFIGS

GIB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def reference_config(name: str):
    """The preset's published config.json as transformers' own config class of its model_type reads it
    (the decoder's config: Gemma 3's text_config)."""
    from transformers import AutoConfig

    raw = PUBLISHED_CONFIGS[name]
    config = AutoConfig.for_model(**raw)
    return config.text_config if "text_config" in raw else config


def formula_bytes(reference, tokens: int, element_bytes: int, *, windowed: bool) -> int:
    per_layer_token = 2 * reference.num_key_value_heads * reference.head_dim * element_bytes
    layer_types = getattr(reference, "layer_types", None) or ["full_attention"] * reference.num_hidden_layers
    held = [min(tokens, reference.sliding_window) if windowed and kind == "sliding_attention" else tokens
            for kind in layer_types]
    return per_layer_token * sum(held)


@pytest.mark.parametrize("dtype", list(BYTES), ids=str)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kv_bytes_equal_the_formula_on_the_published_config(name, dtype):
    config, reference = PRESETS[name], reference_config(name)
    window = reference.sliding_window or 4096  # Qwen 3: no window; the same token counts still apply
    assert kv_bytes_per_token(config, dtype) == formula_bytes(reference, 1, BYTES[dtype], windowed=False)
    for tokens in (1, 2, window - 1, window, window + 1, 3 * window + 5, 32 * 1024, 128 * 1024):
        for windowed in (False, True):
            expected = formula_bytes(reference, tokens, BYTES[dtype], windowed=windowed)
            assert kv_bytes_for_context(config, tokens, dtype, windowed=windowed) == expected, (tokens, windowed)
    if reference.sliding_window is None:  # every layer global: windowing saves nothing
        assert kv_bytes_for_context(config, 128 * 1024, dtype) == kv_bytes_for_context(config, 128 * 1024, dtype,
                                                                                        windowed=False)
        return
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


def test_paged_storage_allocates_what_the_layout_charges_and_covers_every_layer_once():
    """Gemma 3 270M: 3 full and 15 sliding layers make one full group and five sliding groups of three
    layers; a budget of n blocks allocates exactly n blocks of `block_bytes`, and the smallest budget for
    one request holds that request (the engine accepts it, and refuses one block less)."""
    config = PRESETS["gemma3-270m"]
    layout = KVLayout.from_config(config, 16)
    layers = [layer for group in layout.groups for layer in group.layers]
    assert sorted(layers) == list(range(config.num_hidden_layers))
    full = [g for g in layout.groups if g.window is None]
    assert len(full) == 1 and layout.page_layers == len(full[0].layers) == config.layer_types.count("full_attention")
    assert all(g.window == config.sliding_window for g in layout.groups if g not in full)
    storage = PagedKVStorage(config, layout, 7, dtype=torch.bfloat16, device="cpu")
    assert storage.total_bytes == 7 * layout.block_bytes(config, torch.bfloat16)
    per_token_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    assert layout.block_bytes(config, torch.bfloat16) == layout.page_layers * 16 * per_token_layer


def test_smallest_budget_for_one_request_is_accepted_and_one_block_less_is_refused():
    from lm.engine import Engine, EngineConfig
    from lm.models.gemma3 import Gemma3TextModel

    config = PRESETS["gemma3-270m"]
    budget = request_budget_bytes(config, 2000, torch.float32, block_size=16, prefill_chunk=512)
    block = KVLayout.from_config(config, 16).block_bytes(config, torch.float32)
    with torch.device("meta"):
        model = Gemma3TextModel(config)
    Engine(model, config, EngineConfig(max_seq_len=2000, kv_budget_bytes=budget))
    with pytest.raises(ValueError, match="budget"):
        Engine(model, config, EngineConfig(max_seq_len=2000, kv_budget_bytes=budget - block))
