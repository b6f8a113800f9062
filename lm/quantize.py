"""Quantisation of a loaded decoder, applied from outside the model by swapping modules (the model code
knows nothing of it). Every projection and the LM head are swapped; MoE experts too (lm.layers.moe keeps
them as linear layers).

Schemes (`quantize_model(model, scheme)`):
- "int8": int8 weights, one scale per output channel (symmetric, round-to-nearest); activations are not
  quantised. On the CPU the matmul runs in PyTorch's int8-weight kernel with bf16 activations and fp32
  results; elsewhere the weights are dequantised on the fly.
- "int8-dynamic": the same int8 weights, and each call's activations quantised to int8 (per token in the
  projections, per tensor in the head: Int8DynamicLinear) so the matmul runs int8 x int8 -> int32 in
  PyTorch's CPU kernels (fbgemm's dynamic linear where the CPU has VNNI, each row of x scaled to its own
  range first for per-token scales; oneDNN's _int_mm for the projections elsewhere).
  At decode's few rows (up to what `choose_matvec_rows` measured faster on this machine, at load)
  the projections and the head run lm.matvec.int8_matvec instead: the same int8 weights, each row of
  x quantised over its own range at up to 16 bits, in one numba call.
  CPU only; where PyTorch has no quantized engine, "int8" is used instead (with a warning). Given
  calibration token ids (`calibration_ids`, what lm.runtime passes), the projections are smoothed first
  (SmoothQuant, Xiao et al. 2023, arXiv:2211.10438): one fp32 forward over CALIBRATION_TEXT records each
  projection's inputs, and with a_j their largest |activation| in input channel j and w_j the largest
  |weight| of column j, s_j = a_j^alpha / w_j^(1 - alpha) moves outlier channels' range from the
  activations into the weights: the weights are quantised from W diag(s) and each call multiplies x
  by 1 / s, the same product in exact arithmetic. alpha is chosen per projection from SMOOTHING_ALPHAS
  (or no smoothing) by the smallest squared error of the quantised layer's output on those inputs. The
  LM head is smoothed the same way on the final hidden states (a tied embedding sharing its table divides
  s back out on lookup).
- "int4": 4-bit weights in groups of `INT4_GROUP_SIZE` along the input, each group with a bf16 scale and
  zero (asymmetric: w = (q - 8) * scale + zero, q in 0..15), in PyTorch's int4 CPU kernel
  (_weight_int4pack_mm_for_cpu, the layout torchao's int4 weight-only CPU path uses) with bf16
  activations; elsewhere dequantised on the fly. The LM head (and a tied embedding) stays int8, as
  llama.cpp's Q4_K_M keeps its output matrix at 6 bits: the head decides every token; it runs as
  int8-dynamic's head (fbgemm's int8 x int8, or int8_matvec where measured faster right after an int4
  projection; smoothed) on the CPU where PyTorch has a quantized engine.
  Given calibration ids, the weights are scaled first by activation-aware factors (AWQ, Lin et al. 2023,
  arXiv:2306.00978): s_j = a_j^alpha, normalised by sqrt(max s * min s), so that the input channels that
  carry large activations lose less to rounding, with alpha chosen per projection from INT4_AWQ_ALPHAS as
  AWQ does: by the smallest squared error of the layer's output on its calibration inputs.
A tied embedding table is shared with the quantised head and dequantised row by row on lookup.
"""

from __future__ import annotations

import functools
import logging
import numbers
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.commands import QUANTIZATION_SCHEMES
from lm.matvec import Int8Rows, huge_page_copies

log = logging.getLogger(__name__)

