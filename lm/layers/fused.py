"""Fused CPU kernels (numba) for the element-wise work between a decoder layer's matrix products.

At the few rows of a decode step every RMSNorm, residual add, q/k norm and rotation is a handful of
ATen calls on a few thousand numbers, each costing microseconds of dispatch: ~90 norms and ~36 adds a
step on the 270M (18 layers), where the arithmetic itself takes well under a microsecond. Each kernel
here does one such group of calls in one pass, on float32 CPU tensors of at most FUSED_MAX_ELEMENTS
(above that ATen's multi-threaded kernels win, and they are used): a norm; a residual add with the norms
around it; the q/k norm with RoPE; and for decode rows, attention over the paged cache read in place,
alone or together with the q/k norm, RoPE and the cache write before it. The arithmetic is the
reference's, operation by operation in float32 (transformers Gemma3RMSNorm / Qwen3RMSNorm,
apply_rotary_pos_emb), except that the sum of squares of a norm is accumulated in float64 before its
mean is rounded to float32 (ATen sums in float32 lanes; both round the same exact mean, to within an
ulp), and that attention's sums may be reassociated. Where float32's sum of squares would overflow and
its mean would not (|x| around 1e18 to 1e19 at 640 wide) the norm stays finite, where ATen's (and the
reference's) rsqrt(inf) gives 0. The gated MLP's activation stays ATen's everywhere but in the
int8-dynamic decode step (`DecodeStack`: a run of layers in one call), which computes it with
`gated_activation`: e^x from a polynomial and a built exponent so that the loop vectorises (numba's own
tanh and exp are scalar libm calls, 34 us for the 270M's 2,048 values a row, against ~3 us here and ~10
for ATen's), within 2 ulp of ATen's value or of the absolute error both make where 1 + tanh cancels.

`usable` decides per call; the callers (lm.layers) keep the ATen path for everything else: CUDA, other
dtypes, large inputs, inputs that would broadcast (the kernels take exact shapes and check none: the
callers do), and autograd (the kernels are inference only).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, typed
from torch import Tensor

from lm.matvec import _part_bounds, _quantize_rows, _rows as _matvec_rows, _split, thread_parts

FUSED_MAX_ELEMENTS = 1 << 16  # per input: beyond this ATen's 2-thread kernels are faster (2-core dev machine)


def usable(*tensors: Tensor) -> bool:
    """Whether the fused kernels may take these tensors: float32, on the CPU, 1 to FUSED_MAX_ELEMENTS
    elements each, and no autograd graph to record. (Shapes are the caller's to check.)"""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    for t in tensors:  # a plain loop: this check runs several times per layer and step
        if t.dtype is not torch.float32 or not t.is_cpu or not 0 < t.numel() <= FUSED_MAX_ELEMENTS:
            return False
    return True


def reads_in_place(q: Tensor, keys: Tensor) -> bool:
    """Whether `decode_attention` may take queries q and a paged cache of `keys`: both float32 on the
    CPU, no autograd graph to record. Of any size: the decode rows are taken out of q, whatever else the
    step holds, so a row's attention does not depend on what it is batched with."""
    return not (torch.is_grad_enabled() and q.requires_grad) and q.dtype == keys.dtype == torch.float32 \
        and q.device.type == keys.device.type == "cpu"


def _rows(x: Tensor) -> np.ndarray:
    """x (..., D) as a C-contiguous float32 (N, D) array sharing x's memory where x is contiguous."""
    return (x if x.is_contiguous() else x.contiguous()).detach().numpy().reshape(-1, x.shape[-1])


def _empty(x: Tensor) -> Tensor:
    """A new contiguous float32 tensor of x's shape."""
    return torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: bool) -> Tensor:
    """x / rms(x) * (1 + weight) (offset) or * weight, over the last dimension; x (..., D), weight (D,),
    float32 CPU (check with `usable`). Returns a new (..., D) tensor."""
    out = _empty(x)
    _rms_norm(_rows(x), weight.detach().numpy(), offset, np.float32(eps), _rows(out))
    return out


