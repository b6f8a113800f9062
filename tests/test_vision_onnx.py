"""ONNX Runtime backend: export with a dynamic batch, parity with torch, the export cache, int8."""

from __future__ import annotations

import pytest
import torch

import vision.onnx_backend as onnx_backend
from vision.encoder import EncoderOptions, VisionEncoder
from vision_checkpoints import with_random_projector


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir, tmp_path_factory):
    return with_random_projector(tiny_vlm_dir, tmp_path_factory.mktemp("tiny-vlm-proj"))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def tiles():
    return torch.rand(3, 3, 896, 896, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def torch_soft_tokens(vlm_dir, tiles):
    return VisionEncoder.from_checkpoint(vlm_dir).encode(tiles)


def test_onnx_matches_torch_with_dynamic_batch(vlm_dir, onnx_cache, tiles, torch_soft_tokens):
    # max_batch=2 over 3 tiles runs batches of 2 and 1: the exported batch axis must be dynamic.
    options = EncoderOptions(backend="onnx", max_batch=2, onnx_cache_dir=onnx_cache)
    soft_tokens = VisionEncoder.from_checkpoint(vlm_dir, options).encode(tiles)
    assert soft_tokens.shape == torch_soft_tokens.shape and soft_tokens.dtype == torch.float32
    torch.testing.assert_close(soft_tokens, torch_soft_tokens, atol=1e-3, rtol=0)


def test_exported_model_is_reused(vlm_dir, onnx_cache, tiles, torch_soft_tokens, monkeypatch):
    VisionEncoder.from_checkpoint(vlm_dir, EncoderOptions(backend="onnx", onnx_cache_dir=onnx_cache))

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cached file exists")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    encoder = VisionEncoder.from_checkpoint(vlm_dir, EncoderOptions(backend="onnx", onnx_cache_dir=onnx_cache))
    torch.testing.assert_close(encoder.encode(tiles[:1]), torch_soft_tokens[:1], atol=1e-3, rtol=0)
    assert len(list(onnx_cache.glob("*-fp32.onnx"))) == 1


def test_int8_is_close_to_fp32(vlm_dir, onnx_cache, tiles, torch_soft_tokens):
    options = EncoderOptions(backend="onnx", int8=True, onnx_cache_dir=onnx_cache)
    encoder = VisionEncoder.from_checkpoint(vlm_dir, options)
    soft_tokens = encoder.encode(tiles)
    cosine = torch.nn.functional.cosine_similarity(soft_tokens, torch_soft_tokens, dim=-1)  # per token
    assert cosine.mean() >= 0.99
    assert not torch.equal(soft_tokens, torch_soft_tokens)  # it really is a different (quantised) model
    assert encoder.identity.endswith("-int8")


@pytest.mark.parametrize(
    "options",
    [
        dict(backend="onnx", dtype=torch.bfloat16),
        dict(backend="torch", int8=True),
        dict(backend="tensorrt"),
    ],
)
def test_invalid_backend_options_are_refused(options):
    with pytest.raises(ValueError):
        EncoderOptions(**options)
