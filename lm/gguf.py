"""Convert a Gemma 3 GGUF file, once, into an ordinary Hugging Face checkpoint directory.

A GGUF holds quantised weights under llama.cpp's tensor names, the model's hyper-parameters as
`gemma3.*` metadata and the tokenizer as `tokenizer.ggml.*` metadata. Reading and dequantising it
takes tens of seconds, so it is done once: the result (model.safetensors, config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json) goes into a
cache directory keyed by the file's sha256, which `transformers` loads like any published checkpoint
and later starts load in seconds.

Weights are stored in float32. The dequantised values (a fp16 block scale times a small integer,
minus a fp16 offset for the K-quants) are exact in float32 but not in float16 or bfloat16, and
parity with the reference is measured on exactly these values. The 270M is ~1.07 GB on disk that way.

Facts a GGUF does not state and llama.cpp hard-codes for the `gemma3` architecture, applied here:
norm weights are stored as (1 + w) (the converter adds 1; HF checkpoints hold w), q/k are not
permuted, local layers use RoPE θ = 10,000, every 6th layer is global, and the attention scale is
head_dim ** -0.5 except for the 27B (62 layers), where it is (hidden / heads) ** -0.5.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_ARCHITECTURE = "gemma3"
# Bumped whenever the converter's output changes, so that stale cache directories are rebuilt.
CONVERSION_FORMAT = 1
CONVERSION_MARKER = "tessera_conversion.json"  # {"format": ..., "gguf_sha256": ...}, written last
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

# llama.cpp name -> Hugging Face `Gemma3ForCausalLM` name. Per-layer names omit "blk.N." / "model.layers.N.".
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in files with an untied head
}
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_LOCAL_ROPE_THETA = 10_000.0
_SLIDING_WINDOW_PATTERN = 6
_LAYERS_OF_27B = 62

# Gemma 3's chat template as published with the instruction-tuned checkpoints (tokenizer_config.json).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
END_OF_TURN = "<end_of_turn>"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "tessera" / "models"


def cached_checkpoint(gguf_path: Path, name: str, cache_root: Path | None = None, *, sha256: str | None = None,
                      progress: bool = True) -> Path:
    """The converted checkpoint directory for `gguf_path`, converting it on first use.

    The directory is `<cache_root>/<name>-<first 16 hex digits of the file's sha256>`; pass `sha256`
    when it is already known to skip hashing the file."""
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    digest = sha256 or sha256_file(gguf_path)
    target = cache_root / f"{name}-{digest[:16]}"
    if is_complete_checkpoint(target):
        return target
    convert_gguf(gguf_path, target, progress=progress, sha256=digest)
    return target


def is_complete_checkpoint(directory: Path) -> bool:
    """True when `directory` holds a conversion by this version of the converter."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CONVERSION_FORMAT and all((directory / n).is_file() for n in CHECKPOINT_FILES)