def add_rms_norm(residual: Tensor, branch: Tensor, branch_weight: Tensor | None, weight: Tensor | None, eps: float,
                 offset: bool) -> tuple[Tensor, Tensor | None]:
    """(s, norm(s)) with s = residual + norm_b(branch): norm_b the RMSNorm of `branch_weight` (None: the
    branch as it is), norm that of `weight` (None: not computed, returned as None); both norms with `eps`
    and `offset` (see rms_norm). residual, branch (..., D) float32 CPU (check with `usable`)."""
    summed = _empty(residual)
    normed = _empty(residual) if weight is not None else summed
    empty = np.empty(0, np.float32)
    _add_rms_norm(_rows(residual), _rows(branch), empty if branch_weight is None else branch_weight.detach().numpy(),
                  branch_weight is not None, empty if weight is None else weight.detach().numpy(), weight is not None,
                  offset, np.float32(eps), _rows(summed), _rows(normed))
    return summed, (normed if weight is not None else None)


def qk_norm_rope(qkv: Tensor, heads: int, kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None,
                 eps: float, offset: bool, cos: Tensor, sin: Tensor) -> Tensor:
    """Per-head RMSNorm of q (q_weight) and k (k_weight) when given, then RoPE (rotate-half convention),
    of a fused projection's output. qkv (B, T, heads + 2 * kv_heads, D): q's heads, then k's, then v's;
    cos, sin exactly (B, T, D) (no broadcasting), weights (D,). Returns (B, T, heads + kv_heads, D): q's
    heads, then k's (v is left in qkv)."""
    batch, length, width, dim = qkv.shape
    out = torch.empty(batch, length, heads + kv_heads, dim, dtype=torch.float32)
    empty = np.empty(0, np.float32)
    norm = q_weight is not None
    _qk_norm_rope(qkv.detach().contiguous().view(-1, width, dim).numpy(), heads + kv_heads, heads,
                  q_weight.detach().numpy() if norm else empty, k_weight.detach().numpy() if norm else empty, norm,
                  offset, np.float32(eps), _rows(cos), _rows(sin), out.view(-1, heads + kv_heads, dim).numpy())
    return out


def decode_rows_attention(qkv: Tensor, heads: int, kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None,
                          eps: float, offset: bool, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                          slots: Tensor, blocks: Tensor, start: Tensor, length: Tensor, scale: float) -> Tensor:
    """A decode step's attention between its two projections, in one call: `qk_norm_rope`, the cache
    write, then `decode_attention`, with the same arithmetic as those calls made one after another.

    qkv (N, heads + 2 * kv_heads, D): a fused projection's output, one token per row; cos, sin (N, D);
    weights (D,) or None (no q/k norm). Each row's k and v are written to the paged cache keys, values
    (num_blocks, block_size, kv_heads, D) at its slot (slots (N,) int64, block * block_size + offset,
    distinct), then its q attends over positions start[r] .. start[r] + length[r] - 1 of its blocks
    (blocks (N, nb), start, length (N,) int64, as `decode_attention` reads them), its new key included.
    Returns (N, heads * D). All float32 on the CPU; cos, sin, the cache and the indices contiguous, as
    tensors or as numpy arrays of their memory. Shapes are not checked (the caller's)."""
    rows, width, dim = qkv.shape
    out = torch.empty(rows, heads * dim, dtype=torch.float32)
    empty = np.empty(0, np.float32)
    norm = q_weight is not None
    _decode_rows_attention(_rows(qkv).reshape(rows, width, dim), heads, kv_heads,
                           q_weight.detach().numpy() if norm else empty, k_weight.detach().numpy() if norm else empty,
                           norm, offset, np.float32(eps), *(_array(t) for t in (cos, sin, keys, values, slots, blocks,
                                                                                start, length)),
                           np.float32(scale), out.view(rows, heads, dim).numpy())
    return out


