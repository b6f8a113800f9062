"""Load the Gemma 3 decoder from a Hugging Face checkpoint directory (safetensors).

Strict: every expected key must be present with its exact shape, and no other key may sit in the
decoder's namespace; errors name the offending keys. Tensors are memory-mapped with safetensors and
only the shards that hold decoder keys are opened, so a vision-language checkpoint's vision shards
are never read. The model is built on the meta device and receives the loaded tensors directly, so
peak memory is one copy of the decoder in the caller's dtype and device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lm.config import TextConfig
from lm.model import Gemma3TextModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class KeyLayout:
    name: str  # description for error messages
    prefix: str  # decoder namespace: every key under it must be a decoder weight
    head_key: str  # where an (optional, tied) LM head would be stored


# Checked in order; the first whose embedding key is present wins ("model.language_model." before
# its own prefix "model.").
KEY_LAYOUTS = (
    KeyLayout(
        "model.language_model.* (newer Gemma3ForConditionalGeneration)", "model.language_model.", "lm_head.weight"
    ),
    KeyLayout(
        "language_model.model.* (published Gemma3ForConditionalGeneration)",
        "language_model.model.",
        "language_model.lm_head.weight",
    ),
    KeyLayout("model.* (Gemma3ForCausalLM)", "model.", "lm_head.weight"),
)
_EMBED_KEY = "embed_tokens.weight"

_PER_LAYER = {  # our parameter name within a layer -> checkpoint key within "layers.{i}."
    "input_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "pre_ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
}


class CheckpointError(ValueError):
    """The checkpoint does not hold the decoder weights its config describes."""


def name_map(config: TextConfig) -> dict[str, str]:
    """Model parameter name -> checkpoint key inside the decoder namespace (without the prefix)."""
    names = {"embed.weight": _EMBED_KEY, "final_norm.weight": "norm.weight"}
    for i in range(config.num_hidden_layers):
        names.update({f"layers.{i}.{ours}": f"layers.{i}.{theirs}" for ours, theirs in _PER_LAYER.items()})
    return names


def load_text_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[TextConfig, Gemma3TextModel]:
    """(config, model in eval mode) from a checkpoint directory with config.json and either
    model.safetensors or model.safetensors.index.json + shards."""
    path = Path(path)
    config = TextConfig.from_file(path)
    with torch.device("meta"):
        model = Gemma3TextModel(config)
    state = load_text_state(path, config, model, dtype=dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    return config, model.to(device).eval()  # .to moves the RoPE buffers, built on the CPU


def load_text_state(
    path: Path, config: TextConfig, model: Gemma3TextModel, *, dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """The model's state dict read from the checkpoint, checked key by key against `model`'s shapes."""
    key_files = _key_files(path)
    layout = _detect_layout(path, key_files)
    names = name_map(config)
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = None  # stored outside the decoder namespace, at layout.head_key
    expected = {_checkpoint_key(layout, ours, theirs): ours for ours, theirs in names.items()}
    _check_key_set(path, layout, expected, key_files)

    files = sorted({key_files[key] for key in expected} | _head_files(layout, key_files))
    _check_shapes(path, files, expected, {name: tuple(p.shape) for name, p in model.named_parameters()})
    state: dict[str, torch.Tensor] = {}
    head = None
    for file in files:
        with safe_open(path / file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key in expected and key_files[key] == file:
                    state[expected[key]] = handle.get_tensor(key).to(device=device, dtype=dtype)
                elif key == layout.head_key and config.tie_word_embeddings:
                    head = handle.get_tensor(key).to(device=device, dtype=dtype)
    if head is not None and not torch.equal(head, state["embed.weight"]):
        raise CheckpointError(
            f"{path}: {layout.head_key} differs from {layout.prefix}{_EMBED_KEY}, but config.json ties "
            "the LM head to the embeddings (tie_word_embeddings)"
        )
    return state


def _checkpoint_key(layout: KeyLayout, ours: str, theirs: str | None) -> str:
    return layout.head_key if ours == "lm_head.weight" else layout.prefix + theirs


def _key_files(path: Path) -> dict[str, str]:
    """Checkpoint key -> file name holding it."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return dict(index["weight_map"])
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt", device="cpu") as handle:
            return {key: SINGLE_FILE for key in handle.keys()}
    raise FileNotFoundError(
        f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; expected a safetensors checkpoint directory"
    )


def _detect_layout(path: Path, key_files: dict[str, str]) -> KeyLayout:
    for layout in KEY_LAYOUTS:
        if layout.prefix + _EMBED_KEY in key_files:
            return layout
    tried = ", ".join(layout.prefix + _EMBED_KEY for layout in KEY_LAYOUTS)
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
        raise CheckpointError(f"{path} ({layout.name}): " + "; ".join(problems))


def _check_shapes(
    path: Path, files: list[str], expected: dict[str, str], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Compare every expected tensor's shape (read from the file headers) with the model's."""
    wrong = []
    for file in files:
        with safe_open(path / file, framework="pt", device="cpu") as handle:
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
