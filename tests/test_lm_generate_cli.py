"""`tessera generate` on the embedded 270M, through the real command-line entry point."""

from __future__ import annotations

import json

import pytest
import torch

from lm.prompt import layout_chat
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from service.cli import main


def test_generate_json_equals_the_engine_in_process(embedded_270m, capsys):
    prompt = "Name three colours."
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = embedded_270m
    layout = layout_chat(lm.tokenizer, [{"role": "user", "content": [{"type": "text", "text": prompt}]}])
    expected = lm.engine().generate(GenerationRequest(layout.token_ids, SamplingParams(max_new_tokens=12)))
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text and out["text"].strip()
    assert out["prompt_tokens"] == len(layout.token_ids)
    assert out["finish_reason"] in ("stop", "length")
    assert out["timings"]["time_to_first_token_s"] > 0


@pytest.fixture(scope="module")
def reference_270m(embedded_270m):
    """transformers' own model and tokenizer on the same checkpoint directory."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    return (Gemma3ForCausalLM.from_pretrained(embedded_270m.path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(embedded_270m.path))


def test_generate_streams_the_references_greedy_answer(reference_270m, capsys):
    """The streamed text of a greedy chat turn is what transformers' chat template + generate + decode
    make of the same prompt, and the summary counts the same tokens."""
    prompt = "Count from one to five."
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    captured = capsys.readouterr()
    model, tokenizer = reference_270m
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=10,
                             eos_token_id=tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"]))
    new = out[0, len(ids):].tolist()
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert expected.strip()  # a real answer to compare
    assert captured.out == expected + "\n"
    assert f"{len(ids)} prompt + {len(new)} generated tokens" in captured.err


def test_generate_streams_the_seeded_sample_of_the_engine(embedded_270m, capsys):
    """--temperature and --seed reach the sampler: the streamed text is the engine's own seeded sample of
    the same chat turn, piece by piece adding up to its final text."""
    prompt = "Count from one to five."
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "10", "--seed", "3",
                 "--temperature", "0.8"]) == 0
    captured = capsys.readouterr()
    lm = embedded_270m
    layout = layout_chat(lm.tokenizer, [{"role": "user", "content": [{"type": "text", "text": prompt}]}])
    expected = lm.engine().generate(GenerationRequest(layout.token_ids, SamplingParams(
        max_new_tokens=10, temperature=0.8, seed=3)))
    assert captured.out == expected.text + "\n"
    assert f"{len(layout.token_ids)} prompt + {expected.completion_tokens} generated tokens" in captured.err


def test_images_on_a_text_only_model_are_a_clear_error(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(image)
    assert main(["generate", "--prompt", "Describe.", "--image", str(image)]) == 2
    err = capsys.readouterr().err
    assert "text-only" in err and "--image" in err


def test_bad_sampling_values_are_refused(capsys):
    assert main(["generate", "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    messages = tmp_path / "chat.json"
    messages.write_text('[{"role": "user", "content": "hi"}]')
    assert main(["generate", "--messages", str(messages), "--raw"]) == 2
    assert "--raw applies to --prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--pan-and-scan"]) == 2
    assert "--pan-and-scan" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_before_loading(capsys):
    import torch

    from vision.config import usable_device

    assert main(["generate", "--prompt", "x", "--device", "no-such-device"]) == 2
    assert "'no-such-device' is not a torch device" in capsys.readouterr().err
    assert usable_device(torch.device("cpu")) == usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="holds no data"):
        usable_device("meta")
    if not torch.cuda.is_available():
        assert main(["generate", "--prompt", "x", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_engine_on_a_prompt_longer_than_the_window_matches_the_reference(embedded_270m, reference_270m):
    """The real model's 512-token window: chunked prefill of a 700-token prompt and cached decoding
    against transformers' own generate."""
    lm = embedded_270m
    text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(120))
    ids = lm.tokenizer.encode(text)[:700]
    assert len(ids) == 700
    from lm.engine import EngineConfig

    engine = lm.engine(EngineConfig(max_seq_len=1024, kv_budget_bytes=1 << 28, prefill_chunk=256, stop_token_ids=()))
    ours = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=16))).token_ids
    reference = reference_270m[0]
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert ours == out[0, len(ids):].tolist()


def test_a_prompt_beyond_the_model_context_is_refused_with_the_limit(embedded_270m, capsys):
    limit = embedded_270m.config.max_position_embeddings
    prompt = "word " * (limit + 10)
    assert main(["generate", "--raw", "--prompt", prompt, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "prompt is" in err and str(limit - 1) in err


def test_generate_with_an_image_equals_the_reference(tmp_path, capsys):
    """`tessera generate --image` on a tiny random vision-language checkpoint: the same greedy tokens as
    transformers' processor + model on the same image and prompt."""
    from transformers import Gemma3ForConditionalGeneration

    from service.caption_reference import reference_caption, reference_processor
    from service.tiny_checkpoints import write_tiny_captioning_checkpoint
    from vision.sample import synthetic_photo

    checkpoint = write_tiny_captioning_checkpoint(tmp_path / "tiny-vlm")
    image = tmp_path / "photo.jpg"
    synthetic_photo(1200, 500, seed=4).save(image, quality=90)
    prompt = "Describe this image."
    assert main(["generate", "--model", str(checkpoint), "--image", str(image), "--pan-and-scan", "--prompt", prompt,
                 "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["images"] == [{"image": str(image), "tiles": 3}]  # 1200 x 500: the original and 2 crops

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = reference_caption(model, reference_processor(checkpoint), str(image), prompt, new_tokens=6,
                                 pan_and_scan=True)
    assert out["token_ids"] == expected
