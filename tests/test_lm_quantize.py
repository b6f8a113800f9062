"""Quantisation on the real 270M (int8 weight-only, int8 x int8 dynamic, int4): accuracy against fp32,
and each quantised linear against the float product of its own dequantised weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lm import quantize
from lm.attention import FullAttention
from lm.quantize import (Int4Linear, Int8DynamicLinear, Int8Linear, awq_factors, calibration_ids, quantize_model,
                         smoothing_factors)
from lm.requests import GenerationRequest
from lm.sampling import SamplingParams
from lm.engine import EngineConfig

PROMPTS = [
    "The history of the printing press begins",
    "Explain how a refrigerator works in simple terms:",
    "Once upon a time, in a village at the edge of the forest,",
]


def test_int8_linear_matches_its_dequantised_weights():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    layer = Int8Linear(weight)
    dequantised = layer.weight.float() * layer.scales.float()[:, None]
    assert (dequantised - weight).abs().max() <= layer.scales.float().max() * 0.51  # round-to-nearest
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, dequantised)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    # activations go through bf16 in the CPU kernel
    assert torch.allclose(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_int8_dynamic_linear_is_the_int8_product_of_quantised_activations():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(3, 5, 64)
    outlier = x.clone()
    outlier[0, 0, 7] = 40.0  # one token with an outlier channel, as Gemma 3's activations have
    errors = {}
    kinds = {"per token, fbgemm": dict(kernel="fbgemm"), "per token, int_mm": dict(kernel="int_mm"),
             "per tensor": dict(per_token=False)}
    for kind, options in kinds.items():
        layer = Int8DynamicLinear(weight, bias, **options)
        dequantised = layer.int8_weight().float() * layer.scales.float()[:, None]
        for name, inputs in (("plain", x), ("outlier", outlier)):
            expected = F.linear(inputs, dequantised, bias)
            out = layer(inputs)
            assert out.shape == (3, 5, 96) and out.dtype == torch.float32
            errors[kind, name] = ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).flatten()  # per token
        if options.get("kernel") == "int_mm":  # int8 x int8 -> int32 is exact: the layout (int_mm_layout) changes nothing
            other = copy.deepcopy(layer)
            other.weight = layer.weight.t().contiguous().t() if layer.weight.is_contiguous() else layer.weight.contiguous()
            assert other.weight.stride() != layer.weight.stride() and torch.equal(other(x), layer(x))
        if options.get("kernel") == "fbgemm":  # the weights live in fbgemm's packed copy only
            assert layer.weight is None and torch.equal(layer.int8_weight(), Int8DynamicLinear(weight, kernel="int_mm").weight.contiguous())
    for kind in kinds:
        assert errors[kind, "plain"].max() < 0.03  # 8-bit activations (7-bit without VNNI)
    # Per token, the outlier costs only its own row; one scale for the whole tensor spreads it to every row.
    for kind in ("per token, fbgemm", "per token, int_mm"):
        assert errors[kind, "outlier"][1:].max() < 0.03 < errors["per tensor", "outlier"][1:].max()
    # The two per-token kernels quantise alike: within the rounding of one activation step of each other.
    assert (errors["per token, fbgemm", "plain"] - errors["per token, int_mm", "plain"]).abs().max() < 0.01


def test_per_token_fbgemm_quantises_each_row_over_its_own_range():
    """Rows that lean to one side (all positive, as after an activation) waste half of a symmetric
    int8 range; the fbgemm kernel maps each row's [min, max] onto the whole uint8 range, which halves
    the step here (the product's error falls with it), and the row offset comes back exactly."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(8, 64) + 3.0  # every row in roughly [0.5, 5.5]
    errors = {}
    for kernel in ("fbgemm", "int_mm"):
        layer = Int8DynamicLinear(weight, bias, kernel=kernel)
        expected = F.linear(x, layer.int8_weight().float() * layer.scales.float()[:, None], bias)
        errors[kernel] = float((layer(x) - expected).norm() / expected.norm())
    # without VNNI fbgemm takes 7-bit activations (reduce_range): a coarser grid, finer only than half the range
    assert errors["fbgemm"] < (0.7 if quantize._HAS_VNNI else 1.0) * errors["int_mm"]
    constant = torch.full((2, 64), 2.5)  # zero width: the offset alone
    layer = Int8DynamicLinear(weight, bias, kernel="fbgemm")
    expected = F.linear(constant, layer.int8_weight().float() * layer.scales.float()[:, None], bias)
    assert torch.allclose(layer(constant), expected, rtol=1e-5, atol=1e-4)


def test_a_row_that_is_not_finite_spoils_only_itself():
    """Rows of one step come from different requests: fbgemm's single range over the tensor must not let
    one request's NaN or inf change another's output."""
    torch.manual_seed(0)
    layer = Int8DynamicLinear(torch.randn(32, 64), torch.randn(32), kernel="fbgemm")
    x = torch.randn(4, 64)
    clean = layer(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = x.clone()
        spoiled[2, 5] = bad
        out = layer(spoiled)
        assert not torch.isfinite(out[2]).any()
        assert torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])


