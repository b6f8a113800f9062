"""The decoder against the reference on tiny random checkpoints: logits of `lm.model.Gemma3TextModel`
equal those of transformers' `Gemma3ForConditionalGeneration` / `Gemma3ForCausalLM` on the same
weights and token ids. With images, both sides get the same random pixel tiles: the reference runs its
own vision tower inside `forward(pixel_values=...)`, ours gets the soft tokens of `vision.encoder` (whose
agreement with the reference's public `get_image_features` is asserted too)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import TINY_IMAGE_TOKEN, tiny_vlm_config
from lm.attention import FullAttention, tile_ids_from_mask
from lm.weights import load_text_model
from vision.encoder import VisionEncoder

TOKENS_PER_TILE = 256
BOI, EOI = 498, 499  # tiny config's <start_of_image> / <end_of_image>
NEWLINES, SPACE = 108, 237  # stand-ins for "\n\n" and " " (any text ids work)
TOLERANCE = 1e-4


def _text(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, BOI, (n,), generator=generator).tolist()


def _tile() -> list[int]:
    return [NEWLINES, BOI] + [TINY_IMAGE_TOKEN] * TOKENS_PER_TILE + [EOI, NEWLINES]


def _image(generator: torch.Generator, num_crops: int) -> list[int]:
    """Placeholder span of one image; with crops, the Pan & Scan layout (original tile, then the
    crop tiles separated by spaces, all joined by wording tokens)."""
    if num_crops == 0:
        return _tile()
    ids = _text(generator, 5) + _tile() + _text(generator, 9)
    for i in range(num_crops):
        ids += ([SPACE] if i else []) + _tile()
    return ids


def _prompt(seed: int, layout: list) -> list[int]:
    """ids from a layout: ints are text runs of that length, ("image", k) an image with k crops."""
    generator = torch.Generator().manual_seed(seed)
    ids = [2]
    for part in layout:
        ids += _text(generator, part) if isinstance(part, int) else _image(generator, part[1])
    return ids


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(tiny_vlm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(tiny_vlm_dir):
    return load_text_model(tiny_vlm_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def encoder(tiny_vlm_dir):
    return VisionEncoder.from_checkpoint(tiny_vlm_dir)


def _pixels(num_tiles: int, seed: int) -> torch.Tensor:
    """Random normalised tiles (num_tiles, 3, 896, 896) in [-1, 1]."""
    return torch.rand(num_tiles, 3, 896, 896, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _reference_logits(reference, ids: torch.Tensor, pixels: torch.Tensor | None, bidirectional: bool = True):
    """The reference's logits through its public forward."""
    kwargs = {}
    if pixels is not None:
        kwargs["pixel_values"] = pixels
        if bidirectional:
            kwargs["token_type_ids"] = (ids == TINY_IMAGE_TOKEN).long()  # activates the per-tile blocks
    with torch.no_grad():
        out = reference(input_ids=ids, use_cache=False, **kwargs)
    return out.logits


def _our_logits(ours, ids: torch.Tensor, soft: torch.Tensor | None, bidirectional: bool = True, config=None,
                attention=FullAttention):
    config_loaded, model = ours
    config = config or config_loaded
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    image_mask = ids == TINY_IMAGE_TOKEN if soft is not None else None
    tiles = tile_ids_from_mask(image_mask, TOKENS_PER_TILE) if soft is not None and bidirectional else None
    with torch.no_grad():
        hidden = model(ids, positions, attention(config, positions, tiles), soft, image_mask)
        return model.logits(hidden)


class _TileBlocksIgnoreTheWindow(FullAttention):
    """A plausible wrong mask: a tile's bidirectional block overriding the sliding window, where the
    reference applies the window to tile tokens too (local = window AND (causal OR same tile))."""

    def __init__(self, config, positions, tile_ids):
        super().__init__(config, positions, tile_ids)
        same_tile = (tile_ids[:, None, :, None] >= 0) & (tile_ids[:, None, :, None] == tile_ids[:, None, None, :])
        self.masks = {kind: mask | same_tile for kind, mask in self.masks.items()}


