"""ONNX Runtime backend for the vision network: export once per model, optionally int8-quantise, run.

The exported graph takes tiles [batch, 3, 896, 896] float32 (batch dynamic) and returns soft tokens
[batch, 256, d_model] float32. Exported files are cached under a caller-chosen directory, named by
the model identity (see `vision.weights.model_identity`), so a server exports each model once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vision.projector import VisionToSoftTokens

INPUT_NAME = "tiles"
OUTPUT_NAME = "soft_tokens"
OPSET = 17  # LayerNormalization is native from opset 17


def default_cache_dir() -> Path:
    """~/.cache/tessera/onnx; read when called, never at import."""
    return Path.home() / ".cache" / "tessera" / "onnx"


def onnx_model_path(
    load_model: Callable[[], VisionToSoftTokens], *, identity: str, cache_dir: str | Path, int8: bool = False
) -> Path:
    """Path of the cached ONNX file for `identity`, exporting (and quantising) it first if absent.
    `load_model` (returning the fp32 CPU network) is called only when an export is needed."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = cache_dir / f"vision-{identity}-fp32.onnx"
    if not fp32_path.is_file():
        export_onnx(load_model(), fp32_path)
    if not int8:
        return fp32_path
    int8_path = cache_dir / f"vision-{identity}-int8.onnx"
    if not int8_path.is_file():
        quantize_int8(fp32_path, int8_path)
    return int8_path


def export_onnx(model: VisionToSoftTokens, path: str | Path) -> None:
    """Export tower + projector with a dynamic batch axis; written to a temporary name, then renamed,
    so a crash never leaves a half-written file in the cache."""
    path = Path(path)
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        raise ValueError(f"export needs the fp32 CPU model, got {first.dtype} on {first.device}")
    tower = model.tower
    sample = torch.zeros(
        1, tower.patch_embed.in_channels, *_image_hw(model), dtype=torch.float32
    )  # (1, 3, 896, 896)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (sample,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    os.replace(tmp, path)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = Path(int8_path)
    tmp = int8_path.with_name(int8_path.name + f".tmp{os.getpid()}")
    quantize_dynamic(
        str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    os.replace(tmp, int8_path)


class OnnxRunner:
    """One onnxruntime session on the CPU; callable on tiles, returns float32 soft tokens."""

    def __init__(self, path: str | Path, *, intra_op_threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())
        (soft_tokens,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(soft_tokens)


def _image_hw(model: VisionToSoftTokens) -> tuple[int, int]:
    patch = model.tower.patch_embed.kernel_size[0]
    side = model.projector.patches_per_side * patch
    return side, side
