"""`VisionEncoder`: tiles in, soft tokens out, on a chosen backend, device and dtype.

It owns the loaded network (or the ONNX Runtime session) and batches tiles of several images
together in chunks of `max_batch`; the network modules themselves know nothing of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from vision.config import VisionConfig, usable_device

BACKENDS = ("torch", "onnx")


@dataclass(frozen=True)
class EncoderOptions:
    backend: str = "torch"  # "torch" (any device/dtype) or "onnx" (ONNX Runtime, CPU, fp32 or int8)
    device: str = "cpu"  # torch device of the network and of the returned soft tokens
    dtype: torch.dtype = torch.float32  # fp32 on CPU, bf16 on CUDA; soft tokens come back in it
    max_batch: int = 4  # tiles per forward pass, across images
    int8: bool = False  # onnx only: dynamic int8 quantisation of the MatMul weights
    onnx_cache_dir: Path | None = None  # where exported .onnx files live; None = ~/.cache/tessera/onnx
    intra_op_threads: int = 2  # onnx only: ONNX Runtime intra-op threads

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown vision backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        usable_device(self.device)  # ValueError naming the problem
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.backend == "onnx" and (torch.device(self.device).type != "cpu" or self.dtype != torch.float32):
            raise ValueError("the onnx backend runs fp32 on the CPU; use --backend torch for other devices/dtypes")
        if self.int8 and self.backend != "onnx":
            raise ValueError("int8 quantisation is only available with the onnx backend")


class VisionEncoder:
    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], torch.Tensor],
        config: VisionConfig,
        *,
        identity: str,
        options: EncoderOptions = EncoderOptions(),
    ):
        self._run_batch = run_batch  # tiles [B, 3, H, W] (any device) -> soft tokens [B, 256, d_model]
        self.config = config
        self.identity = identity  # names model + backend + dtype, for soft-token cache keys
        self.options = options

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: str | Path, options: EncoderOptions = EncoderOptions()
    ) -> "VisionEncoder":
        from vision.weights import load_vision_model, model_identity

        config = VisionConfig.from_checkpoint(checkpoint_dir)
        if options.backend == "torch":
            model = load_vision_model(checkpoint_dir, config=config, dtype=options.dtype, device=options.device)
            run_batch = _TorchRunner(model)
        else:
            from vision.onnx_backend import OnnxRunner, default_cache_dir, onnx_model_path

            path = onnx_model_path(
                lambda: load_vision_model(checkpoint_dir, config=config),
                identity=model_identity(checkpoint_dir),
                cache_dir=options.onnx_cache_dir or default_cache_dir(),
                int8=options.int8,
            )
            run_batch = OnnxRunner(path, intra_op_threads=options.intra_op_threads)
        dtype_name = str(options.dtype).removeprefix("torch.")
        identity = f"{model_identity(checkpoint_dir)}-{options.backend}-{dtype_name}" + ("-int8" if options.int8 else "")
        return cls(run_batch, config, identity=identity, options=options)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, 896, 896] -> soft tokens [N, 256, d_model] in the encoder's dtype and device."""
        self._check_tiles(tiles)
        chunks = []
        with torch.inference_mode():
            for start in range(0, tiles.shape[0], self.options.max_batch):
                chunk = tiles[start : start + self.options.max_batch]
                chunks.append(self._run_batch(chunk).to(self.options.device, self.options.dtype))
        if not chunks:
            return torch.empty(0, self.config.mm_tokens_per_image, self.config.d_model, dtype=self.options.dtype)
        return torch.cat(chunks)

    def encode_many(self, tiles_per_image: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Several images' tiles, batched together across images; one soft-token tensor per image."""
        if not tiles_per_image:
            return []
        counts = [t.shape[0] for t in tiles_per_image]
        soft_tokens = self.encode(torch.cat(list(tiles_per_image)))  # (sum of tiles, 256, d_model)
        return list(soft_tokens.split(counts))

    def _check_tiles(self, tiles: torch.Tensor) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or tuple(tiles.shape[1:]) != expected:
            got = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
            raise ValueError(f"tiles must have shape [N, {', '.join(map(str, expected))}], got {got}")
        if not tiles.is_floating_point():
            raise ValueError(f"tiles must be floating point (normalised pixels), got {tiles.dtype}")


class _TorchRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model(tiles.to(self.device, self.dtype))
