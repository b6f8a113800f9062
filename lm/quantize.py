"""Int8 quantisation of a loaded decoder, applied from outside the model by swapping modules.

`int8`: every projection and the LM head become dynamically quantised linears (int8 weights, one
scale per output channel; activations quantised per call), run by PyTorch's x86/fbgemm kernels.
Embedding lookups stay in the original dtype: they read one row per token, so they cost nothing.
CPU only: these kernels do not exist on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("int8",)


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """Quantise `model` (a Gemma3TextModel) in place and return it."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}; available: {', '.join(SCHEMES)}")
    if model.embed.weight.device.type != "cpu" or model.embed.weight.dtype != torch.float32:
        raise ValueError("int8 quantisation runs on the CPU from float32 weights; load the model with "
                         "device cpu and dtype float32")
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    source = model.embed.weight if model.lm_head is None else model.lm_head.weight
    head.weight = nn.Parameter(source.detach(), requires_grad=False)
    model.lm_head = head
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model
