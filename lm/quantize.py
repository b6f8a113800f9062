"""Weight-only int8 quantisation of a loaded decoder, applied from outside the model by swapping
modules (the model code knows nothing of it).

Every projection and the LM head keep int8 weights with one scale per output channel (symmetric,
round-to-nearest); activations are not quantised. On the CPU the matmul runs in PyTorch's
int8-weight kernel with bf16 activations and fp32 results; elsewhere the weights are dequantised on
the fly. A tied embedding table is shared with the int8 head and dequantised row by row on lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMES = ("int8",)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T (+ bias) with q int8 (out, in), scale (out,) and the bias, if any, kept as
    it was (Qwen 2's q/k/v biases)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-30) / 127.0  # (out,)
        # The kernel takes bf16 scales: round them (up, so |w| / scale stays <= 127) before quantising
        # against them, so the int8 grid is exactly the one the kernel multiplies by.
        scales = (scales * (1 + 2**-8)).to(torch.bfloat16)
        quantized = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", quantized)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if flat.device.type == "cpu":
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales)
        else:
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., out)


class Int8Embedding(nn.Module):
    """Row lookup in an Int8Linear's table, dequantised to `dtype`: a tied head and the embedding
    share one int8 table instead of keeping the float one for lookups."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.table.weight[ids].to(self.dtype)  # (..., hidden)
        return rows * self.table.scales[ids].to(self.dtype)[..., None]


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantise `model` (any family's network: lm.models) in place and return it."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}; available: {', '.join(SCHEMES)}")
    with torch.no_grad():
        _swap_linears(model.layers)
        tied = model.lm_head is None
        source = model.embed_tokens.weight if tied else model.lm_head.weight
        model.lm_head = Int8Linear(source)
        if tied:
            model.embed_tokens = Int8Embedding(model.lm_head, source.dtype)
    return model


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
        else:
            _swap_linears(child)