def _array(x: Tensor | np.ndarray) -> np.ndarray:
    """A contiguous tensor's memory as a numpy array; an array as it is (a caller converting once per
    step passes arrays: lm.engine.model_runner)."""
    return x if isinstance(x, np.ndarray) else x.detach().numpy()


def compile_fused_kernels() -> None:
    """Compile (or load from numba's on-disk cache) every kernel now rather than in a first step."""
    x = torch.ones(1, 1, 2, 4)
    w = torch.ones(4)
    rms_norm(x, w, 1e-6, True)
    add_rms_norm(x, x, w, w, 1e-6, True)
    add_rms_norm(x, x, None, None, 1e-6, False)
    qk_norm_rope(torch.ones(1, 1, 3, 4), 1, 1, w, w, 1e-6, True, torch.ones(1, 1, 4), torch.ones(1, 1, 4))
    qk_norm_rope(torch.ones(1, 1, 3, 4), 1, 1, None, None, 1e-6, False, torch.ones(1, 1, 4), torch.ones(1, 1, 4))
    one = torch.ones(1, dtype=torch.int64)
    decode_attention(torch.ones(1, 2, 4), x, x, one[:, None] - 1, one - 1, one, 1.0)  # x: 1 block of 1 x 2 x 4
    cache = torch.zeros(1, 1, 1, 4)
    for weights in ((w, w), (None, None)):
        decode_rows_attention(torch.ones(1, 3, 4), 1, 1, *weights, 1e-6, True, torch.ones(1, 4), torch.ones(1, 4),
                              cache, cache.clone(), one - 1, one[:, None] - 1, one - 1, one, 1.0)
    from lm.matvec import Int8Rows  # the int8-dynamic decode step's layers (lm.layers.decode_stack)

    def rows(out_features, in_features):
        return Int8Rows(torch.ones(out_features, in_features, dtype=torch.int8), torch.ones(out_features),
                        inv_smoothing=torch.ones(in_features))
    # one call compiles it: absent weights, smoothing and biases are empty arrays of the same types
    stack = DecodeStack([layer_operands(rows(12, 4), 1, 1, w, w, 1e-6, True, 1.0, rows(4, 4), rows(8, 4), GELU_TANH,
                                        rows(4, 4), w, w, w, w, 1e-6, True)])
    caches = typed.List([(cache.numpy(), cache.clone().numpy())])
    index = np.zeros((1, 1), np.int64)
    stack(torch.ones(1, 1, 4), torch.ones(1, 1, 4), caches, index[0], index[0], np.ones((1, 1, 4), np.float32),
          np.ones((1, 1, 4), np.float32), index, index[:, :, None], index, index + 1)
    gated_activation(torch.ones(1, 4), torch.ones(1, 4), SILU)
    rows(4, 4).argmax(torch.ones(1, 4))  # an int8 head's greedy tokens (lm.quantize.Int8DynamicLinear.greedy)


@njit(nogil=True, cache=True)
def _inverse_rms(x, eps):
    """1 / sqrt(mean(x^2) + eps) of a float32 row, the mean rounded to float32 as the reference's is."""
    total = 0.0
    for j in range(x.shape[0]):
        value = np.float64(x[j])
        total += value * value
    mean = np.float32(total / x.shape[0])
    return np.float32(1.0) / np.sqrt(mean + eps)


@njit(nogil=True, cache=True)
def _normalize(x, weight, offset, eps, out):
    """out = (x * rsqrt(mean(x^2) + eps)) * factor, factor = 1 + weight (offset) or weight."""
    inverse = _inverse_rms(x, eps)
    for j in range(x.shape[0]):
        factor = np.float32(1.0) + weight[j] if offset else weight[j]
        out[j] = (x[j] * inverse) * factor


@njit(nogil=True, cache=True)
def _rms_norm(x, weight, offset, eps, out):
    for i in range(x.shape[0]):
        _normalize(x[i], weight, offset, eps, out[i])


