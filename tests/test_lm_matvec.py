"""lm.matvec: int8 weights times a few fp32 rows, each row quantised on its own, against exact float64
products and the bounds its quantisation promises; and Int8DynamicLinear's use of it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.matvec import Int8Rows, int8_matvec, int8_products
from lm.quantize import MATVEC_MAX_ROWS, Int8DynamicLinear


def _operands(out_features=300, in_features=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) * 0.01 + 1e-3
    return weight, scales, generator


def _levels(in_features: int) -> int:
    return min(32767, (2**31 - 1) // (127 * in_features))


@pytest.mark.parametrize("in_features", [96, 640, 8960])
def test_each_row_is_within_half_a_step_of_its_own_grid(in_features):
    """|y - x W^T| <= s_r / 2 * |W_o|_1 (plus float32 rounding), s_r = max|x_r| / L: the bound of rounding
    each activation to its row's grid of L levels, against the exact float64 product."""
    weight, scales, generator = _operands(200, in_features)
    x = torch.randn(5, in_features, generator=generator) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.5])[:, None]
    x[4, 3] = 200.0  # one outlier widens only its own row's step
    out = int8_matvec(x, weight, scales)
    dequantised = weight.double() * scales.double()[:, None]  # (out, in)
    exact = x.double() @ dequantised.T
    step = x.abs().amax(dim=1).double() / _levels(in_features)  # (rows,)
    bound = step[:, None] / 2 * dequantised.abs().sum(dim=1)[None, :] * (1 + 1e-4) + exact.abs() * 2**-21
    assert out.dtype == torch.float32 and out.shape == (5, 200)
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_the_integer_sums_cannot_overflow_at_the_largest_inputs():
    """Every weight at +127 and every activation at its row's maximum: the int32 sum is in * 127 * L,
    the largest the grid allows, and comes out exact."""
    for in_features in (64, 1536, 8960):
        weight = torch.full((64, in_features), 127, dtype=torch.int8)
        scales = torch.ones(64)
        x = torch.ones(2, in_features)
        x[1] *= -1
        out = int8_matvec(x, weight, scales)
        levels = _levels(in_features)
        assert in_features * 127 * levels <= 2**31 - 1
        expected = in_features * 127.0  # (q . x^) * s_r = in * 127 * L * (1 / L)
        torch.testing.assert_close(out, torch.tensor([[expected], [-expected]]).expand(2, 64), rtol=1e-6, atol=0)


def test_rows_are_independent_and_a_bad_row_spoils_only_itself():
    weight, scales, generator = _operands()
    x = torch.randn(4, 96, generator=generator)
    together = int8_matvec(x, weight, scales)
    for row in range(4):
        assert torch.equal(int8_matvec(x[row:row + 1], weight, scales)[0], together[row])
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = x.clone()
        spoiled[1, 7] = bad
        out = int8_matvec(spoiled, weight, scales)
        assert not torch.isfinite(out[1]).any()
        assert torch.equal(out[[0, 2, 3]], together[[0, 2, 3]])
    zero = int8_matvec(torch.zeros(1, 96), weight, scales, bias=torch.arange(300.0))
    assert torch.equal(zero[0], torch.arange(300.0))


def test_smoothing_and_bias_are_the_same_float32_operations_done_outside():
    weight, scales, generator = _operands()
    x = torch.randn(3, 96, generator=generator)
    inverse = torch.rand(96, generator=generator) + 0.5
    bias = torch.randn(300, generator=generator)
    inside = int8_matvec(x, weight, scales, inv_smoothing=inverse, bias=bias)
    outside = int8_matvec(x * inverse, weight, scales) + bias
    assert torch.equal(inside, outside)


