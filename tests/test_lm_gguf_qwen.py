"""GGUF files of the Qwen family (llama.cpp architectures qwen2, qwen3, qwen3moe) through Tessera's
converter against transformers loading the same file (`from_pretrained(..., gguf_file=...)`): logits of
the converted model equal the reference's, and the rebuilt byte-level BPE tokenizer encodes and decodes
as the reference's GGUF tokenizer and reproduces llama.cpp's Qwen 2 tokenizer test vectors.

The files are tiny random models written here with the `gguf` library (quantised and float tensors)
over the real Qwen vocabulary and merges (llama.cpp's ggml-vocab-qwen2.gguf from the pinned
llama-cpp-python sdist, tests/qwen_fixtures.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lm.attention import FullAttention
from lm.gguf import convert_gguf
from lm.tokenizer import Tokenizer
from lm.weights import load_text_model

TINY = {"hidden": 64, "ffn": 96, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "context": 512,
        "experts": 8, "experts_used": 2, "expert_ffn": 32}
TEXTS = ["Hello world", "def f(x):\n    return x * 2\n", "Ünïcödé, emoji 😀, 中文, numbers 3.14159", "  two  spaces",
         "I'll can't WE'RE"]


@pytest.fixture(scope="module")
def vocabulary():
    """(tokens, token types, merges) of llama.cpp's Qwen 2 vocabulary file; skips when unavailable."""
    from gguf import GGUFReader

    from qwen_fixtures import VOCAB_GGUF, AssetUnavailableError, sdist_assets

    try:
        assets = sdist_assets()
    except AssetUnavailableError as error:
        pytest.skip(f"llama.cpp's Qwen vocabulary is unavailable: {error}")
    fields = GGUFReader(assets / VOCAB_GGUF).fields
    return ([str(t) for t in fields["tokenizer.ggml.tokens"].contents()],
            [int(t) for t in fields["tokenizer.ggml.token_type"].contents()],
            [str(m) for m in fields["tokenizer.ggml.merges"].contents()])


def write_qwen_gguf(path, arch: str, vocabulary, *, seed: int = 0) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    tokens, types, merges = vocabulary
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    if arch != "qwen2":
        writer.add_key_length(TINY["head_dim"])
        writer.add_value_length(TINY["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    if arch == "qwen3moe":
        writer.add_expert_count(TINY["experts"])
        writer.add_expert_used_count(TINY["experts_used"])
        writer.add_expert_feed_forward_length(TINY["expert_ffn"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(151_643)
    writer.add_eos_token_id(151_645 if len(tokens) > 151_645 else 151_643)
    writer.add_add_bos_token(False)

    hidden, head_dim = TINY["hidden"], TINY["head_dim"]
    q_dim, kv_dim = TINY["heads"] * head_dim, TINY["kv_heads"] * head_dim

    def add(name, shape, qtype=Q.F32, scale=0.3):
        values = (1.0 + rng.normal(0.0, 0.2, shape) if "norm" in name else rng.normal(0.0, scale, shape))
        values = values.astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), Q.Q8_0, scale=1.0)
    add("output_norm.weight", (hidden,))
    add("output.weight", (len(tokens), hidden), Q.Q8_0, scale=1.0)
    for layer in range(TINY["layers"]):
        block = f"blk.{layer}."
        add(block + "attn_norm.weight", (hidden,))
        add(block + "attn_q.weight", (q_dim, hidden), Q.Q8_0)
        add(block + "attn_k.weight", (kv_dim, hidden), Q.Q4_0)
        add(block + "attn_v.weight", (kv_dim, hidden), Q.Q8_0)
        add(block + "attn_output.weight", (hidden, q_dim), Q.Q8_0)
        if arch == "qwen2":
            for name, width in (("attn_q.bias", q_dim), ("attn_k.bias", kv_dim), ("attn_v.bias", kv_dim)):
                add(block + name, (width,))
        else:
            add(block + "attn_q_norm.weight", (head_dim,))
            add(block + "attn_k_norm.weight", (head_dim,))
        add(block + "ffn_norm.weight", (hidden,))
        if arch == "qwen3moe":
            experts, width = TINY["experts"], TINY["expert_ffn"]
            add(block + "ffn_gate_inp.weight", (experts, hidden))
            add(block + "ffn_gate_exps.weight", (experts, width, hidden))
            add(block + "ffn_up_exps.weight", (experts, width, hidden))
            add(block + "ffn_down_exps.weight", (experts, hidden, width))
        else:
            add(block + "ffn_gate.weight", (TINY["ffn"], hidden), Q.Q8_0)
            add(block + "ffn_up.weight", (TINY["ffn"], hidden), Q.Q8_0)
            add(block + "ffn_down.weight", (hidden, TINY["ffn"]), Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "qwen3moe"])
def converted(request, vocabulary, tmp_path_factory):
    """(gguf file, our converted checkpoint directory)."""
    directory = tmp_path_factory.mktemp(request.param)
    path = directory / f"tiny-{request.param}.gguf"
    write_qwen_gguf(path, request.param, vocabulary)
    yield path, convert_gguf(path, directory / "converted", progress=False)
    shutil.rmtree(directory, ignore_errors=True)


def test_converted_logits_equal_transformers_reading_the_same_gguf(converted):
    from transformers import AutoModelForCausalLM

    path, checkpoint = converted
    config, model = load_text_model(checkpoint)
    # What transformers' GGUF reader leaves at its config defaults: the qwen3 key length (head_dim; the
    # released models use the default, 128) and, for qwen3moe, the expert width and the renormalised
    # routing llama.cpp applies.
    extra = {"qwen2": {}, "qwen3": {"head_dim": TINY["head_dim"]},
             "qwen3_moe": {"head_dim": TINY["head_dim"], "norm_topk_prob": True,
                           "moe_intermediate_size": TINY["expert_ffn"]}}[config.model_type]
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     **extra).eval()
    ids = torch.randint(0, 151_643, (1, 23), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = reference(ids).logits[0].float()
        got = model.logits(model(ids, positions, FullAttention(config, positions)))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("converted", ["qwen2"], indirect=True)  # the three files share one vocabulary
def test_converted_tokenizer_equals_the_reference_gguf_tokenizer(converted):
    from transformers import AutoTokenizer

    from qwen_fixtures import sdist_assets, vocab_reference_cases

    path, checkpoint = converted
    ours = Tokenizer.from_dir(checkpoint)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.special.bos_id is None and ours.special.eos_id == reference.eos_token_id
    for text in TEXTS:
        assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    for text, ids in vocab_reference_cases(sdist_assets()):  # Hugging Face's own Qwen tokenizer's ids
        assert ours.encode(text) == ids, text
