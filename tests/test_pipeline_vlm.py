"""The whole image path on the tiny vision-language checkpoint: image -> Pan & Scan tiles -> SigLIP
-> projector -> decoder (through the engine's cache), against transformers' processor + model fed the
same image and token ids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_IMAGE_TOKEN
from lm.engine import Engine, EngineConfig
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from lm.weights import load_text_model
from vision.encoder import VisionEncoder
from vision.pan_and_scan import PanAndScanConfig
from vision.preprocess import preprocess_batch

BOI, EOI = 498, 499
TOKENS_PER_TILE = 256


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noise = rng.integers(0, 60, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_ids(tiles: int) -> list[int]:
    """<bos> text, then the image's tiles (original + crops, separated by text), then text."""
    ids = [2, 17, 18, 19]
    for i in range(tiles):
        ids += [20 + i, BOI] + [TINY_IMAGE_TOKEN] * TOKENS_PER_TILE + [EOI]
    return ids + [30, 31, 32, 33]


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(tiny_vlm_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("size,pan_and_scan", [((500, 400), False), ((1200, 400), True)])
def test_image_to_logits_and_greedy_tokens_match_the_reference(tiny_vlm_dir, reference, size, pan_and_scan):
    from transformers import Gemma3ImageProcessorPil

    data = photo(*size, seed=size[0])
    config = PanAndScanConfig(enabled=pan_and_scan)
    [pre] = preprocess_batch([data], config)
    assert pre.num_crops == (3 if pan_and_scan else 0)  # 1200 x 400: three 400 px crops
    soft_tokens = VisionEncoder.from_checkpoint(tiny_vlm_dir).encode(torch.from_numpy(pre.tiles))
    assert soft_tokens.abs().amax() > 0.1  # a real image signal, not an all-zero projector
    ids = prompt_ids(1 + pre.num_crops)
    image_mask = torch.tensor(ids) == TINY_IMAGE_TOKEN

    text_config, model = load_text_model(tiny_vlm_dir)
    engine = Engine(model, text_config, EngineConfig(max_seq_len=2048, kv_budget_bytes=1 << 26, prefill_chunk=300,
                                                     stop_token_ids=()))
    ours = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=8), soft_tokens=soft_tokens,
                                             image_mask=image_mask))

    processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=pan_and_scan,
                                        pan_and_scan_min_crop_size=256,
                                        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")["pixel_values"]
    assert pixels.shape[0] == 1 + pre.num_crops
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        ref_logits = reference(input_ids=input_ids, pixel_values=pixels,
                               token_type_ids=(input_ids == TINY_IMAGE_TOKEN).long(), use_cache=False).logits[0, -1]
        generated = reference.generate(input_ids=input_ids, pixel_values=pixels,
                                       token_type_ids=(input_ids == TINY_IMAGE_TOKEN).long(),
                                       do_sample=False, max_new_tokens=8, min_new_tokens=8)

    from lm.attention import FullAttention, tile_ids_from_mask

    positions = torch.arange(len(ids))[None]
    with torch.inference_mode():
        hidden = model(input_ids, positions,
                       FullAttention(text_config, positions, tile_ids_from_mask(image_mask[None], TOKENS_PER_TILE)),
                       soft_tokens=soft_tokens, image_mask=image_mask[None])
        our_logits = model.logits(hidden[0, -1])
    assert torch.allclose(our_logits, ref_logits, atol=1e-4, rtol=0)
    assert ours.token_ids == generated[0, len(ids):].tolist()