CASES = {
    "text only": [[60]],
    "one image, no crops": [[20, ("image", 0), 30]],
    "one image, two crops": [[12, ("image", 2), 25]],
    "two images": [[8, ("image", 0), 15, ("image", 2), 10]],
    "batch of two": [[10, ("image", 0), 40], [45, ("image", 0), 5]],
}


@pytest.mark.parametrize("name", CASES)
def test_logits_match_reference(reference, ours, encoder, name):
    rows = [_prompt(seed, layout) for seed, layout in enumerate(CASES[name])]
    ids = torch.tensor(rows)  # (B, T); the batch case has equal lengths by construction
    assert ids.shape[1] > tiny_vlm_config().text_config.sliding_window  # local masking matters
    num_tiles = int((ids == TINY_IMAGE_TOKEN).sum()) // TOKENS_PER_TILE
    pixels = _pixels(num_tiles, seed=7) if num_tiles else None
    soft = encoder.encode(pixels) if num_tiles else None
    expected = _reference_logits(reference, ids, pixels)
    if num_tiles:
        with torch.no_grad():
            reference_soft = reference.get_image_features(pixel_values=pixels).pooler_output
        assert (soft - reference_soft).abs().max().item() < TOLERANCE
    got = _our_logits(ours, ids, soft)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE


def test_tile_blocks_and_the_window_are_both_observable(reference, ours, encoder):
    """The parity cases would catch a wrong mask: without token_type_ids the reference is purely
    causal and differs from its bidirectional output (we match both), and a mask whose tile blocks
    ignore the window differs from the reference on tiles longer than the window (ours matches)."""
    ids = torch.tensor([_prompt(3, [6, ("image", 0), 6])])
    pixels = _pixels(1, seed=1)
    soft = encoder.encode(pixels)
    bidirectional = _reference_logits(reference, ids, pixels, bidirectional=True)
    causal = _reference_logits(reference, ids, pixels, bidirectional=False)
    assert (bidirectional - causal).abs().max().item() > 100 * TOLERANCE
    assert (_our_logits(ours, ids, soft, bidirectional=False) - causal).abs().max().item() < TOLERANCE
    assert (_our_logits(ours, ids, soft) - bidirectional).abs().max().item() < TOLERANCE
    assert TOKENS_PER_TILE > tiny_vlm_config().text_config.sliding_window
    wrong = _our_logits(ours, ids, soft, attention=_TileBlocksIgnoreTheWindow)
    assert (wrong - bidirectional).abs().max().item() > 100 * TOLERANCE


def test_soft_tokens_and_window_change_the_output(reference, ours, encoder):
    """Guards for the parity cases: different pixels change the reference's logits, and so does
    widening the sliding window in our model (the window really cuts attention at these lengths)."""
    ids = torch.tensor([_prompt(4, [6, ("image", 0), 30])])
    pixels_a, pixels_b = _pixels(1, seed=2), _pixels(1, seed=3)
    logits_a = _reference_logits(reference, ids, pixels_a)
    logits_b = _reference_logits(reference, ids, pixels_b)
    assert (logits_a - logits_b).abs().max() > 1e-3
    config, _ = ours
    wide = dataclasses.replace(config, sliding_window=10_000)
    soft_a = encoder.encode(pixels_a)
    assert (_our_logits(ours, ids, soft_a) - _our_logits(ours, ids, soft_a, config=wide)).abs().max() > 1e-3