@njit(nogil=True, cache=True)
def _add_rms_norm(residual, branch, branch_weight, branch_norm, weight, norm, offset, eps, summed, normed):
    for i in range(residual.shape[0]):
        if branch_norm:
            _normalize(branch[i], branch_weight, offset, eps, summed[i])
            for j in range(residual.shape[1]):
                summed[i, j] = residual[i, j] + summed[i, j]
        else:
            for j in range(residual.shape[1]):
                summed[i, j] = residual[i, j] + branch[i, j]
        if norm:
            _normalize(summed[i], weight, offset, eps, normed[i])


@njit(nogil=True, cache=True)
def _qk_norm_rope(qkv, count, heads, q_weight, k_weight, norm, offset, eps, cos, sin, out):
    """qkv (N, width, D); the first `count` heads (q's `heads`, then k's) normed and rotated into out
    (N, count, D); cos, sin (N, D)."""
    half = qkv.shape[2] // 2
    for n in range(qkv.shape[0]):
        for h in range(count):
            row = out[n, h]
            if norm:
                _normalize(qkv[n, h], q_weight if h < heads else k_weight, offset, eps, row)
            else:
                row[:] = qkv[n, h]
            for j in range(half):  # rotate_half(x) = (-x[half:], x[:half]), a pair at a time (no copy)
                low, high = row[j], row[j + half]
                row[j] = low * cos[n, j] + (-high) * sin[n, j]
                row[j + half] = high * cos[n, j + half] + low * sin[n, j + half]


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, blocks: Tensor, start: Tensor, length: Tensor,
                     scale: float) -> Tensor:
    """Attention of R one-token queries over their own keys in the paged cache, read in place (no gather).

    q (R, H, D) float32; keys, values (num_blocks, block_size, KV, D) float32, H a multiple of KV (query
    head h reads key head h // (H / KV)); blocks (R, nb) int64 block ids; start, length (R,) int64: row r
    reads positions start[r] .. start[r] + length[r] - 1 of the concatenation of its blocks (length >= 1).
    Returns (R, H, D) float32: softmax(scale * q k^T) v per row and head, the weighted sum of values
    multiplied by 1 / (sum of weights). The dot products and sums may be reassociated (vectorised).
    Shapes are not checked (numba does not bound-check): the caller passes consistent ones."""
    out = torch.empty(q.shape, dtype=torch.float32)
    _decode_attention(q.detach().contiguous().numpy(), keys.numpy(), values.numpy(), blocks.numpy(),
                      start.numpy(), length.numpy(), np.float32(scale), out.numpy())
    return out


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _decode_attention(q, keys, values, blocks, start, length, scale, out):
    rows, heads, dim = q.shape
    size, kv_heads = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    for r in range(rows):
        n = length[r]
        scores = np.empty((heads, n), np.float32)
        for p in range(n):
            position = start[r] + p
            block, offset = blocks[r, position // size], position % size
            for h in range(heads):
                key = keys[block, offset, h // group]
                total = np.float32(0.0)
                for d in range(dim):
                    total += q[r, h, d] * key[d]
                scores[h, p] = total * scale
        for h in range(heads):
            largest = scores[h, 0]
            for p in range(1, n):
                if scores[h, p] > largest:
                    largest = scores[h, p]
            total = np.float32(0.0)
            for p in range(n):
                weight = np.exp(scores[h, p] - largest)
                scores[h, p] = weight
                total += weight
            accumulator = out[r, h]
            accumulator[:] = 0.0
            for p in range(n):
                position = start[r] + p
                value = values[blocks[r, position // size], position % size, h // group]
                weight = scores[h, p]
                for d in range(dim):
                    accumulator[d] += weight * value[d]
            inverse = np.float32(1.0) / total
            for d in range(dim):
                accumulator[d] *= inverse


@njit(nogil=True, cache=True)
def _decode_rows_attention(qkv, heads, kv_heads, q_weight, k_weight, norm, offset, eps, cos, sin, keys, values, slots,
                           blocks, start, length, scale, out):
    count = heads + kv_heads
    rows, dim = qkv.shape[0], qkv.shape[2]
    qk = np.empty((rows, count, dim), np.float32)
    _qk_norm_rope(qkv, count, heads, q_weight, k_weight, norm, offset, eps, cos, sin, qk)
    size = keys.shape[1]
    for r in range(rows):  # every row's key and value first, as the separate calls do
        block, position = slots[r] // size, slots[r] % size
        for h in range(kv_heads):
            keys[block, position, h] = qk[r, heads + h]
            values[block, position, h] = qkv[r, count + h]
    # q contiguous, as `decode_attention` passes it: the same compiled kernel, so the same roundings
    _decode_attention(np.ascontiguousarray(qk[:, :heads]), keys, values, blocks, start, length, scale, out)


GELU_TANH, SILU = 0, 1  # the gated MLP activations `DecodeStack` computes (config.json's gelu_pytorch_tanh, silu)


def layer_operands(qkv_proj, heads: int, kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None,
                   qk_eps: float, qk_offset: bool, scale: float, o_proj, gate_up_proj, activation: int, down_proj,
                   attention_weight: Tensor | None, mlp_weight: Tensor, mlp_branch_weight: Tensor | None,
                   next_weight: Tensor, eps: float, offset: bool) -> tuple:
    """One decoder layer's operands for `DecodeStack`: the four projections' lm.matvec.Int8Rows (fused
    q/k/v, o, fused gate/up, down), the attention's head counts, q/k norm (weights (head_dim,) float32 or
    None, eps, offset) and scale, the gated MLP's activation (GELU_TANH or SILU), and the norms' float32
    weights (hidden,): the attention branch's and the MLP branch's (each optional), the MLP's input norm,
    and the norm after the layer (the next layer's input norm, the final norm after the last), all four
    sharing `eps` and `offset`. The arrays share the tensors' memory. Raises ValueError for another
    activation."""
    empty = np.empty(0, np.float32)

    def array(weight):  # a norm's weight as a float32 numpy view (empty for none)
        return empty if weight is None else weight.detach().numpy()

    if activation not in (GELU_TANH, SILU):
        raise ValueError(f"activation {activation!r}: GELU_TANH ({GELU_TANH}) or SILU ({SILU})")
    return (*qkv_proj.arrays, heads, kv_heads, array(q_weight), array(k_weight), q_weight is not None, qk_offset,
            np.float32(qk_eps), np.float32(scale), *o_proj.arrays, array(attention_weight),
            attention_weight is not None, array(mlp_weight), offset, np.float32(eps), *gate_up_proj.arrays,
            activation, *down_proj.arrays, array(mlp_branch_weight), mlp_branch_weight is not None,
            array(next_weight))


class DecodeStack:
    """A decode step's decoder layers in one numba call, for int8-dynamic layers (lm.layers.decode_stack
    keeps one per run of layers that can take it and builds a new one when any operand changes):
    `layers`, one `layer_operands` tuple per layer in order, held in a numba typed list so that a call
    passes them as one argument.

    Each layer gives the values of `qkv_proj`, `decode_rows_attention`, `o_proj`, `add_rms_norm`,
    `gate_up_proj`, the activation times up (`gated_activation`), `down_proj` and `add_rms_norm` called
    one after another: the same kernels, with the activation computed as `gated_activation` does rather
    than by ATen (within 2 ulp of it, or of its absolute error where the product cancels). One call
    instead of one per layer saves most of the Python between the layers, which runs cold after each
    layer's weights have streamed through the caches (~20 us a call): for the 270M on the 2-core dev
    machine the Python around the layers' kernels went from ~1.5 to ~1.0 ms a step, most of what
    remains being the check that the kept operands still match the modules."""

    def __init__(self, layers: list[tuple]) -> None:
        if not layers:
            raise ValueError("DecodeStack takes one or more layers")
        self._layers = typed.List(layers)

    def __call__(self, x: Tensor, normed: Tensor, caches, kinds: np.ndarray, groups: np.ndarray, cos: np.ndarray,
                 sin: np.ndarray, slots: np.ndarray, blocks: np.ndarray, start: np.ndarray,
                 length: np.ndarray) -> Tensor:
        """x, normed (1, N, hidden) float32 CPU, contiguous (normed: the first layer's input norm of x);
        caches: a numba typed list of each layer's (keys, values) cache arrays (blocks, block_size, KV, D)
        float32 (lm.kv_cache.PagedKVStorage.array_list); kinds, groups (layers,) int64: each layer's RoPE
        tables and KV group; cos, sin (kinds, N, D) float32; per KV group, as `decode_rows_attention`
        takes them: slots (groups, N), blocks (groups, N, width) (zero past a row's blocks), start and
        length (groups, N), all int64. Returns (the last layer's output, its next norm of it), each (1, N,
        hidden) float32."""
        out = torch.empty_like(x)
        out_normed = torch.empty_like(x)
        _decode_stack(x.numpy()[0], normed.numpy()[0], self._layers, caches, kinds, groups, cos, sin, slots, blocks,
                      start, length, thread_parts(), out.numpy()[0], out_normed.numpy()[0])
        return out, out_normed


def gated_activation(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    """act(gate) * up for float32 CPU tensors (..., D) of one shape, act GELU_TANH (0.5 x (1 + tanh(
    sqrt(2 / pi) (x + 0.044715 x^3))), transformers' gelu_pytorch_tanh) or SILU (x / (1 + e^-x)), in
    float32 with e^v from `_exp_parts`; what a `DecodeStack` call computes between each layer's projections.
    Returns a new contiguous (..., D) tensor."""
    out = _empty(gate)
    _gated_activation(_rows(gate), _rows(up), activation, _rows(out))
    return out


# e^v = p(r) 2^n, n = round(v / ln 2), r = v - n ln 2 (Cody-Waite: ln 2 split in a high part exact in a few
# bits and a low part; Cephes' expf constants), p the degree-7 Taylor polynomial of e^r (|r| <= ln 2 / 2: its
# remainder is below 2^-26 relative). v is clamped to [-87, 88] so that 2^n stays a normal float32.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)
_LN2_LOW = np.float32(-2.12194440e-4)


@njit(nogil=True, cache=True, fastmath={"contract"})
def _exp_parts(v, mantissa, exponent):
    """e^v[j] = mantissa[j] * exponent[j].view(float32): exponent gets the bits of 2^n, so that both loops
    vectorise (a scalar bit cast, or libm's expf, would not)."""
    for j in range(v.shape[0]):
        x = min(max(v[j], np.float32(-87.0)), np.float32(88.0))
        n = np.floor(x * _LOG2E + np.float32(0.5))
        r = (x - n * _LN2_HIGH) - n * _LN2_LOW
        p = np.float32(1.0 / 5040)
        p = p * r + np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        mantissa[j] = p * r + np.float32(1.0)
        exponent[j] = (np.int32(n) + np.int32(127)) << np.int32(23)


@njit(nogil=True, cache=True, fastmath={"contract"})
def _gated_activation(gate, up, activation, out):
    """out = act(gate) * up row by row, gate, up, out (N, D) float32 (see gated_activation)."""
    width = gate.shape[1]
    v = np.empty(width, np.float32)
    mantissa = np.empty(width, np.float32)
    exponent = np.empty(width, np.int32)
    power = exponent.view(np.float32)
    for i in range(gate.shape[0]):
        row = gate[i]
        if activation == GELU_TANH:  # tanh(u) = 1 - 2 / (1 + e^2u)
            for j in range(width):
                x = row[j]
                v[j] = np.float32(2.0) * (np.float32(0.7978845608028654) * (x + np.float32(0.044715) * (x * x * x)))
        else:
            for j in range(width):
                v[j] = -row[j]
        _exp_parts(v, mantissa, exponent)
        if activation == GELU_TANH:
            for j in range(width):
                tanh = np.float32(1.0) - np.float32(2.0) / (np.float32(1.0) + mantissa[j] * power[j])
                out[i, j] = (np.float32(0.5) * row[j] * (np.float32(1.0) + tanh)) * up[i, j]
        else:
            for j in range(width):
                out[i, j] = (row[j] / (np.float32(1.0) + mantissa[j] * power[j])) * up[i, j]


# The stack kernel runs lm.matvec's int8_matvec inline (`_product`: quantise, then the parts in prange) rather
# than calling its parallel kernel: numba's cache cannot load a function that calls a parallel one (it crashes).
@njit(nogil=True, inline="always")
def _product(x, smoothing, weight, scales, bias, out, parts):
    quantized, x_scales = _quantize_rows(x, smoothing)
    count = _split(parts, weight.shape[0])
    for part in prange(count):
        first, stop = _part_bounds(weight.shape[0], part, count)
        _matvec_rows(quantized, x_scales, weight, scales, bias, out, first, stop)


@njit(nogil=True, cache=True, parallel=True)
def _decode_stack(x, normed, layers, caches, kinds, groups, cos, sin, slots, blocks, start, length, parts, out,
                  out_normed):
    rows = x.shape[0]
    last = len(layers) - 1
    for i in range(len(layers)):
        (qkv_smoothing, qkv_weight, qkv_scales, qkv_bias, heads, kv_heads, q_weight, k_weight, norm, qk_offset, qk_eps,
         scale, o_smoothing, o_weight, o_scales, o_bias, branch_weight, branch_norm, mlp_weight, offset, eps,
         gate_up_smoothing, gate_up_weight, gate_up_scales, gate_up_bias, activation, down_smoothing, down_weight,
         down_scales, down_bias, mlp_branch_weight, mlp_branch_norm, next_weight) = layers[i]
        keys, values = caches[i]
        kind, g = kinds[i], groups[i]
        dim = keys.shape[3]
        qkv = np.empty((rows, qkv_weight.shape[0]), np.float32)
        _product(normed, qkv_smoothing, qkv_weight, qkv_scales, qkv_bias, qkv, parts)
        attended = np.empty((rows, heads * dim), np.float32)
        _decode_rows_attention(qkv.reshape(rows, qkv_weight.shape[0] // dim, dim), heads, kv_heads, q_weight, k_weight,
                               norm, qk_offset, qk_eps, cos[kind], sin[kind], keys, values, slots[g], blocks[g],
                               start[g], length[g], scale, attended.reshape(rows, heads, dim))
        branch = np.empty((rows, o_weight.shape[0]), np.float32)
        _product(attended, o_smoothing, o_weight, o_scales, o_bias, branch, parts)
        summed = np.empty_like(x)
        mlp_normed = np.empty_like(x)
        _add_rms_norm(x, branch, branch_weight, branch_norm, mlp_weight, True, offset, eps, summed, mlp_normed)
        gate_up = np.empty((rows, gate_up_weight.shape[0]), np.float32)
        _product(mlp_normed, gate_up_smoothing, gate_up_weight, gate_up_scales, gate_up_bias, gate_up, parts)
        half = gate_up_weight.shape[0] // 2
        activated = np.empty((rows, half), np.float32)
        _gated_activation(gate_up[:, :half], gate_up[:, half:], activation, activated)
        branch = np.empty((rows, down_weight.shape[0]), np.float32)
        _product(activated, down_smoothing, down_weight, down_scales, down_bias, branch, parts)
        x = out if i == last else np.empty_like(x)
        normed = out_normed if i == last else np.empty_like(x)
        _add_rms_norm(summed, branch, mlp_branch_weight, mlp_branch_norm, next_weight, True, offset, eps, x, normed)
