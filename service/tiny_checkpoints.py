"""Tiny random-weight Gemma 3 vision-language checkpoints, written on the spot (never downloaded).

The real geometry (SigLIP at 896 px / patch 14, 256 soft tokens per tile, the 262,144-entry Gemma 3
vocabulary with the image placeholder 262144 beyond it, and the embedded 270M's tokenizer files) at
narrow widths, so that the whole image + text path runs on a laptop CPU. Used by the tests, the demo
(scripts/demo.sh) and `tessera bench caption`; the words such a checkpoint writes are noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_captioning_config(*, layers: int = 4, vision_width: int = 32):
    """A Gemma 3 vision-language config with the text vocabulary of the 270M tokenizer."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=128, max_position_embeddings=8192, initializer_range=0.25,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    )
    vision = SiglipVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
                                num_attention_heads=2, image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256,
                        image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000,
                        eos_token_id=[1, 106])


def write_tiny_captioning_checkpoint(path: str | Path, *, seed: int = 0, layers: int = 4) -> Path:
    """Save a random `Gemma3ForConditionalGeneration` with the embedded 270M's tokenizer files to `path`.
    Norm and projector weights are drawn at random (the reference initialises them to zeros, which would
    hide bugs in how they are applied), and the patch embedding large enough that different images give
    different captions."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from lm.checkpoints import DEFAULT_MODEL, resolve_model

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_captioning_config(layers=layers)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
            elif "mm_input_projection_weight" in name:
                param.normal_(0.0, 0.5)
            elif "patch_embedding.weight" in name:  # so that pixels, not position embeddings, dominate
                param.normal_(0.0, 0.5)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    source = resolve_model(DEFAULT_MODEL, progress=False)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    return path