SCHEMES = QUANTIZATION_SCHEMES
INT4_GROUP_SIZE = 32  # input channels per int4 scale and zero (Q4_0 and Q4_K use 32 too)
# Migration strengths tried per projection (None: not smoothed): SmoothQuant's alpha, chosen per layer as
# AWQ chooses its exponent, by the smallest squared error of the layer's output on its calibration inputs.
SMOOTHING_ALPHAS = (None, 0.4, 0.5, 0.6, 0.7, 0.8)
# AWQ's exponents tried per projection for int4 (0: no scaling), chosen the same way (AWQ searches a grid
# of 20 in [0, 1); 4 keep the load time down).
INT4_AWQ_ALPHAS = (0.0, 0.25, 0.5, 0.75)
MATVEC_MAX_ROWS = 8  # rows at which int8_matvec is measured against fbgemm (choose_matvec_rows)
MATVEC_PAIRS = 5  # timed pairs per row count (best of each kernel)
MATVEC_STREAMED_BYTES = 8 << 20  # int8 weights this large are timed from memory (choose_matvec_rows)
MATVEC_EVICT_BYTES = 64 << 20  # read between those timings: twice the dev machine's 32 MB last-level cache
# int8_matvec is taken where it needs at most this share of the other kernel's time when it reads a row-major
# copy of its own (the memory is worth a clear gain), and where it is no slower when it reads the weight buffer
# itself (the LM head: the 270M's measured 0.78-0.89 of fbgemm's time, so 0.9 dropped it in 2 of 5 loads here)
MATVEC_MARGIN = 0.9
SEARCH_ROWS = 512  # output rows of a projection its candidates are compared on (best_on)
# Calibration input for smoothing: prose, numbers, code and other scripts, so that the channels each kind
# of text drives are seen. Not the benchmark's or the tests' prompts.
CALIBRATION_TEXT = (
    "Water boils at one hundred degrees Celsius at sea level. The committee met on Tuesday to discuss the "
    "budget, and several members raised concerns about the cost of the new bridge. def add(a, b):\n"
    "    return a + b\nIn 1969, astronauts landed on the Moon. Les enfants jouent dans le parc. "
    "東京は日本の首都です。"
)


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


