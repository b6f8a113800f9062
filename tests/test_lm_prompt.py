"""Prompt layout against the reference `Gemma3Processor` (Gemma 3 chat template, Gemma3ImageProcessorPil,
image_seq_length 256) built on the converted 270M tokenizer.

The 270M tokenizer has no `<image_soft_token>`; the reference side adds it (it lands at id 262,144,
one past the vocabulary) and its ids are mapped to ours before comparing."""

from __future__ import annotations

import pytest

from lm.prompt import IMAGE_MARKER, TOKENS_PER_TILE, count_images, image_token_cost, layout_chat, layout_text
from vision.pan_and_scan import PanAndScanConfig, num_tiles

PAN_AND_SCAN = PanAndScanConfig(enabled=True)
SQUARE, WIDE_2, WIDE_4, TALL_3 = (320, 320), (1024, 512), (2048, 512), (400, 1200)


@pytest.fixture(scope="module")
def ours(gemma270m_tokenizer):
    return gemma270m_tokenizer


@pytest.fixture(scope="module")
def processor(gemma270m_dir):
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(gemma270m_dir, extra_special_tokens={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(), tokenizer=tokenizer,
                           chat_template=tokenizer.chat_template, image_seq_length=TOKENS_PER_TILE)


def _image(size):
    from PIL import Image

    return Image.new("RGB", size, (120, 30, 200))


def _with_images(messages):
    """The reference wants the images inside the messages; ours takes only their tile counts."""
    return [
        {**m, "content": [{**p, "image": _image(p["size"])} if p.get("type") == "image" else p for p in m["content"]]}
        if isinstance(m["content"], list) else m
        for m in messages
    ]


def _tiles(messages, config):
    return [num_tiles(*p["size"], config) for m in messages if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image"]


def _reference_ids(processor, ours, batch):
    image_token = processor.tokenizer.image_token_id
    ids = [ours.special.image_token_id if i == image_token else i for i in batch["input_ids"][0].tolist()]
    mask = [i == image_token for i in batch["input_ids"][0].tolist()]
    return ids, mask


CASES = {
    "no image, system prompt, two turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Name a colour.  "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
    "one image": [
        {"role": "user", "content": [{"type": "image", "size": SQUARE}, {"type": "text", "text": "Describe it."}]},
    ],
    "two images": [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "size": SQUARE},
                                     {"type": "text", "text": "with"}, {"type": "image", "size": SQUARE},
                                     {"type": "text", "text": "please."}]},
    ],
    "image with 2 crops": [
        {"role": "user", "content": [{"type": "image", "size": WIDE_2}, {"type": "text", "text": "What is this?"}]},
    ],
    "image with 4 crops, then a square one": [
        {"role": "user", "content": [{"type": "text", "text": "Panorama:"}, {"type": "image", "size": WIDE_4},
                                     {"type": "image", "size": SQUARE}]},
    ],
    "image first and last, system prompt as parts": [
        {"role": "system", "content": [{"type": "text", "text": "Look carefully."}]},
        {"role": "user", "content": [{"type": "image", "size": TALL_3}, {"type": "text", "text": " between "},
                                     {"type": "image", "size": WIDE_2}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two images."}]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image", "size": SQUARE}]},
    ],
}


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("case", list(CASES))
def test_chat_layout_equals_reference_processor(processor, ours, case, pan_and_scan):
    messages = CASES[case]
    config = PAN_AND_SCAN if pan_and_scan else PanAndScanConfig()
    batch = processor.apply_chat_template(_with_images(messages), add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", do_pan_and_scan=pan_and_scan)
    expected_ids, expected_mask = _reference_ids(processor, ours, batch)
    tiles = _tiles(messages, config)
    prompt = layout_chat(ours, messages, tiles)
    assert prompt.token_ids == expected_ids
    assert prompt.image_mask == expected_mask
    assert prompt.tiles_per_image == tuple(tiles)
    if "pixel_values" in batch:  # the reference's own tile count agrees with the shared crop geometry
        assert batch["pixel_values"].shape[0] == sum(tiles)
    assert count_images(messages) == len(tiles)


def test_chat_text_equals_reference_template(processor, ours):
    messages = CASES["image first and last, system prompt as parts"]
    for add_generation_prompt in (True, False):
        rendered = processor.apply_chat_template(_with_images(messages), add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        assert ours.chat_template.render(messages, add_generation_prompt=add_generation_prompt).text == rendered


@pytest.mark.parametrize("sizes", [[], [SQUARE], [WIDE_4, SQUARE], [WIDE_2]])
def test_plain_text_with_markers_equals_reference_processor(processor, ours, sizes):
    text = "Caption: " + " and ".join([IMAGE_MARKER] * len(sizes)) + " done.\n"
    batch = processor(text=text, images=[_image(s) for s in sizes] or None, return_tensors="pt",
                      do_pan_and_scan=True)
    expected_ids, expected_mask = _reference_ids(processor, ours, batch)
    prompt = layout_text(ours, text, [num_tiles(*s, PAN_AND_SCAN) for s in sizes])
    assert prompt.token_ids == expected_ids and prompt.image_mask == expected_mask


@pytest.mark.parametrize("size", [SQUARE, WIDE_2, WIDE_4, TALL_3, (600, 500), (5000, 300), (300, 5000)])
def test_image_token_cost_equals_reference_image_processor(processor, size):
    crops = processor.image_processor(
        _image(size), do_pan_and_scan=True, pan_and_scan_min_crop_size=PAN_AND_SCAN.min_crop_size,
        pan_and_scan_max_num_crops=PAN_AND_SCAN.max_num_crops,
        pan_and_scan_min_ratio_to_activate=PAN_AND_SCAN.min_ratio_to_activate, return_tensors="pt")["num_crops"]
    assert image_token_cost(*size, PAN_AND_SCAN) == TOKENS_PER_TILE * (1 + int(crops.reshape(-1)[0]))
    assert image_token_cost(*size, PanAndScanConfig()) == TOKENS_PER_TILE


def test_layout_positions_and_counts(ours):
    prompt = layout_chat(ours, CASES["image with 2 crops"], [3])
    assert prompt.num_tiles == 3 and len(prompt.placeholder_positions) == 3 * TOKENS_PER_TILE
    assert all(prompt.token_ids[i] == ours.special.image_token_id for i in prompt.placeholder_positions)
    assert prompt.token_ids[0] == ours.special.bos_id
    starts = [i for i, t in enumerate(prompt.token_ids) if t == ours.special.start_of_image_id]
    assert [prompt.image_mask[s + 1] for s in starts] == [True] * 3


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "audio"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "system", "content": "be brief"}, {"role": "user"}], r"message 1 \(user\) has no content"),
])
def test_bad_messages_are_rejected(ours, messages, match):
    with pytest.raises(ValueError, match=match):
        layout_chat(ours, messages)


def test_marker_count_must_match_images(ours):
    with pytest.raises(ValueError, match="1 image marker"):
        layout_text(ours, f"{IMAGE_MARKER} hi", [1, 1])
    with pytest.raises(ValueError, match="at least one tile"):
        layout_text(ours, f"{IMAGE_MARKER} hi", [0])
