"""lm.layers.fused: the CPU kernels against the ATen arithmetic they replace (and a float64 reference),
and the cases where the callers must keep ATen."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.attention import sdpa
from lm.layers import Attention, RMSNorm, add_norm, fused, rotate

GEN = torch.Generator().manual_seed(0)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


def aten_norm(norm: RMSNorm, x):
    with torch.inference_mode():
        original = fused.usable
        fused.usable = lambda *tensors: False
        try:
            return norm(x)
        finally:
            fused.usable = original


@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 7, 64), (3, 5)])
def test_rms_norm_matches_aten_and_float64(offset, shape):
    norm = RMSNorm(shape[-1], 1e-6, offset=offset)
    norm.weight.data = randn(shape[-1])
    x = randn(*shape, scale=30.0)
    with torch.inference_mode():
        ours = norm(x)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    factor = (1 + norm.weight.double()) if offset else norm.weight.double()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * factor
    reference = aten_norm(norm, x)
    # within a few float32 ulps of the exact result, as the ATen path is
    bound = 4 * torch.finfo(torch.float32).eps * exact.abs().max()
    assert (ours.double() - exact).abs().max() <= bound
    assert (reference.double() - exact).abs().max() <= bound


@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("norms", ["both", "branch only", "next only"])
def test_add_norm_matches_the_separate_calls(offset, norms):
    branch_norm = RMSNorm(48, 1e-6, offset=offset) if norms != "next only" else None
    next_norm = RMSNorm(48, 1e-6, offset=offset) if norms != "branch only" else None
    for norm in (branch_norm, next_norm):
        if norm is not None:
            norm.weight.data = randn(48)
    residual, branch = randn(2, 3, 48, scale=4.0), randn(2, 3, 48, scale=4.0)
    with torch.inference_mode():
        summed, normed = add_norm(residual, branch, branch_norm, next_norm)
        expected = residual + (aten_norm(branch_norm, branch) if branch_norm is not None else branch)
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-6)
        if next_norm is None:
            assert normed is None
        else:
            torch.testing.assert_close(normed, aten_norm(next_norm, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [True, False, None])  # None: no q/k norm (Qwen 2), rotation only
def test_qk_norm_rope_matches_the_separate_calls(offset):
    heads, kv_heads, dim = 4, 2, 16
    attention = Attention(0, hidden_size=32, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, scale=0.25,
                          qk_norm_eps=None if offset is None else 1e-6, norm_offset=bool(offset))
    if offset is not None:
        attention.q_norm.weight.data, attention.k_norm.weight.data = randn(dim), randn(dim)
    qkv, cos, sin = randn(2, 3, heads + 2 * kv_heads, dim, scale=5.0), randn(2, 3, dim), randn(2, 3, dim)
    with torch.inference_mode():
        qk = qkv[:, :, :heads + kv_heads]
        if offset is not None:
            qk = attention._qk_norm(qk)
        expected = rotate(qk, cos[:, :, None], sin[:, :, None])
        weights = (None, None) if offset is None else (attention.q_norm.weight, attention.k_norm.weight)
        ours = fused.qk_norm_rope(qkv, heads, kv_heads, *weights, 1e-6, bool(offset), cos, sin)
    if offset is None:
        assert torch.equal(ours, expected)  # the same float32 operations in the same order
    else:
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def paged(num_blocks=12, size=4, kv_heads=2, dim=8):
    return randn(num_blocks, size, kv_heads, dim), randn(num_blocks, size, kv_heads, dim)


def gathered_attention(q, keys, values, blocks, start, length, scale):
    """Each row over its own positions, gathered and through SDPA (the path of other devices)."""
    rows, heads, dim = q.shape
    out = []
    for r in range(rows):
        k = keys[blocks[r]].flatten(0, 1)[start[r]:start[r] + length[r]]  # (L, KV, D)
        v = values[blocks[r]].flatten(0, 1)[start[r]:start[r] + length[r]]
        out.append(sdpa(q[r][None, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, scale)[0, :, 0])
    return torch.stack(out)


def test_decode_attention_reads_each_rows_positions_in_place():
    keys, values = paged()
    q = randn(3, 4, 8, scale=2.0)  # 4 query heads over 2 key heads
    blocks = torch.tensor([[3, 7, 9], [5, 6, 6], [0, 11, 2]])  # padded with a repeated block, as the runner does
    start, length = torch.tensor([0, 1, 6]), torch.tensor([12, 5, 1])  # a window's start; a single key
    ours = fused.decode_attention(q, keys, values, blocks, start, length, 0.35)
    torch.testing.assert_close(ours, gathered_attention(q, keys, values, blocks, start, length, 0.35),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[2], values[11, 2].repeat_interleave(2, dim=0))  # one key: its value exactly


def test_decode_attention_a_non_finite_row_spoils_only_itself():
    keys, values = paged()
    q = randn(2, 4, 8)
    blocks, start, length = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 0]), torch.tensor([8, 7])
    clean = fused.decode_attention(q, keys, values, blocks, start, length, 0.5)
    q[0, 1, 3] = float("nan")
    dirty = fused.decode_attention(q, keys, values, blocks, start, length, 0.5)
    assert torch.isnan(dirty[0, 1]).all() and torch.equal(dirty[1], clean[1])


def test_the_callers_keep_aten_where_the_kernels_do_not_apply():
    small = torch.ones(2, 8)
    assert fused.usable(small)
    assert not fused.usable(small.to(torch.bfloat16))
    assert not fused.usable(torch.ones(fused.FUSED_MAX_ELEMENTS + 1))
    assert not fused.usable(torch.ones(4, requires_grad=True))  # autograd records through ATen
    with torch.no_grad():
        assert fused.usable(torch.ones(4, requires_grad=True))
    norm = RMSNorm(8, 1e-6, offset=True)
    x = torch.randn(2, 8, requires_grad=True)
    norm(x).sum().backward()  # the ATen path, differentiable
    assert x.grad is not None and norm.weight.grad is not None
    bf16 = norm.to(torch.bfloat16)(torch.randn(2, 8, dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16
    assert not fused.reads_in_place(torch.ones(1, 2, 1, 8), torch.ones(4, 2, 1, 8, dtype=torch.bfloat16))


def test_kernels_compile_ahead():
    fused.compile_fused_kernels()  # the engine's start calls it: no first-step compilation
    torch.testing.assert_close(fused.rms_norm(torch.ones(1, 4), torch.zeros(4), 0.0, True), torch.ones(1, 4))


def test_inputs_that_broadcast_or_are_empty_take_aten():
    """The kernels take exact shapes (numba checks no bounds): RoPE tables of one batch row for a batch
    of three, a branch broadcast over the residual, a norm of width 0 all go to ATen, and agree with it."""
    heads, kv_heads, dim = 2, 1, 8
    attention = Attention(0, hidden_size=16, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, scale=0.3,
                          qk_norm_eps=1e-6, norm_offset=True)
    attention.fuse_projections()
    x, cos, sin = randn(3, 4, 16), randn(1, 4, dim), randn(1, 4, dim)  # tables broadcast over the batch

    class Keep:  # an AttentionContext returning q: what reaches attention is what is compared
        def attend(self, layer_idx, q, k, v, scale):
            return q

    with torch.inference_mode():
        ours = attention(x, cos, sin, Keep())
        original = fused.usable
        fused.usable = lambda *tensors: False
        try:
            expected = attention(x, cos, sin, Keep())
        finally:
            fused.usable = original
    torch.testing.assert_close(ours, expected)
    norm = RMSNorm(16, 1e-6, offset=False)
    with torch.inference_mode():
        summed, normed = add_norm(randn(3, 4, 16), randn(1, 4, 16), None, norm)  # branch broadcast
        assert summed.shape == (3, 4, 16)
        torch.testing.assert_close(normed, aten_norm(norm, summed))
        assert RMSNorm(0, 1e-6, offset=True)(torch.ones(2, 0)).shape == (2, 0)


def test_decode_rows_read_in_place_whatever_the_step_holds():
    """The decode rows take the in-place kernel however many prompt tokens share their step (q of any
    size), so a row's attention does not depend on its batch; other dtypes, devices and autograd do not."""
    keys = torch.ones(4, 2, 1, 8)
    assert fused.reads_in_place(torch.ones(1, 4, 4096, 8), keys)  # 131,072 elements: beyond the others' cap
    assert not fused.reads_in_place(torch.ones(1, 4, 1, 8, dtype=torch.bfloat16), keys)
    assert not fused.reads_in_place(torch.ones(1, 4, 1, 8), keys.to(torch.bfloat16))
    assert not fused.reads_in_place(torch.ones(1, 4, 1, 8, requires_grad=True), keys)


