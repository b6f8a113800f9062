"""Building blocks shared by the model families (lm/models/): projections, RMSNorm, rotary position
embeddings, attention and the gated MLP. Module and parameter names are Hugging Face's, so a family's
network loads a checkpoint by a strict key-set and shape check, with no rename table.

Numerics follow the reference implementations in `transformers` (noted per block); every block takes
and returns the model dtype, with norms and RoPE tables computed in fp32. On the CPU, float32 inputs of
a few rows (decoding) take lm.layers.fused's kernels for the norms, the residual adds between them and
the q/k norm with RoPE: the same arithmetic in one call instead of a dozen ATen calls.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.layers import fused


SMALL_WEIGHT = 1 << 18  # elements (1 MiB in fp32): below this `linear` is F.linear itself


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight (out, in)^T (+ bias (out,)), as F.linear computes it.

    On the CPU a weight of more than SMALL_WEIGHT elements is multiplied as (weight @ x^T)^T over at
    least two rows: for the few rows of decoding, MKL runs that layout about twice as fast as
    F.linear's (measured on the 2-core dev machine: the 270M's projections for one row 23.5 -> 11.9 ms,
    its 262,144-row tied head 43 -> 17.5 ms; the same speed at 512 rows). A smaller weight goes to
    F.linear, whose single call costs less than the reshapes (the 64-wide test models' projections
    at 1 to 512 rows: 6-19 against 18-29 us a call)."""
    if x.device.type != "cpu" or weight.numel() <= SMALL_WEIGHT:
        return F.linear(x, weight, bias)
    return linear_transposed(x, weight, bias)


