"""Convert a GGUF file, once, into an ordinary Hugging Face checkpoint directory.

A GGUF holds quantised weights under llama.cpp's tensor names, the model's hyper-parameters as
`<architecture>.*` metadata and the tokenizer as `tokenizer.ggml.*` metadata. Reading and dequantising
it takes tens of seconds, so it is done once: the result (model.safetensors, config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json) goes into a
cache directory keyed by the file's sha256, which `transformers` loads like any published checkpoint
and later starts load in seconds.

The model family (lm.models) that converts `general.architecture` supplies config.json, the tensor-name
map and any value fix-up (Gemma's norms); the tensors must then be exactly the family network's
parameters, with its shapes. Tokenizers: SentencePiece-style vocabularies (`tokenizer.ggml.model`
"llama": Gemma) and byte-level BPE ones ("gpt2": Qwen) are rebuilt as `tokenizers` tokenizers.

Weights are stored in float32. The dequantised values (a fp16 block scale times a small integer,
minus a fp16 offset for the K-quants) are exact in float32 but not in float16 or bfloat16, and
parity with the reference is measured on exactly these values. The 270M is ~1.07 GB on disk that way.
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

    from lm.models import gguf_family

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    reader = GGUFReader(gguf_path)
    metadata = _Metadata(reader)
    try:
        family = gguf_family(metadata.get("general.architecture"))
    except ValueError as error:
        raise ValueError(f"{gguf_path}: {error}") from None
    config = family.gguf_config(metadata)
    name_map = family.gguf_tensor_names(config)
    expected_shapes = hf_shapes(family, config)
    _check_tensor_names(gguf_path, {t.name for t in reader.tensors}, name_map, expected_shapes,
                        experts=config.get("num_experts", 0))
    fix_values = family.gguf_tensor_values or (lambda name, values: values)

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
                values = fix_values(tensor.name, values)
                stacked = "{expert}" in hf_name  # one (out, in) slice per expert
                for name, part in _split(hf_name, values) if stacked else [(hf_name, values)]:
                    if part.shape != expected_shapes[name]:
                        raise ValueError(f"{gguf_path}: tensor {tensor.name} ({name}) has shape {part.shape}, "
                                         f"the config implies {expected_shapes[name]}")
                    tensors[name] = np.ascontiguousarray(part)
                bar.update()
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            del tensors
            vocab = read_vocabulary(metadata)
            _write_tokenizer_files(staging, vocab, metadata, config, family)
            bar.update()
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(vocab, config, family))
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


def _generation_config(vocab: "GgufVocabulary", config: dict, family) -> dict:
    """Generation stops on <eos>, on the end-of-turn token the file states (tokenizer.ggml.eot_token_id)
    and on the family's end-of-turn tokens that the vocabulary holds (`ModelFamily.gguf_stop_tokens`,
    e.g. Gemma's <end_of_turn>, as llama.cpp and the published checkpoints do)."""
    eos = [config["eos_token_id"]]
    extras = [vocab.eot_id] + [vocab.tokens.index(text) for text in family.gguf_stop_tokens if text in vocab.tokens]
    for extra in extras:
        if extra is not None and extra not in eos:
            eos.append(extra)
    return {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos,
            "pad_token_id": config.get("pad_token_id", vocab.pad_id)}


