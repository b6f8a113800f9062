"""Helpers for the vision tests: derived copies of the tiny checkpoint (random projector, renamed,
corrupted keys). Plain functions; each test module wraps them in its own fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


def read_all(checkpoint: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    tensors = {}
    for file_name in sorted(set(weight_map.values())):
        with safe_open(str(checkpoint / file_name), framework="pt") as shard:
            for key in shard.keys():
                tensors[key] = shard.get_tensor(key)
    return tensors


def write_sharded(tensors: dict[str, torch.Tensor], dst: Path, src_config_dir: Path, shards: int = 3) -> Path:
    """`tensors` as `shards` safetensors files + index, with the config.json of `src_config_dir`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_config_dir / "config.json", dst / "config.json")
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def write_single(tensors: dict[str, torch.Tensor], dst: Path, src_config_dir: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_config_dir / "config.json", dst / "config.json")
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def with_random_projector(src: Path, dst: Path, seed: int = 1) -> Path:
    """The reference initialises `mm_input_projection_weight` to zeros, which makes every soft token
    zero and any projector bug invisible; this copy gives it random values."""
    tensors = read_all(src)
    generator = torch.Generator().manual_seed(seed)
    key = "multi_modal_projector.mm_input_projection_weight"
    tensors[key] = torch.randn(tensors[key].shape, generator=generator) * 0.5
    return write_sharded(tensors, dst, src)


def renamed(src: Path, dst: Path, rename: Callable[[str], str], *, single_file: bool = False) -> Path:
    tensors = {rename(k): v for k, v in read_all(src).items()}
    return (write_single if single_file else write_sharded)(tensors, dst, src)