def linear_transposed(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear`'s layout for a large weight on the CPU: (weight @ x^T)^T, over two rows when x has one."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    rows = flat.shape[0]
    if rows == 1:
        flat = torch.cat([flat, flat])  # (2, in): one row would take the slow GEMV path
    out = (weight @ flat.T).T[:rows]  # (N, out)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (bias off unless asked for), through `linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in fp32.

    offset=True (Gemma): x / rms(x) * (1 + w) in fp32, then cast to the input dtype; w starts at 0.
    offset=False (Qwen, Llama): (x / rms(x)) cast to the input dtype, then * w; w starts at 1.
    (transformers Gemma3RMSNorm and Qwen3RMSNorm; the two differ only in where the cast falls.)"""

    def __init__(self, dim: int, eps: float, *, offset: bool) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if fused.usable(x, self.weight) and self.weight.shape == x.shape[-1:]:  # few float32 rows on the CPU
            return fused.rms_norm(x, self.weight, self.eps, self.offset)
        if self.offset:  # one fused kernel: x * rsqrt(mean(x^2) + eps) * (1 + w), all in fp32
            factor = 1.0 + self.weight.float()
            if x.dtype == torch.float32:  # no casts
                return F.rms_norm(x, (x.shape[-1],), factor, self.eps)
            return F.rms_norm(x.float(), (x.shape[-1],), factor, self.eps).type_as(x)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def add_norm(residual: Tensor, branch: Tensor, branch_norm: RMSNorm | None,
             norm: RMSNorm | None) -> tuple[Tensor, Tensor | None]:
    """(s, norm(s)) with s = residual + branch_norm(branch) (the branch as it is when branch_norm is None;
    norm(s) None when norm is None): a residual add between a block's norms (Gemma's post-norm of the
    branch, then the next pre-norm; Qwen's add, then the next pre-norm), in one call where
    lm.layers.fused takes the tensors. residual, branch (..., hidden), the model dtype."""
    branch_weight = None if branch_norm is None else branch_norm.weight  # each module lookup costs ~0.5 us
    weight = None if norm is None else norm.weight
    weights = [w for w in (branch_weight, weight) if w is not None]
    first = norm if branch_norm is None else branch_norm
    if weights and residual.shape == branch.shape and all(w.shape == residual.shape[-1:] for w in weights) \
            and fused.usable(residual, branch, *weights) \
            and (norm is None or (norm.eps, norm.offset) == (first.eps, first.offset)):
        return fused.add_rms_norm(residual, branch, branch_weight, weight, first.eps, first.offset)
    summed = residual + (branch if branch_norm is None else branch_norm(branch))
    return summed, (None if norm is None else norm(summed))


# ----- rotary position embeddings -------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[Tensor, float]:
    """(inv_freq (head_dim / 2,) fp32, attention factor) of RoPE with base `theta` and an optional
    `rope_scaling` / `rope_parameters` dict from config.json: none or type "default"; "linear"
    (frequencies / factor, i.e. positions / factor); "yarn" (YaRN, arXiv:2309.00071: per-frequency
    blend of interpolated and original frequencies between beta_fast and beta_slow rotations, and
    cos/sin scaled by 0.1 ln(factor) + 1), as transformers' `ROPE_INIT_FUNCTIONS` computes them.
    Computed on the CPU like the reference, whatever device the model runs on. Raises ValueError on
    another type or a missing parameter."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"RoPE type {kind!r} is not supported; allowed: default, linear, yarn")


def _yarn(inv_freq: Tensor, head_dim: int, theta: float, scaling: dict) -> tuple[Tensor, float]:
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise ValueError("YaRN RoPE scaling needs original_max_position_embeddings")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dimension(rotations: float) -> float:  # the dimension index making `rotations` turns in `original`
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency; 0: interpolate (divide by factor)
    blended = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return blended, float(attention_factor)


class RotaryFrequencies(nn.Module):
    """fp32 RoPE inverse frequencies of one RoPE kind (rope_inv_freq's arguments). They follow the model
    across devices but never take its dtype: `model.to(torch.bfloat16)` would otherwise round them and
    shift every angle. Not a weight (never saved or loaded)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.spec = (head_dim, theta, scaling)
        inv_freq, self.attention_factor = rope_inv_freq(*self.spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        device = fn(self.inv_freq).device  # where the model is going; the dtype is ignored
        self.inv_freq = rope_inv_freq(*self.spec)[0].to(device)
        return self

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, head_dim) in `dtype` for absolute positions (B, T), computed in fp32."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, head_dim) by tables (B, T, head_dim), rotate-half convention."""
    return rotate(x, cos[:, None], sin[:, None])  # tables (B, 1, T, head_dim)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin over the last dimension (head_dim), tables broadcast to x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ----- attention and MLP ----------------------------------------------------------------------------

def run_decoder(layers: nn.ModuleList, x: Tensor, final_norm: RMSNorm, tables, attention) -> Tensor:
    """final_norm(x) after every layer of a pre-norm decoder, x (B, T, hidden). Each layer has an
    `input_layernorm`, `step(x, normed, cos, sin, attention, next_norm) -> (x, next_norm(x))`, taking
    its input already normed, and `decode_parts()` (see `decode_stack`); `tables(layer)` gives its RoPE
    (cos, sin). A layer's closing residual add and the norm after it (the next layer's input norm; the
    final norm after the last layer) are one call (`add_norm`): the same values as the layers' `forward`
    followed by the final norm. A step of decode rows may run its layers in one call (`decode_stack`).
    The layers are not called as modules, so forward hooks registered on a decoder layer or on its input
    norm do not run (hooks on the projections inside do, except in `decode_stack`)."""
    if not len(layers):
        return final_norm(x)
    normed = layers[0].input_layernorm(x)
    stacked = decode_stack(layers, x, normed, final_norm, tables, attention)
    if stacked is not None:
        return stacked
    following = [layer.input_layernorm for layer in list(layers)[1:]] + [final_norm]  # (a slice: a new ModuleList)
    for layer, next_norm in zip(layers, following):
        x, normed = layer.step(x, normed, *tables(layer), attention, next_norm)
    return normed


def decode_stack(layers: nn.ModuleList, x: Tensor, normed: Tensor, final_norm: RMSNorm, tables,
                 attention) -> Tensor | None:
    """`run_decoder`'s result for a step of decode rows, given normed = the first layer's input norm of x,
    with each run of consecutive layers that can take it in one numba call (lm.layers.fused.DecodeStack)
    and any other layer module by module; None where no layer can take it (then `run_decoder` runs every
    layer module by module). The values are the module path's but for the gated MLP's activation
    (fused.gated_activation's rather than ATen's, within 2 ulp of it).

    Each layer's `decode_parts()` gives (input norm, attention, gated MLP, n_a, mlp_norm, n_m), or None
    where the layer cannot take the call (a MoE layer): the layer is s = x + n_a(attention(normed)),
    t = s + n_m(mlp(mlp_norm(s))), with n_a and n_m Gemma 3's branch post-norms or None (Qwen). A layer
    takes the call where its four projections (fused q/k/v, o, fused gate/up, down) take
    lm.matvec.int8_matvec at this many rows (int8-dynamic, Int8DynamicLinear.matvec_rows) and its norms
    and the norm after it (the next layer's input norm, or the final norm) share eps and offset; the step
    must be decode rows only on a float32 CPU cache read in place (the context's `decode_rows_step`,
    checked before the operands so that a prompt step pays nothing here, and `decode_stack_arrays`), x
    float32 on the CPU. Forward hooks on the projections and norms do not run on this path. The operands
    are prepared on the first step and kept (`_stack_kernels`) while the modules, kernels and weights
    they were made from stay the same objects."""
    stack_arrays = getattr(attention, "decode_stack_arrays", None)
    if stack_arrays is None or not attention.decode_rows_step or x.dtype is not torch.float32 or not x.is_cpu \
            or x.dim() != 3 or x.shape[0] != 1 \
            or normed.shape != x.shape or normed.dtype is not torch.float32 or not normed.is_cpu \
            or (torch.is_grad_enabled() and (x.requires_grad or normed.requires_grad)):
        return None
    rows, hidden = x.shape[1], x.shape[2]
    segments, following = _stack_kernels(layers, final_norm)
    # the module path would take ATen's kernels above FUSED_MAX_ELEMENTS (fused.usable): keep its values
    fits = [segment.stack is not None and 0 < rows <= segment.matvec_rows
            and rows * max(hidden, segment.qkv_width) <= fused.FUSED_MAX_ELEMENTS for segment in segments]
    if not any(fits):
        return None
    layer_tables = [tables(layer) for layer in layers]
    for segment, fit in zip(segments, fits):
        arrays = None
        if fit and all(cos.shape == (1, rows, segment.head_dim) and sin.shape == cos.shape
                       and cos.dtype == sin.dtype == torch.float32 and cos.is_cpu and sin.is_cpu
                       for cos, sin in layer_tables[segment.start:segment.stop]):
            arrays = stack_arrays(segment.layer_ids, layer_tables[segment.start:segment.stop])
        if arrays is not None:
            x, normed = segment.stack(x if x.is_contiguous() else x.contiguous(),
                                      normed if normed.is_contiguous() else normed.contiguous(), *arrays)
            continue
        for i in range(segment.start, segment.stop):
            x, normed = layers[i].step(x, normed, *layer_tables[i], attention, following[i])
    return normed


@dataclass(frozen=True)
class _Segment:
    """Layers [start, stop) of a decoder: one DecodeStack call for all of them (`stack`), or module by
    module (`stack` None); the most rows every projection of the run takes int8_matvec at, the widest
    q/k/v, the attention layer ids, head_dim."""

    start: int
    stop: int
    stack: "fused.DecodeStack | None" = None
    matvec_rows: int = 0
    qkv_width: int = 0
    layer_ids: tuple[int, ...] = ()
    head_dim: int = 0


# decode_stack's operands per decoder (its ModuleList): (the identities they were made from, the segments).
# Weak keys: a model that is dropped drops its entry.
_STACK_KERNELS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _stack_kernels(layers: nn.ModuleList, final_norm: RMSNorm) -> tuple[list[_Segment], list[RMSNorm]]:
    """(decode_stack's segments of `layers`, the norm after each layer), the segments made again when
    any layer's projection, int8_matvec operand, norm or norm weight is another object (or at another
    address), or a norm's eps/offset or an attention's layer id, scale or head counts differ from when
    they were made."""
    parts = [layer.decode_parts() for layer in layers]
    following = [None if part is None else part[0] for part in parts[1:]] + [final_norm]
    if None in following[:-1]:  # a layer without parts: its input norm is read as a module attribute
        following = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
    parts = [None if part is None else part[1:] for part in parts]
    identity = tuple(None if part is None else _layer_identity(*part, next_norm)
                     for part, next_norm in zip(parts, following))
    entry = _STACK_KERNELS.get(layers)
    if entry is None or entry[0] != identity:
        entry = (identity, _make_segments(parts, following))
        _STACK_KERNELS[layers] = entry
    return entry[1], following


def _layer_identity(attention_module: "Attention", mlp: "GatedMLP", *norms: RMSNorm | None) -> tuple:
    modules = attention_module._modules  # read from the dicts: nn.Module's attribute lookup costs ~0.5 us
    identity = [id(mlp), id(mlp.act), *map(id, norms)]
    for projection in (modules.get("qkv_proj"), modules.get("o_proj"), mlp._modules.get("gate_up_proj"),
                       mlp._modules.get("down_proj")):
        rows = getattr(projection, "_rows", None)
        identity += (id(projection), id(rows), id(getattr(rows, "_weight", None)), getattr(projection, "matvec_rows", 0))
    every_norm = [norm for norm in (*norms, modules.get("q_norm"), modules.get("k_norm")) if norm is not None]
    identity += (weight.data_ptr() for weight in (norm._parameters["weight"] for norm in every_norm))
    identity += [(norm.eps, norm.offset) for norm in every_norm]  # read once into the operands: compared too
    identity.append((attention_module.layer_idx, attention_module.scale, attention_module.num_heads,
                     attention_module.num_kv_heads, attention_module.head_dim))
    return tuple(identity)


def _make_segments(parts: list[tuple | None], following: list[RMSNorm]) -> list[_Segment]:
    """Runs of consecutive layers whose operands can be made (`_layer_operands`) and that share head_dim,
    each one DecodeStack; the other layers in module-by-module segments."""
    segments: list[_Segment] = []
    run: list[tuple] = []  # (layer index, operands, matvec rows, q/k/v width, layer id, head_dim)

    def close() -> None:
        if run:
            segments.append(_Segment(run[0][0], run[-1][0] + 1, fused.DecodeStack([r[1] for r in run]),
                                     min(r[2] for r in run), max(r[3] for r in run), tuple(r[4] for r in run),
                                     run[0][5]))
            run.clear()

    for i, (part, next_norm) in enumerate(zip(parts, following)):
        layer = None if part is None else _layer_operands(*part, next_norm)
        if layer is None:
            close()
            if segments and segments[-1].stack is None and segments[-1].stop == i:
                segments[-1] = _Segment(segments[-1].start, i + 1)
            else:
                segments.append(_Segment(i, i + 1))
            continue
        if run and run[-1][5] != layer[4]:  # another head_dim: the RoPE tables are stacked per call
            close()
        run.append((i, *layer))
    close()
    return segments


def _layer_operands(attention_module: "Attention", mlp: "GatedMLP", attention_norm: RMSNorm | None, mlp_norm: RMSNorm,
                    mlp_branch_norm: RMSNorm | None, next_norm: RMSNorm) -> tuple | None:
    """(fused.layer_operands, matvec rows, q/k/v width, layer id, head_dim) of one layer, or None where
    it cannot take DecodeStack."""
    modules, mlp_modules = attention_module._modules, mlp._modules
    projections = (modules.get("qkv_proj"), modules.get("o_proj"), mlp_modules.get("gate_up_proj"),
                   mlp_modules.get("down_proj"))
    kernels = [getattr(projection, "_rows", None) for projection in projections]
    norms = [norm for norm in (attention_norm, mlp_norm, mlp_branch_norm, next_norm) if norm is not None]
    q_norm, k_norm = attention_module.q_norm, attention_module.k_norm
    weights = [norm.weight for norm in (*norms, q_norm, k_norm) if norm is not None]
    activation = {id(ACTIVATIONS["gelu_pytorch_tanh"]): fused.GELU_TANH, id(ACTIVATIONS["silu"]): fused.SILU}.get(
        id(mlp.act))
    eps_offset = (next_norm.eps, next_norm.offset)
    if any(kernel is None for kernel in kernels) or activation is None \
            or any((norm.eps, norm.offset) != eps_offset for norm in norms) \
            or any(weight.dtype != torch.float32 or weight.device.type != "cpu" for weight in weights):
        return None
    qk = (None, None, 0.0, False) if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps, q_norm.offset)
    operands = fused.layer_operands(
        kernels[0], attention_module.num_heads, attention_module.num_kv_heads, *qk, attention_module.scale, kernels[1],
        kernels[2], activation, kernels[3], None if attention_norm is None else attention_norm.weight, mlp_norm.weight,
        None if mlp_branch_norm is None else mlp_branch_norm.weight, next_norm.weight, *eps_offset)
    width = (attention_module.num_heads + 2 * attention_module.num_kv_heads) * attention_module.head_dim
    return (operands, min(projection.matvec_rows for projection in projections), width, attention_module.layer_idx,
            attention_module.head_dim)