def test_left_padding_does_not_change_real_tokens(ours):
    config, model = ours
    ids = torch.tensor([_prompt(5, [40])])
    pad = 7
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    positions = torch.cat([torch.full((1, pad), -1), torch.arange(ids.shape[1])[None]], dim=1)
    with torch.no_grad():
        alone = model(ids, torch.arange(ids.shape[1])[None], FullAttention(config, torch.arange(ids.shape[1])[None]))
        with_padding = model(padded, positions, FullAttention(config, positions))
    assert torch.isfinite(with_padding).all()
    assert (with_padding[:, pad:] - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernels", ["fused", "aten"])  # aten: the path of other devices and dtypes
@pytest.mark.parametrize("length", [1, 40])
def test_the_decoder_loop_equals_each_layer_then_the_final_norm(ours, length, kernels, monkeypatch):
    """lm.layers.run_decoder computes each layer's closing add and the next layer's input norm (the
    final norm after the last) in one call: bit for bit what each layer's forward, one after another,
    then the final norm give."""
    from lm.layers import fused
    from lm.models.base import FULL, SLIDING

    if kernels == "aten":
        monkeypatch.setattr(fused, "usable", lambda *tensors: False)
    config, model = ours
    ids = torch.tensor([_prompt(6, [length])])[:, :length]
    positions = torch.arange(ids.shape[1])[None]
    attention = FullAttention(config, positions)
    with torch.inference_mode():
        got = model(ids, positions, attention)
        x = model.embed_inputs(ids, None, None)
        tables = {kind: model.rope[kind].tables(positions, x.dtype) for kind in model.rope}
        for layer in model.layers:
            x = layer(x, *tables[FULL if layer.is_global else SLIDING], attention)
        expected = model.norm(x)
    assert torch.equal(got, expected)


def test_placeholder_count_mismatch_is_an_error(ours):
    config, model = ours
    ids = torch.tensor([_prompt(6, [5, ("image", 0), 5])])
    positions = torch.arange(ids.shape[1])[None]
    mask = ids == TINY_IMAGE_TOKEN
    with pytest.raises(ValueError, match=r"256 placeholder tokens.*512 soft tokens"):
        model(ids, positions, FullAttention(config, positions), torch.zeros(2, TOKENS_PER_TILE, 64), mask)
    with pytest.raises(ValueError, match="together"):
        model(ids, positions, FullAttention(config, positions), None, mask)


def test_placeholders_beyond_vocabulary_are_never_looked_up(ours):
    """Real checkpoints' placeholder id (262144) lies outside the embedding table."""
    config, model = ours
    ids = torch.tensor([_prompt(8, [5, ("image", 0), 5])])
    mask = ids == TINY_IMAGE_TOKEN
    positions = torch.arange(ids.shape[1])[None]
    soft = torch.randn(1, TOKENS_PER_TILE, 64)
    attention = FullAttention(config, positions, tile_ids_from_mask(mask, TOKENS_PER_TILE))
    with torch.no_grad():
        inside = model(ids, positions, attention, soft, mask)
        outside = model(ids.masked_fill(mask, config.vocab_size + 100), positions, attention, soft, mask)
    assert torch.equal(inside, outside)


def _tiny_causal_lm():
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(1)
    model = Gemma3ForCausalLM(tiny_vlm_config().text_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model


PUBLISHED_STYLE = {  # how the released text-only config.json states RoPE and the layer pattern
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window_pattern": 6,
}


@pytest.mark.parametrize("config_style", ["transformers 5", "published"])
def test_causal_lm_checkpoint_matches_reference(tmp_path, config_style):
    from transformers import Gemma3ForCausalLM

    _tiny_causal_lm().save_pretrained(tmp_path)
    if config_style == "published":
        config = json.loads((tmp_path / "config.json").read_text())
        for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
            config.pop(key, None)
        (tmp_path / "config.json").write_text(json.dumps({**config, **PUBLISHED_STYLE}))
    reference = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if config_style == "published":  # the reference read the same structure from the old keys
        assert reference.config.rope_parameters["full_attention"]["factor"] == 8.0
    config, model = load_text_model(tmp_path, dtype=torch.float32)
    assert config.rope_global_scaling == 8.0 and config.is_global(5) and not config.is_global(6)
    ids = torch.tensor([_prompt(9, [70])])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        got = model.logits(model(ids, positions, FullAttention(config, positions)))
    assert (got - expected).abs().max().item() < TOLERANCE


def test_bfloat16_matches_reference(tmp_path):
    """Same dtype path as the reference: bf16 weights, fp32 RMSNorm, embed scale rounded to bf16."""
    from transformers import Gemma3ForCausalLM

    _tiny_causal_lm().save_pretrained(tmp_path)
    reference = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    config, model = load_text_model(tmp_path, dtype=torch.bfloat16)
    ids = torch.tensor([_prompt(10, [40])])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits.float()
        got = model.logits(model(ids, positions, FullAttention(config, positions)))
    assert (got - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


def test_embedding_scale_is_rounded_to_the_model_dtype_like_the_reference(tmp_path):
    """sqrt(72) = 8.485 becomes 8.5 in bf16; the reference multiplies by the rounded value. Compared
    on the embedding output that the reference's public forward returns as hidden_states[0]."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(2)
    reference_config = Gemma3TextConfig(
        vocab_size=16, hidden_size=72, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, layer_types=["full_attention"],
    )
    Gemma3ForCausalLM(reference_config).save_pretrained(tmp_path)
    reference = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    _, model = load_text_model(tmp_path, dtype=torch.bfloat16)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[0]
        got = model.embed_inputs(ids, None, None)
    assert torch.equal(got, expected)
    unrounded = (model.embed_tokens.weight.float() * 72**0.5).to(torch.bfloat16)[None]
    assert not torch.equal(expected, unrounded)  # the rounding is visible at this width


class _SumAttention:
    """A stand-in attention context: every query head plus its key and value heads (any fixed function of
    q, k and v shows a difference in them)."""

    def attend(self, layer_idx, q, k, v, scale):
        repeat = q.shape[1] // k.shape[1]
        return q * scale + k.repeat_interleave(repeat, 1) + v.repeat_interleave(repeat, 1)


@pytest.mark.parametrize("offset", [True, False], ids=["gemma-norm", "qwen-norm"])
def test_the_fused_qk_path_equals_the_unfused_one_through_weight_changes(offset):
    """The fused q/k/v path norms and rotates q and k in one call each, with the two norms' multipliers
    stacked per head; after an in-place update, a write through .data, a state-dict load or a dtype change
    it still equals the unfused path, and the change shows."""
    from lm.layers import Attention, RMSNorm

    torch.manual_seed(0)
    unfused = Attention(0, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25,
                        qk_norm_eps=1e-6, norm_offset=offset)
    with torch.no_grad():
        for norm in (unfused.q_norm, unfused.k_norm):
            norm.weight.normal_()
    fused = Attention(0, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25,
                      qk_norm_eps=1e-6, norm_offset=offset)
    fused.load_state_dict(unfused.state_dict())
    fused.fuse_projections()
    x, angles = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    cos, sin = angles.cos(), angles.sin()

    def both():  # as the engine runs (no autograd)
        with torch.inference_mode():
            return [m(x.to(m.o_proj.weight.dtype), cos, sin, _SumAttention()) for m in (unfused, fused)]

    first = both()
    torch.testing.assert_close(first[1], first[0], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for m in (unfused, fused):
            m.k_norm.weight.add_(0.5)
    second = both()
    torch.testing.assert_close(second[1], second[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(second[1], first[1])
    for m in (unfused, fused):
        m.q_norm.weight.data.add_(0.5)  # no version bump: nothing may be kept from before
    after_data = both()
    torch.testing.assert_close(after_data[1], after_data[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after_data[1], second[1])
    second = after_data
    state = {name: value + 0.25 if "q_norm" in name else value for name, value in unfused.state_dict().items()}
    unfused.load_state_dict(state)
    fused.q_norm.load_state_dict({"weight": state["q_norm.weight"]})
    third = both()
    torch.testing.assert_close(third[1], third[0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(third[1], second[1])
    unfused.double(), fused.double()
    cos, sin = cos.double(), sin.double()
    fourth = both()
    assert fourth[1].dtype == torch.float64
    torch.testing.assert_close(fourth[1], fourth[0], rtol=1e-6, atol=1e-6)  # norms compute in fp32

    norm = RMSNorm(16, 1e-6, offset=True)
    y = torch.randn(3, 16)
    with torch.no_grad():
        before = norm(y)
        norm.weight.fill_(1.0)  # 1 + w doubles every value
        torch.testing.assert_close(norm(y), 2 * before)
    norm(y).sum().backward()  # with autograd on, gradients reach the weight
    assert norm.weight.grad is not None and bool(norm.weight.grad.abs().sum() > 0)