class Int8DynamicLinear(Int8Linear):
    """Int8Linear's weights, with activations quantised to int8 at each call so that the product runs
    int8 x int8 -> int32 on the CPU (VNNI/AMX where present), fp32 out. Two quantisations of x:
    - per_token (the projections): each row of x gets its own scale, so an outlier token (Gemma 3 has
      them) costs only its own row. Kernel "fbgemm" (the default where the CPU has VNNI and PyTorch a
      quantized engine): each row x_r is mapped onto [-1, 1] by its own range, u_r = (x_r - c_r) / h_r
      with c_r, h_r the middle and half-width of [min x_r, max x_r]; fbgemm's dynamic linear quantises
      u with one asymmetric uint8 scale, which spans every row's range (a step of 2/255 of each row's
      own width: per-token asymmetric 8 bits), and y_r = h_r (u_r W^T) + c_r sum_j W_j, with the row
      sums of the dequantised weights kept. Against symmetric rows (max|x_r| / 127) it is finer for
      rows that lean to one side: logits cosine with fp32 0.99849 vs 0.99815 (270M) and 0.99905 vs
      0.99873 (Qwen 2.5 1.5B), teacher-forced greedy agreement 96.9 vs 98.2% and 95.7 vs 94.9% (8 prompts x
      64 tokens; one token is 0.2%). The weights are then kept only in fbgemm's packed layout
      (`int8_weight()` unpacks them).
      Kernel "int_mm" (elsewhere): symmetric int8 rows (amax / 127) times the stored weights' transpose
      in torch._int_mm (oneDNN), exact int32. fbgemm streams the weights faster: the 1.5B's 28 layers of
      projections from memory took 58 vs 76 ms at 1 row and 75 vs 146 ms at 8 (2-core dev machine);
    - per tensor (the LM head, `per_token=False`): fbgemm's dynamic linear on x as it is (one scale for
      the whole x), fastest for the 262,144-row head at every batch size; it packs a second copy of the
      weights (the tied embedding looks rows up in the first). 8-bit activations where the CPU has
      VNNI, 7-bit (reduce_range) elsewhere, whose AVX2 kernels would otherwise saturate.
    Up to `matvec_rows` rows (0 until `choose_matvec_rows()` measures it on this machine; quantize_model
    does), either kind runs lm.matvec.int8_matvec instead: each row of x over its own range at up to
    16 bits, the same int8 weights read once, a few times faster than fbgemm's kernel and its row
    scaling at decode's few rows. A per-token layer that takes it keeps its row-major int8 weights
    beside fbgemm's packed copy.
    Off the CPU it is Int8Linear (a module moved off the CPU gets its int8 weights back first)."""

    KERNELS = ("fbgemm", "int_mm")

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, per_token: bool = True,
                 smoothing: Tensor | None = None, kernel: str | None = None) -> None:
        # smoothing (in,) > 0: the weights quantised are W diag(smoothing) and x is divided by it per call
        super().__init__(weight if smoothing is None else weight * smoothing.to(weight.dtype)[None, :], bias)
        self.register_buffer("inv_smoothing", None if smoothing is None else 1.0 / smoothing.float())
        self.per_token = per_token
        if kernel is None:
            fbgemm = not per_token or (_HAS_VNNI and quantized_engine_available())
            kernel = "fbgemm" if fbgemm and self.weight.device.type == "cpu" else "int_mm"
        if kernel not in self.KERNELS or (not per_token and kernel != "fbgemm"):
            raise ValueError(f"kernel {kernel!r}: per-token layers take one of {self.KERNELS}, the per-tensor "
                             "head fbgemm")
        self.kernel = kernel
        self.matvec_rows = 0  # rows up to which the CPU forward runs int8_matvec (choose_matvec_rows)
        self._rows: Int8Rows | None = None  # int8_matvec's operands
        self._packed = None
        # the int_mm kernel's fp32 scales, kept to save a cast per call (fbgemm holds its own)
        self.register_buffer("scales_f32", self.scales.float(), persistent=False)  # the kernels' scales
        if kernel == "int_mm" and self.weight.device.type == "cpu" \
                and int_mm_layout(*self.weight.shape) == "columns":
            self.weight = self.weight.t().contiguous().t()  # still (out, in); weight.t() is now contiguous
        if kernel == "fbgemm" and self.weight.device.type == "cpu":
            scales = self.scales.double()
            with warnings.catch_warnings():  # quantized tensors are deprecated for new code, not yet removed
                warnings.simplefilter("ignore", UserWarning)  # (the int8 values as they are: no float round trip)
                qweight = torch._make_per_channel_quantized_tensor(self.weight, scales,
                                                                   torch.zeros_like(scales, dtype=torch.long), 0)
            # per token the bias is added after the rows are scaled back; the head's goes in fbgemm
            bias = None if self.bias is None or per_token else self.bias.float()
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)  # fbgemm's layout
            if per_token:  # sum_j W_j of the dequantised weights (out,), for the rows' offsets c_r
                self.register_buffer("row_sums", (self.weight.float().sum(dim=1) * self.scales.float())[None],
                                     persistent=False)
                self.weight = None  # in the packed copy only

    def int8_weight(self) -> Tensor:
        """The int8 weights (out, in) the product multiplies by."""
        if self.weight is not None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def packed_nbytes(self) -> int:
        """Bytes held outside the module's buffers: fbgemm's packed copy, counted as the int8 weights it
        holds, and int8_matvec's row-major copy where it is not the `weight` buffer (0 without them)."""
        packed = 0 if self._packed is None else self.out_features * self.in_features
        rows = None if self._rows is None else self._rows.weight
        shared = rows is not None and self.weight is not None and rows.data_ptr() == self.weight.data_ptr()
        return packed + (0 if rows is None or shared else rows.numel())

    def _apply(self, fn, recurse=True):
        if fn(torch.empty(0)).device.type != "cpu":  # leaving the CPU: fbgemm and int8_matvec stay behind
            if self.weight is None:
                self.weight, self._packed = self.int8_weight(), None
            self.matvec_rows, self._rows = 0, None
        return super()._apply(fn, recurse)

    def choose_matvec_rows(self, preceded_by=None, *, fused_layer: bool = False) -> int:
        """Measure this layer on this machine, int8_matvec against its other CPU path, at 1, 2, ...
        MATVEC_MAX_ROWS rows, and set `matvec_rows` to the rows up to which int8_matvec took at most
        MATVEC_MARGIN of the other's time where it reads a row-major copy of its own, at most the other's
        time where it reads the `weight` buffer itself (best of MATVEC_PAIRS pairs; 0: never, or off the
        CPU); returns it. A per-token layer keeps its row-major int8 weights only if it takes int8_matvec.

        `fused_layer`: this is a per-token projection of a decoder layer that lm.layers.decode_stack can run
        in one call (its `decode_parts()` is not None); it takes int8_matvec at one row without a
        measurement: a decode step of one row runs the layer in one call only where all four of its
        projections take int8_matvec, and that call saves more than any projection's kernel could lose
        there. Measured, the 270M's 4096 x 640 gate/up projection came out above the
        margin in one load out of several (its kernels are within ~10% of each other at one row), which
        sent every layer of the step to the module path: 47 against ~65-70 tok/s.

        `preceded_by`: a callable run before each int8_matvec timing, standing for what precedes this
        layer in a decode step. The int4 scheme's head follows ATen's int4 kernels: PyTorch's OpenMP
        threads spin for a while after each parallel region (libgomp's GOMP_SPINCOUNT) and then share
        the cores with numba's threads, which the measurement must see.

        A weight of MATVEC_STREAMED_BYTES or more is measured as a step reads it: from memory (each call
        after a read of MATVEC_EVICT_BYTES elsewhere, so the last-level cache no longer holds it) and,
        for int8_matvec, from huge pages; called back to back, a 27 MB projection of the 1.5B stays
        in a 32 MB cache, where fbgemm's kernel looks faster than it is in a step."""
        if not self.set_matvec_rows(MATVEC_MAX_ROWS):  # off the CPU
            return 0
        streamed = self.out_features * self.in_features >= MATVEC_STREAMED_BYTES
        own_copy = self.weight is None or self._rows.weight.data_ptr() != self.weight.data_ptr()
        margin = MATVEC_MARGIN if own_copy else 1.0
        evict = np.ones(MATVEC_EVICT_BYTES // 8, np.int64) if streamed else None
        if streamed and own_copy:  # an unpacked copy (the buffer is the caller's to move)
            self._rows.rebind(huge_page_copies([self._rows.weight])[0])

        def timed(function, x, before=None) -> float:
            if evict is not None:
                evict.max()  # numpy, one thread: PyTorch's OpenMP threads stay idle
            if before is not None:
                before()
            return _seconds(function, x)

        # A per-token projection of a layer decode_stack fuses takes one row without a measurement (docstring).
        rows_chosen = 1 if self.per_token and fused_layer else 0
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for rows in range(rows_chosen + 1, MATVEC_MAX_ROWS + 1):
                x = torch.randn(rows, self.in_features, generator=generator)
                self._rows(x)  # warm-up (the first call may load its compiled kernel)
                best = {"matvec": float("inf"), "other": float("inf")}
                for _ in range(MATVEC_PAIRS):
                    best["other"] = min(best["other"], timed(functools.partial(self._cpu_forward, smoothed=False), x))
                    best["matvec"] = min(best["matvec"], timed(self._rows, x, preceded_by))
                if best["matvec"] > margin * best["other"]:
                    break
                rows_chosen = rows
        if rows_chosen:
            self.matvec_rows = rows_chosen  # the operands just measured
        else:
            self.set_matvec_rows(0)  # drops them
        log.debug("int8 %s (%d, %d): int8_matvec up to %d rows", "per token" if self.per_token else "head",
                  self.out_features, self.in_features, self.matvec_rows)
        return self.matvec_rows

    def set_matvec_rows(self, rows: int) -> int:
        """Run int8_matvec up to `rows` rows (0: never), as choose_matvec_rows measured for a layer of
        the same shape; keeps or drops the row-major weights it reads. Returns the rows set (0 off
        the CPU)."""
        self.matvec_rows, self._rows = 0, None
        if rows <= 0 or self.scales.device.type != "cpu":
            return 0
        self._rows = Int8Rows(self.int8_weight(), self.scales_f32, inv_smoothing=self.inv_smoothing, bias=self.bias)
        self.matvec_rows = rows
        return rows

    def _takes_matvec(self, x: Tensor) -> bool:
        """Whether x (..., in) is decode's few rows that int8_matvec takes (up to `matvec_rows`)."""
        return 0 < x.numel() <= self.matvec_rows * self.in_features and x.shape[-1] == self.in_features \
            and x.dtype == torch.float32 and x.is_cpu and not (torch.is_grad_enabled() and x.requires_grad)

    def greedy(self, x: Tensor) -> list[int] | None:
        """Per row of x (R, in): the index of its largest output, as torch.argmax(self(x), dim=-1) picks it
        (the first on ties), decided inside int8_matvec's parts (lm.matvec.Int8Rows.argmax) with no pass
        over the outputs afterwards. None where `forward` would not take int8_matvec for x, or when some
        row's outputs are not all finite (the full outputs then report it)."""
        if x.dim() != 2 or not self._takes_matvec(x):
            return None
        choices, finite = self._rows.argmax(x)
        return choices if all(finite) else None

    def forward(self, x: Tensor) -> Tensor:
        if self._takes_matvec(x):  # decode's few rows: smoothing, quantisation and product in one call (lm.matvec)
            return self._rows(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.inv_smoothing is not None:
            x = x * self.inv_smoothing.to(x.dtype)
        if x.device.type != "cpu" or self._packed is None and self.kernel == "fbgemm":
            return super().forward(x)
        return self._cpu_forward(x.reshape(-1, self.in_features).float()).to(x.dtype).reshape(
            *x.shape[:-1], self.out_features)  # (..., out)

    def _cpu_forward(self, flat: Tensor, smoothed: bool = True) -> Tensor:
        """fbgemm's or _int_mm's product of flat (N, in) fp32, already divided by the smoothing unless
        `smoothed` is False: (N, out) fp32 (the path int8_matvec is measured against)."""
        if not smoothed and self.inv_smoothing is not None:
            flat = flat * self.inv_smoothing
        if not self.per_token:
            out = self._fbgemm(flat)  # the bias is in fbgemm's packed copy
        else:
            if self._packed is not None:
                low, high = torch.aminmax(flat, dim=1, keepdim=True)  # (N, 1) each
                middle = torch.lerp(low, high, 0.5)
                half = (high - middle).clamp_(min=1e-12)
                # a row that is not finite gets NaN out (its half-width is NaN) and u = 0 in: fbgemm's one
                # range over every row must not see it, or the other requests' rows would be spoiled
                out = self._fbgemm((flat - middle).div_(half).nan_to_num_(0.0, 0.0, 0.0))
                out = out.mul_(half).addmm_(middle, self.row_sums)  # (N, out)
            else:
                scale = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # (N, 1)
                quantized = torch.round(flat / scale).to(torch.int8)
                out = torch._int_mm(quantized, self.weight.t()).float().mul_(scale).mul_(self.scales_f32)
            if self.bias is not None:
                out = out + self.bias.float()
        return out

    def _fbgemm(self, flat: Tensor) -> Tensor:
        """fbgemm's dynamic linear of flat (N, in) fp32; raises FloatingPointError, naming the cause, for
        activations that are not finite (fbgemm cannot pick a range for them)."""
        try:
            return torch.ops.quantized.linear_dynamic(flat, self._packed, not _HAS_VNNI)
        except RuntimeError as error:
            if not bool(torch.isfinite(flat).all()):
                raise FloatingPointError("the activations reaching an int8-dynamic layer are not finite (nan or "
                                         "inf)") from error
            raise


def _seconds(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


class Int4Linear(nn.Module):
    """y = x @ w^T (+ bias), w = (q - 8) * scale + zero per group of INT4_GROUP_SIZE inputs; q (out, in)
    in 0..15 packed for PyTorch's int4 CPU kernel, scale and zero bf16 (in / group, out). With
    `smoothing` (in,) > 0 (activation-aware scales, see quantize_model), w is W diag(smoothing) and x
    is divided by it per call."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, group_size: int = INT4_GROUP_SIZE, *,
                 smoothing: Tensor | None = None) -> None:
        super().__init__()
        if smoothing is not None:
            weight = weight.detach().float() * smoothing.float()[None, :]
        self.register_buffer("inv_smoothing", None if smoothing is None else 1.0 / smoothing.float())
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"int4 needs the input size ({in_features}) to be a multiple of {group_size}")
        if out_features % 16:  # the CPU kernel packs output rows by 16
            raise ValueError(f"int4 needs the output size ({out_features}) to be a multiple of 16")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # (out, groups)
        scales = ((high - low) / 15).clamp(min=1e-30).to(torch.bfloat16)
        zeros = (low + 8 * scales.float()).to(torch.bfloat16)
        # Quantise against the bf16 scale and zero the kernel multiplies by (round to nearest, clamped).
        quantized = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
        quantized = quantized.reshape(out_features, in_features).to(torch.int32)
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], -1).transpose(0, 1).contiguous())
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(quantized, 1))
        self._device_weight: Tensor | None = None

    def dequantized(self) -> Tensor:
        """The weight the kernel multiplies by, (out, in) float32."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros).float().T

    def forward(self, x: Tensor) -> Tensor:
        # buffers read from their dict: nn.Module's attribute lookup costs ~0.5 us, per projection and step
        buffers = self._buffers
        inv_smoothing = buffers["inv_smoothing"]
        if inv_smoothing is not None:
            x = x * (inv_smoothing if inv_smoothing.dtype == x.dtype else inv_smoothing.to(x.dtype))
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if flat.is_cpu:
            out = torch._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), buffers["packed"], self.group_size,
                                                    buffers["scales_and_zeros"])
        else:
            if self._device_weight is None or self._device_weight.device != flat.device:
                self._device_weight = self.dequantized().to(flat.device)
            out = F.linear(flat, self._device_weight.to(flat.dtype))
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
        rows = self.table.weight[ids].float() * self.table.scales[ids].float()[..., None]  # (..., hidden) fp32
        inverse = getattr(self.table, "inv_smoothing", None)  # a smoothed head holds W diag(s)
        return (rows if inverse is None else rows * inverse).to(self.dtype)  # one rounding to dtype


class _Weights:
    """A weight and bias standing for an nn.Linear (a tied head's table is the embedding's)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias


def quantize_model(model: nn.Module, scheme: str, *, calibration_ids: list[int] | None = None) -> nn.Module:
    """Quantise `model` (any family's network: lm.models) in place with `scheme` (one of SCHEMES) and
    return it. `calibration_ids`: token ids of CALIBRATION_TEXT (`calibration_ids(tokenizer)`) to smooth
    int8-dynamic's projections and scale int4's with (ignored by int8; None: neither). Raises ValueError
    for an unknown scheme or a shape the scheme cannot take."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}; available: {', '.join(SCHEMES)}")
    if calibration_ids is not None and len(calibration_ids) == 0:
        raise ValueError("calibration_ids is empty: give the token ids of CALIBRATION_TEXT (calibration_ids(tokenizer)) "
                         "or None for no calibration")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    outside = [i for i in calibration_ids or () if not (isinstance(i, numbers.Integral) and 0 <= i < (vocab or i + 1))]
    if outside:
        raise ValueError(f"calibration_ids {outside[:4]} are not token ids of this model (0 to {vocab - 1})"
                         if vocab else f"calibration_ids {outside[:4]} are not token ids (non-negative integers)")
    if scheme == "int8-dynamic" and not quantized_engine_available():
        log.warning("PyTorch has no quantized engine here; int8-dynamic falls back to int8 (weight-only)")
        scheme = "int8"
    calibrated = calibration_ids is not None and scheme != "int8"
    inputs = calibration_inputs(model, calibration_ids) if calibrated else {}

    def quantized(linear: nn.Linear) -> nn.Module:
        x = inputs.get(linear)
        if scheme == "int8-dynamic":
            return best_on(x, linear, _smoothing_candidates(linear.weight, x),
                           lambda w, b, s: Int8DynamicLinear(w, b, smoothing=s))
        if scheme == "int4":
            ranges = None if x is None else x.abs().amax(dim=0)
            factors = [None if alpha == 0 else awq_factors(ranges, alpha)
                       for alpha in (INT4_AWQ_ALPHAS if x is not None else (0,))]
            return best_on(x, linear, factors, lambda w, b, s: Int4Linear(w, b, smoothing=s))
        return Int8Linear(linear.weight, linear.bias)

    with torch.no_grad():
        _swap_linears(model.layers, quantized)
        # The head keeps 8-bit weights in every scheme; where fbgemm is available it runs int8 x int8
        # (int4's too: PyTorch's int8-weight kernel with bf16 activations takes ~3x as long at 1 row).
        # Its input (the final hidden states) is smoothed as the projections' are, alpha searched the same
        # way (Qwen 2.5 1.5B: 94.1 -> 95.1% greedy agreement for int8-dynamic).
        tied = model.lm_head is None
        source = model.embed_tokens.weight if tied else model.lm_head.weight
        dynamic_head = scheme != "int8" and quantized_engine_available() and source.device.type == "cpu"
        if dynamic_head:
            x = inputs.get(model)
            model.lm_head = best_on(x, _Weights(source, None), _smoothing_candidates(source, x),
                                    lambda w, b, s: Int8DynamicLinear(w, b, per_token=False, smoothing=s))
        else:
            model.lm_head = Int8Linear(source)
        if tied:
            model.embed_tokens = Int8Embedding(model.lm_head, source.dtype)
        _choose_matvec_rows(model, source.dtype)
    return model


def _choose_matvec_rows(model: nn.Module, dtype: torch.dtype) -> None:
    """Int8DynamicLinear.choose_matvec_rows for the projections (not MoE experts) and the head of a
    float32 model. The head is measured after a call of the last projection before it, where that is
    another kernel's (int4's ATen kernel)."""
    if dtype != torch.float32:  # int8_matvec takes float32 activations only: no copies for it
        return
    chosen: dict[tuple, int] = {}  # measured once per shape and kind
    # the projections of layers lm.layers.decode_stack can run in one call (not MoE layers)
    fusable = {id(module) for decoder_layer in model.layers
               if getattr(decoder_layer, "decode_parts", lambda: None)() is not None
               for module in decoder_layer.modules()}
    for name, layer in model.layers.named_modules():
        # MoE experts stay in fbgemm alone: a row-major copy of every expert would double their memory
        if isinstance(layer, Int8DynamicLinear) and ".experts." not in f".{name}.":
            fused_layer = id(layer) in fusable
            key = (layer.out_features, layer.in_features, layer.per_token, layer.kernel, fused_layer)
            if key in chosen:
                layer.set_matvec_rows(chosen[key])
            else:
                chosen[key] = layer.choose_matvec_rows(fused_layer=fused_layer)
    if isinstance(model.lm_head, Int8DynamicLinear):
        head = model.lm_head
        if head.weight is not None and head.weight.is_contiguous():  # measured where it will be read from
            head.weight = huge_page_copies([head.weight])[0]
        projections = [module for module in model.layers.modules() if isinstance(module, (Int4Linear, Int8Linear))]
        last = projections[-1] if projections else None
        before = None
        if last is not None and not (isinstance(last, Int8DynamicLinear) and last.matvec_rows):
            x = torch.randn(1, last.in_features, dtype=dtype)  # the model's activations
            before = functools.partial(last, x)
        model.lm_head.choose_matvec_rows(before)
    _to_huge_pages(model)


def _to_huge_pages(model: nn.Module) -> None:
    """Move the int8 weights that int8_matvec streams at every decode step (lm.matvec.huge_page_copies):
    a head's (shared with a tied embedding's lookups) and the row-major copies of the projections."""
    layers = [module for module in model.modules() if isinstance(module, Int8DynamicLinear) and module._rows is not None]
    for layer, copy in zip(layers, huge_page_copies([layer._rows.weight for layer in layers])):
        if layer.weight is not None and layer.weight.data_ptr() == layer._rows.weight.data_ptr():
            layer.weight = copy  # the buffer itself (the embedding's lookups read it too)
        layer._rows.rebind(copy)


def _smoothing_candidates(weight: Tensor, x: Tensor | None) -> list[Tensor | None]:
    """SmoothQuant factors for each of SMOOTHING_ALPHAS (None: unsmoothed, or not finite) for `weight`
    (out, in) given its calibration inputs x (N, in); [None] without inputs."""
    if x is None:
        return [None]
    ranges, weight_range = x.abs().amax(dim=0), weight.abs().amax(dim=0)  # once for every alpha
    return [None if alpha is None else smoothing_factors(weight, ranges, alpha, weight_range=weight_range)
            for alpha in SMOOTHING_ALPHAS]


def calibration_ids(tokenizer) -> list[int]:
    """CALIBRATION_TEXT's token ids in `tokenizer` (lm.tokenizer.Tokenizer)."""
    return tokenizer.encode(CALIBRATION_TEXT)


def calibration_inputs(model: nn.Module, ids: list[int]) -> dict[nn.Module, Tensor]:
    """The inputs (N, in) fp32 of every nn.Linear in model.layers over one forward of `ids` (N = len(ids),
    or the tokens routed to an MoE expert; no cache; `model.config` gives the attention masks), and under
    `model` itself the final hidden states (N, hidden) the LM head reads. An expert no calibration token
    reached is absent."""
    from lm.attention import FullAttention

    inputs: dict[nn.Module, list[Tensor]] = {}

    def record(module, args, output):
        inputs.setdefault(module, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())

    hooks = [module.register_forward_hook(record) for module in model.layers.modules() if isinstance(module, nn.Linear)]
    try:
        device = next(model.parameters()).device
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)[None]  # (1, T)
        positions = torch.arange(len(ids), device=device)[None]
        with torch.inference_mode():
            hidden = model(input_ids, positions, FullAttention(model.config, positions))  # (1, T, hidden)
        inputs[model] = [hidden[0].float()]
    finally:
        for hook in hooks:
            hook.remove()
    return {module: torch.cat(chunks).clone() for module, chunks in inputs.items()}  # out of inference mode


