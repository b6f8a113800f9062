"""int8 weights times a few rows of fp32 activations on the CPU, read at the machine's bandwidth: the
decode step's matrix-vector products for lm.quantize's int8-dynamic layers and int8 LM head.

fbgemm's dynamic linear is built for matrices: at one row it reads the 270M's 262,144 x 640 int8 head
in 6.4-6.9 ms on the 2-core dev machine, ~25 GB/s, and a per-token projection of that model pays ~60 us
of row scaling around a ~20-60 us kernel. `int8_matvec` is one numba call: each row of x quantised
over its own range (16-bit integers at most, symmetric), int32 sums of int8 x int16 products (LLVM
vectorises them as pmaddwd), the output rows split over numba's threads (its OpenMP layer: ~2 us to
start a parallel region). The head: 4.1-5.1 ms; a 640 x 2048 projection 24 against 93 us.

Numerics, for x (N, in) fp32 and an int8 weight q (out, in) with fp32 scales w (out,):
- each row r is quantised on its own: s_r = max_j |x_rj| / L, x^_rj = round(x_rj / s_r), with
  L = min(32767, (2^31 - 1) // (127 * in)) the finest grid whose sums of |q| <= 127 times |x^| <= L
  cannot overflow int32 (L = 26,420 for 640 inputs, 11,008 for 1,536, 1,887 for 8,960): the sums are
  exact, and the activation's rounding error is ~100x smaller than 8-bit activations';
- y_ro = float32(sum_j q_oj x^_rj) * (s_r * w_o) + bias_o, in float32;
- a row that is not finite (or all zero) gives NaN (or zero) in its own output row only.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np
import torch
from numba import config, njit, prange
from torch import Tensor

log = logging.getLogger(__name__)

BLOCK = 64  # output rows per block of int32 sums (a float store inside the sums' loop stops pmaddwd)


def int8_matvec(x: Tensor, weight: Tensor, scales: Tensor, *, inv_smoothing: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
    """(x * inv_smoothing) @ (weight * scales[:, None])^T + bias with x quantised per row as the module
    docstring says: x (N, in) float32, weight (out, in) int8 in [-127, 127], scales (out,) float32, inv_smoothing
    (in,) float32 or None (ones), bias (out,) float32 or None. Returns (N, out) float32. Split over
    torch.get_num_threads() parts. CPU only; raises ValueError for other dtypes or shapes. A layer
    that calls it at every step holds an Int8Rows instead (the checks and conversions made once)."""
    return Int8Rows(weight, scales, inv_smoothing=inv_smoothing, bias=bias)(x)


class Int8Rows:
    """int8_matvec's operands prepared once: the int8 weight (out, in) made row-major, the scales,
    smoothing and bias as float32 numpy views (the tensors are kept, so the views stay valid).
    Calling it on x (N, in) float32 returns (N, out) float32; raises ValueError for another x."""

    def __init__(self, weight: Tensor, scales: Tensor, *, inv_smoothing: Tensor | None = None,
                 bias: Tensor | None = None) -> None:
        outputs, inputs = weight.shape
        if weight.dtype != torch.int8 or weight.device.type != "cpu" or scales.shape != (outputs,) \
                or (inv_smoothing is not None and inv_smoothing.shape != (inputs,)) \
                or (bias is not None and bias.shape != (outputs,)):
            raise ValueError(f"int8_matvec takes an int8 weight (out, in) on the CPU, scales (out,), inv_smoothing "
                             f"(in,) and bias (out,); got weight {tuple(weight.shape)} {weight.dtype} on "
                             f"{weight.device}, scales {tuple(scales.shape)}, inv_smoothing "
                             f"{None if inv_smoothing is None else tuple(inv_smoothing.shape)}, bias "
                             f"{None if bias is None else tuple(bias.shape)}")
        if weight.numel() and int(weight.min()) < -127:
            raise ValueError("int8_matvec takes int8 weights in [-127, 127] (its int32 sums are bounded with |w| <= 127); "
                             "got -128")
        self.in_features, self.out_features = inputs, outputs
        # (out, in) int8, row-major: the tensor itself where it is one (a deepcopy then shares it with a buffer)
        self.weight = weight if weight.is_contiguous() and not weight.requires_grad else weight.detach().contiguous()
        self._weight = self.weight.numpy()  # numpy views keep their tensors alive
        self._scales = scales.detach().float().contiguous().numpy()
        self._smoothing, self._bias = (_NO_ARRAY if tensor is None else tensor.detach().float().contiguous().numpy()
                                       for tensor in (inv_smoothing, bias))

    def __deepcopy__(self, memo):
        """A copy reading a copy of the weight (shared with a module buffer copied in the same deepcopy)."""
        import copy

        clone = Int8Rows.__new__(Int8Rows)
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        clone._weight = clone.weight.numpy()
        return clone

    def argmax(self, x: Tensor) -> tuple[list[int], list[bool]]:
        """Per row of x (N, in) float32: the index of the largest output of `self(x)` (the first on ties;
        meaningless for a row that is not finite) and whether every output of the row is finite: the
        greedy tokens of an int8 head, decided inside the product's parts instead of a pass over the
        logits afterwards. Raises ValueError for another x."""
        x, out = self._checked(x)
        parts = thread_parts()
        best = np.empty((x.shape[0], parts), np.float32)
        index = np.empty((x.shape[0], parts), np.int64)
        residue = np.empty((x.shape[0], parts), np.float32)
        choices, finite = _int8_matvec_argmax(x, self._smoothing, self._weight, self._scales, self._bias, out.numpy(),
                                              parts, best, index, residue)
        return choices.tolist(), finite.tolist()

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inv_smoothing, weight, scales, bias) as `_int8_matvec` takes them (empty arrays for none)."""
        return self._smoothing, self._weight, self._scales, self._bias

    def rebind(self, weight: Tensor) -> None:
        """Read `weight` from now on: the same values (out, in) int8, row-major, held elsewhere (in
        huge pages: `huge_page_copies`)."""
        if weight.shape != self.weight.shape or weight.dtype != torch.int8 or not weight.is_contiguous():
            raise ValueError(f"rebind takes a row-major int8 weight {tuple(self.weight.shape)}; got "
                             f"{tuple(weight.shape)} {weight.dtype}")
        self.weight, self._weight = weight, weight.numpy()

    def __call__(self, x: Tensor) -> Tensor:
        x, out = self._checked(x)
        _int8_matvec(x, self._smoothing, self._weight, self._scales, self._bias, out.numpy(), thread_parts())
        return out

    def _checked(self, x: Tensor) -> tuple[np.ndarray, Tensor]:
        """x (N, in) float32 after checking it, as a row-major numpy array (no autograd graph is recorded:
        inference only), and the empty (N, out) float32 output; raises ValueError for another x."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.in_features or not x.is_cpu:
            raise ValueError(f"int8_matvec takes x (N, {self.in_features}) float32 on the CPU; got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        x = x.detach()
        return (x.numpy() if x.is_contiguous() else x.contiguous().numpy()), torch.empty(x.shape[0], self.out_features)


def thread_parts() -> int:
    """How many parts the kernels split their output rows into (at most; `_split` caps it by size):
    torch.get_num_threads(), within numba's thread pool."""
    return max(1, min(torch.get_num_threads(), config.NUMBA_NUM_THREADS))


