"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, min-p, seeded;
repetition, presence and frequency penalties).

Every accepted temperature is numerically safe: scores are computed as (logits - max) / temperature,
so the best token scores exactly 0 and every other one a number <= 0 (-inf at worst): nothing can
overflow to +inf, and the softmax always has a term equal to 1. A tiny temperature thus converges to
the argmax, its mathematical limit, and a huge one flattens towards uniform. Temperatures below
`GREEDY_TEMPERATURE` are taken as greedy outright, because float32 cannot hold them as normal numbers
(they are subnormal, or flushed to zero on hardware that does so, which would divide 0 by 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from numba import njit

# The smallest normal float32 (~1.18e-38): any temperature below it selects the argmax (see above).
GREEDY_TEMPERATURE = float(torch.finfo(torch.float32).tiny)
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128  # generation stops after this many tokens
    temperature: float = 0.0  # 0 (or < GREEDY_TEMPERATURE) = greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = off
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's defaults (end of turn, eos)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, not included in the output
    # Most tokens of thinking (a reasoning model's <think> block), counted from the <think> that opened the block; then
    # the engine ends the block (lm.thinking). None = unlimited; 0 = no thinking.
    thinking_budget: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature); 0 = off
    # Penalties against repetition, applied to the logits before anything else (greedy included):
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated, once
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated
    repetition_penalty: float = 1.0  # CTRL / transformers: prompt and output tokens' logits / p if > 0, else x p
    # Log probabilities of each sampled token (log-softmax of the model's logits, before penalties,
    # temperature and constraints, as vLLM reports them): None = none; N = the token's own plus the N most
    # likely (OpenAI's top_logprobs, at most MAX_LOGPROBS).
    logprobs: int | None = None
    # OpenAI's logit_bias: ((token_id, bias), ...), each bias in [-100, 100] added to that token's logit
    # before everything else (at most MAX_LOGIT_BIAS entries; ids are checked against the vocabulary by
    # the engine).
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.thinking_budget is not None and (not isinstance(self.thinking_budget, int)
                                                 or self.thinking_budget < 0):
            problems.append(f"thinking_budget must be an integer >= 0, got {self.thinking_budget!r}")
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not math.isfinite(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            problems.append(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            problems.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            problems.append(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        elif any(not isinstance(t, int) or not math.isfinite(b) or not -100 <= b <= 100 for t, b in self.logit_bias):
            problems.append("logit_bias maps token ids to biases in [-100, 100]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed (a repetition penalty, a logit bias) before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0, or below GREEDY_TEMPERATURE."""
        return self.temperature < GREEDY_TEMPERATURE


def greedy_and_finite(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per row of logits (R, vocab): the argmax (the first on ties; meaningless for a row that is not
    finite) and whether every logit of the row is finite.

    On the CPU the head computes logits as (vocab, R) and hands out its transpose (lm.layers.linear), a
    layout in which torch's argmax and sum read a row with a stride of R: for R = 64 at the Gemma 3
    vocabulary they take ~70-90 ms together, the kernel below ~3 ms (2-core dev machine; ~2 vs ~5 ms at
    16 rows, parity at 8). Above 8 such rows one pass of that kernel decides both (a value is finite
    exactly when x - x == 0). Up to 8 rows numpy's argmax (the same first maximum; 18 against 220 us for
    one row of the Gemma 3 vocabulary, 1.1 against 1.3 ms for 8) and `finite_rows`; torch's argmax
    elsewhere (other devices and dtypes)."""
    rows = logits.shape[0]
    columns = logits.T
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        if rows > 8 and columns.is_contiguous():
            choices, finite = _argmax_columns(columns.detach().numpy())
            return choices.tolist(), finite.tolist()
        if rows <= 8:  # any strides (one row of a (vocab, 2) product has a stride of 2, say)
            if columns.is_contiguous():
                choices = columns.detach().numpy().argmax(axis=0)
            else:
                choices = logits.detach().numpy().argmax(axis=1)
            return choices.tolist(), finite_rows(logits)
    return torch.argmax(logits, dim=-1).tolist(), finite_rows(logits)


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of logits (R, vocab) is all finite. A row's sum is finite when its values are,
    so one pass over the logits decides (isfinite().all() takes three); a row whose sum is not (a NaN
    or inf, or finite values summing past the dtype's range) is then checked value by value."""
    finite = torch.isfinite(logits.sum(dim=-1)).tolist()
    return [ok or bool(torch.isfinite(logits[row]).all()) for row, ok in enumerate(finite)]


def compile_kernels() -> None:
    """Compile (or load from numba's on-disk cache: ~0.25 s) the kernel of `greedy_and_finite` now, not
    in the first step that batches more than 8 rows."""
    _argmax_columns(np.zeros((64, 9), np.float32))


@njit(nogil=True, cache=True)
def _argmax_columns(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """columns (vocab, R) float32 -> (argmax of each column, first on ties: int64 (R,); all finite: bool (R,)).
    Reads the values in memory order; scans a block of 64 again only when its maximum beats the best."""
    vocab, rows = columns.shape
    best = np.full(rows, -np.inf, np.float32)
    index = np.zeros(rows, np.int64)
    residue = np.zeros(rows, np.float32)  # sum of x - x: 0 unless some x is NaN or inf
    block_max = np.empty(rows, np.float32)
    for start in range(0, vocab, 64):
        end = min(vocab, start + 64)
        for r in range(rows):
            block_max[r] = columns[start, r]
        for v in range(start, end):
            for r in range(rows):
                x = columns[v, r]
                residue[r] += x - x
                if x > block_max[r]:
                    block_max[r] = x
        for r in range(rows):
            if block_max[r] > best[r]:
                best[r] = block_max[r]
                for v in range(start, end):
                    if columns[v, r] == block_max[r]:
                        index[r] = v
                        break
    return index, residue == 0


def next_token_probs(logits: torch.Tensor, params: SamplingParams, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution the next token is drawn from: float32 (vocab,) on the CPU, finite, summing to 1.

    `logits` (vocab,) must be finite (ValueError otherwise). `allowed` (vocab,) bool, optional: the only
    tokens that may be drawn (a grammar's; at least one must be True), applied before everything else.
    Greedy parameters give the one-hot vector of the argmax (the first one on ties); otherwise
    softmax((logits - max) / temperature) after top-k and top-p filtering (see the module docstring
    for why the max is subtracted first)."""
    logits = logits.detach().float().cpu()  # the generator lives on the CPU
    _require_finite(logits)
    logits = _restrict(logits, allowed)
    if params.greedy:
        return torch.zeros_like(logits).index_fill_(0, torch.argmax(logits), 1.0)
    scores = (logits - logits.max()) / params.temperature  # <= 0, the best exactly 0: cannot overflow
    # Filters rank by the logits, not the scores: a huge temperature can round every score to 0, and
    # ties made by rounding must not decide which tokens survive.
    keep = torch.ones_like(logits, dtype=torch.bool)
    if params.top_k and params.top_k < logits.shape[-1]:
        keep = logits >= torch.topk(logits, params.top_k).values[-1]
    if params.top_p < 1.0:
        order = torch.argsort(logits.masked_fill(~keep, float("-inf")), descending=True, stable=True)
        sorted_probs = torch.softmax(scores.masked_fill(~keep, float("-inf"))[order], dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        keep &= ~torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    if params.min_p > 0:
        # p_i >= min_p * p_max  <=>  score_i - score_max >= log(min_p), and score_max is 0 here
        keep &= scores >= math.log(params.min_p)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)  # the best token always survives: its term is exp(0) = 1


def apply_penalties(logits: torch.Tensor, params: SamplingParams, token_ids: list[int], prompt_len: int) -> torch.Tensor:
    """`logits` (vocab,) with the repetition penalties of `params` applied, given the request's tokens
    (`token_ids`: prompt then output, `prompt_len` of them the prompt). repetition_penalty (Keskar et al.
    2019, CTRL; transformers' RepetitionPenaltyLogitsProcessor) covers prompt and output tokens;
    presence_penalty and frequency_penalty (OpenAI's definitions, as vLLM applies them) the output only;
    then `logit_bias` is added. Prompt ids past the vocabulary (image placeholders whose id lies beyond it,
    as in the test models: Gemma 3's 4B-27B place theirs inside) have no logit and are not penalised.
    Returns a new float32 tensor; the input is unchanged."""
    logits = logits.detach().float().clone()
    if params.repetition_penalty != 1.0 and token_ids:
        vocab = logits.shape[-1]
        seen = torch.tensor(sorted(t for t in set(token_ids) if 0 <= t < vocab), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    output = token_ids[prompt_len:]
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    for token_id, bias in params.logit_bias:
        logits[token_id] += bias
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           allowed: torch.Tensor | None = None) -> int:
    """Pick the next token from one row of finite logits (vocab,), among the `allowed` ones when given
    ((vocab,) bool): the argmax when `params.greedy`, otherwise a draw from `next_token_probs` with
    `generator`. Raises ValueError on non-finite logits or when nothing is allowed."""
    if params.greedy:
        _require_finite(logits)
        return int(torch.argmax(_restrict(logits, allowed)))
    return int(torch.multinomial(next_token_probs(logits, params, allowed), 1, generator=generator))


def _restrict(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    if allowed is None:
        return logits
    allowed = allowed.to(logits.device)
    if allowed.shape != logits.shape or not bool(allowed.any()):
        raise ValueError(f"the constraint allows no token (mask of shape {tuple(allowed.shape)}, "
                         f"{int(allowed.sum())} allowed)")
    return logits.masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log probability under the model (float32 log-softmax of its logits) and the
    most likely tokens at that step: `top` is ((token_id, logprob), ...), best first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logprobs: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """The TokenLogprob of `token_id` from one row of log-probabilities (vocab,), with the `top` most
    likely tokens (best first)."""
    best = torch.topk(logprobs, top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token_id, float(logprobs[token_id]), pairs)


def _require_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits are not finite (nan or inf): nothing can be sampled from them")


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A CPU generator for one request: seeded when asked, otherwise drawn from the engine's."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=fallback))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


_OFF = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}  # greedy, no top-k, no top-p


def sampling_choices(defaults: dict, **given) -> dict:
    """temperature, top_k and top_p for SamplingParams: each as `given` (None or absent: unset), else the
    checkpoint's (`defaults`, checkpoint_sampling_defaults), else greedy / off."""
    return {name: given[name] if given.get(name) is not None else defaults.get(name, off)
            for name, off in _OFF.items()}


def checkpoint_sampling_defaults(generation_config: dict) -> dict:
    """The sampling settings a checkpoint recommends (its generation_config.json, as transformers reads
    it): {"temperature", "top_p", "top_k"} where stated, and only when `do_sample` is true (transformers
    decodes greedily otherwise, whatever the temperature says). Qwen 3 ships its thinking-mode ones."""
    if generation_config.get("do_sample") is not True:
        return {}
    names = {"temperature": float, "top_p": float, "top_k": int}
    return {name: kind(generation_config[name]) for name, kind in names.items()
            if generation_config.get(name) is not None}