def test_an_fbgemm_layer_moved_off_the_cpu_gets_its_int8_weights_back():
    layer = Int8DynamicLinear(torch.randn(32, 64), kernel="fbgemm")
    expected = layer.int8_weight()
    layer.to("meta")  # any device other than the CPU takes the dequantising path, which needs the weights
    assert layer.weight is not None and layer.weight.device.type == "meta" and layer.weight.shape == expected.shape
    assert layer._packed is None


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    """An input channel 60x larger than the rest in every token (Gemma 3's activations have such
    channels) spends most of each token's int8 range; SmoothQuant's factors from the activations' range
    give the same product (W diag(s) times x / s) with several times less error."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64) / 8
    x = torch.randn(4, 7, 64)
    x[..., 5] *= 60.0
    expected = F.linear(x, weight)
    ranges = x.reshape(-1, 64).abs().amax(0)
    ranges[9] = 0.0  # a channel calibration never drove: floored, so its later activations stay in range
    plain = Int8DynamicLinear(weight)
    smoothed = Int8DynamicLinear(weight, smoothing=smoothing_factors(weight, ranges))
    errors = [float((layer(x) - expected).norm() / expected.norm()) for layer in (plain, smoothed)]
    assert errors[1] < 0.02 and errors[1] < errors[0] / 2, errors
    assert smoothing_factors(weight, None) is None


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4"])
def test_channels_calibration_barely_drove_cannot_swamp_the_later_tokens(scheme):
    """Most input channels read 0 during calibration and all carry input later: the floor (a tenth of
    the driven channels' median range) keeps the smoothed layer near the plain one's error."""
    torch.manual_seed(0)
    weight = torch.randn(64, 64) / 8
    ranges = torch.rand(64) + 0.5
    ranges[:40] = 0.0
    x = torch.randn(6, 64)
    expected = F.linear(x, weight)
    if scheme == "int4":
        layers = Int4Linear(weight), Int4Linear(weight, smoothing=awq_factors(ranges))
    else:
        layers = Int8DynamicLinear(weight), Int8DynamicLinear(weight, smoothing=smoothing_factors(weight, ranges))
    plain, smoothed = [float((layer(x) - expected).norm() / expected.norm()) for layer in layers]
    assert smoothed < 3 * plain, (plain, smoothed)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4"])
def test_the_per_layer_search_keeps_the_candidate_with_the_smallest_output_error(scheme):
    """quantize_model builds one layer per migration strength (SMOOTHING_ALPHAS / INT4_AWQ_ALPHAS) and
    keeps the one whose output on the layer's calibration inputs is closest to the float layer's; with an
    outlier channel, that beats leaving the layer unscaled."""
    from lm.quantize import INT4_AWQ_ALPHAS, SMOOTHING_ALPHAS, best_on

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(24, 64)
    x[:, 5] *= 60.0
    ranges = x.abs().amax(0)
    if scheme == "int4":
        factors = [None if a == 0 else awq_factors(ranges, a) for a in INT4_AWQ_ALPHAS]
        build = lambda w, b, s: Int4Linear(w, b, smoothing=s)  # noqa: E731
    else:
        factors = [None if a is None else smoothing_factors(linear.weight, ranges, a) for a in SMOOTHING_ALPHAS]
        build = lambda w, b, s: Int8DynamicLinear(w, b, smoothing=s)  # noqa: E731
    with torch.no_grad():
        expected = linear(x)
        errors = [float((build(linear.weight, linear.bias, s)(x) - expected).square().sum()) for s in factors]
        chosen = float((best_on(x, linear, factors, build)(x) - expected).square().sum())
    assert chosen == min(errors) < errors[0]  # errors[0]: unscaled


def test_empty_calibration_ids_are_refused_by_name():
    with pytest.raises(ValueError, match="calibration_ids is empty"):
        quantize_model(torch.nn.Module(), "int8-dynamic", calibration_ids=[])


def test_calibration_ids_outside_the_vocabulary_are_refused_by_name():
    from types import SimpleNamespace

    model = torch.nn.Module()
    model.config = SimpleNamespace(vocab_size=100)
    for ids in ([5, 100], [-1], [3.0]):
        with pytest.raises(ValueError, match=r"are not token ids of this model \(0 to 99\)"):
            quantize_model(model, "int8-dynamic", calibration_ids=ids)


def test_activation_aware_int4_scales_protect_the_channels_that_carry_large_activations():
    """int4 rounds every weight of a group alike; scaling the columns of channels with large activations
    up (and their inputs down: the same product) before quantising (AWQ) cuts the error those channels
    cause. Here 4 of 64 channels carry 20x the activations."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64) / 8
    x = torch.randn(4, 7, 64)
    x[..., [3, 17, 40, 51]] *= 20.0
    expected = F.linear(x, weight)
    plain = Int4Linear(weight)
    scaled = Int4Linear(weight, smoothing=awq_factors(x.reshape(-1, 64).abs().amax(0)))
    errors = [float((layer(x) - expected).norm() / expected.norm()) for layer in (plain, scaled)]
    assert errors[1] < errors[0] * 0.75, errors
    assert awq_factors(None) is None


def test_calibration_records_every_projection_input_range(embedded_270m):
    from lm.quantize import calibration_inputs

    model = embedded_270m.model
    ids = calibration_ids(embedded_270m.tokenizer)
    inputs = calibration_inputs(model, ids)
    assert all(x.shape[0] == len(ids) for x in inputs.values())  # every token's input, dense layers
    ranges = {module: x.abs().amax(dim=0) for module, x in inputs.items()}
    linears = [module for module in model.layers.modules() if isinstance(module, torch.nn.Linear)]
    assert len(ranges) - 1 == len(linears) == 4 * len(model.layers)  # qkv, o, gate_up, down per layer; the head
    for module in linears:
        values = ranges[module]
        assert values.shape == (module.in_features,) and bool(torch.isfinite(values).all()) and float(values.max()) > 0
    # what the head reads: the final hidden states of the same forward
    from lm.attention import FullAttention

    positions = torch.arange(len(ids))[None]
    with torch.inference_mode():
        hidden = model(torch.tensor(ids)[None], positions, FullAttention(model.config, positions))[0]
    torch.testing.assert_close(inputs[model], hidden.float(), rtol=0, atol=0)


def test_int4_linear_matches_its_dequantised_weights():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    layer = Int4Linear(weight, bias, group_size=32)
    dequantised = layer.dequantized()
    scales = layer.scales_and_zeros[..., 0].float().T.repeat_interleave(32, dim=1)  # (96, 128)
    assert ((dequantised - weight).abs() <= 0.51 * scales + 1e-2 * weight.abs()).all()  # nearest of 16 levels
    x = torch.randn(4, 128)
    expected = F.linear(x, dequantised, bias)
    assert torch.allclose(layer(x), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())  # bf16 x
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(torch.randn(16, 48))
    with pytest.raises(ValueError, match=r"output size \(40\) to be a multiple of 16"):
        Int4Linear(torch.randn(40, 64))


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="int3"):
        quantize_model(torch.nn.Module(), "int3")