def test_the_split_over_threads_changes_nothing():
    weight, scales, generator = _operands(4096 + 17, 64)
    x = torch.randn(2, 64, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = int8_matvec(x, weight, scales)
        torch.set_num_threads(2)
        split = int8_matvec(x, weight, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, split)


@pytest.mark.parametrize("shape", [(1, 300, 64), (3, 1000, 640), (2, 129, 8960)])
def test_int8_products_are_the_exact_integer_sums(shape):
    rows, out_features, in_features = shape
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    weight[0] = 127
    q[0] = 127  # the largest sum there is, in * 127 * 127
    products = int8_products(q.numpy(), weight.numpy())
    assert products.dtype == np.int32
    assert torch.equal(torch.from_numpy(products).long(), q.long() @ weight.long().T)
    with pytest.raises(ValueError, match="int8_products takes int8"):
        int8_products(q.numpy().astype(np.int16), weight.numpy())


def test_operands_of_the_wrong_kind_are_refused_by_name():
    weight, scales, _ = _operands()
    with pytest.raises(ValueError, match="int8 weight"):
        Int8Rows(weight.float(), scales)
    with pytest.raises(ValueError, match="scales"):
        Int8Rows(weight, scales[:-1])
    rows = Int8Rows(weight, scales)
    for x in (torch.randn(2, 95), torch.randn(2, 96, dtype=torch.float64), torch.randn(96)):
        with pytest.raises(ValueError, match=r"x \(N, 96\) float32"):
            rows(x)


@pytest.mark.parametrize("per_token", [True, False])
def test_a_layer_takes_int8_matvec_up_to_its_rows_and_errs_less_there(per_token):
    """Up to matvec_rows rows the layer's output is int8_matvec's (smoothing and bias inside); above, its
    fbgemm path's. Both multiply the same int8 weights; 16-bit activations err far less than 8-bit."""
    torch.manual_seed(0)
    weight, bias = torch.randn(256, 128), torch.randn(256)
    smoothing = torch.rand(128) + 0.5
    layer = Int8DynamicLinear(weight, bias if per_token else None, per_token=per_token, smoothing=smoothing)
    assert layer.set_matvec_rows(3) == 3
    dequantised = layer.int8_weight().float() * layer.scales.float()[:, None] / smoothing  # W diag(s) / s
    x = torch.randn(2, 4, 128)
    few, many = x[:1, :3], x  # 3 rows, 8 rows
    expected_bias = bias if per_token else None
    direct = int8_matvec(few.reshape(3, 128), layer.int8_weight().contiguous(), layer.scales.float(),
                         inv_smoothing=layer.inv_smoothing, bias=expected_bias)
    assert torch.equal(layer(few), direct.reshape(1, 3, 256))
    errors = {}
    for name, inputs in (("matvec", few), ("fbgemm", many)):
        exact = F.linear(inputs.double(), dequantised.double(), None if expected_bias is None else expected_bias.double())
        errors[name] = float((layer(inputs).double() - exact).norm() / exact.norm())
    assert errors["matvec"] < 0.01 * errors["fbgemm"]


def test_choosing_keeps_row_major_weights_only_where_int8_matvec_is_taken():
    torch.manual_seed(0)
    layer = Int8DynamicLinear(torch.randn(512, 256), kernel="fbgemm")
    assert layer.weight is None and layer.packed_nbytes() == 512 * 256  # fbgemm's packed copy only
    rows = layer.choose_matvec_rows()
    assert 0 <= rows <= MATVEC_MAX_ROWS and layer.matvec_rows == rows
    assert layer.packed_nbytes() == 512 * 256 * (2 if rows else 1)  # a row-major copy beside it, if taken
    assert layer.set_matvec_rows(0) == 0 and layer.packed_nbytes() == 512 * 256
    moved = copy.deepcopy(layer)
    moved.set_matvec_rows(2)
    moved.to("meta")  # off the CPU: neither fbgemm nor int8_matvec
    assert moved.matvec_rows == 0 and moved.packed_nbytes() == 0


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("fused_layer", [True, False])
def test_a_layer_reading_its_own_buffer_takes_int8_matvec_when_no_slower(monkeypatch, per_token, fused_layer):
    """The head (per tensor) reads its weight buffer itself and takes int8_matvec at 0.95 of fbgemm's
    time; a per-token fbgemm layer, which would keep a row-major copy beside the packed one, does not.
    A per-token projection of a layer decode_stack fuses takes one row whatever the timings (the fused
    layer needs all four projections there); other layers and the head only where it measured so."""
    import lm.quantize as quantize

    timed = []

    def seconds(function, *args):
        timed.append(args[0].shape[0])
        return share if isinstance(function, Int8Rows) else 1.0

    monkeypatch.setattr(quantize, "_seconds", seconds)
    layer = Int8DynamicLinear(torch.randn(256, 128), per_token=per_token)
    forced = per_token and fused_layer
    share = 0.95
    assert layer.choose_matvec_rows(fused_layer=fused_layer) == (1 if forced else 0 if per_token else MATVEC_MAX_ROWS)
    assert (1 in timed) != forced  # one row is not measured for a fused per-token layer
    share = 1.05
    assert layer.choose_matvec_rows(fused_layer=fused_layer) == (1 if forced else 0)
    assert (layer._rows is not None) == forced


def test_quantize_model_measures_each_shape_once_and_shares_the_choice():
    from lm.layers import fuse_projections
    from lm.models.gemma3 import Gemma3TextModel
    from lm.quantize import quantize_model
    from test_lm_engine import tiny_config

    torch.manual_seed(0)
    model = fuse_projections(Gemma3TextModel(tiny_config(hidden_size=128, intermediate_size=256)).eval())
    quantize_model(model, "int8-dynamic")
    by_shape: dict[tuple, set[int]] = {}
    for module in model.layers.modules():
        if isinstance(module, Int8DynamicLinear):
            by_shape.setdefault((module.out_features, module.in_features), set()).add(module.matvec_rows)
            assert (module._rows is not None) == bool(module.matvec_rows)
    assert len(by_shape) == 4 and all(len(rows) == 1 for rows in by_shape.values())  # qkv, o, gate/up, down
    assert isinstance(model.lm_head, Int8DynamicLinear) and 0 <= model.lm_head.matvec_rows <= MATVEC_MAX_ROWS
    from service.bench.lm import _kernel_choices  # what `tessera bench lm` reports

    report = _kernel_choices(model)
    for module in model.layers.modules():
        if isinstance(module, Int8DynamicLinear):
            other = {"fbgemm": "fbgemm", "int_mm": "_int_mm"}[module.kernel]
            expected = f"int8_matvec at <= {module.matvec_rows} rows, {other} above" if module.matvec_rows else other
            assert f"projection {module.out_features}x{module.in_features}: {expected}" in report


def test_huge_page_copies_hold_the_same_values_and_outlive_their_mapping_name():
    import gc

    from lm.matvec import huge_page_copies

    tensors = [torch.randint(-127, 128, (300, 64), dtype=torch.int8), torch.randn(7, 3), torch.arange(5)]
    copies = huge_page_copies(tensors)
    gc.collect()
    for tensor, copy in zip(tensors, copies):
        assert copy.dtype == tensor.dtype and torch.equal(copy, tensor) and copy.is_contiguous()
        assert copy.data_ptr() % 64 == 0 and copy.data_ptr() != tensor.data_ptr()
    weight, scales, generator = _operands()
    rows = Int8Rows(weight, scales)
    x = torch.randn(2, 96, generator=generator)
    before = rows(x)
    rows.rebind(huge_page_copies([weight])[0])
    assert torch.equal(rows(x), before)
    with pytest.raises(ValueError, match="rebind"):
        rows.rebind(weight[:10].contiguous())
    assert huge_page_copies([]) == []


def test_edge_cases_found_in_review():
    """Autograd inputs take the other path; -128 weights (outside the overflow bound) are refused;
    a deepcopy reads its own copy of a weight it shares with its buffer; empty tensors copy."""
    import gc

    from lm.matvec import huge_page_copies

    torch.manual_seed(0)
    layer = Int8DynamicLinear(torch.randn(200, 96), torch.randn(200))
    layer.set_matvec_rows(4)
    x = torch.randn(2, 96, requires_grad=True)
    with_grad, without = layer(x), layer(x.detach())  # the first through fbgemm (no numpy() of a grad tensor)
    assert float((with_grad.detach() - without).norm() / without.norm()) < 0.03  # 8-bit against 16-bit activations
    with pytest.raises(ValueError, match="-127, 127"):
        Int8Rows(torch.full((64, 8), -128, dtype=torch.int8), torch.ones(64))
    head = Int8DynamicLinear(torch.randn(300, 64), per_token=False)
    head.weight = huge_page_copies([head.weight])[0]
    head.set_matvec_rows(2)
    assert head._rows.weight.data_ptr() == head.weight.data_ptr()
    clone = copy.deepcopy(head)
    gc.collect()
    assert clone._rows.weight is clone.weight and clone._rows.arrays[1].ctypes.data == clone.weight.data_ptr()
    assert torch.equal(clone(torch.ones(1, 64)), head(torch.ones(1, 64)))
    (empty,) = huge_page_copies([torch.empty(0, 4)])
    assert empty.shape == (0, 4)


def test_a_bf16_model_keeps_no_copies_for_int8_matvec():
    from lm.layers import fuse_projections
    from lm.models.gemma3 import Gemma3TextModel
    from lm.quantize import quantize_model
    from test_lm_engine import tiny_config

    torch.manual_seed(0)
    model = fuse_projections(Gemma3TextModel(tiny_config(hidden_size=128, intermediate_size=256)).eval())
    quantize_model(model.to(torch.bfloat16), "int8-dynamic")
    assert not any(getattr(module, "_rows", None) is not None for module in model.modules())


@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_is_the_first_largest_output_and_reports_rows_that_are_not_finite(threads):
    """Int8Rows.argmax against torch.argmax of the same outputs, and finiteness per row; smoothing and
    bias included. Two equal largest outputs, one in each thread's part: the first wins."""
    weight, scales, generator = _operands(4096 + 17, 64)
    smoothing = torch.rand(64, generator=generator) + 0.5
    bias = torch.randn(4096 + 17, generator=generator)
    x = torch.randn(4, 64, generator=generator)
    x[3, 5] = float("nan")  # that row's outputs are all NaN: not finite; the other rows are untouched
    weight[4000], scales[4000] = weight[100], scales[100]
    tied_bias = bias.clone()
    tied_bias[100] = tied_bias[4000] = 1e4  # rows 100 and 4000: equal outputs, far above the rest
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows = Int8Rows(weight, scales, inv_smoothing=smoothing, bias=bias)
        outputs = rows(x)
        choices, finite = rows.argmax(x)
        tied = Int8Rows(weight, scales, inv_smoothing=smoothing, bias=tied_bias)
        tied_outputs = tied(x[:3])
        tied_choices, _ = tied.argmax(x[:3])
    finally:
        torch.set_num_threads(threads_before)
    assert finite == [True, True, True, False]
    assert choices[:3] == torch.argmax(outputs[:3], dim=-1).tolist()
    assert torch.equal(tied_outputs[:, 100], tied_outputs[:, 4000])
    assert tied_choices == [100, 100, 100]


def test_a_quantized_head_decides_greedy_tokens_only_where_its_forward_takes_int8_matvec():
    torch.manual_seed(0)
    head = Int8DynamicLinear(torch.randn(3000, 64), None, per_token=True)
    x = torch.randn(2, 64)
    assert head.greedy(x) is None  # matvec_rows 0: its forward is fbgemm's
    head.set_matvec_rows(2)
    assert head.greedy(x) == torch.argmax(head(x), dim=-1).tolist()
    assert head.greedy(torch.randn(3, 64)) is None  # more rows than matvec_rows
    bad = x.clone()
    bad[1, 0] = float("inf")
    assert head.greedy(bad) is None  # a row whose outputs are not finite: the full outputs report it


def test_argmax_merges_the_parts_in_order_whatever_the_thread_count():
    """The parts' merge of _int8_matvec_argmax called with 1 to 4 parts directly (on any machine): the
    first of equal largest outputs lying in different parts wins, as torch.argmax picks it."""
    from lm.matvec import _NO_ARRAY, _int8_matvec_argmax

    weight, scales, generator = _operands(1024, 32)
    for copy_to in (300, 600, 1000):  # rows 40 and copy_to give equal outputs, far above the rest
        weight[copy_to], scales[copy_to] = weight[40], scales[40]
    bias = torch.zeros(1024)
    bias[[40, 300, 600, 1000]] = 1e4
    x = torch.randn(3, 32, generator=generator)
    expected = torch.argmax(int8_matvec(x, weight, scales, bias=bias), dim=-1).tolist()
    assert expected == [40, 40, 40]
    for parts in (1, 2, 3, 4):
        out = np.empty((3, 1024), np.float32)
        scratch = [np.empty((3, parts), dtype) for dtype in (np.float32, np.int64, np.float32)]
        choices, finite = _int8_matvec_argmax(x.numpy(), _NO_ARRAY, weight.numpy(), scales.numpy(), bias.numpy(), out,
                                              parts, *scratch)
        assert choices.tolist() == expected and finite.all(), parts
