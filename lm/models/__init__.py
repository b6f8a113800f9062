"""Model families and their registry: a family is one file here plus one line in `FAMILIES`.

`family_of(config)` picks the family from config.json's `model_type` (the vision-language Gemma 3
config is `gemma3`, its text-only sibling `gemma3_text`); `load_config(path)` parses a checkpoint's
config.json with it. Nothing outside lm/models/ names a family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm.models import gemma3, qwen
from lm.models.base import DecoderConfig, ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    model_type: family
    for family in (gemma3.FAMILY, qwen.QWEN2, qwen.QWEN3, qwen.QWEN3_MOE)
    for model_type in family.model_types
}


def family_of(config: dict[str, Any]) -> ModelFamily:
    """The family of a parsed config.json, by its `model_type`; ValueError naming the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        architectures = ", ".join(config.get("architectures") or []) or "none stated"
        raise ValueError(f"config.json: model_type {model_type!r} (architectures: {architectures}) is not a "
                         f"supported model family; supported model types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def gguf_family(architecture: str) -> ModelFamily:
    """The family converting GGUF files of `general.architecture` = `architecture`."""
    for family in FAMILIES.values():
        if architecture in family.gguf_architectures:
            return family
    supported = sorted({a for f in FAMILIES.values() for a in f.gguf_architectures})
    raise ValueError(f"GGUF architecture {architecture!r} is not supported; supported: {', '.join(supported)}")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_config(path: str | Path) -> DecoderConfig:
    """The decoder config of a checkpoint directory (or config.json file), parsed by its family."""
    raw = read_config_json(path)
    return family_of(raw).config_from_dict(raw)
