"""Vision-stage configuration, read from a Gemma 3 checkpoint's config.json.

The SigLIP tower's fields come from `vision_config`; the projector also needs `mm_tokens_per_image`
and the language model's width (`text_config.hidden_size`), the size of each soft token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def usable_device(device) -> "torch.device":
    """`device` (a name such as "cpu", "cuda", "cuda:1", or a torch.device) as a torch.device this process
    can run on. Raises ValueError naming the problem: a string that is not a device; a CUDA device where
    this PyTorch has no CUDA, sees no GPU, or sees fewer GPUs than the index asks for; meta (no data);
    another backend (mps, xpu, ...) where an empty tensor cannot be made."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N, ...): {error}") from None
    if parsed.type == "cuda":  # ROCm builds too
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
            reason = "no GPU is visible" if built else "this PyTorch build has no CUDA"
            raise ValueError(f"device {device!r}: CUDA is not available ({reason}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif parsed.type == "meta":
        raise ValueError(f"device {device!r} holds no data (shapes only); use cpu or a GPU")
    elif parsed.type != "cpu":  # mps, xpu, ...: whether a tensor can be made there, on any PyTorch version
        try:
            torch.empty(0, device=parsed)
        except Exception as error:  # noqa: BLE001 - each backend raises its own type
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise ValueError(f"device {device!r}: no {parsed.type} device is available here ({reason})") from None
    return parsed


# Activations the SigLIP MLP may use, by the name config.json gives them.
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class VisionConfig:
    d_model: int  # language-model width = size of one soft token (text_config.hidden_size)
    hidden_size: int = 1152  # SigLIP width (So400m/14)
    intermediate_size: int = 4304  # SigLIP MLP hidden size
    num_hidden_layers: int = 27  # SigLIP encoder blocks
    num_attention_heads: int = 16  # attention heads per block; head_dim = hidden_size / heads
    num_channels: int = 3  # input channels (RGB)
    image_size: int = 896  # tile side in pixels
    patch_size: int = 14  # patch side in pixels: 896 / 14 = 64 patches per side
    layer_norm_eps: float = 1e-6  # eps of the tower's LayerNorms and of the projector's RMSNorm
    hidden_act: str = "gelu_pytorch_tanh"  # MLP activation (gelu with the tanh approximation)
    mm_tokens_per_image: int = 256  # soft tokens per tile after pooling; a square dividing the grid

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int",) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"vision config: {field.name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"vision config: hidden_act {self.hidden_act!r} is not supported; "
                f"allowed: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ValueError(f"vision config: layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or self.patches_per_side % side:
            raise ValueError(
                f"vision config: mm_tokens_per_image {self.mm_tokens_per_image} must be a perfect square "
                f"whose side divides the {self.patches_per_side}x{self.patches_per_side} patch grid "
                f"(e.g. 256 = 16x16 for a 64x64 grid)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        """Side of the average-pooling window (= stride): 64 / 16 = 4 at the defaults."""
        return self.patches_per_side // self.tokens_per_side

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VisionConfig":
        """From a parsed Gemma 3 config.json (`vision_config`, `mm_tokens_per_image`, `text_config`)."""
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError("config.json has no `vision_config`: this is not a vision-language checkpoint")
        if vision.get("vision_use_head"):
            raise ValueError("vision_config.vision_use_head is true: Gemma 3 towers have no pooling head")
        text = config.get("text_config") or {}
        if "hidden_size" not in text:
            raise ValueError("config.json has no `text_config.hidden_size`: the soft-token width is unknown")
        own = {f.name for f in fields(cls)} - {"d_model", "mm_tokens_per_image"}
        kwargs = {name: vision[name] for name in own if name in vision}
        if "mm_tokens_per_image" in config:
            kwargs["mm_tokens_per_image"] = config["mm_tokens_per_image"]
        return cls(d_model=text["hidden_size"], **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "VisionConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a Hugging Face Gemma 3 checkpoint directory")
        return cls.from_dict(json.loads(path.read_text()))