@pytest.fixture(scope="module")
def int8_model(embedded_270m):
    return quantize_model(copy.deepcopy(embedded_270m.model), "int8")


# Measured on the 270M over 8 prompts x 64 tokens (`tessera bench lm`'s accuracy): int8 98.0% / 0.9994,
# int8-dynamic (smoothed per layer and head, as lm.runtime loads it) 97.3% / 0.9979, int4 (activation-aware,
# per layer; smoothed int8 head) 91.8% / 0.9876; the floors below leave room for these 3 prompts' spread.
FLOORS = {"int8": (0.9, 0.99), "int8-dynamic": (0.9, 0.995), "int4": (0.8, 0.98)}


@pytest.fixture(scope="module")
def fp32_reference(embedded_270m):
    """Per prompt: (prompt ids, the engine's 64 greedy fp32 tokens, fp32 logits along them (64, vocab))."""
    lm = embedded_270m
    engine = lm.engine(EngineConfig(max_seq_len=256, kv_budget_bytes=1 << 28, max_batch=1, stop_token_ids=()))
    reference = []
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        generated = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=64))).token_ids
        logits = _teacher_forced_logits(lm, lm.model, ids, generated)
        assert logits.argmax(-1).tolist() == generated  # the fp32 recompute is the engine's output
        reference.append((ids, generated, logits))
    return reference