class Attention(nn.Module):
    """Grouped-query self-attention: q/k/v projections (bias optional: Qwen 2), an optional per-head
    RMSNorm of q and k before RoPE (Gemma 3, Qwen 3), RoPE, then the AttentionContext's scaled dot-product
    attention for `layer_idx` (which keys, the cache and the mask are its business) and o_proj."""

    def __init__(self, layer_idx: int, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, qkv_bias: bool = False, qk_norm_eps: float | None = None,
                 norm_offset: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = Linear(hidden_size, q_width, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, kv_width, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, kv_width, bias=qkv_bias)
        self.o_proj = Linear(q_width, hidden_size)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, offset=norm_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, offset=norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_proj: nn.Module | None = None  # fuse_projections() replaces q/k/v_proj with it

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one `qkv_proj` (out = q_width + 2 * kv_width rows: q's,
        then k's, then v's) holding the same weights: one matmul per step instead of three, as vLLM's
        QKVParallelLinear. Called after the checkpoint is loaded (its names are the three); each output
        is the same dot product as before, and quantisation per output channel or per input group
        (lm.quantize) gives each row the scales it had alone."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = _fused_linear(parts)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention) -> Tensor:
        """x (B, T, hidden), cos/sin (B, T, head_dim), attention: lm.attention.AttentionContext."""
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:  # q and k normed and rotated together (the same ops, half the calls)
            qkv = self.qkv_proj(x).reshape(batch, length, heads + 2 * kv_heads, head_dim)
            norms = () if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            fusable = fused.usable(qkv, cos, sin, *norms) and cos.shape == sin.shape == (batch, length, head_dim) \
                and all(w.shape == (head_dim,) for w in norms)  # norm and rotation in one call (lm.layers.fused)
            if fusable:
                norm_args = (*(norms or (None, None)), self.q_norm.eps if norms else 0.0,
                             bool(norms) and self.q_norm.offset)
                # A context may take the whole step from here (the paged cache's decode rows: norm, rotation,
                # cache write and attention in one call); None where it does not.
                decode_rows = getattr(attention, "attend_decode_rows", None)
                out = None if decode_rows is None else decode_rows(self.layer_idx, qkv, heads, kv_heads, *norm_args,
                                                                    cos, sin, self.scale)
                if out is not None:  # (B, T, H * D)
                    return self.o_proj(out)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]  # (B, T, H + KV, D), (B, T, KV, D)
            if fusable:
                qk = fused.qk_norm_rope(qkv, heads, kv_heads, *norm_args, cos, sin)
            else:
                if self.q_norm is not None:
                    qk = self._qk_norm(qk)
                qk = rotate(qk, cos[:, :, None], sin[:, :, None])
            q, k, v = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)
        else:
            q = self.q_proj(x).reshape(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(x).reshape(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
            v = self.v_proj(x).reshape(batch, length, kv_heads, head_dim).transpose(1, 2)  # (B, KV, T, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention.attend(self.layer_idx, q, k, v, self.scale)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))

    def _qk_norm(self, qk: Tensor) -> Tensor:
        """q_norm over the first num_heads heads of qk (B, T, H + KV, D) and k_norm over the rest, in one
        norm and one multiply by the two weights stacked per head (the same arithmetic as RMSNorm's:
        F.rms_norm with a weight is the norm times the weight, bit for bit)."""
        eps, dim = self.q_norm.eps, self.head_dim
        if self.q_norm.offset:
            factors = self._stacked(1.0 + self.q_norm.weight.float(), 1.0 + self.k_norm.weight.float())  # fp32
            return (F.rms_norm(qk.float(), (dim,), None, eps) * factors).type_as(qk)
        weights = self._stacked(self.q_norm.weight, self.k_norm.weight)
        return weights * F.rms_norm(qk.float(), (dim,), None, eps).to(qk.dtype)

    def _stacked(self, q: Tensor, k: Tensor) -> Tensor:
        """(H + KV, D): q's multiplier (D,) repeated per query head, then k's per key head."""
        return torch.cat([q.expand(self.num_heads, -1), k.expand(self.num_kv_heads, -1)])


ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma 3: GeGLU
    "silu": F.silu,  # Qwen, Llama: SwiGLU
}


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)); `activation` is config.json's name (ACTIVATIONS);
    `linear` the projection class (Linear, or nn.Linear for MoE experts: lm.layers.moe.Expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, linear=Linear) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP activation {activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.gate_proj = linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # fuse_projections() replaces gate/up_proj with it

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one `gate_up_proj` (gate's rows, then up's), as
        Attention.fuse_projections does for q, k and v (vLLM's MergedColumnParallelLinear)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _fused_linear((self.gate_proj, self.up_proj))
            del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


def _fused_linear(parts) -> nn.Module:
    """One projection of the same class as `parts` (Linear or nn.Linear, same input size) whose output
    is theirs concatenated in order; biases concatenated too (all or none have one)."""
    weight = torch.cat([part.weight.detach() for part in parts])  # (sum of outs, in)
    has_bias = parts[0].bias is not None
    with torch.device("meta"):  # no initialisation: the weights are the parts'
        fused = type(parts[0])(weight.shape[1], weight.shape[0], bias=has_bias)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([part.bias.detach() for part in parts]), requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every block's projections that read the same input (Attention's q/k/v, the gated MLPs'
    gate/up, MoE experts' gate/up) in place, after loading; returns `model`."""
    for module in list(model.modules()):
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    return model
