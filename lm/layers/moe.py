"""Sparse Mixture-of-Experts block of Qwen 3 MoE (transformers `Qwen3MoeSparseMoeBlock`): a router
picks the top-k of `num_experts` SwiGLU experts per token and the block returns their outputs summed
with the routing weights. No shared expert.

Parameter names are those of the published checkpoints: `gate.weight` (num_experts, hidden) is the
router; `experts.{i}.gate_proj.weight`, `experts.{i}.up_proj.weight` (moe_intermediate, hidden) and
`experts.{i}.down_proj.weight` (hidden, moe_intermediate) are expert i. The expert projections are
nn.Linear modules, so lm.quantize's int8 swap covers them; the router is not one, and stays in the
model dtype (a quantised router would change which experts are picked, as llama.cpp also avoids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.layers import ACTIVATIONS, GatedMLP


class Expert(GatedMLP):
    """One SwiGLU expert, down_proj(act(gate_proj(x)) * up_proj(x)), with plain nn.Linear projections
    (F.linear) rather than GatedMLP's lm.layers.Linear, whose (weight @ x^T) layout turns one row into
    two: an expert mostly sees one or two rows. Measured on the 2-core dev machine (AMD EPYC, MKL), one
    Qwen3-30B-A3B layer, F.linear vs Linear: 1 thread, 12.6 vs 13.8 ms at 1 token and 804 vs 1,061 ms
    at 512; 2 threads while other jobs held the cores, 32 vs 400 ms at 1 token (each two-row GEMM
    waits for the second thread; the one-row matrix-vector product does not). Only on 2 threads in a
    quiet moment was Linear ahead, at 8 tokens (57 vs 85 ms)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__(hidden_size, intermediate_size, activation, linear=nn.Linear)


class TopKRouter(nn.Module):
    """Router logits, softmax in fp32, the top-k experts per token, their probabilities renormalised
    to sum to 1 when `norm_topk_prob`, cast back to the input dtype (Qwen3MoeTopKRouter)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)  # a checkpoint overwrites it

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, hidden) -> (weights (N, top_k) in x's dtype, expert ids (N, top_k) int64), each row's
        experts in descending probability."""
        # F.linear, as the reference computes the logits: the same op gives the same logits to the
        # bit, so a near tie between the k-th and (k+1)-th expert resolves the same way.
        logits = F.linear(x, self.weight)  # (N, num_experts)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, top_k) x2
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


class SparseMoeBlock(nn.Module):
    """sum over the top-k experts e of token t: weight(t, e) * expert_e(x_t), experts SwiGLU with
    `activation` (config.json's hidden_act).

    The (token, expert) pairs are sorted by expert, so each expert runs once on the contiguous rows of
    its tokens; experts no token picked cost nothing. Two ways to run the experts, equal in result:
    a loop over the experts that received tokens (the CPU path: each runs its own matmuls, quantised
    or not), and one padded batched matmul over those experts (`grouped`, chosen on CUDA, where one
    launch per projection beats a few hundred small ones)."""

    def __init__(self, *, hidden_size: int, moe_intermediate_size: int, num_experts: int,
                 num_experts_per_tok: int, norm_topk_prob: bool, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MoE activation {activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
        self.num_experts = num_experts
        self.act = ACTIVATIONS[activation]
        self.gate = TopKRouter(hidden_size, num_experts, num_experts_per_tok, norm_topk_prob)
        self.experts = nn.ModuleList(
            Expert(hidden_size, moe_intermediate_size, activation) for _ in range(num_experts))

    def forward(self, x: Tensor, *, grouped: bool | None = None) -> Tensor:
        """x (..., hidden), e.g. (B, T, hidden) or (N, hidden) -> the same shape and dtype.

        grouped: None picks the padded batched matmul on CUDA with unquantised experts and the loop
        over experts otherwise; True or False forces one (True needs nn.Linear experts: ValueError)."""
        hidden = x.shape[-1]
        flat = x.reshape(-1, hidden)  # (N, hidden)
        weights, experts = self.gate(flat)  # (N, k) x2
        top_k = experts.shape[1]
        # pair p = (token p // k, its p % k-th expert); sorting the pairs by expert (stable, so tokens
        # stay in order within an expert) makes each expert's rows one contiguous slice.
        expert_of_pair = experts.flatten()  # (S,), S = N * k
        order = torch.argsort(expert_of_pair, stable=True)  # (S,)
        counts = torch.bincount(expert_of_pair, minlength=self.num_experts)  # (num_experts,)
        rows = flat[order // top_k]  # (S, hidden): each pair's token, grouped by expert
        if grouped is None:
            grouped = x.device.type == "cuda" and self._dense_experts()
        if grouped:
            out = self._run_grouped(rows, expert_of_pair[order], counts)
        else:
            out = self._run_loop(rows, counts)
        out = out * weights.flatten()[order, None]  # (S, hidden), scaled by each pair's routing weight
        by_pair = torch.empty_like(out)
        by_pair[order] = out  # (S, hidden) back in (token, slot) order
        # Summing over the k slots, not index_add_: deterministic on CUDA too (no atomics).
        return by_pair.view(-1, top_k, hidden).sum(dim=1).view(x.shape)

    def _run_loop(self, rows: Tensor, counts: Tensor) -> Tensor:
        """rows (S, hidden) grouped by expert, counts (num_experts,) -> expert outputs (S, hidden)."""
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                end = start + count
                out[start:end] = self.experts[expert](rows[start:end])
                start = end
        return out

    def _run_grouped(self, rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
        """The same as _run_loop, as one batched matmul per projection: the rows of the A experts
        that received tokens are padded to the largest count, C, and their weights are stacked (a
        copy of the active experts' weights per call, the price of keeping the checkpoint's
        per-expert parameters)."""
        if not self._dense_experts():
            raise ValueError("the grouped MoE path needs nn.Linear experts (unquantised); use grouped=False")
        if len(rows) == 0:  # no tokens: no expert to stack
            return rows.clone()
        active = counts.nonzero().flatten()  # (A,) expert ids, ascending
        capacity = int(counts.max())
        starts = counts.cumsum(0) - counts  # (num_experts,) first row of each expert
        slot = torch.full_like(counts, -1)
        slot[active] = torch.arange(len(active), device=counts.device)  # expert id -> index in active
        row_slot = slot[expert_of_row]  # (S,)
        row_pos = torch.arange(len(rows), device=rows.device) - starts[expert_of_row]  # (S,) row within expert
        padded = rows.new_zeros(len(active), capacity, rows.shape[1])  # (A, C, hidden)
        padded[row_slot, row_pos] = rows
        ids = active.tolist()

        def stacked(name: str) -> Tensor:  # (A, out, in)
            return torch.stack([getattr(self.experts[e], name).weight for e in ids])

        if self.experts[ids[0]].gate_up_proj is not None:  # fused (lm.layers.fuse_projections)
            gate, up = (padded @ stacked("gate_up_proj").mT).chunk(2, dim=-1)  # (A, C, inter) x2
        else:
            gate, up = padded @ stacked("gate_proj").mT, padded @ stacked("up_proj").mT
        out = (self.act(gate) * up) @ stacked("down_proj").mT  # (A, C, hidden)
        return out[row_slot, row_pos]  # (S, hidden)

    def _dense_experts(self) -> bool:
        names = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
        return all(isinstance(getattr(expert, name), nn.Linear) for expert in self.experts
                   for name in names if getattr(expert, name, None) is not None)