def best_on(x: Tensor | None, linear: nn.Linear, factors: list[Tensor | None], build) -> nn.Module:
    """build(linear.weight, linear.bias, s) for the scaling factors s among `factors` whose layer's output
    on `x` (N, in) is closest to `linear`'s (smallest sum of squared differences; the first without x).

    Each output row is quantised on its own (per-row int8 scales, int4 groups along the input), so a
    layer built from some rows gives exactly those rows of the whole layer's output: the candidates are
    compared on a sample of SEARCH_ROWS rows spread over the layer (a few times less work for the 1.5B's
    projections), and only the chosen one is built whole."""
    if x is None or len(factors) == 1:
        return build(linear.weight, linear.bias, factors[0])
    weight, bias = linear.weight, linear.bias
    if weight.shape[0] > SEARCH_ROWS:
        rows = torch.linspace(0, weight.shape[0] - 1, SEARCH_ROWS, device=weight.device).round().long()
        weight, bias = weight[rows], None if bias is None else bias[rows]
    expected = F.linear(x, weight.float(), None if bias is None else bias.float())
    errors = [float((build(weight, bias, s)(x).float() - expected).square().sum()) for s in factors]
    finite = [error for error in errors if error == error]  # a NaN error never wins
    return build(linear.weight, linear.bias, factors[errors.index(min(finite))] if finite else factors[0])