def _teacher_forced_logits(lm, model, ids: list[int], generated: list[int]) -> torch.Tensor:
    sequence = torch.tensor(ids + generated[:-1])[None]
    positions = torch.arange(sequence.shape[1])[None]
    with torch.inference_mode():
        return model.logits(model(sequence, positions, FullAttention(lm.config, positions))[0, len(ids) - 1:])


@pytest.mark.parametrize("scheme", sorted(FLOORS))
def test_greedy_agrees_with_fp32_and_logits_stay_close(embedded_270m, int8_model, fp32_reference, scheme):
    """Along fp32's own 64 greedy tokens (teacher forcing), the quantised model picks the same token at
    most positions and its logits keep a high cosine with fp32's (FLOORS)."""
    quantized = int8_model if scheme == "int8" else quantize_model(
        copy.deepcopy(embedded_270m.model), scheme, calibration_ids=calibration_ids(embedded_270m.tokenizer))
    agree, mean_cosine = _agreement(embedded_270m, quantized, fp32_reference)
    agreement, cosine = FLOORS[scheme]
    assert agree >= agreement
    assert mean_cosine >= cosine


def _agreement(lm, model, fp32_reference) -> tuple[float, float]:
    """(greedy agreement with fp32, mean logits cosine) of `model` along fp32's tokens (teacher forcing)."""
    agree = total = 0
    cosines = []
    for ids, generated, fp32_logits in fp32_reference:
        logits = _teacher_forced_logits(lm, model, ids, generated)
        agree += int((fp32_logits.argmax(-1) == logits.argmax(-1)).sum())
        total += len(generated)
        cosines += F.cosine_similarity(fp32_logits, logits, dim=-1).tolist()
    return agree / total, sum(cosines) / len(cosines)


