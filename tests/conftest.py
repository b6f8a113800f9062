"""Shared fixtures: tiny random-weight Gemma 3 checkpoints written with the reference library."""

from __future__ import annotations

import pytest
import torch

TINY_IMAGE_TOKEN = 500  # image placeholder id of the tiny vision-language checkpoint


def tiny_vlm_config():
    """A small Gemma 3 vision-language config that keeps every structural feature of the real ones:
    local and global layers, a sliding window shorter than test prompts, GQA with 2 KV heads, linear
    RoPE scaling on global layers, and a SigLIP tower at the true 896 px / 14 px patch geometry
    (64×64 patches pooled to 256 soft tokens) with a narrow width."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,  # layers 0-4 and 6 local, layer 5 global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=24,
        max_position_embeddings=4096,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )
    vision = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=256,
        image_token_index=TINY_IMAGE_TOKEN,
        boi_token_index=498,
        eoi_token_index=499,
    )


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A sharded safetensors checkpoint of a random `Gemma3ForConditionalGeneration`, written by the
    installed transformers' `save_pretrained` (its key layout: `language_model.model.*`,
    `vision_tower.*` without `vision_model.`, `multi_modal_projector.*`). Tests that need the
    published or the `model.*` layout rename keys from this one."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(tiny_vlm_config()).eval()
    # The default init leaves norm weights at zero (hiding a missing "+ 1") and the projector matrix
    # at zero (every soft token would be 0): randomise both.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
            elif "mm_input_projection" in name:
                param.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(path, max_shard_size="200KB", safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def gemma270m_dir():
    """The embedded Gemma 3 270M's checkpoint directory (converted from the packaged GGUF on the first
    run on a machine, then read from the cache)."""
    from lm.checkpoints import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def gemma270m_tokenizer(gemma270m_dir):
    """Its tokenizer, read once per test session (tokenizer.json is 33 MB)."""
    from lm.tokenizer import Tokenizer

    return Tokenizer.from_dir(gemma270m_dir)


@pytest.fixture(scope="session")
def embedded_270m(gemma270m_dir):
    """The real embedded Gemma 3 270M, fp32, loaded once per test session."""
    from lm.runtime import load_language_model

    return load_language_model(str(gemma270m_dir), progress=False)


@pytest.fixture(scope="session")
def tiny_vlm_tok_dir(tmp_path_factory):
    """The service tests' tiny vision-language checkpoint with the 270M's tokenizer
    (service_fixtures.build_tiny_vlm_with_tokenizer), written once per session; tests only read it."""
    from service_fixtures import build_tiny_vlm_with_tokenizer

    return build_tiny_vlm_with_tokenizer(tmp_path_factory.mktemp("tiny-vlm-tok"))


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    """Qwen 3's tokenizer directory (tokenizer.json, tokenizer_config.json with Qwen3-0.6B's chat
    template), built from the pinned llama-cpp-python sdist's Qwen vocabulary and template and cached
    under ~/.cache/tessera/test-assets (tests/qwen_fixtures.py); skips when the sdist cannot be
    downloaded."""
    from qwen_fixtures import AssetUnavailableError, qwen3_tokenizer_dir as build

    try:
        return build()
    except AssetUnavailableError as error:
        pytest.skip(f"the Qwen 3 tokenizer's published sources are unavailable: {error}")


@pytest.fixture(scope="session")
def qwen25_coder_gguf():
    """The real Qwen2.5-Coder 1.5B Instruct GGUF (Q4_K_M), assembled into the model cache from the
    optional extra's packages; skips when they are not installed."""
    from lm.checkpoints import ModelNotInstalledError, packaged_gguf

    try:
        return packaged_gguf("qwen2.5-coder-1.5b-instruct", progress=False)
    except ModelNotInstalledError as error:
        pytest.skip(str(error))