def awq_factors(activation_range: Tensor | None, alpha: float = 0.5) -> Tensor | None:
    """int4's activation-aware factors s (in,) fp32 from an input range (in,) and AWQ's exponent, or None
    without a range."""
    if activation_range is None:
        return None
    s = _floored(activation_range) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    return s if bool(torch.isfinite(s).all()) else None


def _floored(activation_range: Tensor) -> Tensor:
    # A channel calibration never drove (or barely) is floored at a tenth of the median range of the
    # channels it did drive: dividing its activations by a tiny factor would blow up the tokens that do
    # drive it later (then by at most 10^alpha against a typical channel).
    driven = activation_range[activation_range > 0]
    typical = float(driven.median()) if driven.numel() else 0.0
    return activation_range.clamp(min=max(1e-5, 0.1 * typical))


def smoothing_factors(weight: Tensor, activation_range: Tensor | None, alpha: float = 0.6, *,
                      weight_range: Tensor | None = None) -> Tensor | None:
    """SmoothQuant's per-input-channel factors s (in,) fp32 for `weight` (out, in) with migration strength
    `alpha`, or None without a range. `weight_range`: weight.abs().amax(0), if already computed."""
    if activation_range is None:
        return None
    if weight_range is None:
        weight_range = weight.detach().abs().amax(dim=0)
    weight_range = weight_range.float().clamp(min=1e-5)
    s = _floored(activation_range) ** alpha / weight_range ** (1 - alpha)
    return s if bool(torch.isfinite(s).all()) else None


