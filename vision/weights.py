"""Load the SigLIP tower and the multimodal projector from a Hugging Face Gemma 3 checkpoint.

Strict: every expected key must be present with its exact shape, and no other key may sit in the
vision/projector namespace; the error names the offending keys. Tensors are memory-mapped with
safetensors and only the shards that hold vision or projector keys are opened, so loading a 27B
checkpoint's vision stage never touches the language-model shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vision.config import VisionConfig
from vision.projector import VisionToSoftTokens

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class KeyLayout:
    name: str  # short description used in error messages
    tower_prefix: str  # prefix of the SigLIP keys (before "embeddings.", "encoder.", "post_layernorm.")
    projector_prefix: str  # prefix of the projector keys


# Checked in order; the first whose patch-embedding key is present wins. A checkpoint mixing two
# layouts then fails as "unexpected keys".
KEY_LAYOUTS = (
    KeyLayout("published (vision_tower.vision_model.*)", "vision_tower.vision_model.", "multi_modal_projector."),
    KeyLayout("transformers 5 save_pretrained (vision_tower.*)", "vision_tower.", "multi_modal_projector."),
    KeyLayout(
        "model.* with vision_model", "model.vision_tower.vision_model.", "model.multi_modal_projector."
    ),
    KeyLayout("model.*", "model.vision_tower.", "model.multi_modal_projector."),
)
# Any key starting with one of these belongs to the vision stage and must be accounted for.
VISION_NAMESPACES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_PATCH_EMBED_KEY = "embeddings.patch_embedding.weight"


class CheckpointError(ValueError):
    """The checkpoint does not hold the vision weights this config describes."""


@contextmanager
def open_safetensors(file: str | Path) -> Iterator:
    """safetensors' `safe_open(file, framework="pt", device="cpu")` handle; a file it cannot read (a
    corrupt or truncated header or data, as an interrupted download leaves) raises CheckpointError naming
    the file instead of safetensors' own error type."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated? {error})") from None


def name_map(config: VisionConfig) -> dict[str, tuple[str, str]]:
    """Module parameter name -> ("tower" | "projector", checkpoint key without the layout prefix)."""
    names = {
        "tower.patch_embed.weight": ("tower", "embeddings.patch_embedding.weight"),
        "tower.patch_embed.bias": ("tower", "embeddings.patch_embedding.bias"),
        "tower.position_embed": ("tower", "embeddings.position_embedding.weight"),
        "tower.post_norm.weight": ("tower", "post_layernorm.weight"),
        "tower.post_norm.bias": ("tower", "post_layernorm.bias"),
        "projector.norm_weight": ("projector", "mm_soft_emb_norm.weight"),
        "projector.projection": ("projector", "mm_input_projection_weight"),
    }
    per_block = {
        "attn_norm": "layer_norm1",
        "attn.q_proj": "self_attn.q_proj",
        "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj",
        "attn.out_proj": "self_attn.out_proj",
        "mlp_norm": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in per_block.items():
            for kind in ("weight", "bias"):
                names[f"tower.blocks.{i}.{ours}.{kind}"] = ("tower", f"encoder.layers.{i}.{theirs}.{kind}")
    return names


def load_vision_model(
    checkpoint_dir: str | Path,
    *,
    config: VisionConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VisionToSoftTokens:
    """The tower + projector of `checkpoint_dir`, in eval mode, on `device` in `dtype`."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or VisionConfig.from_checkpoint(checkpoint_dir)
    key_to_file = checkpoint_key_files(checkpoint_dir)
    layout = detect_layout(key_to_file)
    with torch.device("meta"):
        model = VisionToSoftTokens(config)
    expected_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    wanted = {}  # checkpoint key -> module parameter name
    for param_name, (part, suffix) in name_map(config).items():
        prefix = layout.tower_prefix if part == "tower" else layout.projector_prefix
        wanted[prefix + suffix] = param_name
    if set(wanted.values()) != set(expected_shapes):  # the map itself must cover the module exactly
        raise AssertionError("vision name map and module parameters disagree")
    present = {key for key in key_to_file if key.startswith(VISION_NAMESPACES)}
    missing = sorted(set(wanted) - present)
    unexpected = sorted(present - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_dir}: vision weights do not match the config (layout: {layout.name}); "
            + "; ".join(
                part
                for part in (_describe("missing", missing), _describe("unexpected", unexpected))
                if part
            )
        )

    state: dict[str, torch.Tensor] = {}
    mis_shaped = []
    by_file: dict[str, list[str]] = {}
    for key in wanted:
        by_file.setdefault(key_to_file[key], []).append(key)
    for file_name, keys in sorted(by_file.items()):
        if not (checkpoint_dir / file_name).is_file():
            raise CheckpointError(f"{checkpoint_dir}: shard {file_name} (holding {keys[0]}) is missing")
        with open_safetensors(checkpoint_dir / file_name) as shard:
            absent = sorted(set(keys) - set(shard.keys()))
            if absent:
                raise CheckpointError(
                    f"{checkpoint_dir}: the index places {', '.join(absent[:8])} in {file_name}, "
                    "which does not contain them"
                )
            for key in keys:
                param_name = wanted[key]
                shape = tuple(shard.get_slice(key).get_shape())
                if shape != expected_shapes[param_name]:
                    mis_shaped.append(f"{key} has shape {list(shape)}, expected {list(expected_shapes[param_name])}")
                    continue
                state[param_name] = shard.get_tensor(key).to(device=device, dtype=dtype)
    if mis_shaped:
        raise CheckpointError(f"{checkpoint_dir}: mis-shaped vision weights: " + "; ".join(mis_shaped))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def checkpoint_key_files(checkpoint_dir: Path) -> dict[str, str]:
    """Every tensor key of the checkpoint -> the file (relative to the directory) holding it."""
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no `weight_map`")
        return dict(weight_map)
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as handle:
            return {key: SINGLE_FILE for key in handle.keys()}
    raise CheckpointError(f"{checkpoint_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def detect_layout(keys) -> KeyLayout:
    for layout in KEY_LAYOUTS:
        if layout.tower_prefix + _PATCH_EMBED_KEY in keys:
            return layout
    tried = ", ".join(layout.tower_prefix + _PATCH_EMBED_KEY for layout in KEY_LAYOUTS)
    raise CheckpointError(f"no vision tower in this checkpoint: none of {tried} is present")


def model_identity(checkpoint_dir: str | Path) -> str:
    """A short hash naming one set of vision weights, for soft-token and ONNX caches.

    Covers the resolved path, config.json, and the name, size and modification time of every file
    holding vision keys, so replacing the weights in place changes it. Cheap: no tensor is read."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    digest = hashlib.sha256()
    digest.update(str(checkpoint_dir).encode())
    digest.update((checkpoint_dir / "config.json").read_bytes())
    files = {f for k, f in checkpoint_key_files(checkpoint_dir).items() if k.startswith(VISION_NAMESPACES)}
    for file_name in sorted(files):
        stat = (checkpoint_dir / file_name).stat()
        digest.update(f"\0{file_name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _describe(kind: str, keys: list[str], shown: int = 8) -> str:
    if not keys:
        return ""
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {kind} key(s): {', '.join(keys[:shown])}{more}"