_NO_ARRAY = np.empty(0, np.float32)  # inv_smoothing or bias not given
_ALIGNMENT = 64  # bytes: each copy in huge_page_copies starts on a cache line


def huge_page_copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of CPU `tensors` (contiguous, any dtype) in one private anonymous mapping advised for
    transparent huge pages (madvise(MADV_HUGEPAGE); Linux's THP mode "madvise" or "always"), in order:
    the weights a decode step streams, read through 2 MiB pages instead of 4 KiB ones (fewer TLB misses,
    and hardware prefetch that does not stop at every 4 KiB boundary). On the 2-core dev machine the
    270M's 262,144 x 640 int8 head went 5.3-6.0 -> 3.8-4.3 ms a call through int8_matvec, its 72 int8
    projections 4.1 -> 3.6 ms (ATen's int4 kernel, compute-bound, did not change). Each copy keeps the
    mapping alive. Where huge pages cannot be asked for (no MADV_HUGEPAGE, or madvise refused) the
    tensors are returned as they are."""
    if not tensors:
        return []
    sizes = [-(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT for tensor in tensors]
    try:
        mapping = mmap.mmap(-1, max(sum(sizes), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)  # before the pages are touched: they are faulted in huge
    except (AttributeError, OSError, ValueError) as error:  # not Linux, or THP unavailable
        log.debug("no huge pages for the decode weights: %s", error)
        return list(tensors)
    copies, offset = [], 0
    for tensor, size in zip(tensors, sizes):
        if not tensor.numel():
            copies.append(tensor.clone())
            continue
        copy = torch.frombuffer(mapping, dtype=tensor.dtype, count=tensor.numel(), offset=offset)  # keeps mapping
        copies.append(copy.view(tensor.shape).copy_(tensor))
        offset += size
    return copies


@njit(nogil=True, parallel=True, cache=True)
def _int8_matvec(x, inv_smoothing, weight, scales, bias, out, parts):
    quantized, x_scales = _quantize_rows(x, inv_smoothing)
    outputs = weight.shape[0]
    count = _split(parts, outputs)
    for part in prange(count):
        start, stop = _part_bounds(outputs, part, count)
        _rows(quantized, x_scales, weight, scales, bias, out, start, stop)


@njit(nogil=True, parallel=True, cache=True)
def _int8_matvec_argmax(x, inv_smoothing, weight, scales, bias, out, parts, best, index, residue):
    """_int8_matvec, then per row the first largest output and whether all are finite (Int8Rows.argmax):
    each part scans its own outputs while they are in its cache (best, index, residue (R, parts) scratch:
    a part's largest value, its index, the sum of y - y over the part, 0 unless some y is NaN or inf),
    then the parts are merged in order (a later part wins only when strictly larger)."""
    quantized, x_scales = _quantize_rows(x, inv_smoothing)
    rows, outputs = x.shape[0], weight.shape[0]
    count = _split(parts, outputs)
    for part in prange(count):
        start, stop = _part_bounds(outputs, part, count)
        _rows(quantized, x_scales, weight, scales, bias, out, start, stop)
        for r in range(rows):
            largest, at, total = out[r, start], start, np.float32(0)
            for o in range(start, stop):
                value = out[r, o]
                total += value - value
                if value > largest:
                    largest, at = value, o
            best[r, part], index[r, part], residue[r, part] = largest, at, total
    choices = np.empty(rows, np.int64)
    finite = np.empty(rows, np.bool_)
    for r in range(rows):
        largest, at, total = best[r, 0], index[r, 0], residue[r, 0]
        for part in range(1, count):
            total += residue[r, part]
            if best[r, part] > largest:
                largest, at = best[r, part], index[r, part]
        choices[r], finite[r] = at, total == 0
    return choices, finite


@njit(nogil=True, cache=True)
def _quantize_rows(x, inv_smoothing):
    """x (R, in) float32, times inv_smoothing (in,) unless empty -> (int16 (R, in), scales (R,) float32):
    each row over its own range (module docstring); a row that is not finite gets zeros and scale NaN."""
    rows, inputs = x.shape
    levels = np.float32(min(32767, (2**31 - 1) // (127 * inputs)))
    quantized = np.empty((rows, inputs), np.int16)
    x_scales = np.empty(rows, np.float32)
    smoothed = np.empty(inputs, np.float32)
    for r in range(rows):
        largest = np.float32(0)
        finite = True
        for j in range(inputs):
            value = x[r, j] * inv_smoothing[j] if inv_smoothing.size else x[r, j]
            smoothed[j] = value
            finite = finite and np.isfinite(value)
            largest = max(largest, abs(value))
        scale = largest / levels if finite else np.float32(np.nan)
        x_scales[r] = scale
        inverse = np.float32(1) / scale if finite and largest > 0 else np.float32(0)
        for j in range(inputs):
            quantized[r, j] = np.int16(np.rint(smoothed[j] * inverse)) if finite else np.int16(0)
    return quantized, x_scales


@njit(nogil=True, cache=True)
def _split(parts, outputs):
    """Parts for `outputs` rows: at most `parts` (thread_parts()), each of BLOCK rows or more."""
    return max(1, min(parts, outputs // BLOCK))


@njit(nogil=True, cache=True)
def _part_bounds(outputs, part, parts):
    """Output rows [start, stop) of part `part` of `parts`, on BLOCK boundaries."""
    start = outputs * part // parts // BLOCK * BLOCK
    stop = outputs if part == parts - 1 else outputs * (part + 1) // parts // BLOCK * BLOCK
    return start, stop


@njit(nogil=True, cache=True)
def _rows(quantized, x_scales, weight, scales, bias, out, start, stop):
    sums = np.empty(BLOCK, np.int32)
    for base in range(start, stop, BLOCK):
        end = min(stop, base + BLOCK)
        for r in range(quantized.shape[0]):
            _block_sums(quantized[r], weight, base, end, sums)
            for o in range(base, end):
                value = np.float32(sums[o - base]) * (x_scales[r] * scales[o])
                out[r, o] = value + bias[o] if bias.size else value


@njit(nogil=True, cache=True)
def _block_sums(row, weight, base, end, sums):
    """sums[o - base] = weight[o] . row (int32, exact) for the weight rows o in [base, end); row int16.
    Only int32 stores in this loop: a float store in it stops LLVM from vectorising it as pmaddwd."""
    for o in range(base, end):
        total = np.int32(0)
        for j in range(weight.shape[1]):
            total += np.int32(weight[o, j]) * np.int32(row[j])
        sums[o - base] = total


def int8_products(q: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The exact int32 products q @ weight^T of int8 rows q (N, in) and int8 weight rows (out, in)
    (row-major): (N, out) int32, as torch._int_mm gives them, split over torch.get_num_threads() parts.
    |q|, |weight| <= 127 and in <= 133,000 keep every sum inside int32. Memory-bound at one row (the
    270M's 262,144 x 640 head: ~5 against ~10 ms for _int_mm on the 2-core dev machine); the work grows
    with N. Raises ValueError for other dtypes or shapes."""
    if q.dtype != np.int8 or weight.dtype != np.int8 or q.ndim != 2 or weight.ndim != 2 \
            or q.shape[1] != weight.shape[1] or not weight.flags.c_contiguous:
        raise ValueError(f"int8_products takes int8 q (N, in) and a row-major int8 weight (out, in); got q "
                         f"{q.shape} {q.dtype}, weight {weight.shape} {weight.dtype}")
    out = np.empty((q.shape[0], weight.shape[0]), np.int32)
    _int8_products(np.ascontiguousarray(q), weight, out, thread_parts())
    return out


@njit(nogil=True, parallel=True, cache=True)
def _int8_products(q, weight, out, parts):
    wide = q.astype(np.int16)  # int8 x int16 is what LLVM vectorises as pmaddwd
    count = _split(parts, weight.shape[0])
    for part in prange(count):
        start, stop = _part_bounds(weight.shape[0], part, count)
        sums = np.empty(BLOCK, np.int32)
        for base in range(start, stop, BLOCK):  # a block of weight rows stays in cache for every row of q
            end = min(stop, base + BLOCK)
            for r in range(wide.shape[0]):
                _block_sums(wide[r], weight, base, end, sums)
                out[r, base:end] = sums[:end - base]
