"""The real Qwen2.5-Coder 1.5B Instruct (the `qwen25-coder` extra's Q4_K_M GGUF, converted by Tessera)
against transformers loading the same GGUF itself (slow; skipped without the extra): chat prompt ids
equal `apply_chat_template`'s, and greedy answers to a few questions are the reference's own greedy
choices at every step (teacher-forced through the reference), fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from lm.checkpoints import resolve_model
from lm.engine import EngineConfig
from lm.prompt import layout_chat
from lm.requests import GenerationRequest
from lm.runtime import load_language_model
from lm.sampling import SamplingParams

pytestmark = pytest.mark.slow

ANSWER_TOKENS = 48
CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What does `git rebase -i` do? One sentence."}],
    [{"role": "user", "content": "Name a sorting algorithm."}, {"role": "assistant", "content": "Quicksort."},
     {"role": "user", "content": "Its average complexity?"}],
]


@pytest.fixture(scope="module")
def ours(qwen25_coder_gguf):
    return load_language_model(str(qwen25_coder_gguf), progress=False)


@pytest.fixture(scope="module")
def reference(qwen25_coder_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(qwen25_coder_gguf.parent), qwen25_coder_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def test_the_converted_checkpoint_is_a_qwen2_model(ours, qwen25_coder_gguf):
    assert resolve_model(str(qwen25_coder_gguf)) == ours.path
    assert ours.config.model_type == "qwen2" and not ours.config.accepts_images
    assert ours.tokenizer.chat_template is not None


@pytest.mark.parametrize("chat", CHATS, ids=["code", "system", "multi-turn"])
def test_prompt_ids_and_greedy_answers_equal_the_reference(ours, reference, chat):
    tokenizer, model = reference
    expected = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True)
    prompt = layout_chat(ours.tokenizer, chat).token_ids
    assert prompt == list(expected["input_ids"])

    engine = ours.engine(EngineConfig(max_seq_len=len(prompt) + ANSWER_TOKENS + 1, kv_budget_bytes=256 << 20,
                                      max_batch=1, prefill_chunk=32, stop_token_ids=ours.tokenizer.special.stop_ids))
    answer = engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=ANSWER_TOKENS)),
                             timeout=600).token_ids
    assert answer and ours.tokenizer.decode(answer).strip()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0]
    assert logits[len(prompt) - 1:-1].argmax(dim=-1).tolist()[:len(answer)] == answer
