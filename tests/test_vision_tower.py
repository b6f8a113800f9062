"""SigLIP tower + Gemma 3 projector against the reference (`get_image_features`) on the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vision.config import VisionConfig
from vision.encoder import EncoderOptions, VisionEncoder
from vision_checkpoints import with_random_projector


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir, tmp_path_factory):
    return with_random_projector(tiny_vlm_dir, tmp_path_factory.mktemp("tiny-vlm-proj"))


@pytest.fixture(scope="module")
def reference(vlm_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()


def reference_soft_tokens(reference, tiles: torch.Tensor) -> torch.Tensor:
    # transformers 5: get_image_features returns BaseModelOutputWithPooling whose pooler_output holds
    # the projected soft tokens (last_hidden_state is the SigLIP output before the projector).
    with torch.inference_mode():
        out = reference.get_image_features(pixel_values=tiles)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def random_tiles(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 896, 896, generator=generator) * 2 - 1  # normalised pixels in [-1, 1]


def test_soft_tokens_match_reference(vlm_dir, reference):
    tiles = random_tiles(2)
    expected = reference_soft_tokens(reference, tiles)
    assert expected.abs().mean() > 1e-2  # a zero projector would make the comparison vacuous
    encoder = VisionEncoder.from_checkpoint(vlm_dir)
    soft_tokens = encoder.encode(tiles)
    assert soft_tokens.shape == (2, 256, 64) == expected.shape
    assert soft_tokens.dtype == torch.float32
    torch.testing.assert_close(soft_tokens, expected, atol=1e-4, rtol=0)


def test_config_read_from_checkpoint(vlm_dir, reference):
    config = VisionConfig.from_checkpoint(vlm_dir)
    ref_vision = reference.config.vision_config
    assert config.hidden_size == ref_vision.hidden_size
    assert config.num_hidden_layers == ref_vision.num_hidden_layers
    assert config.num_attention_heads == ref_vision.num_attention_heads
    assert config.intermediate_size == ref_vision.intermediate_size
    assert config.layer_norm_eps == ref_vision.layer_norm_eps
    assert config.d_model == reference.config.text_config.hidden_size
    patches_per_side = ref_vision.image_size // ref_vision.patch_size
    tokens_per_side = round(reference.config.mm_tokens_per_image ** 0.5)
    assert tokens_per_side**2 == reference.config.mm_tokens_per_image
    assert (config.patches_per_side, config.tokens_per_side) == (patches_per_side, tokens_per_side)
    assert config.pool_kernel == patches_per_side // tokens_per_side  # 896 / 14 = 64 patches pooled 4 x 4 into 16


def test_encode_batches_across_images(vlm_dir):
    encoder = VisionEncoder.from_checkpoint(vlm_dir, EncoderOptions(max_batch=2))
    images = [random_tiles(1, seed=1), random_tiles(3, seed=2), random_tiles(2, seed=3)]
    batched = encoder.encode_many(images)
    assert [t.shape[0] for t in batched] == [1, 3, 2]
    for tiles, soft_tokens in zip(images, batched):
        one_at_a_time = torch.cat([encoder.encode(tile[None]) for tile in tiles])
        torch.testing.assert_close(soft_tokens, one_at_a_time, atol=1e-5, rtol=0)


def test_bfloat16_follows_the_reference(vlm_dir, reference):
    tiles = random_tiles(1, seed=4)
    encoder = VisionEncoder.from_checkpoint(vlm_dir, EncoderOptions(dtype=torch.bfloat16))
    soft_tokens = encoder.encode(tiles)
    assert soft_tokens.dtype == torch.bfloat16
    expected = reference_soft_tokens(reference, tiles)
    cosine = torch.nn.functional.cosine_similarity(soft_tokens.float(), expected, dim=-1)
    assert cosine.mean() > 0.99


def test_tiles_of_the_wrong_shape_are_refused(vlm_dir):
    encoder = VisionEncoder.from_checkpoint(vlm_dir)
    with pytest.raises(ValueError, match=r"tiles must have shape \[N, 3, 896, 896\]"):
        encoder.encode(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize("tokens", [255, 144, 0])
def test_soft_token_count_must_be_a_square_dividing_the_grid(tokens):
    with pytest.raises(ValueError, match="mm_tokens_per_image|positive integer"):
        VisionConfig(d_model=64, mm_tokens_per_image=tokens)


def test_soft_token_count_other_squares_accepted():
    config = VisionConfig(d_model=64, mm_tokens_per_image=64)  # 8x8 divides 64x64: pool 8x8
    assert config.pool_kernel == 8


def test_config_from_published_style_dict_uses_so400m_defaults():
    # Published Gemma 3 config.json files omit fields equal to SigLIP defaults, e.g. layer_norm_eps.
    config = VisionConfig.from_dict(
        {
            "mm_tokens_per_image": 256,
            "text_config": {"hidden_size": 2560},
            "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "vision_use_head": False},
        }
    )
    assert dataclasses.replace(config, d_model=2560) == VisionConfig(d_model=2560)
    with pytest.raises(ValueError, match="text_config.hidden_size"):
        VisionConfig.from_dict({"vision_config": {}})


@pytest.mark.slow
def test_so400m_shape_matches_reference(tmp_path):
    """True So400m/14 geometry with random weights, one tile (~2 x 47 s on the 2-core machine)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=896, patch_size=14, vision_use_head=False,
    )
    text = Gemma3TextConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=1, num_key_value_heads=1, head_dim=32)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256)
    reference = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves the projector matrix and its norm weight at zero
        for name, param in reference.named_parameters():
            if "mm_input_projection" in name:
                param.normal_(0.0, 0.05)
            elif "mm_soft_emb_norm" in name:
                param.normal_(0.0, 0.5)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    tiles = random_tiles(1, seed=5)
    expected = reference_soft_tokens(reference, tiles)
    del reference
    soft_tokens = VisionEncoder.from_checkpoint(tmp_path).encode(tiles)
    torch.testing.assert_close(soft_tokens, expected, atol=1e-4, rtol=0)