@functools.cache
def int_mm_layout(out_features: int, in_features: int) -> str:
    """How an (out, in) int8 weight is stored for torch._int_mm(x, weight.t()) on this CPU: "rows"
    (row-major (out, in), read transposed) or "columns" (column-major: weight.t() is a contiguous
    (in, out)), whichever is faster summed over 1 and 8 rows (decode at batch 1 and 8), measured once
    per shape per process (best of 5 calls each: 5-25 ms per shape for the 270M). oneDNN picks its int8
    kernel by layout, shape and rows, and no layout wins everywhere: on the 2-core dev machine the 270M's
    down projection (640 x 2048) took 13 us (rows) vs 53 us (columns) at 1 row and 176 vs 74 us at 8;
    its gate/up projection (4096 x 640) 30 vs 146 us at 1 row and 139 vs 160 us at 8."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    layouts = {"rows": weight.t(), "columns": weight.t().contiguous()}
    totals = dict.fromkeys(layouts, 0.0)
    for rows in (1, 8):
        x = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
        for name, operand in layouts.items():
            torch._int_mm(x, operand)  # warm-up: oneDNN builds its kernel on the first call
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                torch._int_mm(x, operand)
                best = min(best, time.perf_counter() - started)
            totals[name] += best
    choice = min(totals, key=totals.get)
    log.debug("int8 (%d, %d): %s layout (rows %.0f us, columns %.0f us over 1 and 8 rows)", out_features,
              in_features, choice, totals["rows"] * 1e6, totals["columns"] * 1e6)
    return choice


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


_HAS_VNNI = _cpu_has_vnni()


def quantized_engine_available() -> bool:
    """Whether PyTorch has a quantized engine for int8 x int8 dynamic linear layers (fbgemm, x86, oneDNN)."""
    return bool(set(torch.backends.quantized.supported_engines) & {"fbgemm", "x86", "onednn"})


def _swap_linears(module: nn.Module, quantized) -> None:
    """Replace every nn.Linear under `module` by quantized(linear)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, quantized(child))
        else:
            _swap_linears(child, quantized)