def convert_gguf(gguf_path: Path, output_dir: Path, *, progress: bool = True, sha256: str | None = None) -> Path:
    """Write the Hugging Face checkpoint for a Gemma 3 GGUF into `output_dir` (atomically: the files
    are written into a temporary sibling directory which is then renamed)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    reader = GGUFReader(gguf_path)
    metadata = _Metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture != GGUF_ARCHITECTURE:
        raise ValueError(f"{gguf_path}: GGUF architecture is {architecture!r}; only {GGUF_ARCHITECTURE!r} is supported")
    config = build_config(metadata, tensor_names={t.name for t in reader.tensors})
    name_map = gguf_to_hf_names(config["num_hidden_layers"])
    _check_tensor_names(gguf_path, {t.name for t in reader.tensors}, name_map, config["tie_word_embeddings"])
    expected_shapes = hf_shapes(config)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        tensors: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(reader.tensors) + 1, desc=f"Converting {gguf_path.name}", unit="tensor",
                   disable=not progress)
        with bar:
            for tensor in reader.tensors:
                hf_name = name_map[tensor.name]
                values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
                if tensor.name.endswith("norm.weight"):
                    values = values - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
                if values.shape != expected_shapes[hf_name]:
                    raise ValueError(f"{gguf_path}: tensor {tensor.name} ({hf_name}) has shape {values.shape}, "
                                     f"the config implies {expected_shapes[hf_name]}")
                tensors[hf_name] = values
                bar.update()
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            del tensors
            vocab = read_vocabulary(metadata)
            _write_tokenizer_files(staging, vocab, metadata, config)
            bar.update()
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(vocab, config))
        _write_json(staging / CONVERSION_MARKER, {"format": CONVERSION_FORMAT,
                                                  "gguf_sha256": sha256 or sha256_file(gguf_path)})
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _publish(staging: Path, output_dir: Path) -> None:
    """Move a finished conversion into place; a stale one there is replaced, a complete one kept."""
    if output_dir.exists() and not is_complete_checkpoint(output_dir):
        stale = output_dir.with_name(f".{output_dir.name}.stale-{os.getpid()}")
        try:
            os.rename(output_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:  # another process moved it first
            pass
    try:
        os.rename(staging, output_dir)
    except OSError:
        if not is_complete_checkpoint(output_dir):  # not a concurrent conversion that won the race
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _generation_config(vocab: "GgufVocabulary", config: dict) -> dict:
    """Generation stops on <eos> and, as llama.cpp and the published Gemma 3 checkpoints do, on <end_of_turn>."""
    eos = [config["eos_token_id"]]
    if END_OF_TURN in vocab.tokens:
        eos.append(vocab.tokens.index(END_OF_TURN))
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}


class _Metadata:
    """GGUF key/value metadata, decoded lazily (the tokenizer arrays hold 262,144 entries each)."""

    def __init__(self, reader) -> None:
        self._fields = reader.fields

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def length(self, key: str) -> int:
        """Number of entries of an array field, without decoding them."""
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks {key!r}, which a Gemma 3 file must state")
        return len(self._fields[key].data)

    def require(self, key: str):
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks {key!r}, which a Gemma 3 file must state")
        return self._fields[key].contents()


def build_config(metadata: _Metadata, tensor_names: set[str]) -> dict:
    """config.json for `Gemma3ForCausalLM` in the published format (rope_theta / rope_local_base_freq /
    rope_scaling, with layer_types spelled out)."""
    arch = GGUF_ARCHITECTURE
    num_layers = int(metadata.require(f"{arch}.block_count"))
    hidden = int(metadata.require(f"{arch}.embedding_length"))
    heads = int(metadata.require(f"{arch}.attention.head_count"))
    head_dim = int(metadata.require(f"{arch}.attention.key_length"))
    pattern = int(metadata.get(f"{arch}.attention.sliding_window_pattern", _SLIDING_WINDOW_PATTERN))
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    scaling_factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    rope_scaling = None
    if scaling_type not in (None, "none") and scaling_factor != 1.0:
        if scaling_type != "linear":
            raise ValueError(f"GGUF states RoPE scaling {scaling_type!r}; Gemma 3 uses 'linear' or none")
        rope_scaling = {"rope_type": "linear", "factor": scaling_factor}
    vocab_size = metadata.length("tokenizer.ggml.tokens")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(metadata.get(f"{arch}.vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(metadata.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.require(f"{arch}.attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": hidden // heads if num_layers == _LAYERS_OF_27B else head_dim,
        "sliding_window": int(metadata.require(f"{arch}.attention.sliding_window")),
        "_sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)],
        "rms_norm_eps": float(metadata.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(metadata.require(f"{arch}.context_length")),
        "rope_theta": float(metadata.require(f"{arch}.rope.freq_base")),
        "rope_local_base_freq": _LOCAL_ROPE_THETA,
        "rope_scaling": rope_scaling,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": int(metadata.require("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(metadata.require("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }


def gguf_to_hf_names(num_layers: int) -> dict[str, str]:
    names = dict(_GLOBAL_TENSORS)
    for layer in range(num_layers):
        for gguf_name, hf_name in _LAYER_TENSORS.items():
            names[f"blk.{layer}.{gguf_name}"] = f"model.layers.{layer}.{hf_name}"
    return names


def hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The shape each HF tensor must have, from the config alone."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    per_layer = {
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "self_attn.q_norm.weight": (config["head_dim"],),
        "self_attn.k_norm.weight": (config["head_dim"],),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "pre_feedforward_layernorm.weight": (hidden,),
        "post_feedforward_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def _check_tensor_names(path: Path, present: set[str], name_map: dict[str, str], tied: bool) -> None:
    unknown = sorted(present - name_map.keys())
    if unknown:
        raise ValueError(f"{path}: tensors with no Gemma 3 mapping: {', '.join(unknown[:8])}"
                         + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    required = set(name_map) - ({"output.weight"} if tied else set())
    missing = sorted(required - present)
    if missing:
        raise ValueError(f"{path}: missing tensors: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


# --- tokenizer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufVocabulary:
    tokens: list[str]  # as the file spells them
    token_types: list[int]  # llama.cpp token types (1 normal, 3 control, 4 user-defined, 6 byte)
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool


def read_vocabulary(metadata: _Metadata) -> GgufVocabulary:
    model = metadata.require("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"GGUF tokenizer model is {model!r}; Gemma 3 files use the SentencePiece ('llama') model")
    return GgufVocabulary(
        tokens=list(metadata.require("tokenizer.ggml.tokens")),
        token_types=[int(t) for t in metadata.require("tokenizer.ggml.token_type")],
        bos_id=int(metadata.require("tokenizer.ggml.bos_token_id")),
        eos_id=int(metadata.require("tokenizer.ggml.eos_token_id")),
        unk_id=int(metadata.require("tokenizer.ggml.unknown_token_id")),
        pad_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
    )


def build_tokenizer(vocab: GgufVocabulary):
    """A `tokenizers.Tokenizer` equal to transformers' `GemmaTokenizer` for this vocabulary: SentencePiece
    BPE with byte fallback, spaces normalised to "▁", control tokens special, user-defined tokens
    (newline and tab runs, HTML tags, image markers) matched whole.

    Two things the GGUF spelling needs: runs of spaces are stored as real spaces but looked up as "▁"
    runs after normalisation, so they are respelled; and the file has no merges, so they are derived
    from the vocabulary, best first in file order (Gemma's GGUF scores do not follow merge order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]
    ids = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=ids, merges=derive_merges(tokens, ids), unk_token=tokens[vocab.unk_id],
                              fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, vocab.token_types) if kind == _CONTROL
    ])
    tokenizer.add_tokens([
        AddedToken(token, special=False, normalized=False)
        for token, original, kind in zip(tokens, vocab.tokens, vocab.token_types)
        if kind == _USER_DEFINED and token == original  # respelled space runs stay plain vocabulary
    ])
    bos = tokens[vocab.bos_id]
    if vocab.add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab.bos_id)]
        )
    return tokenizer


def derive_merges(tokens: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary pieces, tokens in file order, longer left piece first."""
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                merges.append((left, right))
    return merges


def _write_tokenizer_files(directory: Path, vocab: GgufVocabulary, metadata: _Metadata, config: dict) -> None:
    build_tokenizer(vocab).save(str(directory / "tokenizer.json"))
    special = {
        "bos_token": vocab.tokens[vocab.bos_id],
        "eos_token": vocab.tokens[vocab.eos_id],
        "unk_token": vocab.tokens[vocab.unk_id],
        "pad_token": vocab.tokens[vocab.pad_id],
    }
    if "<mask>" in vocab.tokens:
        special["mask_token"] = "<mask>"
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer",
        **special,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template", GEMMA3_CHAT_TEMPLATE),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "padding_side": "left",
        "spaces_between_special_tokens": False,
    })


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
