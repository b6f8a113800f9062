"""Exact greedy tokens from a float LM head at a quarter of its bytes: an int8 screen, then the float
head on the few rows that can still win (CPU).

Decoding one token on the CPU reads the whole head: 262,144 x 640 fp32 (671 MB) for the 270M, 64 MB for
a 64-wide test model, most of a step. For a greedy request only the argmax matters, and an int8 copy of
the head bounds every logit closely enough to rule almost all rows out. For a row x (hidden,) of the
final hidden states:

- x is quantised per row, x^ = q_x * s_x with s_x = max|x| / 127, so |x_j - x^_j| <= s_x / 2; each head
  row v holds W^_v = q_v * w_v (w_v = max|W_v| / 127), |W_vj - W^_vj| <= w_v / 2; the int8 product
  (int32 accumulators, exact: lm.matvec.int8_products or torch._int_mm, whichever was faster
  here at that row count) gives a_v = (q_x . q_v) s_x w_v;
- |x . W_v - a_v| <= s_x / 2 * |W_v|_1 + w_v / 2 * |x^|_1 = e_v (the two roundings' worst case);
- a row can be the argmax only if a_v + e_v >= max_u (a_u - e_u): the candidates. Their logits are then
  computed from the float head itself, in the model's dtype, as a one-row head computes them, and the
  first of the largest wins, as torch.argmax picks. (A head over R rows at once may round a logit
  differently in its last bits, as any two matrix shapes may: a near tie within a few ulps can go
  either way, as between batch sizes of the full head.)

The margin also covers floating-point rounding: of the screen's own arithmetic (a factor 1 + 2^-10 on
e_v), of the candidates' dot products (hidden * eps(fp32) * |W_v|_1 * max|x|, the worst case of a sum
of `hidden` products) and of the logits' rounding to the model dtype (2 eps(dtype) |logit|), so a row
whose logit, however rounded, could equal the winner's is a candidate. On the 270M's real hidden states
7 to ~20,000 of 262,144 rows remain (median ~510, over 90 greedy steps).

The screen answers None, and the caller computes the full head, when x is not finite, when a logit
or a bound could overflow, when max|x| < 1e-30 (all zero: every row ties; or so small that the fp32
scales lose precision), or for more rows than SCREEN_MAX_ROWS (there the float head's matrix-matrix
product is as fast), or when a row leaves more than vocab / 8 candidates (flat logits: hidden states
of random tokens leave most rows of the 270M's head).

Per row of x, one vectorised pass writes every head row's upper and lower bound (float32, 8 bytes a
head row), numpy takes the largest lower bound and the rows whose upper bound reaches it: memory-bound,
~0.13 ms a row for 262,144 head rows. (A single pass that also kept the running maximum did not
vectorise: 0.46 ms a row.) Measured on the 2-core dev machine, screen against full head: the 270M's fp32
head 12.8 vs 24 ms at 1 row, 24 vs 58 ms at 8, 37 vs 113 ms at 16; the 64-wide test head 0.9-1.7 vs
4.4 ms at 1 row, 7.5 vs 10.9 ms at 16 (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from numba import njit
from torch import Tensor

from lm.layers import SMALL_WEIGHT, Linear, linear, linear_transposed
from lm.matvec import huge_page_copies, int8_products

log = logging.getLogger(__name__)

# id(head weight) -> its screen, while some engine holds it (the screen holds the weight, so the id
# cannot be reused while the entry lives)
_SCREENS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SCREENS_LOCK = threading.Lock()

SCREEN_MAX_ROWS = 16  # rows (sampling requests of a step) the screen takes; more go to the full head
MIN_SCREEN_BYTES = 8 << 20  # heads smaller than this are read whole (the screen's fixed cost is ~0.2 ms)
MAX_CANDIDATE_FRACTION = 8  # more than vocab / 8 candidates: the screen gains nothing, read the head
_SAFETY = 1.0 + 2.0**-10  # on the quantisation bound: the screen's own fp32 roundings
_F32_EPS = float(torch.finfo(torch.float32).eps)


class GreedyHeadScreen:
    """The int8 screen of one float head weight (vocab, hidden), kept with the weight itself.

    Built when an engine starts, from the weights at that moment: the int8 copy does not follow later
    changes. A head changed in place is detected by its version counter (`stale`; writes through
    `.data` are not), a replaced one by the engine (lm.engine.model_runner), and both are then read in
    full. Raises ValueError for a weight that is not a finite 2-D float CPU tensor, or where
    torch._int_mm is not exact at its hidden size (checked on 256 rows)."""

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() != 2 or not weight.is_floating_point() or weight.device.type != "cpu":
            raise ValueError(f"the screen takes a 2-D float CPU head weight, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        self.weight = weight  # (vocab, hidden), the model's own tensor: the candidates' logits come from it
        self._version = weight._version  # an in-place change of the head after this makes the screen stale
        vocab, hidden = weight.shape
        if vocab == 0 or hidden == 0:
            raise ValueError(f"the head weight is empty: {tuple(weight.shape)}")
        self._q = torch.empty(vocab, hidden, dtype=torch.int8)  # row-major: _int_mm reads its transpose
        step, l1 = torch.empty(vocab), torch.empty(vocab)  # w_v, |W_v|_1 (float32)
        for start in range(0, vocab, 16384):  # in slices: no fp32 copy of a whole bf16 head
            rows = weight[start:start + 16384].detach().float()
            if not bool(torch.isfinite(rows).all()):
                raise ValueError("the head weight has values that are not finite")
            part = step[start:start + 16384]
            torch.div(rows.abs().amax(dim=1), 127.0, out=part).clamp_(min=1e-30)  # a zero row's too
            self._q[start:start + 16384] = torch.round(rows / part[:, None]).clamp_(-127, 127)
            torch.sum(rows.abs(), dim=1, out=l1[start:start + 16384])
        if not bool(torch.isfinite(l1).all()):
            raise ValueError("a head row's L1 norm overflows float32")
        probe = torch.randint(-127, 128, (SCREEN_MAX_ROWS, hidden), dtype=torch.int8,
                              generator=torch.Generator().manual_seed(0))
        if not torch.equal(torch._int_mm(probe, self._q[:256].t()).long(), probe.long() @ self._q[:256].long().t()):
            raise ValueError(f"torch._int_mm is not exact at hidden size {hidden} here")  # it is not at 1
        self._q = huge_page_copies([self._q])[0]  # streamed whole at every screened step
        self._q_rows = self._q.numpy()
        # rows of hidden up to which lm.matvec.int8_products computes the screen's products (the same exact
        # int32 sums as _int_mm, so the choice changes no result, only the time)
        self.products_rows = self._fastest_rows(hidden)
        self._step, self._l1 = step.numpy(), l1.numpy()
        self._max_l1 = max(float(self._l1.max()), 1e-30)
        # the largest max|x| taken: |logit| <= |W_v|_1 max|x| stays under a quarter of the dtype's range,
        # and the kernel's float32 bounds (up to (2 + hidden / 127) |W_v|_1 max|x|) under 1e37
        self._max_abs = min(float(torch.finfo(weight.dtype).max) / 4, 1e37 / (2 + hidden / 127)) / self._max_l1
        self._limit = max(1, vocab // MAX_CANDIDATE_FRACTION)  # candidates per row beyond which it gains nothing
        # rounding of the candidates' logits to the model dtype (twice its epsilon, relative), and of
        # the screen's own fp32 arithmetic on a_v (four fp32 epsilons)
        self._out_eps = 2.0 * float(torch.finfo(weight.dtype).eps) + 4.0 * _F32_EPS

    def _fastest_rows(self, hidden: int) -> int:
        """The rows (1 to SCREEN_MAX_ROWS) up to which int8_products took less time than _int_mm here,
        each timed right after the other (best of 3): the screen follows the layers' ATen kernels, whose
        OpenMP threads spin for a while after each call and share the cores with numba's."""
        generator = torch.Generator().manual_seed(0)
        fastest = 0
        for rows in range(1, SCREEN_MAX_ROWS + 1):
            q = torch.randint(-127, 128, (rows, hidden), dtype=torch.int8, generator=generator)
            int8_products(q.numpy(), self._q_rows)  # warm-up (the first call may load the compiled kernel)
            times = [float("inf"), float("inf")]
            for _ in range(3):
                started = time.perf_counter()
                torch._int_mm(q, self._q.t())
                middle = time.perf_counter()
                int8_products(q.numpy(), self._q_rows)
                times = [min(times[0], middle - started), min(times[1], time.perf_counter() - middle)]
            if times[1] >= times[0]:
                break
            fastest = rows
        return fastest

    @classmethod
    def for_model(cls, model, *, force: bool = False) -> GreedyHeadScreen | None:
        """The screen of `model`'s head (lm.models.base: `lm_head`, or the tied `embed_tokens`), or None
        where it does not apply: a quantised head (already int8), a head off the CPU, logit soft-capping
        (a tanh after the head can merge near logits into ties), no int8 matrix product in this PyTorch,
        or (unless `force`) a head under MIN_SCREEN_BYTES. Engines of the same head share one screen while
        the head is unchanged."""
        weight = head_weight(model)
        if weight is None or not weight.is_floating_point() or weight.device.type != "cpu":
            return None
        if getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None:
            return None
        if not force and weight.numel() * weight.element_size() < MIN_SCREEN_BYTES:
            return None
        with _SCREENS_LOCK:  # engines of one model share its screen (the 270M's takes ~1 s to build)
            screen = _SCREENS.get(id(weight))
            if screen is None or screen.weight is not weight or screen.stale:
                try:
                    screen = _SCREENS[id(weight)] = cls(weight)
                except (ValueError, RuntimeError, NotImplementedError) as exc:  # or no int8 product here
                    log.info("no greedy screen for this head: %s", exc)
                    return None
            return screen

    @property
    def stale(self) -> bool:
        """The head weight was changed in place since the screen was built (its version counter moved;
        writes through `.data` do not move it)."""
        return self.weight._version != self._version

    def candidates(self, hidden: Tensor) -> list[Tensor | None] | None:
        """Per row of `hidden` (R, hidden): the rows of the head (int64, ascending) whose logit may be
        that row's largest, or None for a row with too many; None for all when the screen cannot decide
        (see the module docstring)."""
        rows = self._rows(hidden)
        return None if rows is None else list(rows)

    def _rows(self, hidden: Tensor) -> Iterator[Tensor | None] | None:
        """`candidates`, one row at a time (a caller can stop at the first row with too many)."""
        rows = hidden.shape[0]
        if rows == 0 or rows > SCREEN_MAX_ROWS or hidden.device.type != "cpu" or self.stale:
            return None
        x = hidden.detach().float().contiguous()
        quantized = _quantize_rows(x.numpy(), self._max_abs)
        if quantized is None:
            return None  # NaN or inf (the full head reports it), or logits that might overflow the dtype
        q_x, bounds = quantized  # (R, hidden) int8; (R, 3) float64: s_x, |x^|_1 bound, max|x|
        if rows <= self.products_rows:
            accumulators = int8_products(q_x, self._q_rows)  # (R, vocab) int32, exact
        else:
            accumulators = torch._int_mm(torch.from_numpy(q_x), self._q.t()).numpy()  # the same sums
        rounding = x.shape[1] * _F32_EPS  # the candidates' dot products' rounding, per unit of max|x| |W_v|_1
        return self._each_row(accumulators, bounds, rounding)

    def _each_row(self, accumulators: np.ndarray, bounds: np.ndarray, rounding: float) -> Iterator[Tensor | None]:
        upper, lower = np.empty(accumulators.shape[1], np.float32), np.empty(accumulators.shape[1], np.float32)
        out_eps = np.float32(self._out_eps)
        for row in range(accumulators.shape[0]):
            s_x, x_l1, largest = bounds[row]
            # e_v = per_l1 |W_v|_1 + per_step w_v (float32: the roundings of these factors are in _SAFETY)
            per_l1, per_step = _SAFETY * 0.5 * s_x + largest * rounding, _SAFETY * 0.5 * x_l1
            _row_bounds(accumulators[row], self._step, self._l1, np.float32(s_x), np.float32(per_l1),
                        np.float32(per_step), out_eps, upper, lower)
            index = np.flatnonzero(upper >= lower.max())  # reaches the largest lower bound
            yield torch.from_numpy(index) if index.shape[0] <= self._limit else None

    def argmax(self, hidden: Tensor) -> list[int] | None:
        """The greedy token of each row of `hidden` (R, hidden) (final-norm states, the model's dtype):
        the index of the largest logit of hidden @ weight^T as the float head computes it, the first on
        ties. None when the screen cannot decide cheaply (see the module docstring): compute the head."""
        found = self._rows(hidden)
        if found is None:
            return None
        # the candidates' logits as the full head's product computes them (lm.layers.linear chooses by size)
        product = linear if self.weight.numel() <= SMALL_WEIGHT else linear_transposed
        chosen = []
        for row, index in enumerate(found):
            if index is None:
                return None  # a row with too many candidates: the full head for all (one call costs as much)
            logits = product(hidden[row:row + 1], self.weight.index_select(0, index))  # (1, C), model dtype
            chosen.append(int(index[int(torch.argmax(logits))]))
        return chosen


