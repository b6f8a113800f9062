"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, seeded).

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

import torch

# The smallest normal float32 (~1.18e-38): any temperature below it selects the argmax (see above).
GREEDY_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128  # generation stops after this many tokens
    temperature: float = 0.0  # 0 (or < GREEDY_TEMPERATURE) = greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = off
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's defaults (end of turn, eos)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, not included in the output
    # Most tokens of thinking (a reasoning model's <think> block), counted from the last <think>; then
    # the engine ends the block (lm.thinking). None = unlimited; 0 = no thinking.
    thinking_budget: int | None = None

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
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0, or below GREEDY_TEMPERATURE."""
        return self.temperature < GREEDY_TEMPERATURE


def next_token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the next token is drawn from: float32 (vocab,) on the CPU, finite, summing to 1.

    `logits` (vocab,) must be finite (ValueError otherwise). Greedy parameters give the one-hot
    vector of the argmax (the first one on ties); otherwise softmax((logits - max) / temperature)
    after top-k and top-p filtering (see the module docstring for why the max is subtracted first)."""
    logits = logits.detach().float().cpu()  # the generator lives on the CPU
    _require_finite(logits)
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
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1)  # the best token always survives: its term is exp(0) = 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of finite logits (vocab,): the argmax when `params.greedy`,
    otherwise a draw from `next_token_probs` with `generator`. Raises ValueError on non-finite logits."""
    if params.greedy:
        _require_finite(logits)
        return int(torch.argmax(logits))
    return int(torch.multinomial(next_token_probs(logits, params), 1, generator=generator))


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
