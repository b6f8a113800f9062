"""The real Qwen 3 tokenizer for tests, built from published files rather than written by hand.

Qwen 3 keeps Qwen 2's byte-level BPE (151,643 tokens and their merges) and adds its own special
tokens and chat template. Both published sources ship in the llama-cpp-python source distribution
on PyPI (its vendored llama.cpp tree), which CI can fetch in seconds (76 MB), unlike the 1.1 GB Qwen
2.5 GGUF:

- `vendor/llama.cpp/models/ggml-vocab-qwen2.gguf`: a vocabulary-only GGUF of the Qwen BPE (the same
  151,643 tokens and 151,387 merges as the Qwen2.5-Coder GGUF), with `.inp` / `.out` test vectors:
  strings and the ids the Hugging Face tokenizer of the Qwen repository gave them
  (llama.cpp's convert_hf_to_gguf_update.py wrote them with `encode(text, add_special_tokens=False)`);
- `vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja`: Qwen3-0.6B's chat template, copied
  verbatim from its tokenizer_config.json.

Cache layout (one directory per sdist digest, each part created atomically by a rename, so that
concurrent test sessions never see half of it):

    <cache_root>/<sdist sha256>/llama.cpp/models/...          the four files above, as extracted
    <cache_root>/<sdist sha256>/qwen3-tokenizer-v1/           tokenizer.json, tokenizer_config.json

`cache_root` defaults to ~/.cache/tessera/test-assets. The sdist is downloaded (and its sha256
checked) only while the first directory is missing; it is not kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_PYTHON_SDIST_SIZE = 76_589_250

# Paths under <cache>/<sha256>/ of the files taken from the sdist (each is the sdist's
# llama_cpp_python-<version>/vendor/<path>).
VOCAB_GGUF = "llama.cpp/models/ggml-vocab-qwen2.gguf"
VOCAB_INPUTS = "llama.cpp/models/ggml-vocab-qwen2.gguf.inp"
VOCAB_OUTPUTS = "llama.cpp/models/ggml-vocab-qwen2.gguf.out"
QWEN3_TEMPLATE = "llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja"
SDIST_FILES = (VOCAB_GGUF, VOCAB_INPUTS, VOCAB_OUTPUTS, QWEN3_TEMPLATE)

TOKENIZER_DIR = "qwen3-tokenizer-v1"  # bump the suffix when the built files change
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

QWEN_BPE_SIZE = 151_643  # byte-level BPE tokens; the added tokens follow from this id on

# Qwen's pre-tokenizer split, as in the published Qwen tokenizer.json (llama.cpp's "qwen2" pre-type
# is the same expression with the case-insensitive group spelled out).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen 3's added tokens in id order from 151643, and whether each is special, as Qwen3's published
# tokenizer_config.json (added_tokens_decoder) states them. Not special: the tool, fill-in-the-middle
# and thinking markers, which decoding with skip_special_tokens=True keeps.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)


class AssetUnavailableError(RuntimeError):
    """The published source could not be fetched (no network, index unreachable); tests skip."""


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "tessera" / "test-assets"


def sdist_assets(cache_root: Path | None = None) -> Path:
    """The directory holding SDIST_FILES (see the module docstring), downloading and extracting the
    pinned llama-cpp-python sdist when they are missing.

    Raises AssetUnavailableError when pip cannot download it, ValueError when the download's sha256
    is not the pinned one."""
    root = (cache_root or default_cache_root()) / LLAMA_CPP_PYTHON_SDIST_SHA256
    if all((root / name).is_file() for name in SDIST_FILES):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as scratch:
        sdist = _download_sdist(Path(scratch))
        _extract(sdist, Path(scratch))
        _publish(Path(scratch) / "llama.cpp", root / "llama.cpp", [Path(name).relative_to("llama.cpp")
                                                                   for name in SDIST_FILES])
    return root


def qwen3_tokenizer_dir(cache_root: Path | None = None) -> Path:
    """A Hugging Face tokenizer directory for Qwen 3 (tokenizer.json, tokenizer_config.json with
    Qwen3-0.6B's chat template), independent of any model config; built on first use.

    Raises as `sdist_assets`."""
    assets = sdist_assets(cache_root)
    target = assets / TOKENIZER_DIR
    if all((target / name).is_file() for name in TOKENIZER_FILES):
        return target
    with tempfile.TemporaryDirectory(prefix=".build-", dir=assets) as scratch:
        staging = Path(scratch) / TOKENIZER_DIR
        build_qwen3_tokenizer(assets / VOCAB_GGUF, (assets / QWEN3_TEMPLATE).read_text(encoding="utf-8"), staging)
        _publish(staging, target, TOKENIZER_FILES)
    return target


def build_qwen3_tokenizer(vocab_gguf: Path, chat_template: str, output_dir: Path) -> Path:
    """Write Qwen 3's tokenizer.json and tokenizer_config.json into `output_dir`: the BPE vocabulary
    and merges of `vocab_gguf` (a llama.cpp GGUF with tokenizer.ggml.model "gpt2" and pre "qwen2"),
    laid out as the published Qwen tokenizer.json (NFC, Qwen split, byte-level), then
    QWEN3_ADDED_TOKENS from id 151643 on.

    Raises ValueError when the GGUF is not a Qwen 2 byte-level vocabulary of the expected size."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    fields = GGUFReader(vocab_gguf).fields
    kind = (fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents())
    if kind != ("gpt2", "qwen2"):
        raise ValueError(f"{vocab_gguf} holds a {kind} tokenizer; a Qwen vocabulary is ('gpt2', 'qwen2')")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    token_types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(merge.split(" ")) for merge in fields["tokenizer.ggml.merges"].contents()]
    # llama.cpp marks BPE tokens NORMAL (1) and puts the added and padding tokens after them.
    bpe_size = next((i for i, kind in enumerate(token_types) if kind != 1), len(token_types))
    if bpe_size != QWEN_BPE_SIZE:
        raise ValueError(f"{vocab_gguf} has {bpe_size} BPE tokens before its first added token; the Qwen "
                         f"vocabulary has {QWEN_BPE_SIZE}")

    tokenizer = Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens[:bpe_size])}, merges=merges,
                              dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=bpe_size):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([added])
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"{content!r} got id {tokenizer.token_to_id(content)}, not {token_id}")

    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    # Qwen3's published tokenizer_config.json, less model_max_length (a property of a model, and
    # this directory serves checkpoints of any size).
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": special}
            for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=bpe_size)
        },
        "additional_special_tokens": [content for content, special in QWEN3_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
    return output_dir


def vocab_reference_cases(assets: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's Qwen 2 tokenizer test vectors: (text, ids the Hugging Face tokenizer gave it)."""
    texts = (assets / VOCAB_INPUTS).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (assets / VOCAB_OUTPUTS).read_text(encoding="utf-8").split("\n")[:-1]
    if len(texts) != len(outputs):
        raise ValueError(f"{len(texts)} test strings but {len(outputs)} id lists in {assets / VOCAB_OUTPUTS}")
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(texts, outputs)]


def _download_sdist(directory: Path) -> Path:
    # Only llama-cpp-python is taken as source: its build backend (scikit-build-core, needed by pip
    # to read the sdist's metadata) may come as a wheel, which keeps this to seconds. Short timeouts:
    # an unreachable index should skip the tests quickly, not after pip's default retries.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "1", "--dest", str(directory),
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as error:
        raise AssetUnavailableError(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist took over "
                                    f"{error.timeout:.0f} s") from error
    sdist = directory / LLAMA_CPP_PYTHON_SDIST
    if result.returncode != 0 or not sdist.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise AssetUnavailableError(f"pip could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                                    f"(exit {result.returncode}; is the package index reachable?): {tail}")
    digest = hashlib.sha256()
    with sdist.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != LLAMA_CPP_PYTHON_SDIST_SHA256:
        raise ValueError(f"{sdist.name} downloaded with sha256 {digest.hexdigest()}, not the pinned "
                         f"{LLAMA_CPP_PYTHON_SDIST_SHA256}")
    return sdist


def _extract(sdist: Path, destination: Path) -> None:
    """SDIST_FILES, written under `destination`; members are copied into paths of our naming,
    never extracted by their archive paths."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/"
    wanted = {prefix + name: name for name in SDIST_FILES}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            name = wanted.pop(member.name, None)
            if name is None:
                continue
            if not member.isfile():
                raise ValueError(f"{sdist.name}: {member.name} is not a regular file")
            path = destination / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, path.open("wb") as target:
                shutil.copyfileobj(source, target)
            if not wanted:
                break
    if wanted:
        raise ValueError(f"{sdist.name} lacks {sorted(wanted)}")


def _publish(staging: Path, target: Path, required) -> None:
    """Move a finished directory into place. A complete one already there (a concurrent session got
    there first) is kept; an incomplete one (a file went missing) is replaced."""
    if all((target / name).is_file() for name in required):
        return
    if target.exists():
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError:
        if not all((target / name).is_file() for name in required):
            raise
