"""Weight-only int8 on the real 270M: accuracy against fp32, and the int8 linear itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lm.attention import FullAttention
from lm.quantize import Int8Linear, quantize_model
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from lm.engine import EngineConfig

PROMPTS = [
    "The history of the printing press begins",
    "Explain how a refrigerator works in simple terms:",
    "Once upon a time, in a village at the edge of the forest,",
]


def test_int8_linear_matches_its_dequantised_weights():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    layer = Int8Linear(weight)
    dequantised = layer.weight.float() * layer.scales.float()[:, None]
    assert (dequantised - weight).abs().max() <= layer.scales.float().max() * 0.51  # round-to-nearest
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, dequantised)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    # activations go through bf16 in the CPU kernel
    assert torch.allclose(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="int4"):
        quantize_model(torch.nn.Module(), "int4")


@pytest.fixture(scope="module")
def int8_model(embedded_270m):
    return quantize_model(copy.deepcopy(embedded_270m.model), "int8")


def test_int8_greedy_agrees_with_fp32_and_logits_stay_close(embedded_270m, int8_model):
    """Along fp32's own 64 greedy tokens (teacher forcing), int8 picks the same token at >= 90% of
    positions and its logits keep cosine >= 0.99 with fp32's."""
    lm = embedded_270m
    engine = lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=1 << 28, max_batch=1, stop_token_ids=()))
    agree = total = 0
    cosines = []
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        generated = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=64))).token_ids
        sequence = torch.tensor(ids + generated[:-1])[None]
        positions = torch.arange(sequence.shape[1])[None]
        with torch.inference_mode():
            logits = [m.logits(m(sequence, positions, FullAttention(lm.config, positions))[0, len(ids) - 1:])
                      for m in (lm.model, int8_model)]
        assert logits[0].argmax(-1).tolist() == generated  # the fp32 recompute is the engine's output
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        total += len(generated)
        cosines += F.cosine_similarity(logits[0], logits[1], dim=-1).tolist()
    assert agree / total >= 0.9
    assert sum(cosines) / len(cosines) >= 0.99


def test_int8_model_shares_one_int8_table_for_embedding_and_head(embedded_270m, int8_model):
    def stored_bytes(module):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(module.parameters()) + list(module.buffers())}
        return sum(storages.values())

    assert int8_model.embed_tokens.table is int8_model.lm_head
    # no float copy of the 262,144 x 640 table is kept: about a quarter of the fp32 model's bytes
    assert stored_bytes(int8_model) < 0.3 * stored_bytes(embedded_270m.model)
    ids = torch.tensor([[2, 651, 5279, 529]])
    expected = embedded_270m.model.embed_tokens(ids)
    rows = int8_model.embed_tokens(ids)
    assert rows.dtype == torch.float32
    assert (rows - expected).abs().max() <= int8_model.lm_head.scales.float().max()  # one quantisation step