def test_the_decode_kernel_agrees_with_fp32_at_least_as_well(embedded_270m, fp32_reference):
    """int8-dynamic's layers and head at decode's few rows run lm.matvec (16-bit activations, each row its
    own range): forced onto every row of the teacher-forced pass, it keeps the floors, and its logits are
    no further from fp32's than those of fbgemm's 8-bit activations (the path the test above measures)."""
    quantized = quantize_model(copy.deepcopy(embedded_270m.model), "int8-dynamic",
                               calibration_ids=calibration_ids(embedded_270m.tokenizer))
    layers = [module for module in quantized.modules() if isinstance(module, Int8DynamicLinear)]
    results = {}
    for kernel, rows in (("fbgemm", 0), ("matvec", 1 << 20)):
        for layer in layers:
            layer.set_matvec_rows(rows)
        results[kernel] = _agreement(embedded_270m, quantized, fp32_reference)
    agreement, cosine = FLOORS["int8-dynamic"]
    assert results["matvec"][0] >= agreement and results["matvec"][1] >= max(cosine, results["fbgemm"][1])


def test_int8_model_shares_one_int8_table_for_embedding_and_head(embedded_270m, int8_model):
    def stored_bytes(module):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(module.parameters()) + list(module.buffers())}
        return sum(storages.values())

    assert int8_model.embed_tokens.table is int8_model.lm_head
    # no float copy of the 262,144 x 640 table is kept: about a quarter of the fp32 model's bytes
    assert stored_bytes(int8_model) < 0.3 * stored_bytes(embedded_270m.model)
    ids = torch.tensor([[2, 651, 5279, 529]])
    expected = embedded_270m.model.embed_tokens(ids)
    rows = int8_model.embed_tokens(ids)
    assert rows.dtype == torch.float32
    assert (rows - expected).abs().max() <= int8_model.lm_head.scales.float().max()  # one quantisation step


def test_a_smoothed_head_table_still_embeds_the_original_rows():
    """A tied head smoothed like the projections stores W diag(s); the embedding lookup sharing that table
    divides s back out, so each value stays within half a quantisation step (of its row, per channel)."""
    from lm.quantize import Int8Embedding

    torch.manual_seed(0)
    weight = torch.randn(64, 32) * 0.05
    smoothing = torch.rand(32) * 4 + 0.25
    head = Int8DynamicLinear(weight, per_token=False, smoothing=smoothing)
    ids = torch.tensor([[0, 5, 63, 5]])
    rows = Int8Embedding(head, torch.float32)(ids)  # (1, 4, 32)
    half_step = head.scales.float()[ids][..., None] / smoothing / 2
    assert bool(((rows - weight[ids]).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
    x = torch.randn(3, 32)
    torch.testing.assert_close(head(x), x @ weight.T, rtol=0.05, atol=0.02)  # the head itself still computes x W^T


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int4"])
def test_each_output_row_is_quantised_on_its_own(scheme):
    """What the search's row subset rests on (best_on compares candidates on SEARCH_ROWS rows): a layer
    built from some rows of a weight gives exactly those rows of the whole layer's output."""
    from lm.quantize import SEARCH_ROWS, best_on

    torch.manual_seed(0)
    weight, x = torch.randn(SEARCH_ROWS + 208, 64) / 8, torch.randn(9, 64)
    x[:, 3] *= 30.0
    smoothing = smoothing_factors(weight, x.abs().amax(0), 0.5)
    build = (lambda w, b, s: Int4Linear(w, b, smoothing=s)) if scheme == "int4" else \
        (lambda w, b, s: Int8DynamicLinear(w, b, smoothing=s))  # noqa: E731
    rows = torch.tensor([0, 5, 77, 300, SEARCH_ROWS + 207] + list(range(100, 111)))  # 16: int4 packs rows by 16
    with torch.no_grad():
        assert torch.equal(build(weight, None, smoothing)(x)[:, rows], build(weight[rows], None, smoothing)(x))
        linear = torch.nn.Linear(64, SEARCH_ROWS + 208, bias=False)
        linear.weight.copy_(weight)
        chosen = best_on(x, linear, [None, smoothing], build)
        errors = [float((build(weight, None, s)(x) - linear(x)).square().sum()) for s in (None, smoothing)]
        assert float((chosen(x) - linear(x)).square().sum()) == min(errors)
