"""KV-cache memory figures from the configs alone, against the formula of DESIGN.md section 5:
bytes per token = Σ_layers 2 × kv_heads × head_dim × bytes; local layers hold at most the window."""

import pytest
import torch

from lm.kv_cache import kv_bytes_for_context, kv_bytes_per_token
from lm.presets import PRESETS

GIB = 2**30


@pytest.mark.parametrize(
    "name,context,all_global_gib,windowed_gib",
    [
        ("gemma3-4b", 32 * 1024, 4.25, 0.74),
        ("gemma3-27b", 32 * 1024, 15.5, 2.9),
        ("gemma3-4b", 128 * 1024, 17.0, 2.6),
        ("gemma3-27b", 128 * 1024, 62.0, 10.4),
    ],
)
def test_kv_bytes_match_design_table(name, context, all_global_gib, windowed_gib):
    config = PRESETS[name]
    all_global = kv_bytes_for_context(config, context, torch.bfloat16, windowed=False)
    windowed = kv_bytes_for_context(config, context, torch.bfloat16, windowed=True)
    assert all_global == kv_bytes_per_token(config, torch.bfloat16) * context
    # The table rounds to 2-3 significant figures.
    assert all_global / GIB == pytest.approx(all_global_gib, abs=0.05)
    assert windowed / GIB == pytest.approx(windowed_gib, abs=0.05)


def test_formula_by_hand_for_4b():
    config = PRESETS["gemma3-4b"]
    per_layer_token = 2 * 4 * 256 * 2  # K and V, 4 kv heads, head_dim 256, bf16
    global_layers = [i for i in range(34) if (i + 1) % 6 == 0]
    assert len(global_layers) == 5
    expected = per_layer_token * (5 * 32768 + 29 * 1024)
    assert kv_bytes_for_context(config, 32768, torch.bfloat16) == expected