class _Metadata:
    """GGUF key/value metadata, decoded lazily (the tokenizer arrays hold 262,144 entries each)."""

    def __init__(self, reader) -> None:
        self._fields = reader.fields
        self.tensor_names = {tensor.name for tensor in reader.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def length(self, key: str) -> int:
        """Number of entries of an array field, without decoding them."""
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks {key!r}, which the file must state")
        return len(self._fields[key].data)

    def require(self, key: str):
        if key not in self._fields:
            raise ValueError(f"GGUF metadata lacks {key!r}, which the file must state")
        return self._fields[key].contents()


def hf_shapes(family, config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape of every parameter of the family's network for `config` (built on
    the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        network = family.network(family.config_from_dict(config))
    return {(name if name == "lm_head.weight" else "model." + name): tuple(p.shape)
            for name, p in network.named_parameters()}


def _split(hf_name: str, stacked: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A stacked (experts, ...) tensor as one (name, slice) per expert."""
    return [(hf_name.format(expert=expert), stacked[expert]) for expert in range(stacked.shape[0])]


def _check_tensor_names(path: Path, present: set[str], name_map: dict[str, str],
                        expected: dict[str, tuple[int, ...]], *, experts: int = 0) -> None:
    unknown = sorted(present - name_map.keys())
    if unknown:
        raise ValueError(f"{path}: tensors with no mapping to this architecture: {', '.join(unknown[:8])}"
                         + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))

    def keys(hf_name: str) -> list[str]:
        return [hf_name.format(expert=e) for e in range(experts)] if "{expert}" in hf_name else [hf_name]

    mapped = {key for name in present for key in keys(name_map[name])}
    gguf_names = {key: gguf for gguf, hf in name_map.items() for key in keys(hf)}
    missing = [f"{gguf_names.get(key, '?')} ({key})" for key in sorted(set(expected) - mapped)]
    if missing:
        raise ValueError(f"{path}: missing tensors: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    extra = sorted(mapped - set(expected))
    if extra:
        raise ValueError(f"{path}: tensors the config does not describe: {', '.join(extra[:8])}")


# --- tokenizer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufVocabulary:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece-style, Gemma) or "gpt2" (byte-level BPE, Qwen)
    tokens: list[str]  # as the file spells them
    token_types: list[int]  # llama.cpp token types (1 normal, 3 control, 4 user-defined, 6 byte)
    merges: list[str]  # "left right" pairs, best first ("gpt2" only)
    pre: str | None  # tokenizer.ggml.pre: the pre-tokenizer's name ("gpt2" only)
    bos_id: int | None
    eos_id: int
    eot_id: int | None  # end of turn, when the file states one
    unk_id: int | None
    pad_id: int | None
    add_bos: bool


_TOKENIZER_MODELS = ("llama", "gpt2")
# Pre-tokenizer split patterns by tokenizer.ggml.pre, as in the published tokenizer.json of each family.
_BPE_SPLIT_PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}


def read_vocabulary(metadata: _Metadata) -> GgufVocabulary:
    model = metadata.require("tokenizer.ggml.model")
    if model not in _TOKENIZER_MODELS:
        raise ValueError(f"GGUF tokenizer model is {model!r}; supported: {', '.join(_TOKENIZER_MODELS)}")

    def optional_id(key: str) -> int | None:
        value = metadata.get(key)
        return None if value is None else int(value)

    return GgufVocabulary(
        model=model,
        tokens=list(metadata.require("tokenizer.ggml.tokens")),
        token_types=[int(t) for t in metadata.require("tokenizer.ggml.token_type")],
        merges=list(metadata.require("tokenizer.ggml.merges")) if model == "gpt2" else [],
        pre=metadata.get("tokenizer.ggml.pre"),
        bos_id=optional_id("tokenizer.ggml.bos_token_id"),
        eos_id=int(metadata.require("tokenizer.ggml.eos_token_id")),
        eot_id=optional_id("tokenizer.ggml.eot_token_id"),
        unk_id=int(metadata.require("tokenizer.ggml.unknown_token_id")) if model == "llama" else
        optional_id("tokenizer.ggml.unknown_token_id"),
        pad_id=optional_id("tokenizer.ggml.padding_token_id") if model == "gpt2" else
        int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")),
    )


def build_tokenizer(vocab: GgufVocabulary):
    """A `tokenizers.Tokenizer` for the vocabulary: SentencePiece-style or byte-level BPE."""
    return build_bpe_tokenizer(vocab) if vocab.model == "gpt2" else build_sentencepiece_tokenizer(vocab)


def build_bpe_tokenizer(vocab: GgufVocabulary):
    """A byte-level BPE tokenizer equal to the published tokenizer.json of the family (Qwen 2 / 3): NFC
    normalisation, the family's split regex (by tokenizer.ggml.pre), byte-level alphabet and decoder,
    the file's merges; control tokens special, user-defined ones (<tool_call>, FIM markers) matched whole
    but not special. ValueError for a pre-tokenizer this module does not know."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    if vocab.pre not in _BPE_SPLIT_PATTERNS:
        raise ValueError(f"GGUF BPE pre-tokenizer {vocab.pre!r} is not supported; supported: "
                         f"{', '.join(_BPE_SPLIT_PATTERNS)}")
    ids = {token: index for index, token in enumerate(vocab.tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    tokenizer = Tokenizer(BPE(vocab=ids, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                              byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_BPE_SPLIT_PATTERNS[vocab.pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(vocab.tokens, vocab.token_types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(vocab.tokens, vocab.token_types) if kind == _USER_DEFINED])
    return tokenizer


def build_sentencepiece_tokenizer(vocab: GgufVocabulary):
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


def _write_tokenizer_files(directory: Path, vocab: GgufVocabulary, metadata: _Metadata, config: dict,
                           family) -> None:
    build_tokenizer(vocab).save(str(directory / "tokenizer.json"))

    def token(index: int | None) -> str | None:
        return None if index is None else vocab.tokens[index]

    special = {name: value for name, value in (
        ("bos_token", token(vocab.bos_id) if vocab.add_bos or vocab.model == "llama" else None),
        ("eos_token", token(vocab.eos_id)), ("unk_token", token(vocab.unk_id)),
        ("pad_token", token(vocab.pad_id))) if value is not None}
    if "<mask>" in vocab.tokens:
        special["mask_token"] = "<mask>"
    template = metadata.get("tokenizer.chat_template") or family.gguf_chat_template
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer" if vocab.model == "llama" else "Qwen2Tokenizer",
        **special,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        **({"chat_template": template} if template is not None else {}),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "padding_side": "left",
        "spaces_between_special_tokens": False,
    })


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