def head_weight(model) -> Tensor | None:
    """The weight (vocab, hidden) `model.logits` multiplies by when its head is a plain linear map:
    `lm_head`'s, or the tied `embed_tokens`' (lm.models.base); None for a quantised head or a network
    without the family attributes (a test double with logits of its own)."""
    if not hasattr(model, "lm_head"):
        return None
    head = model.lm_head
    if head is None:
        embed = getattr(model, "embed_tokens", None)
        return embed.weight if isinstance(embed, torch.nn.Embedding) else None
    return head.weight if type(head) is Linear and head.bias is None else None


def compile_screen_kernel() -> None:
    """Compile (or load from numba's on-disk cache) the screen's kernels now, not in the first step."""
    _quantize_rows(np.ones((1, 4), np.float32), 1.0)
    one, out = np.ones(4, np.float32), np.empty(4, np.float32)
    _row_bounds(np.zeros(4, np.int32), one, one, *np.ones(4, np.float32), out, np.empty_like(out))


@njit(nogil=True, cache=True)
def _quantize_rows(x, max_abs):
    """x (R, hidden) float32 -> (q_x int8 (R, hidden), (R, 3) float64: s_x = max|x| / 127, a bound on
    |x^|_1, max|x|), or None when some value is not finite or exceeds max_abs, or a row's max|x| is
    under 1e-30."""
    rows, hidden = x.shape
    q = np.empty((rows, hidden), np.int8)
    bounds = np.empty((rows, 3), np.float64)
    for r in range(rows):
        largest = 0.0
        total = 0.0
        for j in range(hidden):
            value = abs(np.float64(x[r, j]))
            if not value <= max_abs:  # NaN, inf or too large
                return None
            largest = max(largest, value)
            total += value
        if largest < 1e-30:  # all zero (every row ties) or so small that fp32 scales lose precision
            return None
        step = largest / 127.0
        inverse = 1.0 / step
        for j in range(hidden):
            q[r, j] = np.int8(min(127.0, max(-127.0, np.round(x[r, j] * inverse))))
        bounds[r, 0] = step
        bounds[r, 1] = total + hidden * step / 2  # |x^_j| <= |x_j| + s_x / 2
        bounds[r, 2] = largest
    return q, bounds


@njit(nogil=True, cache=True)
def _row_bounds(accumulators, step, l1, scale, per_l1, per_step, out_eps, upper, lower):
    """One row's bounds on every head row's logit, in float32 (vectorised; its roundings, a few eps of
    |a_v|, are inside out_eps): a_v = accumulators[v] * (scale * step[v]), e_v = per_l1 * l1[v] + per_step *
    step[v] + out_eps (|a_v| + e_v); upper = a_v + e_v, lower = a_v - e_v. accumulators (vocab,) int32:
    q_x . q_v; step, l1 (vocab,) float32: w_v, |W_v|_1; upper, lower (vocab,) float32, written."""
    for v in range(accumulators.shape[0]):
        approx = np.float32(accumulators[v]) * (scale * step[v])
        error = per_l1 * l1[v] + per_step * step[v]
        error += out_eps * (abs(approx) + error)
        upper[v] = approx + error
        lower[v] = approx - error
