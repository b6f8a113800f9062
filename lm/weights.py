"""Load a decoder from a Hugging Face checkpoint directory (safetensors), for any registered family.

Strict: every parameter of the family's network (whose names are the checkpoint's) must be present
with its exact shape, and no other key may sit in the decoder's namespace; errors name the offending
keys. Tensors are memory-mapped with safetensors and only the shards that hold decoder keys are opened,
so a vision-language checkpoint's vision shards are never read. The model is built on the meta device
and receives the loaded tensors directly, so peak memory is one copy of the decoder in the caller's
dtype and device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm.layers import fuse_projections
from lm.models import family_of, read_config_json
from lm.models.base import DecoderConfig, KeyLayout, ModelFamily
from vision.weights import open_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EMBED_KEY = "embed_tokens.weight"
_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """The checkpoint does not hold the decoder weights its config describes."""


def load_text_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[DecoderConfig, torch.nn.Module]:
    """(config, model in eval mode) from a checkpoint directory with config.json and either
    model.safetensors or model.safetensors.index.json + shards. The family is config.json's
    `model_type` (lm.models.FAMILIES); ValueError for an unsupported one, CheckpointError when the
    weights do not match the config."""
    path = Path(path)
    raw = read_config_json(path)
    family = family_of(raw)
    config = family.config_from_dict(raw)
    with torch.device("meta"):
        model = family.network(config)
    state = load_text_state(path, family, config, model, dtype=dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    fuse_projections(model)  # q/k/v and gate/up as one matmul each (after the checkpoint's names are checked)
    return config, model.to(device).eval()  # .to moves the RoPE buffers, built on the CPU


def load_text_state(path: Path, family: ModelFamily, config: DecoderConfig, model: torch.nn.Module, *,
                    dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The model's state dict read from the checkpoint, checked key by key against `model`'s shapes."""
    key_files = _key_files(path)
    layout = _detect_layout(path, family, key_files)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    expected = {(layout.head_key if name == _HEAD else layout.prefix + name): name for name in shapes}
    _check_key_set(path, layout, expected, key_files)

    files = sorted({key_files[key] for key in expected} | _head_files(layout, key_files))
    _check_shapes(path, files, expected, shapes)
    state: dict[str, torch.Tensor] = {}
    head = None
    for file in files:
        with open_safetensors(path / file) as handle:
            for key in handle.keys():
                if key in expected and key_files[key] == file:
                    state[expected[key]] = handle.get_tensor(key).to(device=device, dtype=dtype)
                elif key == layout.head_key and config.tie_word_embeddings:
                    head = handle.get_tensor(key).to(device=device, dtype=dtype)
    if head is not None and not torch.equal(head, state[_EMBED_KEY]):
        raise CheckpointError(
            f"{path}: {layout.head_key} differs from {layout.prefix}{_EMBED_KEY}, but config.json ties "
            "the LM head to the embeddings (tie_word_embeddings)"
        )
    return state


def _key_files(path: Path) -> dict[str, str]:
    """Checkpoint key -> file name holding it."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return dict(index["weight_map"])
    if (path / SINGLE_FILE).is_file():
        with open_safetensors(path / SINGLE_FILE) as handle:
            return {key: SINGLE_FILE for key in handle.keys()}
    raise FileNotFoundError(
        f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; expected a safetensors checkpoint directory"
    )


def _detect_layout(path: Path, family: ModelFamily, key_files: dict[str, str]) -> KeyLayout:
    for layout in family.key_layouts:
        if layout.prefix + _EMBED_KEY in key_files:
            return layout
    tried = ", ".join(layout.prefix + _EMBED_KEY for layout in family.key_layouts)
    raise CheckpointError(f"{path}: no decoder embedding found (looked for {tried})")


def _head_files(layout: KeyLayout, key_files: dict[str, str]) -> set[str]:
    return {key_files[layout.head_key]} if layout.head_key in key_files else set()


def _check_key_set(path: Path, layout: KeyLayout, expected: dict[str, str], key_files: dict[str, str]) -> None:
    present = set(key_files)
    missing = sorted(set(expected) - present)
    in_namespace = {key for key in present if key.startswith(layout.prefix)}
    unexpected = sorted(in_namespace - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys in the decoder namespace {layout.prefix}*: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{path} ({layout.name}): " + "; ".join(problems)
                              + " (does config.json's model_type name the checkpoint's family?)")


def _check_shapes(
    path: Path, files: list[str], expected: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Compare every expected tensor's shape (read from the file headers) with the model's."""
    wrong = []
    for file in files:
        with open_safetensors(path / file) as handle:
            for key in handle.keys():
                if key in expected:
                    found, wanted = tuple(handle.get_slice(key).get_shape()), shapes[expected[key]]
                    if found != wanted:
                        wrong.append(f"{key} has shape {list(found)}, config.json implies {list(wanted)}")
    if wrong:
        raise CheckpointError(f"{path}: wrong tensor shapes: " + "; ".join(wrong))


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} ... ({len(keys)} in all)"