@pytest.mark.parametrize("offset", [True, False, None])  # None: no q/k norm (Qwen 2)
def test_decode_rows_attention_equals_the_three_calls_it_replaces(offset):
    """Norm and rotation, the cache write, then attention over each row's own positions, in one call:
    bit for bit what qk_norm_rope, index_copy_ into the cache and decode_attention give one after
    another, the new keys included (GQA, a window's start, rows of different lengths)."""
    heads, kv_heads, dim, size = 4, 2, 8, 4
    weights = (None, None) if offset is None else (randn(dim), randn(dim))
    qkv, cos, sin = randn(3, heads + 2 * kv_heads, dim, scale=3.0), randn(3, dim), randn(3, dim)
    keys, values = paged(size=size, kv_heads=kv_heads, dim=dim)
    blocks = torch.tensor([[3, 7, 9], [5, 6, 6], [0, 11, 2]])
    start, length = torch.tensor([0, 1, 6]), torch.tensor([11, 5, 1])
    slots = torch.stack([blocks[r, (start[r] + length[r] - 1) // size] * size + (start[r] + length[r] - 1) % size
                         for r in range(3)])  # each row's new token: its last position
    expected_keys, expected_values = keys.clone(), values.clone()
    with torch.inference_mode():
        qk = fused.qk_norm_rope(qkv[None], heads, kv_heads, *weights, 1e-6, bool(offset), cos[None], sin[None])[0]
        expected_keys.view(-1, kv_heads, dim).index_copy_(0, slots, qk[:, heads:])
        expected_values.view(-1, kv_heads, dim).index_copy_(0, slots, qkv[:, heads + kv_heads:])
        expected = fused.decode_attention(qk[:, :heads], expected_keys, expected_values, blocks, start, length, 0.3)
        ours = fused.decode_rows_attention(qkv, heads, kv_heads, *weights, 1e-6, bool(offset), cos, sin, keys,
                                           values, slots, blocks, start, length, 0.3)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert torch.equal(ours, expected.reshape(3, heads * dim))



@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "silu"])
def test_gated_activation_matches_aten(name):
    """The decode layer's activation (fused.gated_activation, vectorised e^x) against ATen's and float64:
    within 4 ulp of ATen's value, or of the absolute error both make where 1 + tanh cancels (GELU's
    negative tail, ~3e-7); the product with up is ATen's multiply; non-finite inputs stay non-finite."""
    from lm.layers import ACTIVATIONS

    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50_000, generator=generator) * scale for scale in (0.01, 1.0, 4.0, 30.0)]
                  + [torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e4, -1e4])])
    up = torch.randn(x.shape, generator=generator)
    code = {"gelu_pytorch_tanh": fused.GELU_TANH, "silu": fused.SILU}[name]
    ours = fused.gated_activation(x.reshape(4, -1), up.reshape(4, -1), code).reshape(-1)
    act = ACTIVATIONS[name](x)
    reference = act * up
    exact = ACTIVATIONS[name](x.double()) * up.double()
    allowed = 4 * torch.from_numpy(np.spacing(reference.abs().numpy())).double() + 5e-7 * up.double().abs()
    assert bool(((ours.double() - reference.double()).abs() <= allowed).all())
    # no less accurate than ATen against float64, beyond that floor
    assert (ours.double() - exact).abs().max() <= (reference.double() - exact).abs().max() + 5e-7 * up.abs().max()
    special = torch.tensor([[float("inf"), float("-inf"), float("nan")]])
    assert not bool(torch.isfinite(fused.gated_activation(special, torch.ones_like(special), code)).any())
