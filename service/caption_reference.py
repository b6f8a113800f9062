"""The reference captioner: transformers' `Gemma3Processor` (Gemma3ImageProcessorPil) then
`Gemma3ForConditionalGeneration.generate`, one image at a time.

What the tests compare `tessera caption` / `tessera generate --image` against, and the other side of
`tessera bench caption`. Needs the `test` extra (transformers); nothing on the serving path imports it.
"""

from __future__ import annotations

from pathlib import Path


def reference_processor(checkpoint: Path):
    """`Gemma3Processor` over the checkpoint's (270M) tokenizer, which names no image tokens itself."""
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, extra_special_tokens={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    from PIL import Image

    from vision.pan_and_scan import PanAndScanConfig

    defaults = PanAndScanConfig()  # the released checkpoints' preprocessor settings (DESIGN.md section 2)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}, resample=Image.Resampling.BILINEAR, rescale_factor=1 / 255,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, pan_and_scan_min_crop_size=defaults.min_crop_size,
        pan_and_scan_max_num_crops=defaults.max_num_crops,
        pan_and_scan_min_ratio_to_activate=defaults.min_ratio_to_activate)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template, image_seq_length=256)


def reference_caption(model, processor, image_path: str, prompt: str, *, new_tokens: int,
                      pan_and_scan: bool = False, force_length: bool = False) -> list[int]:
    """Greedy caption token ids of one image by the reference (processor + generate)."""
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(text=text, images=[image], return_tensors="pt", do_pan_and_scan=pan_and_scan)
    extra = {"min_new_tokens": new_tokens} if force_length else {}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
