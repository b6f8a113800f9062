"""The real embedded Gemma 3 270M (dequantised from the GGUF) against the reference
`Gemma3ForCausalLM` loaded from the same converted checkpoint directory, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from lm.attention import FullAttention
from lm.prompt import layout_chat
from lm.weights import load_text_model

GREEDY_TOKENS = 64
GREEDY_PROMPT = "Once upon a time, there lived"  # short: the no-cache loop re-reads the whole sequence each step
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Ünïcödé, emoji 😀 and numbers 3.14159:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.fixture(scope="module")
def tokenizer(gemma270m_tokenizer):
    return gemma270m_tokenizer


@pytest.fixture(scope="module")
def ours(gemma270m_dir):
    torch.manual_seed(0)
    return load_text_model(gemma270m_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(gemma270m_dir):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(gemma270m_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _last_logits(ours, input_ids: list[int]) -> torch.Tensor:
    config, model = ours
    ids = torch.tensor([input_ids])
    positions = torch.arange(len(input_ids))[None]
    with torch.no_grad():
        hidden = model(ids, positions, FullAttention(config, positions))
        return model.logits(hidden[:, -1])[0]


def _prompts(tokenizer) -> list[list[int]]:
    chat = layout_chat(tokenizer, [{"role": "system", "content": "Answer in one word."},
                                   {"role": "user", "content": "What colour is the sky?"}])
    return [tokenizer.encode(text) for text in PROMPTS] + [chat.token_ids]


def test_last_position_logits_match_reference(ours, reference, tokenizer):
    for input_ids in _prompts(tokenizer):
        with torch.no_grad():
            expected = reference(torch.tensor([input_ids])).logits[0, -1].float()
        got = _last_logits(ours, input_ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
        assert int(got.argmax()) == int(expected.argmax())


@pytest.fixture(scope="module")
def our_greedy(ours, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt, 64 greedy tokens) from our model, recomputing the whole sequence each step (no cache)."""
    prompt = tokenizer.encode(GREEDY_PROMPT)
    generated: list[int] = []
    for _ in range(GREEDY_TOKENS):
        generated.append(int(_last_logits(ours, prompt + generated).argmax()))
    return prompt, generated


def test_greedy_tokens_match_reference_teacher_forced(reference, tokenizer, our_greedy):
    """One reference forward over prompt + our tokens: its argmax at every step must be our next token,
    which is what its own greedy decoding would pick given the same prefix."""
    prompt, generated = our_greedy
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + generated])).logits[0]
    expected = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert generated == expected
    assert not set(generated) & set(tokenizer.special.stop_ids)  # 64 real tokens, no early stop
    assert tokenizer.decode(generated).strip()


@pytest.mark.slow
def test_greedy_tokens_match_reference_generate(reference, our_greedy):
    """The same check through the reference's own cached `generate` (~25 s on an idle 2-core machine)."""
    prompt, generated = our_greedy
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=GREEDY_TOKENS)
    assert out[0, len(prompt):].tolist() == generated
